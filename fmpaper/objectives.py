"""Training objectives: cross-entropy plus the contrastive terms of CL4SRec and DuoRec.

Every variant trains the same SASRec encoder; a variant only decides which extra views of a
batch are encoded and which InfoNCE terms are added (book/models.md):

  sasrec           CE
  cl4srec          CE + w * InfoNCE(aug1(s), aug2(s))        (cl4srec_ce=False: InfoNCE alone)
  duorec_unsup     CE + w * InfoNCE(h(s), h'(s))             two dropout passes of s
  duorec_sup       CE + w * InfoNCE(h(s), h(s+))             s+ = another sequence, same target
  duorec_supunsup  CE + w * [InfoNCE(h, h') + InfoNCE(h, h(s+))]   (supunsup_mode="both")
                   CE + w * InfoNCE(h', h(s+))                     (supunsup_mode="duorec")

The views of a step go through the encoder in one call (one batch of B * views rows), so
dropout draws differ per view while the work stays one large batch; semantic positives get a
call of their own (see `Objective.__call__`).
Augmentations are batched tensor ops that return new tensors: the data is never modified.
The authors' code augmented the stored training sequences in place; `cl4srec_inplace`
reproduces that (`augment_inplace`, `Objective.stored`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import Config
from .data import SeqData
from .model import SASRec, trim


# ---------------------------------------------------------------- augmentations (CL4SRec)
def _positions(seq: torch.Tensor) -> torch.Tensor:
    return torch.arange(seq.shape[1], device=seq.device).expand_as(seq)   # (B, L)


def crop(seq, lengths, eta, gen):
    """Keep a random contiguous span of floor(eta * n) items (at least 1), moved to the front."""
    keep = torch.clamp((lengths * eta).floor().long(), min=1)
    start = (torch.rand(lengths.shape, generator=gen) * (lengths - keep + 1)).long()
    idx = start[:, None] + _positions(seq)
    out = torch.where(_positions(seq) < keep[:, None], seq.gather(1, idx.clamp(max=seq.shape[1] - 1)), 0)
    return out, keep


def mask(seq, lengths, gamma, mask_id, gen):
    """Replace floor(gamma * n) randomly chosen items (without replacement) by the mask token."""
    n_mask = (lengths * gamma).floor().long()
    real = _positions(seq) < lengths[:, None]
    keys = torch.where(real, torch.rand(seq.shape, generator=gen), 2.0)   # padding sorts last
    rank = keys.argsort(1).argsort(1)                                    # rank of each position
    return torch.where(rank < n_mask[:, None], mask_id, seq), lengths


def reorder(seq, lengths, beta, gen):
    """Shuffle a random span of floor(beta * n) items; everything outside it stays in place."""
    span = (lengths * beta).floor().long()
    start = (torch.rand(lengths.shape, generator=gen) * (lengths - span + 1)).long()
    pos = _positions(seq).float()
    inside = (pos >= start[:, None]) & (pos < (start + span)[:, None])
    # keys inside the span are random in [start, start + span): sorting permutes only the span
    keys = torch.where(inside, start[:, None] + torch.rand(seq.shape, generator=gen) * span[:, None], pos)
    return seq.gather(1, keys.argsort(1)), lengths


def draw_operators(lengths: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence's two distinct operators (0 crop, 1 mask, 2 reorder), an ordered pair drawn
    uniformly; -1 (no operator) for both where the sequence has a single item."""
    first = torch.randint(0, 3, lengths.shape, generator=gen)            # (B,)
    second = (first + torch.randint(1, 3, lengths.shape, generator=gen)) % 3   # never == first
    return tuple(torch.where(lengths > 1, o, -1) for o in (first, second))


def augment_pair(seq, lengths, cfg: Config, mask_id: int, gen: torch.Generator):
    """The two CL4SRec views of a batch. Each sequence gets two distinct operators out of crop,
    mask and reorder (an ordered pair drawn uniformly, as the authors' `random.sample(range(3),
    k=2)`); length-1 sequences stay as they are in both views."""
    ops = [crop(seq, lengths, cfg.crop_eta, gen), mask(seq, lengths, cfg.mask_gamma, mask_id, gen),
           reorder(seq, lengths, cfg.reorder_beta, gen)]
    views = []
    for choice in draw_operators(lengths, gen):
        out_seq, out_len = seq.clone(), lengths.clone()
        for i, (s, n) in enumerate(ops):
            pick = choice == i
            out_seq[pick], out_len[pick] = s[pick], n[pick]
        views.append((out_seq, out_len))
    return views


def augment_inplace(seq, lengths, cfg: Config, mask_id: int, gen: torch.Generator):
    """The two views as the authors' code produced them, and the stored sequences they leave.

    Their mask and reorder wrote into the stored training example (a view of it, not a copy),
    crop copied. Per example, with its two distinct operators applied in order to the stored
    sequence s0: the first turns s0 into s1 (unchanged by crop), the second s1 into s2. A crop
    view is the crop of the sequence it saw (s0 or s1); a mask or reorder view is the stored
    example itself, so it shows s2 when the batch is assembled (two in-place operators give two
    identical views). s2 is written back and is also what the CE term reads.
    Returns ([(view1, len1), (view2, len2)], s2)."""
    first, second = draw_operators(lengths, gen)

    def step(op, s):
        masked, _ = mask(s, lengths, cfg.mask_gamma, mask_id, gen)
        shuffled, _ = reorder(s, lengths, cfg.reorder_beta, gen)
        return torch.where((op == 1)[:, None], masked, torch.where((op == 2)[:, None], shuffled, s))

    crop0 = crop(seq, lengths, cfg.crop_eta, gen)
    s1 = step(first, seq)
    crop1 = crop(s1, lengths, cfg.crop_eta, gen)
    s2 = step(second, s1)
    views = []
    for op, (c_seq, c_len) in ((first, crop0), (second, crop1)):
        pick = op == 0
        views.append((torch.where(pick[:, None], c_seq, s2), torch.where(pick, c_len, lengths)))
    return views, s2


# ---------------------------------------------------------------- InfoNCE
def info_nce(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of N positive pairs (z1[i], z2[i]), each (N, d).
    Similarity = dot product / temperature; each of the 2N rows has its positive and the
    2N - 2 other rows as negatives."""
    n = z1.shape[0]
    z = torch.cat([z1, z2])                                              # (2N, d)
    sim = (z @ z.T) / temperature                                        # (2N, 2N)
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    positive = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(sim, positive)


# ---------------------------------------------------------------- semantic positives (DuoRec)
class SemanticPositives:
    """For a training example, another training example with the same target item, uniformly
    among them; an example whose target occurs once is its own positive."""

    def __init__(self, target_items: torch.Tensor):
        self.order = torch.argsort(target_items, stable=True)            # examples grouped by target
        sorted_t = target_items[self.order]
        first = torch.ones_like(sorted_t, dtype=torch.bool)
        first[1:] = sorted_t[1:] != sorted_t[:-1]
        group = torch.cumsum(first.long(), 0) - 1
        starts = torch.nonzero(first).squeeze(1)
        sizes = torch.bincount(group)
        self.where = torch.empty_like(self.order)                        # example -> slot in order
        self.where[self.order] = torch.arange(len(self.order))
        self.start = torch.empty_like(self.order)
        self.size = torch.empty_like(self.order)
        self.start[self.order] = starts[group]
        self.size[self.order] = sizes[group]

    def draw(self, ex: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        size, start = self.size[ex], self.start[ex]
        offset = self.where[ex] - start
        shift = 1 + (torch.rand(ex.shape, generator=gen) * (size - 1)).long()  # 1..size-1: never itself
        slot = torch.where(size > 1, (offset + shift) % size, offset)
        return self.order[start + slot]


# ---------------------------------------------------------------- the training objective
class Objective:
    """Loss of one training step for `cfg.variant`, on training examples `ex` (indices into
    the data's training targets). Returns a dict of scalar terms; "loss" is what is minimised."""

    def __init__(self, cfg: Config, data: SeqData):
        self.cfg, self.data = cfg, data
        self.targets, self.users = data.train_targets()
        # input length of every training example: its history before the target, at most max_len
        self.lengths = (self.targets - data.offsets[self.users]).clamp(max=cfg.max_len)   # (n_examples,)
        v = cfg.variant
        self.semantic = SemanticPositives(data.items[self.targets]) if v in ("duorec_sup", "duorec_supunsup") else None
        # cl4srec_inplace: every training example stored as its own row (as RecBole stores each
        # prefix), overwritten by its mask and reorder views; int32 halves the memory (ML-1M:
        # 981,491 x 50 -> 196 MB)
        self.stored = None
        if cfg.cl4srec_inplace:
            rows = [data.inputs(t, u)[0] for t, u in zip(self.targets.split(65536), self.users.split(65536))]
            self.stored = torch.cat(rows).to(torch.int32)                # (n_examples, L)

    def state(self) -> dict[str, torch.Tensor]:
        """What a resumed run needs besides the weights: the stored inputs when they change."""
        return {} if self.stored is None else {"stored": self.stored}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.stored is not None:
            self.stored = tensors["stored"].to(torch.int32)

    def mask_fraction(self, mask_id: int) -> float:
        """Share of the stored training positions that hold the mask token (0 when nothing is stored)."""
        if self.stored is None:
            return 0.0
        return float((self.stored == mask_id).sum()) / float(self.lengths.sum())

    @staticmethod
    def encode(model: SASRec, views: list) -> list[torch.Tensor]:
        """Encode several (seq, lengths) views in one call (dropout drawn independently per row)."""
        all_seq = torch.cat([s for s, _ in views])
        all_len = torch.cat([n for _, n in views])
        device = next(model.parameters()).device
        h = model.encode(trim(all_seq, all_len).to(device), all_len.to(device))
        return list(h.split(len(views[0][0])))

    def batch(self, ex: torch.Tensor):
        return self.data.inputs(self.targets[ex], self.users[ex])

    def views_cl4srec(self, seq, lengths, ex, mask_id: int, gen: torch.Generator) -> tuple[list, torch.Tensor]:
        """CL4SRec's two views and the sequence the CE term reads (the stored one when in place)."""
        if self.stored is None:
            return augment_pair(seq, lengths, self.cfg, mask_id, gen), seq
        views, after = augment_inplace(self.stored[ex].long(), lengths, self.cfg, mask_id, gen)
        self.stored[ex] = after.to(torch.int32)
        return views, after

    def __call__(self, model: SASRec, ex: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
        cfg, v = self.cfg, self.cfg.variant
        seq, lengths, target = self.batch(ex)
        with_ce = v != "cl4srec" or cfg.cl4srec_ce
        augmented = []
        if v == "cl4srec":
            augmented, seq = self.views_cl4srec(seq, lengths, ex, model.mask_id, gen)
        views = ([(seq, lengths)] if with_ce else []) + augmented        # view 0 feeds the CE
        if v in ("duorec_unsup", "duorec_supunsup"):
            views.append((seq, lengths))                                 # second dropout pass
        hs = self.encode(model, views)                                   # one (B, d) per view
        if v in ("duorec_sup", "duorec_supunsup"):
            s, n, _ = self.batch(self.semantic.draw(ex, gen))
            # a call of its own: semantic positives have any length, while the batch was grouped
            # by length, and one call would pad every view to the longest positive
            hs += self.encode(model, [(s, n)])
        device = hs[0].device
        if not with_ce:  # InfoNCE alone: the two views only, no pass for a CE term weighted 0
            terms = {"cl": info_nce(hs[0], hs[1], cfg.cl_temperature)}
            terms["loss"] = cfg.cl_weight * terms["cl"]
            return terms
        terms = {"ce": F.cross_entropy(model.logits(hs[0]), (target - 1).to(device))}
        tau = cfg.cl_temperature
        if v == "cl4srec":
            terms["cl"] = info_nce(hs[1], hs[2], tau)
        elif v in ("duorec_unsup", "duorec_sup"):
            terms["cl"] = info_nce(hs[0], hs[1], tau)
        elif v == "duorec_supunsup":
            if cfg.supunsup_mode == "both":
                terms["cl"] = info_nce(hs[0], hs[1], tau) + info_nce(hs[0], hs[2], tau)
            else:
                terms["cl"] = info_nce(hs[1], hs[2], tau)
        terms["loss"] = terms["ce"] + cfg.cl_weight * terms.get("cl", 0.0)
        return terms
