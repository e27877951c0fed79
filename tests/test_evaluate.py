import math

import pandas as pd
import pytest
import torch

from fmpaper import verify
from fmpaper.evaluate import (MODES, PROTOCOLS, comparisons, evaluate, metrics_from_ranks, ranks, sample_negatives,
                              user_item_mask, valid_ndcg10)
from fmpaper.model import SASRec


def test_metrics_by_hand():
    r = torch.tensor([0, 1, 9, 10, 19, 25])
    m = metrics_from_ranks(r)
    assert m["hr@10"] == pytest.approx(3 / 6)
    assert m["hr@20"] == pytest.approx(5 / 6)
    assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(11)) / 6)
    assert m["ndcg@20"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(11) + 1 / math.log2(12) + 1 / math.log2(21)) / 6)


class FixedScores(torch.nn.Module):
    """Stands in for SASRec: every user gets the same scores (item i scores -i: item 1 best)."""

    def __init__(self, n_items):
        super().__init__()
        self.n_items = n_items
        self.w = torch.nn.Parameter(torch.zeros(1))

    def encode(self, seq, lengths):
        return torch.zeros(len(seq), 1)

    def logits(self, h):
        return -torch.arange(1, self.n_items + 1, dtype=torch.float).expand(len(h), -1) + 0 * h


def test_full_rank_and_history_mask(smoke_data):
    model = FixedScores(smoke_data.n_items)
    r = ranks(model, smoke_data, "paper")
    target = smoke_data.items[smoke_data.eval_targets("test")]
    assert torch.equal(r["full"], target - 1)                             # items above = ids below
    masked = ranks(model, smoke_data, "corrected", mask_history=True)["full"]
    hist = user_item_mask(smoke_data, upto=smoke_data.eval_targets("test"))
    for u in range(5):
        above = set(range(1, int(target[u]))) - set(torch.nonzero(hist[u]).flatten().tolist())
        assert masked[u] == len(above)


def test_corrected_negatives_exclude_user_items(smoke_data):
    own = user_item_mask(smoke_data)
    for mode in ("uni", "pop"):
        neg = sample_negatives(smoke_data, mode, "corrected", seed=3)
        assert neg.shape == (smoke_data.n_users, 100)
        assert not own.gather(1, neg).any()
        assert all(len(set(row.tolist())) == 100 for row in neg)
        assert torch.equal(neg, sample_negatives(smoke_data, mode, "corrected", seed=3))


def test_paper_negatives_follow_interactions(smoke_data):
    neg = sample_negatives(smoke_data, "pop", "paper", seed=0)
    counts = smoke_data.item_counts().double()
    drawn = torch.bincount(neg.flatten(), minlength=len(counts)).double()
    # the most popular items are drawn about count / interactions * draws times, duplicates included
    top = counts.argsort(descending=True)[:5]
    expected = counts[top] / counts.sum() * neg.numel()
    assert ((drawn[top] - expected).abs() < 5 * expected.sqrt() + 2).all()
    assert any(len(set(row.tolist())) < 100 for row in neg)              # duplicates happen


def test_paper_ties_count_against_the_target(smoke_data):
    """With every score equal, the paper protocol puts all 100 negatives above the target, the
    corrected one none: the whole difference is the tie rule."""
    class Flat(FixedScores):
        def logits(self, h):
            return torch.zeros(len(h), self.n_items) + 0 * h
    r_paper = ranks(Flat(smoke_data.n_items), smoke_data, "paper")
    r_fixed = ranks(Flat(smoke_data.n_items), smoke_data, "corrected")
    assert (r_paper["uni100"] == 100).all() and (r_fixed["uni100"] == 0).all()


class Jittered(torch.nn.Module):
    """A model's scores, each moved by at most `jitter` (as another processor's rounding would)."""

    def __init__(self, model, jitter, seed):
        super().__init__()
        self.model, self.jitter = model, jitter
        self.gen = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.zeros(1))

    def encode(self, seq, lengths):
        return self.model.encode(seq, lengths)

    def logits(self, h):
        s = self.model.logits(h)
        return s + (torch.rand(s.shape, generator=self.gen) * 2 - 1) * self.jitter


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_rank_bounds_hold_every_rank_the_jittered_scores_give(smoke_data, smoke_cfg, protocol):
    """Scores each moved by at most eps/2 move every gap by at most eps: each rank they give lies
    within rank_bounds(eps), and the exact rank too."""
    model = SASRec(smoke_data.n_items, smoke_cfg).eval()
    eps = 2e-3
    exact = comparisons(model, smoke_data, protocol, seed=1)
    assert any((c.rank_bounds(eps)[1] > c.rank_bounds(eps)[0]).any() for c in exact.values())   # near ties exist
    for c in exact.values():
        lo, hi = c.rank_bounds(0.0)
        assert torch.equal(lo, c.rank()) or torch.equal(hi, c.rank())     # eps 0: the tie rule's side
    for trial in range(3):
        jittered = ranks(Jittered(model, eps / 2, trial).eval(), smoke_data, protocol, seed=1)
        for mode, c in exact.items():
            lo, hi = c.rank_bounds(eps)
            assert ((lo <= jittered[mode]) & (jittered[mode] <= hi)).all(), mode
            assert ((lo <= c.rank()) & (c.rank() <= hi)).all(), mode


def test_a_target_drawn_as_its_own_negative_is_no_near_tie(smoke_data):
    """Under the paper's rule the target drawn among its negatives ties itself on every machine:
    it counts above in both bounds, never as a maybe."""
    class Flat(FixedScores):
        def logits(self, h):
            return torch.zeros(len(h), self.n_items) + 0 * h
    c = comparisons(Flat(smoke_data.n_items), smoke_data, "paper")["uni100"]
    own = c.is_target.sum(1)
    assert own.any()
    lo, hi = c.rank_bounds(1e-5)
    assert torch.equal(lo, own) and (hi == 100).all() and (c.rank() == 100).all()


def test_verify_accepts_a_difference_only_where_scores_are_near_tied(smoke_data, tmp_path, monkeypatch):
    """compare(): a runs.csv value that differs from the recomputed one is accepted only when it
    is what the ranks give with near-tied scores (within TIE_EPS) counted the other way."""
    targets = smoke_data.items[smoke_data.eval_targets("test")]
    user = int(targets.argmin())
    target = int(targets[user])                   # ranked target - 1 (item i scores -i): in the top 20
    assert target <= 20
    other = target + 1

    class NearTie(FixedScores):
        """item i scores -i, but `other` scores 3e-6 below `target` (`user`'s test target)."""
        def logits(self, h):
            s = super().logits(h).clone()
            s[:, other - 1] = -target - 3e-6
            return s
    model = NearTie(smoke_data.n_items)
    metrics = {"test": {p: evaluate(model, smoke_data, p) for p in PROTOCOLS},
               "valid_ndcg@10": valid_ndcg10(model, smoke_data)}
    lines = pd.DataFrame([dict(row="baseline", seed=0, protocol=p, mode=m, metric=k, value=v,
                               valid_ndcg10=metrics["valid_ndcg@10"])
                          for p in PROTOCOLS for m in MODES for k, v in metrics["test"][p][m].items()])
    monkeypatch.setattr(verify, "scorer", lambda run, metrics=None: (model, smoke_data, 0))
    assert verify.compare(lines, "baseline", 0, metrics, tmp_path) == ([], 0)
    # the target one place lower for every user of it, as a processor rounding the other way ranks it
    full = comparisons(model, smoke_data, "paper")["full"]
    swapped = full.rank() + (targets == target)
    assert torch.equal(full.rank_bounds(verify.TIE_EPS)[1], swapped)
    at = (lines["protocol"] == "paper") & (lines["mode"] == "full") & (lines["metric"] == "ndcg@20")
    value = metrics_from_ranks(swapped)["ndcg@20"]
    assert abs(value - lines.loc[at, "value"].item()) > verify.TOLERANCE
    lines.loc[at, "value"] = value
    assert verify.compare(lines, "baseline", 0, metrics, tmp_path) == ([], 1)
    # a difference no near tie explains
    lines.loc[at, "value"] = value - 1e-3
    bad, tied = verify.compare(lines, "baseline", 0, metrics, tmp_path)
    assert tied == 0 and len(bad) == 1 and bad[0].startswith("baseline seed 0 paper full ndcg@20: runs.csv")
