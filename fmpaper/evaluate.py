"""The paper's three evaluation modes, under the authors' protocol and a corrected one.

Modes (test split, one target per user): FULL ranks the target among all items; uni100 and
pop100 rank it among 100 sampled negatives (uniformly / by popularity). Metrics: HR@K and
NDCG@K = 1 / log2(rank + 2) for rank < K (rank 0 = first), averaged over users.

Protocols (book chapter "How the protocols differ", notebooks/protocols.ipynb):
  as-run     what the authors' code computed, side effects included (book chapter "How the
             paper's numbers arose"). Their evaluation sampler keeps one shuffled candidate list
             and gives each user, in turn, the next 100 entries of it (target and history allowed).
             uni100: the list is every item. pop100: the list is the item column of the
             interaction table itself, and shuffling it in place reorders the data the test
             histories and targets are then read from, so every history and target becomes a
             random draw of items by popularity. FULL as under `paper`.
  paper      the authors' sampling rules without that side effect: FULL does not mask the
             user's history; negatives are drawn with replacement and may be the target itself
             or items of the history; pop100 draws from the list of all interactions (train +
             valid + test), so popular items recur. A negative that ties the target (e.g.
             the target drawn as its own negative) counts as ranked above it.
  corrected  negatives exclude every item of the user, are distinct, drawn uniformly or in
             proportion to item counts; FULL may mask the history (`mask_history`).
All three are seeded here (the authors' sampler was not), so every number can be re-run.
"""
from __future__ import annotations

import dataclasses

import torch

from . import FmpaperError
from .data import SeqData
from .model import SASRec, trim

MODES = ("full", "uni100", "pop100")
PROTOCOLS = ("as-run", "paper", "corrected")


@torch.no_grad()
def scores(model: SASRec, data: SeqData, split: str, batch: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of every item for every user's valid/test input: (U, n_items), and targets (U,)."""
    model.eval()
    device = next(model.parameters()).device
    target_idx = data.eval_targets(split)
    users = torch.arange(data.n_users)
    out, targets = [], []
    for part in users.split(batch):
        seq, lengths, target = data.inputs(target_idx[part], part)
        h = model.encode(trim(seq, lengths).to(device), lengths.to(device))
        out.append(model.logits(h).float().cpu())
        targets.append(target)
    return torch.cat(out), torch.cat(targets)


def user_item_mask(data: SeqData, upto: torch.Tensor | None = None) -> torch.Tensor:
    """(U, n_items + 1) bool: item i occurs among the user's interactions (before flat index `upto`)."""
    user = torch.repeat_interleave(torch.arange(data.n_users), data.offsets.diff())
    keep = torch.ones(len(data.items), dtype=torch.bool)
    if upto is not None:
        keep = torch.arange(len(data.items)) < upto[user]
    m = torch.zeros(data.n_users, data.n_items + 1, dtype=torch.bool)
    m[user[keep], data.items[keep]] = True
    return m


def sample_negatives(data: SeqData, mode: str, protocol: str, n: int = 100, seed: int = 0) -> torch.Tensor:
    """(U, n) negative item ids for uni100 ("uni") or pop100 ("pop")."""
    gen = torch.Generator().manual_seed(seed)
    U, V = data.n_users, data.n_items
    if protocol == "paper":
        if mode == "uni":
            return torch.randint(1, V + 1, (U, n), generator=gen)
        pick = torch.randint(0, len(data.items), (U, n), generator=gen)  # a random interaction's item
        return data.items[pick]
    weights = torch.ones(U, V + 1) if mode == "uni" else data.item_counts().double().expand(U, V + 1).clone()
    weights[:, 0] = 0
    weights[user_item_mask(data)] = 0
    eligible = (weights > 0).sum(1)
    if int(eligible.min()) < n:
        u = int(eligible.argmin())
        raise FmpaperError(f"{data.name}: the corrected protocol draws {n} items a user never interacted with; "
                           f"user {data.user_tokens[u]} has only {int(eligible[u])}")
    return torch.multinomial(weights, n, replacement=False, generator=gen)


def shuffled_items(data: SeqData, seed: int) -> SeqData:
    """A copy of `data` whose item column (every interaction, users in turn, each in time order)
    is randomly permuted: what the authors' popularity sampler left behind. `data` is untouched."""
    gen = torch.Generator().manual_seed(seed)
    return dataclasses.replace(data, items=data.items[torch.randperm(len(data.items), generator=gen)])


def block_negatives(candidates: torch.Tensor, n_users: int, n: int = 100) -> torch.Tensor:
    """(U, n): user u gets entries u*n .. u*n + n - 1 of the candidate list, wrapping around, as
    the authors' sampler handed out consecutive blocks of one shuffled list."""
    idx = torch.arange(n_users)[:, None] * n + torch.arange(n)           # (U, n)
    return candidates[idx % len(candidates)]


@dataclasses.dataclass
class Comparison:
    """What one mode's rank counts: the target's score against its candidates'. The rank is the
    number of candidates above the target; `ties_above` counts a tie as above (the paper's rule).
    A candidate that is the target item itself compares equal on any machine, so it is marked."""
    candidates: torch.Tensor       # (U, n) scores of the candidates
    target: torch.Tensor           # (U, 1) score of the target
    is_target: torch.Tensor        # (U, n) bool: the candidate is the target item
    ties_above: bool

    def rank(self) -> torch.Tensor:
        above = self.candidates >= self.target if self.ties_above else self.candidates > self.target
        return above.sum(1)

    def rank_bounds(self, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The least and the greatest rank (U,) each user's target can take when every score may
        move by `eps`: candidates further than `eps` above count surely, those within `eps` maybe.
        Another processor's rounding moves scores by about a millionth (see TIE_EPS)."""
        gap = self.candidates - self.target
        tie = torch.tensor(self.ties_above)
        return (torch.where(self.is_target, tie, gap > eps).sum(1),
                torch.where(self.is_target, tie, gap >= -eps).sum(1))


def _all_items(s: torch.Tensor, target: torch.Tensor, candidates: torch.Tensor | None = None) -> Comparison:
    """The target (U,) against every item, scored by s (U, n_items); `candidates` replaces s as
    the candidates' scores (the history masked). Ties do not count: the target never ranks itself."""
    col = (target - 1)[:, None]
    return Comparison(s if candidates is None else candidates, s.gather(1, col),
                      torch.zeros_like(s, dtype=torch.bool).scatter_(1, col, True), ties_above=False)


def _sampled(s: torch.Tensor, target: torch.Tensor, neg: torch.Tensor, ties_above: bool) -> Comparison:
    """The target (U,) against 100 sampled negatives (U, 100), item ids, scored by s (U, n_items)."""
    return Comparison(s.gather(1, neg - 1), s.gather(1, (target - 1)[:, None]), neg == target[:, None], ties_above)


def as_run_pop100(model: SASRec, data: SeqData, seed: int, split: str = "test") -> Comparison:
    """pop100 as the authors' code computed it: histories, targets and negatives all read from
    the shuffled item column."""
    shuffled = shuffled_items(data, seed)
    s, target = scores(model, shuffled, split)
    return _sampled(s, target, block_negatives(shuffled.items, data.n_users), ties_above=True)  # the list itself


def comparisons(model: SASRec, data: SeqData, protocol: str = "paper", seed: int = 0,
                mask_history: bool = False, split: str = "test") -> dict[str, Comparison]:
    """What each mode's rank compares: {"full", "uni100", "pop100"}: Comparison."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}")
    s, target = scores(model, data, split)
    col = (target - 1)[:, None]                                           # column of the target
    full_scores = s
    if mask_history:
        hist = user_item_mask(data, upto=data.eval_targets(split))[:, 1:]
        hist.scatter_(1, col, False)
        full_scores = s.masked_fill(hist, float("-inf"))
    out = {"full": _all_items(s, target, full_scores)}
    if protocol == "as-run":
        gen = torch.Generator().manual_seed(seed)
        items = torch.randperm(data.n_items, generator=gen) + 1          # the shuffled list of all items
        out["uni100"] = _sampled(s, target, block_negatives(items, data.n_users), ties_above=True)
        out["pop100"] = as_run_pop100(model, data, seed + 1, split)
        return out
    for mode, key in (("uni", "uni100"), ("pop", "pop100")):
        neg = sample_negatives(data, mode, protocol, seed=seed + (0 if mode == "uni" else 1))
        out[key] = _sampled(s, target, neg, ties_above=protocol == "paper")
    return out


def ranks(model: SASRec, data: SeqData, protocol: str = "paper", seed: int = 0,
          mask_history: bool = False, split: str = "test") -> dict[str, torch.Tensor]:
    """0-based rank of each user's target in each mode: {"full": (U,), "uni100": (U,), "pop100": (U,)}."""
    return {mode: c.rank() for mode, c in comparisons(model, data, protocol, seed, mask_history, split).items()}


def metrics_from_ranks(r: torch.Tensor, ks=(10, 20)) -> dict[str, float]:
    out = {}
    for k in ks:
        hit = r < k
        out[f"ndcg@{k}"] = float((hit / torch.log2(r.double() + 2)).mean())
        out[f"hr@{k}"] = float(hit.double().mean())
    return out


def ndcg(r: torch.Tensor, k: int = 10) -> torch.Tensor:
    """Per-user NDCG@k (U,), for paired comparisons."""
    return (r < k) / torch.log2(r.double() + 2)


def evaluate(model: SASRec, data: SeqData, protocol: str = "paper", seed: int = 0,
             mask_history: bool = False) -> dict[str, dict[str, float]]:
    """{"full": {"ndcg@10":..., "hr@10":..., "ndcg@20":..., "hr@20":...}, "uni100": ..., "pop100": ...}"""
    return {mode: metrics_from_ranks(r) for mode, r in ranks(model, data, protocol, seed, mask_history).items()}


def test_report(model: SASRec, data: SeqData, seed: int = 0) -> tuple[dict, dict[str, torch.Tensor]]:
    """Test metrics under both protocols, and every user's rank per "protocol.mode" (for paired
    comparisons between runs): ({protocol: {mode: metrics}}, {"paper.full": (U,), ...})."""
    metrics, all_ranks = {}, {}
    for protocol in PROTOCOLS:
        r = ranks(model, data, protocol, seed)
        metrics[protocol] = {mode: metrics_from_ranks(x) for mode, x in r.items()}
        all_ranks.update({f"{protocol}.{mode}": x for mode, x in r.items()})
    return metrics, all_ranks


def valid_comparison(model: SASRec, data: SeqData) -> Comparison:
    """The early-stopping ranking: each user's validation target among all items (history not masked)."""
    return _all_items(*scores(model, data, "valid"))


def valid_ndcg10(model: SASRec, data: SeqData) -> float:
    """Early-stopping criterion: validation NDCG@10 over all items (history not masked)."""
    return float(ndcg(valid_comparison(model, data).rank(), 10).mean())
