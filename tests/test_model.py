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
