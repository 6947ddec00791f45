"""Profiles: a calibrated method for one model, as one safetensors file (never pickle).

Tensors (per-layer thresholds, kept counts, predictor weights) are safetensors entries
named ``layers.<i>.<name>`` or ``<name>``; everything else (method, target, parameters,
achieved sparsity per layer on the calibration text, the model fingerprint) is JSON in
the safetensors metadata under the key ``moyu``. Loading validates the file and refuses a
profile made for another model in one line.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .arch import mlp_layers, architecture_of
from .atomic import atomic_path
from .errors import MoyuError

FORMAT_VERSION = 1


def fingerprint(model: nn.Module) -> dict[str, Any]:
    """Architecture, shapes and a hash of a strided sample of every MLP weight."""
    architecture_of(model)
    layers = mlp_layers(model)
    h = hashlib.sha256()
    for ml in layers:
        for w in (ml.w_up, ml.w_down):
            h.update(w.detach().float().flatten()[::251].numpy().tobytes())
    return {
        "model_type": model.config.model_type,
        "name": getattr(model, "moyu_name", None),
        "layers": len(layers),
        "d_model": int(layers[0].w_up.shape[1]),
        "d_ff": int(layers[0].d_ff),
        "weights_sha256": h.hexdigest()[:16],
    }


@dataclass
class Profile:
    """A calibrated dynamic-activation method for one model."""

    method: str
    target: dict[str, float]                 # e.g. {"sparsity": 0.5} or {"cett": 0.2}
    params: dict[str, Any]                   # method options used
    model: dict[str, Any]                    # :func:`fingerprint` of the model
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    calib: dict[str, Any] = field(default_factory=dict)   # achieved sparsity etc. on calibration text
    config_version: int = 1                  # the method's options/tensors layout version

    def layer(self, i: int, name: str) -> torch.Tensor:
        """Tensor ``name`` of layer ``i``."""
        return self.tensors[f"layers.{i}.{name}"]

    def set_layer(self, i: int, name: str, value: torch.Tensor) -> None:
        """Store tensor ``name`` of layer ``i``."""
        self.tensors[f"layers.{i}.{name}"] = value.detach().contiguous().cpu()

    def check_model(self, model: nn.Module) -> None:
        """Refuse, in one line, to apply this profile to a model it was not made for."""
        fp = fingerprint(model)
        keys = ("model_type", "layers", "d_model", "d_ff", "weights_sha256")
        if any(fp[k] != self.model.get(k) for k in keys):
            made = self.model.get("name") or self.model.get("model_type")
            raise MoyuError(f"profile was made for model '{made}' ({self.model.get('model_type')}, "
                            f"{self.model.get('layers')} layers, weights {self.model.get('weights_sha256')}), "
                            f"not this one ('{fp['name']}', weights {fp['weights_sha256']}): "
                            f"calibrate a profile for this model")

    def save(self, path: str | Path) -> Path:
        """Write atomically (temp file + rename) as safetensors with JSON metadata."""
        from safetensors.torch import save_file

        path = Path(path)
        meta = {"format": FORMAT_VERSION, "method": self.method, "target": self.target,
                "params": self.params, "model": self.model, "calib": self.calib,
                "config_version": self.config_version}
        with contextlib.ExitStack() as stack:
            try:
                tmp = stack.enter_context(atomic_path(path))
            except OSError as e:
                raise MoyuError(f"cannot write profile to {path}: {e.strerror}; choose a writable path") from None
            tensors = {k: v.contiguous() for k, v in self.tensors.items()}
            save_file(tensors, str(tmp), metadata={"moyu": json.dumps(meta)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Profile":
        """Read and validate a profile file; one-line :class:`MoyuError` if missing or corrupt."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise MoyuError(f"profile {path} not found: create one with `moyu calibrate`")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})["moyu"])
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            if meta.get("format") != FORMAT_VERSION:
                raise ValueError(f"format {meta.get('format')}")
            return cls(method=meta["method"], target=meta["target"], params=meta["params"],
                       model=meta["model"], tensors=tensors, calib=meta.get("calib", {}),
                       config_version=int(meta.get("config_version", 1)))
        except MoyuError:
            raise
        except Exception as e:
            raise MoyuError(f"{path} is not a valid moyu profile ({type(e).__name__}): "
                            "re-create it with `moyu calibrate`") from None
