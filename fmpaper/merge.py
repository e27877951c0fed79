"""Parameter merging of models that share one architecture (poster, "Parameter Merging").

uniform_merge: theta* = (1/M) sum_m theta_m (the authors' code forgets the 1/M; we do not).
fisher_merge:  theta* = sum_m lambda_m F_m theta_m / sum_m lambda_m F_m, elementwise, with F_m
               the diagonal Fisher of model m (fmpaper.fisher). Every parameter is merged,
               embeddings and LayerNorm included.

Floor: each F_m is replaced by F_m + floor before weighting. Where every Fisher vanishes
(e.g. an item no validation sequence touches and the model never predicts) the entry then
falls back to the lambda-weighted mean of the models; where some Fisher is far above the floor
the floor changes nothing visible. floor = 0 is allowed: entries whose weights all vanish
still fall back to the lambda-weighted mean. Arithmetic is in float64, results take the
dtype of the first state.
"""
from __future__ import annotations

import math

import torch

from . import FmpaperError


def check_same_tensors(ref: dict, other: dict, label: str, ref_label: str) -> None:
    """FmpaperError unless `other` has exactly the tensor names and shapes of `ref`."""
    for name, t in ref.items():
        if name not in other:
            raise FmpaperError(f"{label} has no entry for parameter {name}")
        if tuple(other[name].shape) != tuple(t.shape):
            raise FmpaperError(f"parameter {name} has shape {tuple(other[name].shape)} in {label}, "
                               f"{tuple(t.shape)} in {ref_label}")
    for name in other:
        if name not in ref:
            raise FmpaperError(f"{label} has parameter {name} that {ref_label} lacks")


def _check_states(states, what: str = "model") -> list[str]:
    """Names of the parameters shared by all states; FmpaperError on any mismatch."""
    if not isinstance(states, (list, tuple)) or len(states) == 0:
        raise FmpaperError(f"need a non-empty list of {what} states")
    for m, s in enumerate(states[1:], start=2):
        check_same_tensors(states[0], s, f"{what} {m}", f"{what} 1")
    return list(states[0])


def _check_fishers(states, fishers, names) -> None:
    if not isinstance(fishers, (list, tuple)) or len(fishers) != len(states):
        got = len(fishers) if isinstance(fishers, (list, tuple)) else type(fishers).__name__
        raise FmpaperError(f"need one Fisher per model: {len(states)} models, {got} Fishers")
    for m, f in enumerate(fishers, start=1):
        check_same_tensors(states[0], f, f"Fisher {m}", "the models")
        for name in names:
            if not torch.isfinite(f[name]).all() or (f[name] < 0).any():
                raise FmpaperError(f"Fisher {m} of {name} has negative, NaN or infinite entries")


def _check_lambdas(lambdas, M: int) -> list[float]:
    if lambdas is None:
        return [1.0] * M
    lambdas = [float(x) for x in lambdas]
    if len(lambdas) != M:
        raise FmpaperError(f"need one lambda per model: {M} models, {len(lambdas)} lambdas")
    if any(not math.isfinite(x) or x < 0 for x in lambdas):
        raise FmpaperError(f"lambdas must be finite and >= 0, got {lambdas}")
    if sum(lambdas) == 0:
        raise FmpaperError("lambdas are all zero: no model would count")
    return lambdas


def _merge_exact_copies(states, name):
    """Integer tensors (none in SASRec, but a state may carry counters) must agree."""
    t = states[0][name]
    for m, s in enumerate(states[1:], start=2):
        if not torch.equal(s[name].to(t.device), t):
            raise FmpaperError(f"non-float parameter {name} differs between model 1 and model {m}")
    return t.clone()


def uniform_merge(states: list[dict]) -> dict:
    """Plain mean of the models' parameters: the Fisher merge with every Fisher equal to one."""
    _check_states(states)
    ones = [{name: torch.ones_like(t, dtype=torch.float64) for name, t in s.items()} for s in states]
    return fisher_merge(states, ones, floor=0.0)


def fisher_merge(states: list[dict], fishers: list[dict], lambdas=None, floor: float = 1e-10) -> dict:
    """theta* = sum_m lambda_m (F_m + floor) theta_m / sum_m lambda_m (F_m + floor), elementwise."""
    names = _check_states(states)
    _check_fishers(states, fishers, names)
    lambdas = _check_lambdas(lambdas, len(states))
    if not math.isfinite(floor) or floor < 0:
        raise FmpaperError(f"floor must be finite and >= 0, got {floor}")
    out = {}
    for name in names:
        t = states[0][name]
        if not t.is_floating_point():
            out[name] = _merge_exact_copies(states, name)
            continue
        num = torch.zeros(t.shape, dtype=torch.float64, device=t.device)
        den = torch.zeros_like(num)
        mean = torch.zeros_like(num)  # lambda-weighted mean: where every weight vanishes
        for lam, s, f in zip(lambdas, states, fishers):
            w = lam * (f[name].to(t.device, torch.float64) + floor)
            theta = s[name].to(t.device, torch.float64)
            num += w * theta
            den += w
            mean += lam * theta
        mean /= sum(lambdas)
        out[name] = torch.where(den > 0, num / den.clamp(min=torch.finfo(torch.float64).tiny), mean).to(t.dtype)
    return out


def fisher_weight_shares(fishers: list[dict], lambdas=None) -> dict[str, list[float]]:
    """{parameter name: [share of model m in sum_m lambda_m sum(F_m[name])]}: how much each model
    weighs in the merge of that tensor. A tensor whose Fishers are all zero gets the lambda shares."""
    if not isinstance(fishers, (list, tuple)) or len(fishers) == 0:
        raise FmpaperError("need a non-empty list of Fishers")
    names = _check_states(fishers, "Fisher")  # same names and shapes
    lambdas = _check_lambdas(lambdas, len(fishers))
    shares = {}
    for name in names:
        mass = [lam * float(f[name].double().sum()) for lam, f in zip(lambdas, fishers)]
        if any(not math.isfinite(x) or x < 0 for x in mass):
            raise FmpaperError(f"Fisher of {name} has negative, NaN or infinite entries")
        total = sum(mass)
        shares[name] = [x / total for x in mass] if total > 0 else [x / sum(lambdas) for x in lambdas]
    return shares
