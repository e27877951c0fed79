"""Every knob of a run, with its type, meaning and the paper's value as default.

A run is fully described by a `Config`; its JSON is saved next to every checkpoint.
Profiles are named sets of overrides (smoke for tests, quick for a laptop, paper for the
paper's protocol).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from . import FmpaperError

VARIANTS = ("sasrec", "cl4srec", "duorec_unsup", "duorec_sup", "duorec_supunsup")


@dataclass
class Config:
    # --- what is trained
    variant: str = "sasrec"          # one of VARIANTS: the training objective (table rows 1-5)
    dataset: str = "ml-100k"         # "ml-100k", "ml-1m" or a path to a RecBole .inter file
    profile: str = "quick"           # name of the profile the overrides came from
    seed: int = 0                    # seeds torch, numpy and every sampler of the run
    max_users: int = 0               # >0: keep only the first N users (by id) after 5-core (smoke)
    # --- data (book chapter "The data", notebooks/data.ipynb)
    min_count: int = 5               # iterative k-core threshold for users and items
    max_len: int = 50                # MAX_ITEM_LIST_LENGTH: inputs are the last max_len items
    # --- SASRec backbone (book/models.md)
    hidden: int = 64                 # embedding / hidden size d
    n_layers: int = 2                # transformer blocks
    n_heads: int = 2                 # attention heads
    inner: int = 256                 # feed-forward inner size
    dropout: float = 0.5             # hidden dropout (embeddings, attention output, FFN)
    attn_dropout: float = 0.5        # dropout on attention probabilities
    ln_eps: float = 1e-12            # LayerNorm epsilon
    init_std: float = 0.02           # N(0, init_std) init of embeddings and linear weights
    # --- optimisation
    lr: float = 1e-3                 # Adam learning rate (no weight decay)
    batch_size: int = 256            # training batch
    epochs: int = 50                 # maximum epochs
    patience: int = 10               # early stopping: epochs without better valid NDCG@10
    group_by_length: bool = True     # batch examples of similar length so padding can be trimmed
    eval_batch: int = 1024           # sequences scored at once in evaluation
    # --- contrastive objectives (issue 3; paper values)
    cl_weight: float = 0.1           # weight of every InfoNCE term
    cl_temperature: float = 1.0      # InfoNCE temperature (dot-product similarity / tau)
    crop_eta: float = 0.6            # CL4SRec crop: share of items kept
    mask_gamma: float = 0.3          # CL4SRec mask: share of items replaced by the mask token
    reorder_beta: float = 0.6        # CL4SRec reorder: share of the sequence shuffled
    cl4srec_ce: bool = True          # False: CL4SRec trained on InfoNCE alone (authors' later commit)
    supunsup_mode: str = "both"      # "both": unsup. + sup. terms; "duorec": dropout view vs semantic view
    cl4srec_inplace: bool = False    # True: mask and reorder views overwrite the stored training inputs,
                                     #   persistently across epochs, as the authors' code did (book
                                     #   chapter "How the paper's numbers arose")
    # --- where training starts and which epoch a run keeps
    init_from: str = ""              # "": fresh initialisation; else a row name (same dataset, profile
                                     #   and seed) or a finished run directory to start from
    select: str = "best"             # "best": keep the epoch of best validation NDCG@10; "last": the
                                     #   last epoch (the authors' post-merge fine-tuning)
    # --- where it runs
    device: str = "auto"             # "auto" (cuda when present), "cpu" or "cuda"

    def validate(self) -> "Config":
        if self.variant not in VARIANTS:
            raise FmpaperError(f"unknown variant {self.variant!r}; choose one of {', '.join(VARIANTS)}")
        for name in ("crop_eta", "mask_gamma", "reorder_beta", "dropout", "attn_dropout"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise FmpaperError(f"{name} must lie in [0, 1], got {v}")
        if self.cl_weight < 0:
            raise FmpaperError(f"cl_weight must be >= 0, got {self.cl_weight}")
        if self.cl_temperature <= 0:
            raise FmpaperError(f"cl_temperature must be > 0, got {self.cl_temperature}")
        if not self.lr > 0:
            raise FmpaperError(f"lr must be > 0, got {self.lr}")
        if self.select not in ("best", "last"):
            raise FmpaperError(f"select must be 'best' or 'last', got {self.select!r}")
        if self.cl4srec_inplace and self.variant != "cl4srec":
            raise FmpaperError(f"cl4srec_inplace applies to variant cl4srec, not {self.variant}")
        if self.supunsup_mode not in ("both", "duorec"):
            raise FmpaperError(f"supunsup_mode must be 'both' or 'duorec', got {self.supunsup_mode!r}")
        for name in ("max_len", "hidden", "n_layers", "n_heads", "inner", "batch_size", "epochs", "patience"):
            if getattr(self, name) <= 0:
                raise FmpaperError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.hidden % self.n_heads:
            raise FmpaperError(f"hidden ({self.hidden}) must be divisible by n_heads ({self.n_heads})")
        return self

    def identity(self) -> dict:
        """What names a cached run: every field, except that a field of LATER_FIELDS is left out
        while it holds its default (so adding a field keeps every run cached before it)."""
        d = dataclasses.asdict(self)
        defaults = Config()
        return {k: v for k, v in d.items() if not (k in LATER_FIELDS and v == getattr(defaults, k))}

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise FmpaperError(f"unknown config field(s): {', '.join(sorted(unknown))}")
        return cls(**d).validate()


# Fields added after runs were first cached; see Config.identity.
LATER_FIELDS: frozenset = frozenset({"cl4srec_inplace", "init_from", "select"})

# Overrides applied on top of the defaults (which are the paper's protocol); "datasets" holds
# further overrides for one named dataset under that profile.
PROFILES: dict[str, dict] = {
    # tiny deterministic ML-100K subset, one epoch: for tests and CI
    "smoke": dict(dataset="ml-100k", max_users=60, epochs=1, patience=1, batch_size=128),
    # ML-100K, paper architecture, few epochs: a laptop reproduction. An ML-1M epoch is ten times
    # the steps of an ML-100K one: there 2 epochs reach a share of SASRec's best validation
    # NDCG@10 over 8 epochs (89%) like the one 4 epochs reach on ML-100K (87%), where 1 reaches
    # 77% (`fmpaper curve`, seed 0; the data pages plot both curves)
    "quick": dict(dataset="ml-100k", epochs=4, patience=4, datasets={"ml-1m": dict(epochs=2, patience=2)}),
    # the paper's full protocol (50 epochs, patience 10); meant for ML-1M on a GPU
    "paper": dict(dataset="ml-1m"),
}


def make_config(profile: str = "quick", **overrides) -> Config:
    """Defaults <- profile <- the profile's settings for the chosen dataset (its "datasets"
    entry) <- explicit overrides (None values are ignored)."""
    if profile not in PROFILES:
        raise FmpaperError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    values = {k: v for k, v in PROFILES[profile].items() if k != "datasets"}
    values["profile"] = profile
    explicit = {k: v for k, v in overrides.items() if v is not None}
    values.update(PROFILES[profile].get("datasets", {}).get(explicit.get("dataset", values.get("dataset")), {}))
    values.update(explicit)
    return Config.from_dict(values)
