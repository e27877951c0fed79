import torch

from fmpaper.model import SASRec, trim


def test_padding_and_causality(tiny_cfg):
    """The output at position k of a right-padded sequence equals that of the unpadded prefix."""
    model = SASRec(30, tiny_cfg).eval()
    seq = torch.tensor([[3, 7, 1, 9, 0, 0, 0, 0]])
    full = model.encode_all(seq)                                          # (1, 8, d)
    for k in range(1, 5):
        alone = model.encode_all(seq[:, :k])
        torch.testing.assert_close(full[:, :k], alone, rtol=1e-5, atol=1e-6)
    # changing what follows position k (padding or later items) does not change position k
    other = torch.tensor([[3, 7, 1, 9, 4, 4, 2, 5]])
    torch.testing.assert_close(model.encode_all(other)[:, :4], full[:, :4], rtol=1e-5, atol=1e-6)


def test_last_position_shortcut_and_trim(tiny_cfg):
    model = SASRec(30, tiny_cfg).eval()
    seq = torch.tensor([[3, 7, 1, 9, 0, 0, 0, 0], [5, 0, 0, 0, 0, 0, 0, 0], [1, 2, 3, 4, 5, 6, 7, 8]])
    lengths = torch.tensor([4, 1, 8])
    reference = model.encode_all(seq)[torch.arange(3), lengths - 1]      # every layer everywhere
    torch.testing.assert_close(model.encode(seq, lengths), reference, rtol=1e-5, atol=1e-6)
    short = seq[:2]
    assert trim(short, lengths[:2]).shape == (2, 4)
    torch.testing.assert_close(model.encode(trim(short, lengths[:2]), lengths[:2]), reference[:2], rtol=1e-5, atol=1e-6)


def test_shapes_and_tied_output(tiny_cfg):
    model = SASRec(30, tiny_cfg)
    assert model.item_emb.weight.shape == (32, tiny_cfg.hidden)          # pad + 30 items + mask token
    h = torch.randn(5, tiny_cfg.hidden)
    torch.testing.assert_close(model.logits(h), h @ model.item_emb.weight[1:31].T)


def test_dropout_matches_torch_in_distribution():
    from fmpaper.model import dropout
    x = torch.ones(200_000)
    y = dropout(x, 0.3, True)
    kept = y != 0
    assert abs(float(kept.double().mean()) - 0.7) < 0.01                 # keep rate 1 - p
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / 0.7))  # survivors rescaled
    assert abs(float(y.mean()) - 1.0) < 0.01                            # expectation preserved
    assert torch.equal(dropout(x, 0.3, False), x) and torch.equal(dropout(x, 0.0, True), x)


def test_dropout_path_of_the_model(tiny_cfg):
    """With dropout on: training passes differ from each other and from eval, eval is deterministic,
    padding is still ignored, and gradients reach every parameter through the dropout branches."""
    from fmpaper.config import make_config
    cfg = make_config("smoke", hidden=16, n_heads=2, inner=32, max_len=8, dropout=0.3, attn_dropout=0.3)
    model = SASRec(30, cfg)
    seq = torch.tensor([[3, 7, 1, 9, 0, 0, 0, 0], [1, 2, 3, 4, 5, 6, 7, 8]])
    lengths = torch.tensor([4, 8])
    model.train()
    a, b = model.encode(seq, lengths), model.encode(seq, lengths)
    assert not torch.allclose(a, b)
    a.pow(2).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    model.eval()
    e1, e2 = model.encode(seq, lengths), model.encode(seq, lengths)
    torch.testing.assert_close(e1, e2, rtol=0, atol=0)
    assert not torch.allclose(a.detach(), e1)
    # padding after the sequence never matters, in training mode too (same dropout draws)
    other = seq.clone()
    other[0, 4:] = torch.tensor([4, 4, 2, 5])
    model.train()
    torch.manual_seed(1)
    x1 = model.encode(seq, lengths)
    torch.manual_seed(1)
    x2 = model.encode(other, lengths)
    torch.testing.assert_close(x1[0], x2[0], rtol=1e-5, atol=1e-6)
