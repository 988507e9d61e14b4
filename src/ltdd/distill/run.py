"""The shared outer loop for every distillation method: checkpoints, resume, guards, logging, evaluation, output.

Files in the output folder::

    checkpoint.safetensors   resumable state (written atomically every ``checkpoint_every`` iterations and at the end)
    distilled.safetensors    the distilled set (images, labels, optional soft_labels, lr)
    config.yaml              the fully resolved RunConfig
    log.jsonl                one line per logged iteration: losses per phase, step size, seconds, peak memory
    grid.png                 the synthetic images (un-whitened), one row per class
    eval.json                the evaluation protocol's result (when evaluated)
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from tqdm.auto import tqdm

from ..config import RunConfig, atomic_write_bytes, atomic_write_text, read_jsonl, save_json, save_yaml, to_dict
from ..distributed import rank_world
from ..errors import LtddError
from ..synset import SyntheticSet, save_grid
from ..data.fingerprint import fingerprint, split_sha
from .base import DivergenceError, make_distiller

CHECKPOINT = "checkpoint.safetensors"


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


def save_checkpoint(path: Path, distiller, iteration: int) -> None:
    tensors = {f"state.{k}": v.contiguous() for k, v in distiller.tensors().items()}
    tensors["generator"] = distiller.generator_state()
    meta = {"iteration": str(iteration), "method": distiller.method_name,
            "extra": json.dumps(distiller.extra_state())}
    atomic_write_bytes(path, st_save(tensors, metadata=meta))


def load_checkpoint(path: Path, distiller) -> int:
    from safetensors import safe_open

    try:
        tensors = st_load(path.read_bytes())
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001
        raise LtddError(f"checkpoint {path} is corrupt ({str(e).splitlines()[0][:100]})") from None
    if meta.get("method") != distiller.method_name:
        raise LtddError(f"checkpoint {path} is from method '{meta.get('method')}', not '{distiller.method_name}'")
    distiller.load_tensors({k[len("state."):]: v for k, v in tensors.items() if k.startswith("state.")})
    distiller.set_generator_state(tensors["generator"])
    distiller.load_extra_state(json.loads(meta.get("extra", "{}")))
    return int(meta["iteration"])


def _truncate_log(path: Path, keep_below: int) -> None:
    """Keep the log lines of iterations before the checkpoint (``keep_below``); the rest are re-done on resume.
    A line cut short by a kill (or any line that is not a JSON object) is dropped: it can only be the last line,
    written after the last checkpoint."""
    if not path.is_file():
        return
    kept = [rec for rec in read_jsonl(path) if rec.get("iteration", -1) < keep_below]
    atomic_write_text(path, "".join(json.dumps(rec) + "\n" for rec in kept))


def distill(run_cfg: RunConfig, data, out_dir: str | Path, *, experts_dir=None, device=None, resume: bool = False,
            progress: bool = True, evaluate: bool = True, eval_runs: int | None = None,
            stop_after: int | None = None) -> dict:
    """Run (or resume) the distillation described by ``run_cfg.distill`` and write the output folder.

    ``stop_after``: stop (as if killed) after that many iterations of this call, leaving the checkpoint - used by
    the resume tests.
    """
    cfg = run_cfg.distill
    device = device or torch.device("cpu")
    out = Path(out_dir)
    ckpt = out / CHECKPOINT
    log_path = out / "log.jsonl"
    if ckpt.exists() and not resume:
        raise LtddError(f"{out} already holds a run (checkpoint.safetensors); pass --resume to continue it "
                        f"or choose another --out")
    if resume and not ckpt.exists():
        raise LtddError(f"nothing to resume: {ckpt} does not exist")
    distiller = make_distiller(cfg, data, experts_dir=experts_dir, device=device)
    main = rank_world()[0] == 0  # under torchrun every rank computes, only rank 0 writes
    if main:
        out.mkdir(parents=True, exist_ok=True)
        save_yaml(out / "config.yaml", run_cfg)
    if resume:
        start = load_checkpoint(ckpt, distiller)
        if main:
            _truncate_log(log_path, start)
    else:
        distiller.initialise()
        start = 0
        if main:
            atomic_write_text(log_path, "")
            save_checkpoint(ckpt, distiller, 0)

    t_run = time.time()
    done_now = 0
    iterations = 0 if getattr(distiller, "one_shot", False) else cfg.iterations
    bar = tqdm(range(start, iterations), desc=f"distill {distiller.method_name}", disable=not progress)
    with open(log_path if main else os.devnull, "a") as log:
        for it in bar:
            t0 = time.time()
            try:
                record = distiller.step(it)
                distiller.check(it, record)
            except DivergenceError:
                raise
            except RuntimeError as e:
                if "out of memory" in str(e).lower():
                    raise LtddError(f"out of memory at iteration {it}: lower the IPC, syn_steps or batch_syn, or "
                                    f"use distill.gradient=constant_memory") from None
                raise
            record = {"iteration": it, **record, "seconds": time.time() - t0,
                      "peak_memory_mb": peak_memory_mb(device)}
            if it % max(1, cfg.log_every) == 0 or it == iterations - 1:
                log.write(json.dumps(record) + "\n")
                log.flush()
            bar.set_postfix(loss=f"{record.get('loss', 0):.4f}", lr=f"{record.get('lr', 0):.3g}")
            if cfg.eval_every and (it + 1) % cfg.eval_every == 0 and it + 1 < iterations:
                res = _evaluate(distiller.synthetic_set(), data, run_cfg, device, runs=1, seed=it)
                log.write(json.dumps({"iteration": it, "eval_accuracy": res.summary["accuracy"]["mean"],
                                      "eval_class_std": res.summary["class_std"]["mean"]}) + "\n")
                log.flush()
            if main and ((it + 1) % max(1, cfg.checkpoint_every) == 0 or it == iterations - 1):
                save_checkpoint(ckpt, distiller, it + 1)
            done_now += 1
            if stop_after is not None and done_now >= stop_after and it + 1 < iterations:
                if main:
                    save_checkpoint(ckpt, distiller, it + 1)
                return {"stopped_at": it + 1}
    seconds = time.time() - t_run
    syn = distiller.synthetic_set()
    syn.meta = {"method": distiller.method_name, "data": to_dict(run_cfg.data), "ipc": cfg.ipc,
                "dataset": data.name, "split_sha": split_sha(data), "preprocessor": _prep_meta(data),
                "fingerprint": fingerprint(data),
                "iterations": iterations, "class_names": list(data.class_names),
                "train_counts": [int(c) for c in data.train_counts], **distiller.set_meta()}
    if main:
        distiller.write_artifacts(out)  # before the set that names them
        syn.save(out / "distilled.safetensors")
        save_grid(out / "grid.png", data.preprocessor.to_pixels(syn.images), syn.labels, data.num_classes)
    result = {"method": distiller.method_name, "iterations": iterations, "seconds": seconds,
              "peak_memory_mb": peak_memory_mb(device), "out": str(out)}
    if evaluate:
        res = _evaluate(syn, data, run_cfg, device, runs=eval_runs, seed=cfg.seed)
        ev = res.to_dict()
        ev["protocol"] = to_dict(run_cfg.protocol_config())
        if main:
            save_json(out / "eval.json", ev)
        result["eval"] = res.summary
    return result


def _prep_meta(data) -> dict:
    try:
        return data.preprocessor.config()
    except Exception:  # noqa: BLE001
        return {}


def _evaluate(syn: SyntheticSet, data, run_cfg: RunConfig, device, runs=None, seed=0):
    from ..evaluate import run_protocol

    return run_protocol(syn.images, syn.labels, data, run_cfg.protocol_config(), soft_labels=syn.soft_labels,
                        lr=syn.lr, device=device, seed=seed, runs=runs)
