"""The two-stage table's networks: each trained once, stored with its test logits, named by what determines it.

A network file is ``<root>/<name>-<hash>.pt`` (a torch file of tensors only, read with ``weights_only=True``) with
a small ``.json`` beside it (seconds, epochs, images); the hash covers the name, the identity of its training data
(the real split, or the key of the distilled set it was trained on), the epochs, outputs, seed, model and training
configuration and the data fingerprint, so a changed scale never reuses a network. Rows that share a network (the
real-data group classifier of Original + GM / + MTT / + Original with the same seed) train it once. A network in
training keeps its resumable state in ``<name>-<hash>.ckpt.safetensors`` (every few minutes), so a killed run
continues it instead of starting the network over.
"""

from __future__ import annotations

import dataclasses
import io
import json
import time
from pathlib import Path

import torch
from torch import nn

from ..config import ModelConfig, TrainConfig, atomic_write_bytes, save_json
from .cells import key_hash, log, material

__all__ = ["NetStore"]

CHECKPOINT_EVERY_S = 300.0  # a network in training writes its resumable state at most this often


class NetStore:
    """``sources``: source name (``real``, ``gm``, ``mtt``) -> identity of its training images; ``epochs``: source
    name -> epochs of a network trained on it."""

    def __init__(self, root: Path, model_cfg: ModelConfig, train_cfg: TrainConfig, data_key: dict,
                 sources: dict[str, str], epochs: dict[str, int], device=None):
        self.root = Path(root)
        self.model_cfg = model_cfg
        self.train_cfg = train_cfg
        self.data_key = data_key
        self.sources = sources
        self.epochs = epochs
        self.device = device
        self.data = None  # the prepared data, set before training

    def key(self, name: str, src: str, n_out: int, seed: int) -> str:
        return key_hash({"kind": "net", "name": name, "source": self.sources[src], "epochs": self.epochs[src],
                         "n_out": int(n_out), "seed": int(seed), "model": material(self.model_cfg),
                         "train": material(self.train_cfg), "data": self.data_key})

    def stem(self, name: str, src: str, n_out: int, seed: int) -> str:
        return f"{name}-{self.key(name, src, n_out, seed)[:8]}"

    def _new(self, n_out: int, seed: int) -> nn.Module:
        from ..models import create_model

        torch.manual_seed(seed)
        m = create_model(self.model_cfg.name, n_out, self.data.channels, self.data.im_size, **self.model_cfg.args)
        return m.to(self.device)

    def get(self, name: str, src: str, x: torch.Tensor, y: torch.Tensor, n_out: int, seed: int,
            class_counts=None) -> dict:
        """Train (or load) network ``name`` on data of source ``src``; returns ``{"test_logits", "epochs",
        "n_train", "seconds", ...}``."""
        from ..train import predict, train_model

        stem = self.stem(name, src, n_out, seed)
        path = self.root / f"{stem}.pt"
        if path.is_file():
            return torch.load(path, weights_only=True)
        epochs = self.epochs[src]
        model = self._new(n_out, seed)
        self.root.mkdir(parents=True, exist_ok=True)
        ckpt = self.root / f"{stem}.ckpt.safetensors"
        timing: dict = {}
        # the checkpoint is kept until the network is saved: a kill in between loses nothing
        train_model(model, x, y, dataclasses.replace(self.train_cfg, epochs=epochs), num_classes=n_out,
                    class_counts=class_counts, seed=seed, desc=stem, checkpoint=ckpt,
                    checkpoint_every_s=CHECKPOINT_EVERY_S, keep_checkpoint=True, timing=timing)
        t1 = time.time()
        logits = predict(model, self.data.test_x)
        rec = {"state": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "test_logits": logits,
               "epochs": int(epochs), "n_train": int(len(x)), "seconds": float(timing["seconds"] + time.time() - t1),
               "train_seconds": float(timing["seconds"]), "n_out": int(n_out), "seed": int(seed),
               "resumed_from": int(timing["resumed_from"])}
        buf = io.BytesIO()
        torch.save(rec, buf)
        atomic_write_bytes(path, buf.getvalue())
        save_json(path.with_suffix(".json"), {k: rec[k] for k in ("seconds", "epochs", "n_train", "resumed_from")})
        ckpt.unlink(missing_ok=True)
        acc = float((logits.argmax(1) == self.data.test_y).float().mean()) if n_out == self.data.num_classes else None
        log(f"  net {stem}: {len(x)} images x {epochs} epochs, {rec['seconds']:.0f} s"
            + (f", test acc {acc:.3f}" if acc is not None else ""))
        return rec

    def model(self, name: str, src: str, n_out: int, seed: int) -> nn.Module:
        rec = torch.load(self.root / f"{self.stem(name, src, n_out, seed)}.pt", weights_only=True)
        m = self._new(rec["n_out"], rec["seed"])
        m.load_state_dict(rec["state"])
        return m.eval()

    def seconds(self, nets: list[tuple[str, str, int, int]]) -> dict:
        """``{file stem: {"seconds", "epochs", "n_train"}}`` of the given networks (name, source, outputs, seed)
        that are stored."""
        out = {}
        for name, src, n_out, seed in nets:
            side = self.root / f"{self.stem(name, src, n_out, seed)}.json"
            if side.is_file():
                out[side.stem] = json.loads(side.read_text())
        return out
