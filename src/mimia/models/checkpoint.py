"""Checkpoint I/O: safetensors weights plus a JSON sidecar with the architecture.

``model.safetensors`` holds tensors only (no code runs on load); ``model.json`` beside it holds
the :class:`ModelSpec` and free-form provenance (training config, seed, ...).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from mimia.models import build_model
from mimia.models.base import MIMModel
from mimia.models.spec import ModelSpec


def sidecar_path(weights: str | Path) -> Path:
    return Path(weights).with_suffix(".json")


def save_model(model: MIMModel, weights: str | Path, info: dict[str, Any] | None = None) -> None:
    """Write weights and sidecar atomically (temp files, then rename)."""
    weights = Path(weights)
    weights.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp_w = weights.with_name(weights.name + ".tmp")
    tmp_j = sidecar_path(weights).with_name(sidecar_path(weights).name + ".tmp")
    save_file(state, str(tmp_w))
    tmp_j.write_text(json.dumps({"spec": model.spec.to_dict(), "info": info or {}}, indent=2))
    os.replace(tmp_j, sidecar_path(weights))
    os.replace(tmp_w, weights)


def read_sidecar(weights: str | Path) -> dict[str, Any]:
    path = sidecar_path(weights)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint sidecar {path} is missing (expected beside {weights})")
    return json.loads(path.read_text())


def load_model(weights: str | Path, device: str = "cpu") -> MIMModel:
    spec = ModelSpec.from_dict(read_sidecar(weights)["spec"])
    model = build_model(spec)
    model.load_state_dict(load_file(str(weights), device="cpu"), strict=True)
    return model.to(device).eval()


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
