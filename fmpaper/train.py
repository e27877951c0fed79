"""Training loop shared by every variant, with early stopping, resumable checkpoints and run I/O.

A run directory holds
  model.safetensors  the best (validation NDCG@10) weights
  config.json        the resolved Config
  metrics.json       best epoch, validation NDCG@10, test metrics under both protocols, times
  history.json       per-epoch loss terms, validation NDCG@10 and seconds
While training, everything lives in `<out>.partial/`, which also holds the state of the last
finished epoch (weights and Adam moments named by epoch, best weights, state.json; every file
written to a temporary name and renamed, state.json last), so a kill at any instant leaves a
consistent epoch to resume from. A killed run restarts
from there; each epoch seeds its own shuffling and dropout, so a resumed run ends with the same
weights as an uninterrupted one. The finished directory is renamed into place at the end.
No pickle is ever written or loaded.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from . import FmpaperError
from .config import Config
from .data import SeqData, batches, load
from .evaluate import test_report, valid_ndcg10
from .model import SASRec
from .objectives import Objective


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise FmpaperError("device 'cuda' requested but torch sees no GPU")
    return torch.device(name)


def processor() -> str:
    """The CPU's model name where the system reports one (Linux: /proc/cpuinfo), else its
    architecture. Recorded because model-based Fisher draws differ between processors."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    n = torch.get_num_threads()
    return f"{processor()}, {n} thread{'' if n == 1 else 's'}"


def load_data(cfg: Config) -> SeqData:
    return load(cfg.dataset, cfg.max_len, cfg.min_count, cfg.max_users)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


def _save_tensors(path: Path, tensors: dict) -> None:
    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def _optimizer_tensors(opt: torch.optim.Adam, model: SASRec) -> dict:
    out = {}
    for name, p in model.named_parameters():
        st = opt.state.get(p)
        if st:
            out[f"exp_avg.{name}"], out[f"exp_avg_sq.{name}"] = st["exp_avg"], st["exp_avg_sq"]
            out[f"step.{name}"] = torch.as_tensor(st["step"], dtype=torch.float64).reshape(1)
    return out


def _restore_optimizer(opt: torch.optim.Adam, model: SASRec, t: dict) -> None:
    for name, p in model.named_parameters():
        if f"step.{name}" in t:
            opt.state[p] = {"step": t[f"step.{name}"].reshape(()).float(),
                            "exp_avg": t[f"exp_avg.{name}"].to(p.device),
                            "exp_avg_sq": t[f"exp_avg_sq.{name}"].to(p.device)}


def _resumable(part: Path, cfg: Config) -> bool:
    """`part` holds a finished epoch of this very config, with every file needed to go on."""
    try:
        if (part / "config.json").read_text() != cfg.to_json():
            return False
        e = json.loads((part / "state.json").read_text())["epoch"]
    except (OSError, ValueError, KeyError):
        return False
    needed = [f"last-{e}.safetensors", f"adam-{e}.safetensors", "best.safetensors"]
    if cfg.cl4srec_inplace:
        needed.append(f"objective-{e}.safetensors")                      # the overwritten training inputs
    return all((part / f).is_file() for f in needed)


def partial_dir(out: Path) -> Path:
    """Where the run `out` is built until it is finished (renamed to `out` in one step)."""
    return out.with_name(out.name + ".partial")


def train(cfg: Config, out: str | Path, progress: bool = True, data: SeqData | None = None,
          init: dict | None = None, extra: dict | None = None, on_epoch=None) -> dict:
    """Train `cfg` into run directory `out` (resuming `<out>.partial` if it holds the same config).
    `init`: start from these weights instead of a fresh initialisation (a run named by
    `cfg.init_from`, resolved by the caller, or a merge to fine-tune); `extra`: more entries for
    metrics.json; `on_epoch(state)`: called once each epoch is saved (a logger; an exception
    raised there stops the training as a kill would, resumable from that epoch). Returns the
    run's metrics. An existing finished `out` is an error: runs are never overwritten."""
    cfg.validate()
    out = Path(out)
    if (out / "model.safetensors").exists():
        raise FmpaperError(f"{out} already holds a finished run; choose another --out")
    device = pick_device(cfg.device)
    data = data or load_data(cfg)
    part = partial_dir(out)
    state = {"epoch": 0, "best": -1.0, "best_epoch": 0, "bad": 0, "history": [], "seconds": 0.0}
    if _resumable(part, cfg):
        state = json.loads((part / "state.json").read_text())
    else:                                                                # nothing usable: start clean
        shutil.rmtree(part, ignore_errors=True)
        part.mkdir(parents=True)
        (part / "config.json").write_text(cfg.to_json())

    torch.manual_seed(cfg.seed)
    model = SASRec(data.n_items, cfg).to(device)
    if init is not None:
        model.load_state_dict(init)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    if state["epoch"]:
        e = state["epoch"]
        model.load_state_dict(load_file(str(part / f"last-{e}.safetensors"), device=str(device)))
        _restore_optimizer(opt, model, load_file(str(part / f"adam-{e}.safetensors")))
    objective = Objective(cfg, data)
    if state["epoch"] and objective.state():
        objective.load_state(load_file(str(part / f"objective-{state['epoch']}.safetensors")))
    n_ex = len(objective.lengths)

    while state["epoch"] < cfg.epochs and state["bad"] < cfg.patience:
        epoch = state["epoch"] + 1
        t0 = time.perf_counter()
        torch.manual_seed(cfg.seed * 100003 + epoch)                      # dropout draws of this epoch
        gen = torch.Generator().manual_seed(cfg.seed * 100003 + epoch)    # shuffling and augmentations
        model.train()
        sums: dict[str, float] = {}
        steps = batches(n_ex, cfg.batch_size, gen, objective.lengths if cfg.group_by_length else None)
        bar = tqdm(steps, desc=f"{cfg.variant} epoch {epoch}", disable=not progress, leave=False)
        for ex in bar:
            terms = objective(model, ex, gen)
            opt.zero_grad(set_to_none=True)
            terms["loss"].backward()
            opt.step()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            bar.set_postfix(loss=f"{float(terms['loss'].detach()):.3f}")
        score = valid_ndcg10(model, data)
        secs = time.perf_counter() - t0
        state["history"].append({"epoch": epoch, "valid_ndcg@10": score, "seconds": secs,
                                 **{k: v / len(steps) for k, v in sums.items()}})
        if cfg.cl4srec_inplace:
            state["history"][-1]["mask_fraction"] = objective.mask_fraction(model.mask_id)
        state["seconds"] += secs
        if score > state["best"]:
            state.update(best=score, best_epoch=epoch, bad=0)
            _save_tensors(part / "best.safetensors", model.state_dict())
        else:
            state["bad"] += 1
        state["epoch"] = epoch
        # files named by epoch: a kill before state.json lands leaves the previous epoch's intact
        _save_tensors(part / f"last-{epoch}.safetensors", model.state_dict())
        _save_tensors(part / f"adam-{epoch}.safetensors", _optimizer_tensors(opt, model))
        if objective.state():
            _save_tensors(part / f"objective-{epoch}.safetensors", objective.state())
        _write_json(part / "state.json", state)                          # the epoch counts once this lands
        for f in (f"last-{epoch - 1}.safetensors", f"adam-{epoch - 1}.safetensors",
                  f"objective-{epoch - 1}.safetensors"):
            (part / f).unlink(missing_ok=True)
        if on_epoch is not None:
            on_epoch(state)
        if progress:
            print(f"{cfg.variant} epoch {epoch}: loss {state['history'][-1]['loss']:.4f} "
                  f"valid ndcg@10 {score:.4f} ({secs:.1f}s)", flush=True)

    kept, valid = state["best_epoch"], state["best"]
    if cfg.select == "last":                    # the weights of the last epoch, already in `model`
        kept, valid = state["epoch"], state["history"][-1]["valid_ndcg@10"]
    else:
        model.load_state_dict(load_file(str(part / "best.safetensors"), device=str(device)))
    model.eval()
    metrics = {"best_epoch": state["best_epoch"], "kept_epoch": kept, "epochs_run": state["epoch"],
               "valid_ndcg@10": valid, "train_seconds": state["seconds"], **(extra or {})}
    finish_run(part, out, model, data, cfg, metrics, state["history"])
    return metrics


def finish_run(part: Path, out: Path, model: SASRec | None, data: SeqData, cfg: Config, metrics: dict,
               history: list | None = None, ranks_of=None) -> dict:
    """Evaluate on the test split (every protocol), write the final files into `part`, drop the
    resume state and rename `part` to `out`. `ranks_of` scores something other than `model`
    (an output ensemble, which has no checkpoint). Returns the completed metrics."""
    test, ranks = test_report(ranks_of or model, data, seed=cfg.seed)
    metrics.update(test=test, data=data.stats())
    metrics.setdefault("hardware", hardware())     # a restored run keeps the machine that trained it
    if model is not None:
        _save_tensors(part / "model.safetensors", model.state_dict())
    _save_tensors(part / "ranks.safetensors", ranks)
    _write_json(part / "metrics.json", metrics)
    if history is not None:
        _write_json(part / "history.json", history)
    (part / "config.json").write_text(cfg.to_json())
    for f in [*part.glob("last-*.safetensors"), *part.glob("adam-*.safetensors"),
              *part.glob("objective-*.safetensors"), part / "best.safetensors", part / "state.json"]:
        f.unlink(missing_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(part, out)
    return metrics


@dataclass
class Run:
    cfg: Config
    data: SeqData
    model: SASRec
    metrics: dict


def load_run(run_dir: str | Path, data: SeqData | None = None) -> Run:
    """A finished run directory -> its config, data, model (eval mode, on cfg's device) and metrics."""
    run_dir = Path(run_dir)
    ckpt, conf = run_dir / "model.safetensors", run_dir / "config.json"
    if not ckpt.is_file() or not conf.is_file():
        raise FmpaperError(f"{run_dir} is not a run directory (no model.safetensors / config.json)")
    try:
        cfg = Config.from_dict(json.loads(conf.read_text()))
        tensors = load_file(str(ckpt))
    except FmpaperError:
        raise
    except Exception as e:
        raise FmpaperError(f"{run_dir}: unreadable checkpoint ({str(e).splitlines()[0]})") from None
    data = data or load_data(cfg)
    device = pick_device(cfg.device)
    model = SASRec(data.n_items, cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in tensors.items()}
    if expected != found:
        diff = sorted(set(expected.items()) ^ set(found.items()))[0]
        raise FmpaperError(f"{run_dir}: checkpoint does not match its config/data (first difference: {diff[0]} {diff[1]})")
    model.load_state_dict(tensors)
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    return Run(cfg, data, model.to(device).eval(), metrics)
