import math

import pytest
import torch

from fmpaper.evaluate import metrics_from_ranks, ranks, sample_negatives, user_item_mask


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
