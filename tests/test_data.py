import json
import subprocess
import sys

import pytest
import torch

from fmpaper import FmpaperError
from fmpaper.data import batches, kcore, load, read_inter

from conftest import write_inter


def five_core_case(tmp_path):
    """Six users a..f rate items 1..5. Item 7 has 4 ratings (a, b, c, g) and item 8 one (g): both
    go in the first pass, which leaves g with 3 interactions, so g goes in the second."""
    rows = []
    t = 0
    for u in "abcdef":                       # six users share items 1..5
        for i in range(1, 6):
            t += 1
            rows.append((u, i, t))
    rows += [("a", 7, 100), ("b", 7, 101), ("c", 7, 102)]    # item 7: 3 ratings -> dropped
    rows += [("g", 1, 5), ("g", 2, 6), ("g", 3, 7), ("g", 7, 8), ("g", 8, 9)]  # g: loses 7, 8 -> 3 left -> dropped
    return write_inter(tmp_path / "t.inter", rows)


def test_kcore_iterates(tmp_path):
    df = kcore(read_inter(five_core_case(tmp_path)), 5)
    assert sorted(df["user"].unique()) == list("abcdef")
    assert sorted(df["item"].unique(), key=int) == ["1", "2", "3", "4", "5"]
    assert len(df) == 30


def test_leave_one_out_and_prefixes(tmp_path):
    # one user with items in a known time order, ties kept in file order
    rows = [("u", 10 + k, ts) for k, ts in enumerate([5, 1, 3, 3, 9, 7])]   # items 10..15
    path = write_inter(tmp_path / "s.inter", rows)
    d = load(str(path), max_len=3, min_count=1)
    tokens = d.item_tokens
    order = [tokens[i - 1] for i in d.items.tolist()]
    assert order == ["11", "12", "13", "10", "15", "14"]                   # by time; 12 before 13 (tie)
    valid, test = d.eval_targets("valid"), d.eval_targets("test")
    assert tokens[d.items[valid].item() - 1] == "15" and tokens[d.items[test].item() - 1] == "14"
    targets, users = d.train_targets()                                   # training part 11 12 13 10
    assert targets.tolist() == [1, 2, 3]
    seq, lengths, y = d.inputs(targets, users)
    ids = {t: i + 1 for i, t in enumerate(tokens)}
    assert lengths.tolist() == [1, 2, 3]
    assert seq.tolist() == [[ids["11"], 0, 0], [ids["11"], ids["12"], 0], [ids["11"], ids["12"], ids["13"]]]
    assert [tokens[i - 1] for i in y.tolist()] == ["12", "13", "10"]
    # validation input: the last max_len=3 items before the validation target, truncated from the left
    s, n, _ = d.inputs(valid, torch.tensor([0]))
    assert n.tolist() == [3] and s.tolist() == [[ids["12"], ids["13"], ids["10"]]]
    assert d.stats() == {"users": 1, "items": 6, "interactions": 6, "train_examples": 3}


def test_ml100k_counts(smoke_data):
    full = load("ml-100k")
    assert full.stats() == {"users": 943, "items": 1349, "interactions": 99287, "train_examples": 96458}
    assert smoke_data.n_users == 60


@pytest.mark.parametrize("content, message", [
    ("1\t2\t3\n", "header"),
    ("user_id:token\titem_id:token\n1\t2\n", "timestamp"),
    ("user_id:token\titem_id:token\ttimestamp:float\n1\t2\tyesterday\n", "non-numeric timestamp"),
])
def test_bad_inter(tmp_path, content, message):
    p = tmp_path / "bad.inter"
    p.write_text(content)
    with pytest.raises(FmpaperError, match=message):
        load(str(p))


def test_missing_and_empty(tmp_path):
    with pytest.raises(FmpaperError, match="no such"):
        load(str(tmp_path / "nope.inter"))
    p = write_inter(tmp_path / "few.inter", [("a", 1, 1), ("a", 2, 2)])
    with pytest.raises(FmpaperError, match="5-core"):
        load(str(p))


def test_grouped_batches_cover_every_example_once():
    lengths = torch.randint(1, 51, (1000,))
    got = batches(1000, 64, torch.Generator().manual_seed(0), lengths)
    assert sorted(torch.cat(got).tolist()) == list(range(1000))
    spread = sum(int(lengths[b].max() - lengths[b].min()) for b in got) / len(got)
    assert spread < 10                                                    # similar lengths per batch


def test_cli_stats_and_errors(tmp_path):
    path = five_core_case(tmp_path)
    out = subprocess.run([sys.executable, "-m", "fmpaper", "data", "stats", str(path), "--json"],
                         capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == {"users": 6, "items": 5, "interactions": 30, "train_examples": 12}
    bad = subprocess.run([sys.executable, "-m", "fmpaper", "data", "stats", str(tmp_path / "x.inter")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "no such .inter file" in bad.stderr
