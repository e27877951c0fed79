"""The authors' setup as their code ran it: the `as-run` protocol, CL4SRec's in-place
augmentations, training from another run's weights, and the post-merge training."""
import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from fmpaper import FmpaperError
from fmpaper.config import make_config
from fmpaper.data import load
from fmpaper.evaluate import block_negatives, ranks, shuffled_items
from fmpaper.objectives import Objective, augment_inplace, augment_pair, draw_operators, reorder
from fmpaper.pages.fidelity import mask_fraction, plot_mask_fraction
from fmpaper.rows import get_row, members_trained_as_long, rows, trained_further, uniform_of
from fmpaper.runs import finetune_config, kept_target, run_dir, start_weights, train_config
from fmpaper.stats import chance_ndcg
from fmpaper.train import load_run, train

from conftest import train_killed_after_first_epoch, write_inter


# ----------------------------------------------------------------------------- as-run
class NextItem(torch.nn.Module):
    """Scores item last + 1 far above the rest (plus noise against ties): perfect on data where
    every user's next item is the one after their last item."""

    def __init__(self, n_items):
        super().__init__()
        self.n_items = n_items
        self.w = torch.nn.Parameter(torch.zeros(1))

    def encode(self, seq, lengths):
        return seq.gather(1, (lengths - 1)[:, None]).float()              # (B, 1): the last item

    def logits(self, h):
        items = torch.arange(1, self.n_items + 1).float()
        return (items[None, :] == (h % self.n_items) + 1).float() * 10 + torch.rand(len(h), self.n_items)


@pytest.fixture(scope="module")
def chain_data(tmp_path_factory):
    """400 users, 300 items; each user watches consecutive items (mod 300) from a random start."""
    g = torch.Generator().manual_seed(1)
    lines = []
    for u in range(400):
        start, n = int(torch.randint(300, (1,), generator=g)), int(torch.randint(8, 20, (1,), generator=g))
        lines += [(u, (start + t) % 300 + 1, t) for t in range(n)]
    path = write_inter(tmp_path_factory.mktemp("chain") / "chain.inter", lines)
    return load(str(path), max_len=50, min_count=1)


def test_as_run_popular_sits_at_chance_where_the_model_is_perfect(chain_data):
    model = NextItem(chain_data.n_items)
    paper = ranks(model, chain_data, "paper", seed=0)
    assert (paper["full"] == 0).float().mean() > 0.99                    # the model is right
    ndcg = []
    for seed in range(40):
        r = ranks(model, chain_data, "as-run", seed=seed)["pop100"]
        ndcg.append(((r < 10) / torch.log2(r.double() + 2)).mean())
    # 16,000 user draws: standard error ~0.0011; ties with duplicated candidates pull down slightly
    assert abs(float(torch.stack(ndcg).mean()) - chance_ndcg(101, 10)) < 0.005


def test_as_run_full_is_paper_full_and_data_untouched(chain_data):
    model = NextItem(chain_data.n_items)
    before = chain_data.items.clone()
    torch.manual_seed(0)
    a = ranks(model, chain_data, "as-run", seed=3)
    torch.manual_seed(0)
    p = ranks(model, chain_data, "paper", seed=3)
    assert torch.equal(a["full"], p["full"])
    assert torch.equal(chain_data.items, before)
    shuffled = shuffled_items(chain_data, 3)
    assert torch.equal(shuffled.items.sort().values, before.sort().values)   # a permutation
    assert not torch.equal(shuffled.items, before)


def test_block_negatives_are_consecutive_blocks_with_wraparound():
    lst = torch.arange(250) + 1
    neg = block_negatives(lst, n_users=4, n=100)
    assert neg.shape == (4, 100)
    assert torch.equal(neg[1], lst[100:200])
    assert torch.equal(neg[2], torch.cat([lst[200:], lst[:50]]))         # wraps around
    assert all(len(set(row.tolist())) == 100 for row in neg)              # distinct within a user


def test_evaluate_cli_as_run_and_unknown_protocol(tmp_path, smoke_data):
    out = tmp_path / "run"
    train(make_config("smoke"), out, progress=False, data=smoke_data)
    r = subprocess.run([sys.executable, "-m", "fmpaper", "evaluate", str(out), "--protocol", "as-run", "--json"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    assert m["full"] == json.loads((out / "metrics.json").read_text())["test"]["paper"]["full"]
    r = subprocess.run([sys.executable, "-m", "fmpaper", "evaluate", str(out), "--protocol", "nope"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "nope" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


# ----------------------------------------------------------------------------- CL4SRec in place
def test_operators_always_differ():
    lengths = torch.randint(1, 50, (5000,))
    first, second = draw_operators(lengths, torch.Generator().manual_seed(0))
    long = lengths > 1
    assert (first[long] != second[long]).all() and (first[~long] == -1).all() and (second[~long] == -1).all()
    pairs = torch.stack([first[long], second[long]], 1).unique(dim=0)
    assert len(pairs) == 6                                               # every ordered pair occurs


def test_reorder_keeps_each_multiset():
    seq = torch.randint(1, 100, (64, 20))
    lengths = torch.randint(1, 21, (64,))
    seq = torch.where(torch.arange(20)[None] < lengths[:, None], seq, 0)
    out, _ = reorder(seq, lengths, 0.6, torch.Generator().manual_seed(0))
    assert torch.equal(out.sort(1).values, seq.sort(1).values)


def test_inplace_views_and_written_back_sequence():
    cfg = make_config("smoke")
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 21, (500,))
    seq = torch.where(torch.arange(20)[None] < lengths[:, None], torch.randint(1, 90, (500, 20)), 0)
    before = seq.clone()
    views, after = augment_inplace(seq, lengths, cfg, 99, g)
    assert torch.equal(seq, before)                                      # the caller writes back
    for i in range(500):
        n = int(lengths[i])
        n_mask = int((after[i] == 99).sum())
        assert n_mask in (0, int(n * 0.3))
        kept = after[i][after[i] != 99]
        assert len(kept) == 20 - n_mask
        # what is not masked is a sub-multiset of the original (reorder only permutes)
        assert not (torch.bincount(kept, minlength=100) > torch.bincount(before[i], minlength=100)).any()
        if n == 1:
            assert torch.equal(after[i], before[i]) and torch.equal(views[0][0][i], before[i])
    same = (views[0][0] == views[1][0]).all(1) & (views[0][1] == views[1][1])
    uncropped = (views[0][1] == lengths) & (views[1][1] == lengths) & (lengths > 3)
    # two in-place operators give one stored sequence, seen by both views
    assert same[uncropped].float().mean() > 0.9


def test_inplace_epoch_masks_stored_inputs_at_the_expected_rate(tmp_path, smoke_data):
    cfg = make_config("smoke", variant="cl4srec", cl4srec_inplace=True)
    items = smoke_data.items.clone()
    train(cfg, tmp_path / "run", progress=False, data=smoke_data)
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    obj = Objective(cfg, smoke_data)
    lengths = (obj.targets - smoke_data.offsets[obj.users]).clamp(max=cfg.max_len)
    expected = float(((lengths > 1) * (lengths * cfg.mask_gamma).floor()).sum() * 2 / 3 / lengths.sum())
    assert history[0]["mask_fraction"] == pytest.approx(expected, rel=0.1)
    assert torch.equal(smoke_data.items, items)                          # the data itself is untouched
    plain = Objective(make_config("smoke", variant="cl4srec"), smoke_data)
    assert plain.stored is None and plain.state() == {}
    seq, n, _ = plain.batch(torch.arange(64))
    copy = seq.clone()
    augment_pair(seq, n, plain.cfg, 999, torch.Generator().manual_seed(0))
    assert torch.equal(seq, copy)                                        # without the switch: no writes


def test_inplace_run_resumes_exactly(tmp_path, smoke_data):
    cfg = make_config("smoke", variant="cl4srec", cl4srec_inplace=True, epochs=2, patience=2)
    train(cfg, tmp_path / "straight", progress=False, data=smoke_data)
    train_killed_after_first_epoch(cfg, tmp_path / "resumed", smoke_data)
    assert (tmp_path / "resumed.partial" / "objective-1.safetensors").is_file()
    train(cfg, tmp_path / "resumed", progress=False, data=smoke_data)
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("straight", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    ha, hb = (json.loads((tmp_path / d / "history.json").read_text()) for d in ("straight", "resumed"))
    assert [h["mask_fraction"] for h in ha] == [h["mask_fraction"] for h in hb]
    assert ha[1]["mask_fraction"] > ha[0]["mask_fraction"]                # the masks accumulate


# ----------------------------------------------------------------------------- init_from
@pytest.fixture(scope="module")
def base_run(tmp_path_factory, smoke_data):
    out = tmp_path_factory.mktemp("base") / "sasrec"
    train(make_config("smoke"), out, progress=False, data=smoke_data)
    return out


def test_start_weights_are_the_base_with_a_zero_mask_row(base_run, smoke_data):
    base = load_file(str(base_run / "model.safetensors"))
    for variant in ("duorec_sup", "cl4srec"):
        cfg = make_config("smoke", variant=variant, init_from=str(base_run), lr=1e-4)
        w = start_weights(cfg, base_run)
        mask_row = smoke_data.n_items + 1
        for k in base:
            if k == "item_emb.weight":
                assert torch.equal(w[k][:mask_row], base[k][:mask_row])
                assert torch.equal(w[k][mask_row], torch.zeros_like(base[k][mask_row])) == (variant == "cl4srec")
            else:
                assert torch.equal(w[k], base[k])


def test_training_starts_exactly_from_the_base(tmp_path, base_run, smoke_data):
    # Adam's steps are about lr in size: with lr 1e-12 the run ends where it started
    cfg = make_config("smoke", variant="duorec_unsup", init_from=str(base_run), lr=1e-12)
    train(cfg, tmp_path / "ft", progress=False, data=smoke_data, init=start_weights(cfg, base_run))
    a, b = load_file(str(base_run / "model.safetensors")), load_file(str(tmp_path / "ft" / "model.safetensors"))
    # (the base itself moved a full epoch away from the shared initialisation, so this is not it)
    assert all(torch.allclose(a[k], b[k], atol=1e-9, rtol=0) for k in a)


def test_init_from_refuses_missing_unfinished_and_mismatched(tmp_path, base_run, smoke_data):
    cfg = make_config("smoke", variant="duorec_sup", init_from="x")
    with pytest.raises(FmpaperError, match="missing"):
        start_weights(cfg, tmp_path / "nowhere")
    (tmp_path / "half.partial").mkdir()
    with pytest.raises(FmpaperError, match="unfinished"):
        start_weights(cfg, tmp_path / "half")
    other = make_config("smoke", variant="duorec_sup", init_from="x", hidden=32)
    with pytest.raises(FmpaperError, match="hidden"):
        start_weights(other, base_run)
    elsewhere = make_config("smoke", variant="duorec_sup", init_from="x", dataset="ml-1m")
    with pytest.raises(FmpaperError, match="dataset"):
        start_weights(elsewhere, base_run)
    r = subprocess.run([sys.executable, "-m", "fmpaper", "train", "--profile", "smoke", "--variant", "cl4srec",
                        "--set", f"init_from={tmp_path / 'nowhere'}", "--out", str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "init_from" in r.stderr and r.stderr.count("\n") == 1
    for bad in ("lr=0", "lr=-0.001", "select=first"):
        r = subprocess.run([sys.executable, "-m", "fmpaper", "train", "--profile", "smoke", "--set", bad,
                            "--out", str(tmp_path / "o")], capture_output=True, text=True)
        assert r.returncode == 2 and bad.split("=")[0] in r.stderr and r.stderr.count("\n") == 1
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_select_last_keeps_the_last_epoch(tmp_path, base_run, smoke_data):
    member = load_run(base_run, data=smoke_data).cfg
    assert finetune_config(member, epochs=10).epochs == member.epochs == 1   # the profile's cap
    cfg = finetune_config(dataclasses.replace(member, epochs=5), epochs=2, lr=1e-4)
    assert (cfg.variant, cfg.select, cfg.epochs, cfg.patience, cfg.lr) == ("sasrec", "last", 2, 2, 1e-4)
    m = train(cfg, tmp_path / "ft", progress=False, data=smoke_data,
              init=load_file(str(base_run / "model.safetensors")))
    history = json.loads((tmp_path / "ft" / "history.json").read_text())
    assert m["kept_epoch"] == 2 and m["valid_ndcg@10"] == history[-1]["valid_ndcg@10"]


# ----------------------------------------------------------------------------- the rows
def test_finetuned_rows_and_their_dependencies():
    r = rows()
    for v in ("cl4srec", "duorec_unsup", "duorec_sup", "duorec_supunsup"):
        row = r[f"ft_{v}"]
        assert row.kind == "train" and row.init_from == "baseline" and dict(row.settings)["lr"] == 1e-4
        assert row.needs(2) == [("baseline", 2)]
    tuned = r["ft_fisher_target_1_tuned"]
    assert tuned.members == ("ft_duorec_unsup", "ft_duorec_sup", "ft_duorec_supunsup")
    assert tuned.finetune_epochs == 10 and tuned.finetune_lr == 1e-4 and "ft_ensemble_tuned" not in r
    for m in tuned.members:                       # each member trained further exactly as the merges are
        control = r[f"{m}_tuned"]
        assert trained_further(m) == control.name and control.needs(1) == [(m, 1)]
        cfg = train_config(control, "ml-1m", "quick", 1)
        merge_cfg = kept_target(tuned.name, "ml-1m", "quick", 1)[1]
        assert cfg.init_from == m and dataclasses.replace(cfg, init_from="") == merge_cfg
        assert (cfg.variant, cfg.select, cfg.epochs, cfg.lr) == ("sasrec", "last", 2, 1e-4)
    assert trained_further("baseline") is None and uniform_of(tuned.name) == "ft_uniform_tuned"
    assert uniform_of("ft_fisher_target_1") == "ft_uniform"
    assert members_trained_as_long(tuned.name) == tuple(f"{m}_tuned" for m in tuned.members)
    assert members_trained_as_long("ft_fisher_target_1") is None and members_trained_as_long("fisher_exact") is None
    assert r["fisher_exact_seeds"].needs(3) == [("duorec_unsup", 3), ("duorec_sup", 4), ("duorec_supunsup", 5)]
    assert not r["fisher_exact_seeds"].runs_in("paper") and r["ft_uniform"].runs_in("paper")
    assert get_row("cl4srec_as_run").settings == (("cl4srec_inplace", True),)


def test_run_identity_follows_the_base_and_the_member_seeds(tmp_path):
    a = run_dir("ft_duorec_sup", "ml-100k", "smoke", 0, root=tmp_path)
    b = run_dir("ft_duorec_sup", "ml-100k", "smoke", 0, root=tmp_path, group_by_length=False)
    assert a != b and a.name.startswith("ft_duorec_sup-")
    s0 = run_dir("fisher_exact_seeds", "ml-100k", "smoke", 0, root=tmp_path)
    assert s0 != run_dir("fisher_exact", "ml-100k", "smoke", 0, root=tmp_path)


def test_mask_fraction_names_runs_without_history(tmp_path, monkeypatch, smoke_data):
    """A cl4srec_as_run restored from a checkpoint kept without its training record has no
    per-epoch history: the figure says so instead of failing the page."""
    monkeypatch.setenv("FMPAPER_RUNS", str(tmp_path))
    cfg = make_config("smoke", variant="cl4srec", cl4srec_inplace=True, epochs=1, patience=1)
    out = run_dir("cl4srec_as_run", "ml-100k", "smoke", 0)
    assert out.parent.parent.parent.parent == tmp_path
    train(cfg, out, progress=False, data=smoke_data)
    assert len(mask_fraction("ml-100k", "smoke", [0])) == 1              # one epoch, one share
    (out / "history.json").unlink()
    frac = mask_fraction("ml-100k", "smoke", [0])
    assert frac.empty and frac.attrs["no_history"] == [0]
    texts = [t.get_text() for ax in plot_mask_fraction(frac).axes for t in ax.texts]
    assert any("no per-epoch history" in t for t in texts)
