import math

import pytest
import torch

from fmpaper.config import make_config
from fmpaper.objectives import SemanticPositives, augment_pair, crop, info_nce, mask, reorder

SEQ = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 0, 0, 0, 0, 0], [21, 0, 0, 0, 0, 0, 0, 0, 0, 0]])
LEN = torch.tensor([10, 5, 1])


def gen():
    return torch.Generator().manual_seed(0)


def test_crop_keeps_a_contiguous_share():
    src = SEQ.clone()
    out, n = crop(SEQ, LEN, 0.6, gen())
    assert torch.equal(SEQ, src)
    assert n.tolist() == [6, 3, 1]
    for row, k, orig, m in zip(out, n, SEQ, LEN):
        kept = row[:k].tolist()
        assert (row[k:] == 0).all()
        start = orig.tolist().index(kept[0])
        assert kept == orig[start:start + k].tolist()


def test_mask_replaces_a_share_with_the_token():
    out, n = mask(SEQ, LEN, 0.3, 99, gen())
    assert torch.equal(n, LEN)
    assert ((out == 99).sum(1)).tolist() == [3, 1, 0]
    assert torch.equal(out[SEQ == 0], SEQ[SEQ == 0])                      # padding untouched
    assert torch.equal(out[out != 99], SEQ[out != 99])


def test_reorder_shuffles_one_span():
    g = gen()
    for _ in range(20):
        out, n = reorder(SEQ, LEN, 0.6, g)
        for row, orig, m in zip(out, SEQ, LEN):
            assert sorted(row[:m].tolist()) == sorted(orig[:m].tolist())
            assert (row[m:] == 0).all()
            moved = torch.nonzero(row != orig).flatten()
            if len(moved):                                               # moved items lie in one span
                assert moved.max() - moved.min() < int(m * 0.6)


def test_augment_leaves_length_one_and_source_alone():
    cfg = make_config("smoke")
    src = SEQ.clone()
    for seed in range(10):
        for out, n in augment_pair(SEQ, LEN, cfg, 99, torch.Generator().manual_seed(seed)):
            assert torch.equal(out[2], SEQ[2]) and n[2] == 1
    assert torch.equal(SEQ, src)


def test_augment_pair_uses_two_distinct_operators():
    # 200 sequences of 10 distinct items: crop shortens, mask writes the mask token, reorder neither
    cfg = make_config("smoke")
    seq = torch.arange(1, 11).repeat(200, 1)
    lengths = torch.full((200,), 10)

    def op(out, n):
        return torch.where(n < 10, 0, torch.where((out == 99).any(1), 1, 2))
    pairs = set()
    for seed in range(5):
        (s1, n1), (s2, n2) = augment_pair(seq, lengths, cfg, 99, torch.Generator().manual_seed(seed))
        a, b = op(s1, n1), op(s2, n2)
        assert (a != b).all()
        pairs |= set(zip(a.tolist(), b.tolist()))
    assert len(pairs) == 6                                               # every ordered pair occurs


def test_info_nce_by_hand():
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    z2 = torch.tensor([[0.5, 0.5], [1.0, -1.0], [2.0, 0.0]])
    tau = 0.5
    z = torch.cat([z1, z2]).tolist()
    total = 0.0
    for i in range(6):
        pos = (i + 3) % 6
        sims = {j: sum(a * b for a, b in zip(z[i], z[j])) / tau for j in range(6) if j != i}
        total += -sims[pos] + math.log(sum(math.exp(s) for s in sims.values()))
    assert float(info_nce(z1, z2, tau)) == pytest.approx(total / 6, rel=1e-6)


def test_semantic_positives_share_the_target():
    targets = torch.tensor([5, 7, 5, 9, 5, 7])
    sp = SemanticPositives(targets)
    g = gen()
    for _ in range(20):
        ex = torch.arange(6)
        pos = sp.draw(ex, g)
        assert torch.equal(targets[pos], targets)
        assert pos[3] == 3                                               # unique target: itself
        other = torch.tensor([0, 1, 2, 4, 5])
        assert (pos[other] != other).all()                               # others: never itself


@pytest.mark.parametrize("ce,rows,keys", [(True, 3, {"ce", "cl", "loss"}), (False, 2, {"cl", "loss"})])
def test_cl4srec_infonce_only_skips_the_ce_pass(smoke_data, ce, rows, keys):
    from fmpaper.model import SASRec
    from fmpaper.objectives import Objective
    cfg = make_config("smoke", variant="cl4srec", cl4srec_ce=ce)
    model = SASRec(smoke_data.n_items, cfg)
    seen = []
    encode = model.encode
    model.encode = lambda s, n: seen.append(len(s)) or encode(s, n)
    ex = torch.arange(8)
    terms = Objective(cfg, smoke_data)(model, ex, gen())
    assert set(terms) == keys and seen == [rows * len(ex)]      # one encoder call, B rows per view
    expected = (terms["ce"] if ce else 0.0) + cfg.cl_weight * terms["cl"]
    assert torch.allclose(terms["loss"], torch.as_tensor(expected))
