"""Fisher estimators on a tiny SASRec in float64: the closed form against brute force, the
sampled estimators against their definitions, and the file format."""
import os

import pytest
import torch

from fmpaper import FmpaperError
from fmpaper.config import Config
from fmpaper.fisher import (ESTIMATORS, check_compatible, compute_fisher, load_fisher,
                            probability_mass_topk, save_fisher)
from fmpaper.model import SASRec
from fmpaper.pages.display import ESTIMATOR_COLORS, ESTIMATOR_MARKERS
from fmpaper.rows import ESTIMATOR_NAMES


pytestmark = pytest.mark.usefixtures("one_thread")

N_ITEMS = 20


def tiny_model(seed=0):
    """hidden 8, 2 layers, 2 heads; parameters pushed away from the init so p is far from uniform."""
    torch.manual_seed(seed)
    cfg = Config(hidden=8, n_layers=2, n_heads=2, inner=16, max_len=6)
    model = SASRec(N_ITEMS, cfg).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return model


# repeated items, right padding, a length-1 sequence, a full one
SEQ = torch.tensor([[3, 5, 3, 7, 0, 0],
                    [1, 2, 3, 4, 5, 6],
                    [9, 0, 0, 0, 0, 0],
                    [4, 4, 4, 2, 2, 0],
                    [20, 19, 18, 20, 1, 0],
                    [7, 8, 7, 8, 7, 8]])
LENGTHS = (SEQ > 0).sum(1)
TARGETS = torch.tensor([7, 9, 1, 2, 20, 8])


def fisher(estimator, model=None, seq=SEQ, lengths=LENGTHS, targets=TARGETS, **kw):
    return compute_fisher(model if model is not None else tiny_model(), seq, lengths, targets,
                          estimator, progress=False, **kw)


def assert_same(a, b, rtol=1e-10):
    assert a.keys() == b.keys()
    scale = max(float(t.abs().max()) for t in b.values())
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=rtol * scale * 1e-2, msg=name)


def flat(f):
    return torch.cat([t.flatten() for t in f.values()])


def test_exact_equals_bruteforce_every_parameter():
    model = tiny_model()
    exact, brute = fisher("exact", model), fisher("bruteforce", model)
    assert {n: p.shape for n, p in model.named_parameters()} == {n: t.shape for n, t in exact.items()}
    assert_same(exact, brute)
    for name, t in exact.items():
        assert t.dtype == torch.float64 and (t >= 0).all(), name
        if name not in ("item_emb.weight",):
            assert t.abs().max() > 0, name  # every parameter is reached
    assert exact["item_emb.weight"][0].abs().max() == 0             # padding row
    assert exact["item_emb.weight"][N_ITEMS + 1].abs().max() == 0   # mask-token row
    assert exact["item_emb.weight"][1:N_ITEMS + 1].abs().min() > 0


def test_exact_equals_bruteforce_with_mask_token_in_input():
    model = tiny_model(1)
    seq = SEQ.clone()
    seq[1, 2] = N_ITEMS + 1  # a CL4SRec-masked input: the mask row gets input-side Fisher only
    exact, brute = fisher("exact", model, seq=seq), fisher("bruteforce", model, seq=seq)
    assert_same(exact, brute)
    assert exact["item_emb.weight"][N_ITEMS + 1].abs().max() > 0


def test_exact_does_not_depend_on_batching_or_padding():
    model = tiny_model()
    ref = fisher("exact", model, batch_size=64)
    assert_same(fisher("exact", model, batch_size=1), ref)
    # the same sequences with one padding column less (no sequence uses the last position twice)
    keep = LENGTHS < 6
    sub = fisher("exact", model, seq=SEQ[keep], lengths=LENGTHS[keep], targets=TARGETS[keep])
    trimmed = fisher("exact", model, seq=SEQ[keep][:, :5], lengths=LENGTHS[keep], targets=TARGETS[keep])
    assert_same(trimmed, sub)


@pytest.mark.parametrize("estimator,k,authors", [("target", None, False), ("target", None, True),
                                                   ("random", 7, False), ("topk", 5, False),
                                                   ("model", 6, False)])
def test_sampled_closed_form_equals_per_example_autograd(estimator, k, authors):
    model = tiny_model(2)
    seq = SEQ.clone()
    seq[0, 1] = N_ITEMS + 1  # the mask token in an input, and items drawn that are also inputs
    closed = fisher(estimator, model, seq=seq, k=k, authors=authors, seed=3)
    reference = fisher(estimator, model, seq=seq, k=k, authors=authors, seed=3, gradients="autograd")
    assert_same(closed, reference)
    assert flat(closed).abs().max() > 0


def test_topk_and_random_with_all_items_equal_bruteforce():
    model = tiny_model()
    brute = fisher("bruteforce", model)
    assert_same(fisher("topk", model, k=N_ITEMS), brute)
    assert_same(fisher("random", model, k=N_ITEMS), brute)  # weight |V|/k = 1, every item drawn


def test_topk_truncation_is_biased_low():
    model = tiny_model()
    exact, top = flat(fisher("exact", model)), flat(fisher("topk", model, k=5))
    # entry-wise below the exact Fisher, up to rounding (entries ~1e-33 differ in their last bits)
    assert (top <= exact * (1 + 1e-9) + 1e-12 * exact.max()).all() and top.sum() < exact.sum()


@pytest.mark.parametrize("estimator", ["random", "model"])
def test_sampled_estimators_are_unbiased(estimator):
    model = tiny_model()
    exact = flat(fisher("exact", model))
    draws = torch.stack([flat(fisher(estimator, model, k=5, seed=s)) for s in range(100)])
    single = float((draws[0] - exact).norm() / exact.norm())
    mean = float((draws.mean(0) - exact).norm() / exact.norm())
    assert mean < 0.1 and mean < single / 3, (single, mean)   # ~ single / sqrt(100)


def test_sampling_is_seeded():
    model = tiny_model()
    a, b = fisher("random", model, k=3, seed=1), fisher("random", model, k=3, seed=1)
    c = fisher("random", model, k=3, seed=2)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not all(torch.equal(a[n], c[n]) for n in a)
    # the draws do not depend on the unit of work
    assert_same(fisher("model", model, k=3, seed=4, batch_size=2), fisher("model", model, k=3, seed=4))


def hand_grads(model, seq, length, item, temperature=1.0):
    """p(item | seq) and d log p / d theta by plain autograd on a train-free copy of the model."""
    model = model.eval()
    params = list(model.parameters())
    h = model.encode(seq[None], length[None])
    logp = torch.log_softmax(model.logits(h)[0] / temperature, dim=-1)[item - 1]
    grads = torch.autograd.grad(logp, params)
    return logp.exp().detach(), dict(zip([n for n, _ in model.named_parameters()], grads))


def test_target_equals_hand_autograd_on_one_sequence():
    model = tiny_model()
    i = 3
    p, g = hand_grads(model, SEQ[i], LENGTHS[i], TARGETS[i])
    want = {n: p * t ** 2 for n, t in g.items()}
    got = fisher("target", model, seq=SEQ[i:i + 1], lengths=LENGTHS[i:i + 1], targets=TARGETS[i:i + 1])
    assert_same(got, want)


def test_target_authors_form():
    """Logits / 10, weight p*^2, a plain sum over the sequences."""
    model = tiny_model()
    want = None
    for i in (0, 4):
        p, g = hand_grads(model, SEQ[i], LENGTHS[i], TARGETS[i], temperature=10.0)
        term = {n: p ** 2 * t ** 2 for n, t in g.items()}
        want = term if want is None else {n: want[n] + term[n] for n in want}
    idx = torch.tensor([0, 4])
    got = fisher("target", model, seq=SEQ[idx], lengths=LENGTHS[idx], targets=TARGETS[idx], authors=True)
    assert_same(got, want)


@pytest.mark.parametrize("estimator,k", [("target", None), ("random", 3), ("topk", 3), ("model", 3)])
def test_batchwise_with_batch_of_one_is_per_example(estimator, k):
    model = tiny_model()
    per_example = fisher(estimator, model, k=k, seed=5)
    assert_same(fisher(estimator, model, k=k, seed=5, batchwise=True, batch_size=1), per_example)


def test_batchwise_definition_on_one_batch():
    """(sum_i p_i*) (grad sum_i log p_i*)^2 / |batch| / N for the target item, batch of 3."""
    model = tiny_model()
    idx = torch.tensor([0, 1, 3])
    total_logp, total_p = 0.0, 0.0
    for i in idx:
        p, _ = hand_grads(model, SEQ[i], LENGTHS[i], TARGETS[i])
        h = model.encode(SEQ[i][None], LENGTHS[i][None])
        total_logp = total_logp + torch.log_softmax(model.logits(h)[0], -1)[TARGETS[i] - 1]
        total_p = total_p + p
    g = torch.autograd.grad(total_logp, list(model.parameters()))
    want = {n: total_p * t ** 2 / 3 / 3 for (n, _), t in zip(model.named_parameters(), g)}
    got = fisher("target", model, seq=SEQ[idx], lengths=LENGTHS[idx], targets=TARGETS[idx],
                 batchwise=True, batch_size=3)
    assert_same(got, want)


def test_dtype_argument_and_model_left_untouched():
    model = tiny_model().train()
    ref = fisher("exact", model)
    f32 = fisher("exact", model, dtype=torch.float32)
    assert all(t.dtype == torch.float32 for t in f32.values())
    assert float((flat(f32).double() - flat(ref)).abs().max() / flat(ref).abs().max()) < 1e-4
    assert model.training and next(model.parameters()).dtype == torch.float64
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("kwargs", [
    dict(estimator="random", k=0), dict(estimator="topk", k=N_ITEMS + 1), dict(estimator="model", k=-1),
    dict(estimator="random"), dict(estimator="exact", k=3), dict(estimator="fisherish"),
    dict(estimator="random", k=3, authors=True), dict(estimator="exact", batchwise=True),
    dict(estimator="bruteforce", batchwise=True), dict(estimator="target", batch_size=0),
    dict(estimator="exact", gradients="numeric"),
])
def test_bad_arguments_raise(kwargs):
    with pytest.raises(FmpaperError):
        fisher(model=tiny_model(), **kwargs)


def test_bad_inputs_raise():
    model = tiny_model()
    with pytest.raises(FmpaperError, match="lengths"):
        fisher("exact", model, lengths=LENGTHS * 0)
    with pytest.raises(FmpaperError, match="item ids"):
        fisher("exact", model, seq=SEQ + 30)
    with pytest.raises(FmpaperError, match="targets"):
        fisher("target", model, targets=None)
    with pytest.raises(FmpaperError, match="positions"):
        fisher("exact", model, seq=torch.ones(2, 7, dtype=torch.long), lengths=torch.tensor([7, 7]))


def test_estimators_listed():
    assert ESTIMATORS == ("exact", "target", "random", "topk", "model", "bruteforce")


def test_probability_mass_topk():
    model = tiny_model()
    mass = probability_mass_topk(model, SEQ, LENGTHS, ks=(1, 5, N_ITEMS))
    assert model.training  # restored
    model.eval()
    p = torch.softmax(model.logits(model.encode(SEQ, LENGTHS)), -1).detach()
    assert mass[1] == pytest.approx(float(p.max(1).values.mean()), rel=1e-12)
    assert mass[1] < mass[5] < mass[N_ITEMS] == pytest.approx(1.0)
    with pytest.raises(FmpaperError):
        probability_mass_topk(model, SEQ, LENGTHS, ks=(0,))


def test_save_load_round_trip(tmp_path):
    model = tiny_model()
    f, meta = fisher("exact", model, return_meta=True)
    assert meta["estimator"] == "exact" and meta["sequences"] == len(SEQ) and meta["seconds"] >= 0
    path = tmp_path / "fisher.safetensors"
    save_fisher(path, f, meta)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fisher.json", "fisher.safetensors"]
    g, meta2 = load_fisher(path)
    assert all(torch.equal(f[n], g[n]) for n in f) and g.keys() == f.keys()
    assert meta2["estimator"] == "exact" and meta2["shapes"]["item_emb.weight"] == [N_ITEMS + 2, 8]
    assert len(meta2["signature"]) == 16
    check_compatible(g, model.state_dict())


def test_save_killed_between_its_two_files_leaves_no_fisher(tmp_path, monkeypatch):
    # the tensors land last: a kill after the JSON leaves no Fisher file to be read as complete
    import fmpaper.fisher as fm
    f = fisher("target", tiny_model())
    path = tmp_path / "f.safetensors"
    real, calls = os.replace, []

    def replace_then_die(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a kill would, after the first file landed
        real(src, dst)
    monkeypatch.setattr(fm.os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        save_fisher(path, f, {})
    monkeypatch.setattr(fm.os, "replace", real)
    assert not path.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]
    save_fisher(path, f, {"estimator": "target"})   # the next save completes the pair
    assert load_fisher(path)[1]["estimator"] == "target"


def test_load_refuses_bad_files(tmp_path):
    f = fisher("target", tiny_model())
    with pytest.raises(FmpaperError, match="no such"):
        load_fisher(tmp_path / "missing.safetensors")
    bad = dict(f)
    bad["ln.weight"] = bad["ln.weight"].clone()
    bad["ln.weight"][0] = float("nan")
    save_fisher(tmp_path / "nan.safetensors", bad, {"estimator": "target"})
    with pytest.raises(FmpaperError, match="ln.weight"):
        load_fisher(tmp_path / "nan.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(FmpaperError, match="readable"):
        load_fisher(tmp_path / "junk.safetensors")
    save_fisher(tmp_path / "ok.safetensors", f, {})
    (tmp_path / "ok.json").write_text("{broken")
    with pytest.raises(FmpaperError, match="JSON"):
        load_fisher(tmp_path / "ok.safetensors")
    with pytest.raises(FmpaperError):
        save_fisher(tmp_path / "x.json", f, {})
    with pytest.raises(FmpaperError):
        save_fisher(tmp_path / "y.safetensors", f, {"when": object()})
    with pytest.raises(FmpaperError):
        save_fisher(tmp_path / "z.safetensors", f, {"seconds": float("nan")})
    save_fisher(tmp_path / "list.safetensors", f, {})
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(FmpaperError, match="object"):
        load_fisher(tmp_path / "list.safetensors")
    assert not list(tmp_path.glob("*.partial"))


def test_check_compatible_names_the_parameter():
    model = tiny_model()
    f = fisher("target", model)
    state = model.state_dict()
    check_compatible(f, model)
    wrong = dict(f, **{"blocks.1.fc1.weight": torch.zeros(3, 3)})
    with pytest.raises(FmpaperError, match="blocks.1.fc1.weight"):
        check_compatible(wrong, state)
    missing = {n: t for n, t in f.items() if n != "pos_emb.weight"}
    with pytest.raises(FmpaperError, match="pos_emb.weight"):
        check_compatible(missing, state)
    with pytest.raises(FmpaperError, match="extra.bias"):
        check_compatible(dict(f, **{"extra.bias": torch.zeros(1)}), state)


def test_same_result_inside_no_grad():
    model = tiny_model()
    for est, k in (("exact", None), ("topk", 3)):
        ref = fisher(est, model, k=k)
        with torch.no_grad():
            assert_same(fisher(est, model, k=k), ref)


def test_every_estimator_has_one_name_colour_and_marker():
    """The pages name, colour and mark estimators by fisher.ESTIMATORS' keys: a new estimator
    must get all three (brute force, the exact Fisher's check, is never plotted)."""
    assert set(ESTIMATOR_NAMES) == set(ESTIMATORS)
    plotted = set(ESTIMATORS) - {"bruteforce"}
    assert set(ESTIMATOR_COLORS) == set(ESTIMATOR_MARKERS) == plotted
