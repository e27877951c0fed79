"""Diagonal Fisher information of a SASRec, for Fisher merging (book chapter "The Fisher", book/fisher.md).

    F = E_s E_{v ~ p(v|s)} (d log p(v|s) / d theta)^2          (elementwise, every parameter)

computed in eval mode (no dropout) over given sequences (the authors used the validation
inputs) and averaged over them. Estimators (`estimator=`):

  exact       the expectation over all items in closed form (derived below); d backward passes
              per batch of sequences instead of |V| per sequence
  bruteforce  sum_v p_v g_v^2 over all items with explicit per-example gradients (verification)
  target      p(v*|s) g_{v*}^2 for the target item v* (poster); `authors=True` is the authors'
              code: logits / 10, weight p*^2, summed over sequences without dividing by N
  random      k items uniformly without replacement, (|V|/k) sum p_v g_v^2 (unbiased)
  topk        the k most probable items, sum p_v g_v^2 (truncated: biased low)
  model       k draws v ~ p with replacement, (1/k) sum g_v^2 (unbiased)

The sampled estimators sum per-example squared gradients (in closed form, below), or with
`batchwise=True` a slot-paired batch form: per batch b and slot j,
(sum_{i in b} w_ij) * (grad sum_{i in b} log p(v_ij|s_i))^2 / |b|, summed over batches and
divided by N, so a batch of one is exactly the per-example estimate. Each sequence draws its own
items; the poster's form, one item per draw shared by the whole batch, is not implemented (the
method chapter's "Sampling estimators" gives the bias of the slot-paired form).

Exact Fisher: derivation
------------------------
h (d) is the representation of s, E (|V|, d) the output item embeddings (rows 1..n_items of
the tied table), z = E h, p = softmax(z), ebar = sum_j p_j e_j, a_v = e_v - ebar, and
J = dh/dtheta (d x P). Since d log p_v = d z_v - sum_j p_j d z_j,

    g_v = J^T a_v + O_v,     O_v[(u, c)] = (delta_uv - p_u) h_c   (output use of row u of E).

Sum over v with weights p_v, elementwise squares:
  1. sum_v p_v (J^T a_v)^2 = diag(J^T C J),  C = sum_v p_v a_v a_v^T (d x d). With
     C = U Lambda U^T and R = Lambda^1/2 U^T (so C = R^T R) this is sum_i ((R J)_i)^2.
  2. sum_v p_v O_v[(u,c)]^2 = h_c^2 (p_u (1-p_u)^2 + (1-p_u) p_u^2) = p_u (1 - p_u) h_c^2.
  3. 2 sum_v p_v (J^T a_v)_(u,c) (delta_uv - p_u) h_c = 2 h_c p_u (a_u^T J)_(u,c), because
     sum_v p_v a_v = 0. Nonzero only for rows u that are also in the input (tied embedding).
     a_u^T J = sum_i (u_i . a_u)(u_i^T J) = sum_i (u_i . a_u / sqrt(lambda_i)) (R J)_i; where
     lambda_i = 0, u_i . a_u = 0 for every u with p_u > 0 (lambda_i = sum_v p_v (u_i . a_v)^2).
Computing R J: backward pass i carries cotangent R_i (row i of each sequence's R) for all
sequences of a batch at once (they do not interact), w.r.t. the embedded input x (B, L, d) and
the output of every Linear / LayerNorm (recorded by forward hooks): d passes per batch, not
|V| per sequence. Per-example weight gradients follow from the output gradients G and inputs X:
Linear dW = G^T X (at a single position: (g x^T)^2 = g^2 (x^2)^T), db = sum_t G; LayerNorm
dw = sum_t G * xhat, db = sum_t G. Position row t uses dh/dx[t]; item row u uses the sum of
dh/dx[t] over the positions holding u (summed before squaring). Padding never reaches h (causal
attention read at the last real position): row 0 stays 0, and so does the mask-token row unless
the inputs contain the mask token.

Sampled estimators, same machinery
----------------------------------
A sampled estimator is sum_j w_j g_{v_j}^2 over k drawn items v_j with weights w_j >= 0. With
rows R_j = sqrt(w_j) a_{v_j} (k x d), W = sum_j w_j and m_u = sum_{j: v_j = u} w_j:
  1. sum_j w_j (J^T a_{v_j})^2 = sum_j ((R J)_j)^2: k backward passes instead of d.
  2. sum_j w_j O_{v_j}[(u, c)]^2 = (W p_u^2 + m_u (1 - 2 p_u)) h_c^2.
  3. 2 h_c sum_j sqrt(w_j) ([v_j = u] - p_u) (R J)_j[(u, c)] for input rows u.
The exact Fisher is the case w = p over all items (W = 1, m_u = p_u, sum_v p_v a_v = 0), where
the eigendecomposition of C brings the k = |V| rows down to d. With the authors' temperature T
(logits / T), a_v and h are divided by T. `gradients="autograd"` computes the same sums from
explicit per-example gradients (torch.func), the reference the tests compare against.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import numbers
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.func import functional_call, jacrev, vmap
from tqdm import tqdm

from . import FmpaperError, first_line
from .merge import check_same_tensors

ESTIMATORS = ("exact", "target", "random", "topk", "model", "bruteforce")
SAMPLED = ("target", "random", "topk", "model")
TAKES_K = ("random", "topk", "model")       # the estimators that draw k items per sequence
AUTHORS_TEMPERATURE = 10.0   # the authors' code divides the logits by 10 for the Fisher
MEMORY_BYTES = 256 * 2**20   # working set of one chunk of per-example gradients (CPU; larger
                             # chunks were slower in benchmarks/bench_fisher.py: cache misses)
GPU_MEMORY_BYTES = 4 * 2**30
DRAW_CHUNK = 256             # sequences per sampling step: draws do not depend on batch_size

try:  # torch.func has no batching rule for the fused CPU attention kernels; the math one is plain ops
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def _math_attention():
        return sdpa_kernel([SDPBackend.MATH])
except ImportError:  # torch < 2.3: correct, only slower
    def _math_attention():
        return contextlib.nullcontext()


# ----------------------------------------------------------------------------- public API

def compute_fisher(model, seq, lengths, targets, estimator, k=None, batchwise=False, authors=False,
                   batch_size=64, seed=0, progress=True, dtype=None, return_meta=False,
                   gradients="closed"):
    """Diagonal Fisher of every parameter of `model` (SASRec) over sequences seq (N, L) with
    lengths (N,) and target items (N,) (targets only needed by 'target'). Returns
    {name: tensor like the parameter} on the CPU (and a meta dict with `return_meta`).

    k: items per sequence for random/topk/model. batch_size: sequences per step (the batch of
    the batch-wise formula; otherwise only a unit of work). dtype: compute in this dtype
    (default: the model's). gradients: "closed" (rows of R J, module docstring) or "autograd"
    (explicit per-example gradients: slow, the reference). The model itself is left untouched
    (a copy is put in eval mode)."""
    n_items = _check(model, seq, lengths, targets, estimator, k, batchwise, authors, batch_size)
    if gradients not in ("closed", "autograd"):
        raise FmpaperError(f"gradients must be 'closed' or 'autograd', got {gradients!r}")
    t0 = time.perf_counter()
    model = copy.deepcopy(model).eval()
    if dtype is not None:
        model = model.to(dtype)
    model.requires_grad_(False)
    device = next(model.parameters()).device
    seq, lengths = seq.to(device).long(), lengths.to(device).long()
    targets = None if targets is None else targets.to(device).long()
    acc = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    temperature = AUTHORS_TEMPERATURE if authors else 1.0

    if estimator == "exact" and gradients == "closed":
        _closed(model, seq, lengths, acc, batch_size, progress, "exact")
    elif estimator in ("exact", "bruteforce"):
        def draw(idx):  # every item, weighted by its probability
            p = _probs(model, seq[idx], lengths[idx], 1.0)                  # (B, n)
            items = torch.arange(1, n_items + 1, device=device).expand(len(idx), n_items)
            return items, p
        _per_example(model, seq, lengths, draw, 1.0, acc, batch_size, progress, "bruteforce")
    else:
        gen = torch.Generator().manual_seed(seed)
        items, weights = _draw(model, seq, lengths, targets, estimator, k, temperature,
                               2 if authors else 1, gen)
        if batchwise:
            _batchwise(model, seq, lengths, items, weights, temperature, acc, batch_size, progress, estimator)
        elif gradients == "closed":
            _closed(model, seq, lengths, acc, batch_size, progress, estimator, items, weights, temperature)
        else:
            _per_example(model, seq, lengths, lambda idx: (items[idx], weights[idx]), temperature,
                         acc, batch_size, progress, estimator)

    scale = 1.0 if authors else 1.0 / len(seq)  # the authors accumulate a plain sum
    fisher = {name: (f * scale).cpu() for name, f in acc.items()}
    if not return_meta:
        return fisher
    meta = {"estimator": estimator, "k": k, "batchwise": bool(batchwise), "authors": bool(authors),
            "seed": seed, "batch_size": batch_size, "sequences": len(seq), "gradients": gradients,
            "seconds": round(time.perf_counter() - t0, 3), "dtype": str(next(model.parameters()).dtype)}
    return fisher, meta


def probability_mass_topk(model, seq, lengths, ks=(10, 30, 50), batch_size=256) -> dict:
    """Mean share of the predicted probability mass held by the top-k items, for each k."""
    n_items = model.n_items
    for k in ks:
        if not 1 <= k <= n_items:
            raise FmpaperError(f"k must lie in 1..{n_items} (n_items), got {k}")
    _check(model, seq, lengths, None, "exact", None, False, False, batch_size)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    seq, lengths = seq.to(device).long(), lengths.to(device).long()
    kmax, total = max(ks), None
    try:
        for s in range(0, len(seq), batch_size):
            p = _probs(model, seq[s:s + batch_size], lengths[s:s + batch_size], 1.0)
            mass = p.topk(kmax, dim=1).values.cumsum(1).sum(0).double()    # (kmax,)
            total = mass if total is None else total + mass
    finally:
        model.train(was_training)
    return {k: float(total[k - 1]) / len(seq) for k in ks}


def architecture_signature(shapes: dict) -> str:
    """Short hash of the parameter names and shapes: equal signatures <=> mergeable tensors."""
    text = json.dumps({n: list(s) for n, s in sorted(shapes.items())})
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def save_fisher(path, fisher: dict, meta: dict) -> None:
    """Write fisher as safetensors at `path` and meta (plus parameter shapes and their
    signature) as JSON at path.with_suffix('.json'); each lands atomically (temp + os.replace),
    the JSON first: the tensors file marks the pair complete (the run cache reads a Fisher only
    where it exists), so a kill between the two leaves at most a JSON that the next save replaces."""
    path = Path(path)
    json_path = path.with_suffix(".json")
    if json_path == path:
        raise FmpaperError(f"{path}: the Fisher file must not end in .json (the meta goes there)")
    shapes = {n: list(t.shape) for n, t in fisher.items()}
    meta = dict(meta, shapes=shapes, signature=architecture_signature(shapes), format="fmpaper-fisher-1")
    try:
        meta_text = json.dumps(meta, indent=2, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise FmpaperError(f"Fisher meta is not JSON-serialisable ({e})") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {n: t.detach().cpu().contiguous() for n, t in fisher.items()}
    tmp_st = _temp_name(path)
    tmp_js = _temp_name(json_path)
    try:
        save_file(tensors, str(tmp_st))
        tmp_js.write_text(meta_text + "\n", encoding="utf-8")
        os.replace(tmp_js, json_path)
        os.replace(tmp_st, path)
    finally:
        for t in (tmp_st, tmp_js):
            t.unlink(missing_ok=True)


def load_fisher(path) -> tuple[dict, dict]:
    """(fisher, meta) written by save_fisher; FmpaperError if missing, unreadable or not finite."""
    path = Path(path)
    json_path = path.with_suffix(".json")
    for p in (path, json_path):
        if not p.is_file():
            raise FmpaperError(f"no such Fisher file: {p}")
    try:
        fisher = load_file(str(path))
    except Exception as e:
        raise FmpaperError(f"{path}: not a readable safetensors file ({first_line(e)})") from None
    try:
        meta = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise FmpaperError(f"{json_path}: not readable JSON ({first_line(e)})") from None
    if not isinstance(meta, dict):
        raise FmpaperError(f"{json_path}: expected a JSON object of Fisher meta data")
    for name, t in fisher.items():
        if not torch.isfinite(t).all():
            raise FmpaperError(f"{path}: Fisher of {name} has NaN or infinite entries")
        if (t < 0).any():
            raise FmpaperError(f"{path}: Fisher of {name} has negative entries")
    shapes = meta.get("shapes")
    if shapes is not None and shapes != {n: list(t.shape) for n, t in fisher.items()}:
        raise FmpaperError(f"{path}: tensor shapes disagree with {json_path.name}")
    return fisher, meta


def check_compatible(fisher: dict, model_state) -> None:
    """Raise FmpaperError naming the first parameter whose Fisher is missing or misshapen."""
    if isinstance(model_state, nn.Module):
        model_state = model_state.state_dict()
    check_same_tensors(model_state, fisher, "the Fisher", "the model")


# ----------------------------------------------------------------------------- checks, sampling

def check_options(estimator, k=None, batchwise=False, authors=False, n_items=None) -> None:
    """The one check of an estimator's options (rows.FisherSpec and compute_fisher call it): k
    only for TAKES_K, and there an integer >= 1 (at most n_items when the model is known);
    batchwise only for SAMPLED; the authors' form only for the target item."""
    if estimator not in ESTIMATORS:
        raise FmpaperError(f"unknown Fisher estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
    if estimator in TAKES_K:
        top = n_items if n_items is not None else float("inf")
        if not isinstance(k, numbers.Integral) or isinstance(k, bool) or not 1 <= k <= top:
            span = f"in 1..{n_items} (n_items)" if n_items is not None else ">= 1 (items per sequence)"
            raise FmpaperError(f"estimator {estimator} needs k {span}, got {k!r}")
    elif k is not None:
        raise FmpaperError(f"estimator {estimator} takes no k (got k={k}); only {', '.join(TAKES_K)} do")
    if batchwise and estimator not in SAMPLED:
        raise FmpaperError(f"batchwise applies to {', '.join(SAMPLED)}, not to {estimator}")
    if authors and estimator != "target":
        raise FmpaperError(f"the authors' form is a target-item Fisher; not available for {estimator}")


def _check(model, seq, lengths, targets, estimator, k, batchwise, authors, batch_size) -> int:
    n_items = model.n_items
    check_options(estimator, k, batchwise, authors, n_items)
    if not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise FmpaperError(f"batch_size must be a positive integer, got {batch_size}")
    if not torch.is_tensor(seq) or seq.dim() != 2 or len(seq) == 0:
        raise FmpaperError("seq must be a non-empty (N, L) tensor of item ids")
    N, L = seq.shape
    if L > model.pos_emb.num_embeddings:
        raise FmpaperError(f"sequences have {L} positions, the model only {model.pos_emb.num_embeddings}")
    if not torch.is_tensor(lengths) or tuple(lengths.shape) != (N,):
        raise FmpaperError(f"lengths must be a ({N},) tensor, one per sequence")
    if int(lengths.min()) < 1 or int(lengths.max()) > L:
        raise FmpaperError(f"lengths must lie in 1..{L}, got {int(lengths.min())}..{int(lengths.max())}")
    if int(seq.min()) < 0 or int(seq.max()) > n_items + 1:
        raise FmpaperError(f"item ids must lie in 0..{n_items + 1}, got {int(seq.min())}..{int(seq.max())}")
    if estimator == "target":
        if targets is None or not torch.is_tensor(targets) or tuple(targets.shape) != (N,):
            raise FmpaperError(f"the target estimator needs targets of shape ({N},)")
        if int(targets.min()) < 1 or int(targets.max()) > n_items:
            raise FmpaperError(f"target items must lie in 1..{n_items}")
    return n_items


@torch.no_grad()
def _probs(model, seq, lengths, temperature):
    h = model.encode(seq[:, : int(lengths.max())], lengths)                # (B, d)
    return torch.softmax(model.logits(h) / temperature, dim=-1)           # (B, n)


@torch.no_grad()
def _draw(model, seq, lengths, targets, estimator, k, temperature, power, gen):
    """Items (N, K) and their weights (N, K) for a sampled estimator, in sequence order."""
    n = model.n_items
    items, weights = [], []
    for s in range(0, len(seq), DRAW_CHUNK):
        p = _probs(model, seq[s:s + DRAW_CHUNK], lengths[s:s + DRAW_CHUNK], temperature)  # (B, n)
        B = len(p)
        if estimator == "target":
            idx = targets[s:s + DRAW_CHUNK, None] - 1
            w = p.gather(1, idx) ** power
        elif estimator == "topk":
            w, idx = p.topk(k, dim=1)
        elif estimator == "random":  # uniform subset; importance weight |V| / k
            idx = torch.multinomial(torch.ones(B, n), k, replacement=False, generator=gen).to(p.device)
            w = p.gather(1, idx) * (n / k)
        else:  # model: v ~ p, each draw weighs 1 / k
            idx = torch.multinomial(p.double().cpu(), k, replacement=True, generator=gen).to(p.device)
            w = torch.full(idx.shape, 1.0 / k, dtype=p.dtype, device=p.device)
        items.append(idx + 1)
        weights.append(w)
    return torch.cat(items), torch.cat(weights)


# ----------------------------------------------------------------------------- per-example gradients

class _Encoder(nn.Module):
    """forward = model.encode, so torch.func.functional_call can swap in the parameters."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, seq, lengths):
        return self.model.encode(seq, lengths)


def _log_probs(model, temperature):
    """log p(items | seq) as a function of the parameters, for torch.func."""
    enc, n = _Encoder(model), model.n_items

    def fn(params, seq, lengths, items):                                  # seq (B, L), items (B, K)
        h = functional_call(enc, {"model." + k: v for k, v in params.items()}, (seq, lengths))
        logits = h @ params["item_emb.weight"][1:n + 1].T / temperature     # (B, n): tied weights
        return torch.log_softmax(logits, dim=-1).gather(1, items - 1)      # (B, K)
    return fn


def _per_example(model, seq, lengths, draw, temperature, acc, batch_size, progress, name):
    """acc += sum_i sum_j w_ij (grad log p(v_ij | s_i))^2, one gradient per (sequence, item)."""
    params = dict(model.named_parameters())
    n_params = sum(p.numel() for p in params.values())
    itemsize = next(iter(params.values())).element_size()
    pairs = max(1, _budget(seq.device) // (3 * n_params * itemsize))  # (sequence, item) gradients held at once
    fn = _log_probs(model, temperature)

    def one(params, s, n, items):                                         # one sequence -> (K,)
        return fn(params, s[None], n[None], items[None])[0]
    jac = vmap(jacrev(one), in_dims=(None, 0, 0, 0))                      # -> {name: (B, K, *shape)}

    order = torch.argsort(lengths.cpu(), stable=True).to(seq.device)     # similar lengths: less padding
    steps = list(order.split(batch_size))
    with _math_attention():
        for idx in tqdm(steps, desc=f"fisher {name}", disable=not progress):
            items, weights = draw(idx)                                    # (B, K) each
            s = seq[idx][:, : int(lengths[idx].max())]
            K = items.shape[1]
            kc = min(K, pairs)
            bc = max(1, pairs // kc)
            for b0 in range(0, len(idx), bc):
                b = slice(b0, b0 + bc)
                for k0 in range(0, K, kc):
                    kk = slice(k0, k0 + kc)
                    grads = jac(params, s[b], lengths[idx][b], items[b, kk])
                    w = weights[b, kk]
                    for pname, g in grads.items():
                        acc[pname] += torch.tensordot(w, g * g, dims=2)


def _batchwise(model, seq, lengths, items, weights, temperature, acc, batch_size, progress, name):
    """Batch-wise form: acc += (sum_i w_ij) (grad sum_i log p(v_ij | s_i))^2 / |batch|, pairing the j-th
    sampled item of every sequence of the batch (the poster shares one item per draw instead: book/fisher.md)."""
    params = dict(model.named_parameters())
    n_params = sum(p.numel() for p in params.values())
    itemsize = next(iter(params.values())).element_size()
    slots = max(1, _budget(seq.device) // (3 * n_params * itemsize))
    fn = _log_probs(model, temperature)
    jac = jacrev(lambda params, s, n, it: fn(params, s, n, it).sum(0))   # -> {name: (K, *shape)}
    steps = list(torch.arange(len(seq), device=seq.device).split(batch_size))  # batches in given order
    with _math_attention():
        for idx in tqdm(steps, desc=f"fisher {name} batchwise", disable=not progress):
            s = seq[idx][:, : int(lengths[idx].max())]
            for k0 in range(0, items.shape[1], slots):
                kk = slice(k0, k0 + slots)
                grads = jac(params, s, lengths[idx], items[idx, kk])
                W = weights[idx, kk].sum(0)                               # (K,)
                for pname, g in grads.items():
                    acc[pname] += torch.tensordot(W, g * g, dims=1) / len(idx)


# ----------------------------------------------------------------------------- exact Fisher

@contextlib.contextmanager
def _record_layers(model):
    """Record (param prefix, module, input, output) of every Linear / LayerNorm call."""
    calls, handles = [], []

    def hook_for(prefix):
        return lambda mod, inp, out: calls.append((prefix, mod, inp[0], out))
    for prefix, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.LayerNorm)):
            handles.append(m.register_forward_hook(hook_for(prefix)))
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def _closed(model, seq, lengths, acc, batch_size, progress, name, items=None, weights=None,
            temperature=1.0):
    """Exact Fisher (items None) or a sampled one (items, weights (N, K)) in closed form."""
    layered = {f"{pre}.{n}" for pre, m in model.named_modules()
               if isinstance(m, (nn.Linear, nn.LayerNorm)) for n, _ in m.named_parameters(recurse=False)}
    others = set(acc) - layered - {"item_emb.weight", "pos_emb.weight"}
    if others:  # the closed form knows these layer types only
        raise FmpaperError(f"closed-form Fisher supports Linear/LayerNorm layers only; {sorted(others)[0]} is neither")
    # memory per sequence at peak: r cotangent rows of (every layer output twice, the largest
    # weight Jacobian three times, four position Jacobians) -> sequences per chunk
    d, L = model.item_emb.embedding_dim, seq.shape[1]
    r = d if items is None else items.shape[1]
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.LayerNorm))]
    outputs = L * sum(m.weight.shape[0] for m in layers if m.weight is not None)
    largest = max(m.weight.numel() for m in layers if m.weight is not None)
    per_seq = r * (2 * outputs + 3 * largest + 4 * L * d) * acc["item_emb.weight"].element_size()
    chunk = max(1, min(batch_size, _budget(seq.device) // per_seq))
    order = torch.argsort(lengths.cpu(), stable=True).to(seq.device)     # similar lengths: less padding
    for idx in tqdm(list(order.split(chunk)), desc=f"fisher {name}", disable=not progress):
        n = lengths[idx]
        drawn = None if items is None else (items[idx], weights[idx])
        _closed_step(model, seq[idx][:, : int(n.max())], n, acc, drawn, temperature)


def _closed_step(model, seq, lengths, acc, drawn, temperature):
    """acc += sum over the batch of the per-sequence Fisher (module docstring): exact when
    drawn is None, else the sampled sum over drawn = (items (B, K), weights (B, K))."""
    B, L = seq.shape
    n = model.n_items
    E_all = model.item_emb.weight                                         # (n + 2, d)
    E = E_all[1:n + 1]                                                    # (n, d) output embeddings
    x = model.embed(seq).detach().requires_grad_(True)                    # (B, L, d)
    with torch.enable_grad(), _record_layers(model) as calls:
        h = model.encode_embedded(x, lengths)                            # (B, d)
    d = h.shape[1]
    hd = h.detach()
    p = torch.softmax(hd @ E.T / temperature, dim=-1)                     # (B, n)
    ebar = p @ E                                                          # (B, d)
    hs = hd / temperature                                                 # d z / d E_u = (delta - p) h / T
    a_in = (E_all[seq] - ebar[:, None]) / temperature                     # (B, L, d)  a_u, u = seq[t]
    p_in = F.pad(p, (1, 1)).gather(1, seq)                                # (B, L): 0 for pad and mask rows

    if drawn is None:
        # C = sum_v p_v a_v a_v^T = R^T R with R = Lambda^1/2 U^T; eigh in float64 (d x d is tiny)
        A = (E[None] - ebar[:, None]).double()                            # (B, n, d)
        C = torch.einsum("bn,bnk,bnl->bkl", p.double(), A, A)             # (B, d, d)
        lam, U = torch.linalg.eigh(C)                                     # ascending
        root = lam.clamp(min=0).sqrt()                                    # (B, d)
        R = (root[:, :, None] * U.transpose(1, 2)).to(hd.dtype)           # (B, d, d)
        # rows with lambda_i = 0 are exactly zero: skipped
        rows = [i for i in range(d) if bool((root[:, i] > 0).any())]
        # term 3 needs p_u a_u^T J = p_u sum_i (u_i . a_u / sqrt(lam_i)) (R J)_i; where lam_i = 0,
        # u_i . a_u = 0 for every item with p_u > 0 (and p_u = 0 kills term 3)
        coef = torch.einsum("bki,btk->bti", U, a_in.double())             # (B, L, d)  u_i . a_u
        coef = torch.where(root[:, None] > 0, coef / root.clamp(min=1e-300)[:, None], 0.0)
        coef3 = (p_in[..., None] * coef[..., rows]).to(hd.dtype)           # (B, L, r)
        q = p * (1 - p)                                                   # (B, n) term 2
    else:
        items, w = drawn                                                  # (B, K) each
        sw = w.to(hd.dtype).sqrt()
        R = sw[..., None] * (E_all[items] - ebar[:, None]) / temperature   # (B, K, d)
        rows = list(range(items.shape[1]))
        hit = (seq[:, :, None] == items[:, None, :]).to(hd.dtype)         # (B, L, K) [v_j = u]
        coef3 = sw[:, None] * (hit - p_in[..., None])                     # (B, L, K)
        m = torch.zeros_like(p).scatter_add_(1, items - 1, w.to(p.dtype))  # (B, n) weight on item u
        q = w.sum(1, keepdim=True).to(p.dtype) * p.square() + m * (1 - 2 * p)  # (B, n) term 2

    # backward pass i carries cotangent R[b, i] for every sequence b at once: it yields row i
    # of R J for every layer output and for x
    outs = [out for _, _, _, out in calls]
    per_row = [torch.autograd.grad(h, [x] + outs, grad_outputs=R[:, i], retain_graph=i != rows[-1],
                                   allow_unused=True) for i in rows]
    RJx = torch.stack([g[0] for g in per_row], 1)                         # (B, r, L, d)

    # 1. layers: per-example weight gradients of the rows, squared, summed over rows
    for j, (prefix, mod, X, out) in enumerate(calls):
        G = torch.stack([torch.zeros_like(out) if g[j + 1] is None else g[j + 1] for g in per_row], 1)
        G = G.flatten(2, -2)                                              # (B, r, T, out)
        X = X.detach().flatten(1, -2)                                     # (B, T, in)
        if isinstance(mod, nn.LayerNorm):  # weight gradient sum_t G * xhat: xhat recomputed
            X = F.layer_norm(X, mod.normalized_shape, None, None, mod.eps)
            if mod.weight is not None:
                acc[f"{prefix}.weight"] += (G * X[:, None]).sum(2).square().sum((0, 1))
        elif mod.weight is not None and X.shape[1] == 1:  # one position: (g x^T)^2 = g^2 (x^2)^T
            acc[f"{prefix}.weight"] += G[:, :, 0].square().sum(1).T @ X[:, 0].square()
        elif mod.weight is not None:
            acc[f"{prefix}.weight"] += (G.transpose(2, 3) @ X[:, None]).square_().sum((0, 1))
        if mod.bias is not None:
            acc[f"{prefix}.bias"] += G.sum(2).square().sum((0, 1))

    # position rows: dh/dx[t] is the Jacobian of pos_emb row t
    acc["pos_emb.weight"][:L] += RJx.square().sum((0, 1))

    # item rows, input use: sum dh/dx[t] over the positions holding the same item, count it once
    real = torch.arange(L, device=seq.device)[None] < lengths[:, None]    # (B, L)
    same = (seq[:, :, None] == seq[:, None, :]) & real[:, None, :]        # (B, L, L)
    earlier = torch.ones(L, L, dtype=torch.bool, device=seq.device).tril(-1)
    first = real & ~(same & earlier).any(-1)                              # (B, L) first occurrence
    RJagg = torch.einsum("btu,biuc->bitc", same.to(RJx.dtype), RJx)       # (B, r, L, d)
    t1 = RJagg.square().sum(1)                                            # (B, L, d)  term 1
    t3 = 2 * hs[:, None] * torch.einsum("bti,bitc->btc", coef3, RJagg)    # (B, L, d)  term 3
    acc["item_emb.weight"].index_add_(0, seq.flatten(), ((t1 + t3) * first[..., None]).flatten(0, 1))
    # item rows, output use: term 2
    acc["item_emb.weight"][1:n + 1] += q.T @ hs.square()


def _budget(device) -> int:
    return GPU_MEMORY_BYTES if device.type == "cuda" else MEMORY_BYTES


def _temp_name(path: Path) -> Path:
    fd, name = tempfile.mkstemp(prefix=path.name + ".", suffix=".partial", dir=path.parent)
    os.close(fd)
    return Path(name)
