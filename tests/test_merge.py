"""Uniform and Fisher-weighted merging of model states."""
import pytest
import torch

from fmpaper import FmpaperError
from fmpaper.config import Config
from fmpaper.fisher import compute_fisher
from fmpaper.merge import fisher_merge, fisher_weight_shares, uniform_merge
from fmpaper.model import SASRec


pytestmark = pytest.mark.usefixtures("one_thread")


def state(seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(3, 4, generator=g) * scale, "a.bias": torch.randn(3, generator=g),
            "emb.weight": torch.randn(5, 2, generator=g)}


def fisher_like(seed):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(t.shape, generator=g) + 0.1 for n, t in state(0).items()}


def test_uniform_merge_is_the_mean():
    s = [state(i) for i in range(3)]
    out = uniform_merge(s)
    for n in out:
        torch.testing.assert_close(out[n], (s[0][n] + s[1][n] + s[2][n]) / 3)
        assert out[n].dtype == s[0][n].dtype


def test_equal_fishers_give_the_uniform_merge():
    s = [state(i) for i in range(3)]
    f = fisher_like(7)
    out, ref = fisher_merge(s, [f, f, f]), uniform_merge(s)
    for n in out:
        torch.testing.assert_close(out[n], ref[n], rtol=1e-6, atol=1e-7)


def test_merging_a_model_with_itself_returns_it():
    s = state(1)
    out = fisher_merge([s, s], [fisher_like(1), fisher_like(2)])
    for n in out:
        torch.testing.assert_close(out[n], s[n], rtol=1e-6, atol=1e-7)


def test_lambdas_weight_as_stated():
    s = [state(1), state(2)]
    f = [fisher_like(1), fisher_like(2)]
    only_first = fisher_merge(s, f, lambdas=(1, 0))
    for n in only_first:
        torch.testing.assert_close(only_first[n], s[0][n])
    out = fisher_merge(s, f, lambdas=(2.0, 1.0), floor=0.0)
    for n in out:
        w0, w1 = 2 * f[0][n].double(), f[1][n].double()
        want = (w0 * s[0][n] + w1 * s[1][n]) / (w0 + w1)
        torch.testing.assert_close(out[n], want.float())


def test_high_fisher_dominates():
    s = [state(1), state(2)]
    f0 = {n: torch.full(t.shape, 1e6) for n, t in s[0].items()}
    f1 = {n: torch.full(t.shape, 1e-6) for n, t in s[0].items()}
    out = fisher_merge(s, [f0, f1])
    for n in out:
        torch.testing.assert_close(out[n], s[0][n], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("floor", [1e-10, 0.0])
def test_floor_where_every_fisher_vanishes(floor):
    s = [state(1), state(2)]
    f0, f1 = fisher_like(1), fisher_like(2)
    for f in (f0, f1):
        f["emb.weight"][2] = 0.0  # an item row no model has information about
    out = fisher_merge(s, [f0, f1], lambdas=(3, 1), floor=floor)
    want = (3 * s[0]["emb.weight"][2] + s[1]["emb.weight"][2]) / 4   # lambda-weighted mean
    torch.testing.assert_close(out["emb.weight"][2], want)
    assert torch.isfinite(out["emb.weight"]).all()
    # rows with information are Fisher-weighted, not averaged
    w0, w1 = 3 * (f0["emb.weight"][0].double() + floor), f1["emb.weight"][0].double() + floor
    torch.testing.assert_close(out["emb.weight"][0],
                               ((w0 * s[0]["emb.weight"][0] + w1 * s[1]["emb.weight"][0]) / (w0 + w1)).float())


def test_mismatches_are_refused():
    s = [state(1), state(2)]
    f = [fisher_like(1), fisher_like(2)]
    bad_shape = dict(state(2), **{"a.weight": torch.zeros(4, 3)})
    with pytest.raises(FmpaperError, match="a.weight"):
        uniform_merge([s[0], bad_shape])
    with pytest.raises(FmpaperError, match="a.weight"):
        fisher_merge([s[0], bad_shape], f)
    with pytest.raises(FmpaperError, match="extra"):
        uniform_merge([s[0], dict(state(2), extra=torch.zeros(1))])
    with pytest.raises(FmpaperError, match="a.bias"):
        uniform_merge([s[0], {n: t for n, t in state(2).items() if n != "a.bias"}])
    with pytest.raises(FmpaperError, match="emb.weight"):
        fisher_merge(s, [f[0], dict(f[1], **{"emb.weight": torch.ones(2, 5)})])
    with pytest.raises(FmpaperError, match="a.bias"):
        fisher_merge(s, [f[0], {n: t for n, t in f[1].items() if n != "a.bias"}])
    nan = dict(f[1], **{"a.bias": torch.tensor([1.0, float("nan"), 1.0])})
    with pytest.raises(FmpaperError, match="a.bias"):
        fisher_merge(s, [f[0], nan])
    with pytest.raises(FmpaperError, match="one Fisher per model"):
        fisher_merge(s, f[:1])
    for lambdas in [(1,), (1, 2, 3), (1, -1), (0, 0), (1, float("inf"))]:
        with pytest.raises(FmpaperError, match="lambda"):
            fisher_merge(s, f, lambdas=lambdas)
    with pytest.raises(FmpaperError, match="floor"):
        fisher_merge(s, f, floor=-1.0)
    with pytest.raises(FmpaperError):
        uniform_merge([])


def test_weight_shares():
    f0 = {n: torch.ones(t.shape) for n, t in state(0).items()}
    f1 = {n: 3 * torch.ones(t.shape) for n, t in state(0).items()}
    f1["a.bias"] = torch.zeros(3)
    f0["a.bias"] = torch.zeros(3)
    shares = fisher_weight_shares([f0, f1])
    assert shares["a.weight"] == pytest.approx([0.25, 0.75])
    assert shares["a.bias"] == pytest.approx([0.5, 0.5])  # no information: the lambda shares
    assert fisher_weight_shares([f0, f1], lambdas=(3, 1))["a.weight"] == pytest.approx([0.5, 0.5])
    with pytest.raises(FmpaperError, match="a.weight"):
        fisher_weight_shares([f0, dict(f1, **{"a.weight": torch.ones(2)})])


def test_merge_of_two_sasrecs_with_computed_fishers():
    cfg = Config(hidden=8, n_layers=1, n_heads=2, inner=16, max_len=5)
    models = [SASRec(12, cfg).double() for _ in range(2)]
    seq = torch.tensor([[1, 2, 3, 0, 0], [4, 4, 5, 6, 7], [8, 0, 0, 0, 0]])
    lengths = (seq > 0).sum(1)
    fishers = [compute_fisher(m, seq, lengths, None, "exact", progress=False) for m in models]
    states = [m.state_dict() for m in models]
    merged = fisher_merge(states, fishers)
    assert merged.keys() == states[0].keys()
    merged_model = SASRec(12, cfg).double()
    merged_model.load_state_dict(merged)
    for n, t in merged.items():  # elementwise between the two models
        lo = torch.minimum(states[0][n], states[1][n])
        hi = torch.maximum(states[0][n], states[1][n])
        assert ((t >= lo - 1e-12) & (t <= hi + 1e-12)).all(), n
    shares = fisher_weight_shares(fishers)
    assert all(sum(v) == pytest.approx(1.0) for v in shares.values())
