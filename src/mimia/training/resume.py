"""Resume files: a training run's full state every ``checkpoint_every`` epochs, so that a killed
run restarted with the same arguments continues and ends with the same weights as an
uninterrupted one.

A resume file holds the model, the optimizer, every random generator state, the epoch, the
history and the fingerprint of what the weights depend on (data, config, engine); an engine
adds its own state (DP-SGD: its three generators and the privacy accountant).
"""

from __future__ import annotations

import errno
import os
import pickle
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path

import torch

from mimia.storage import atomic_path

COMMON_KEYS = ("model", "optimizer", "torch_rng", "epoch", "history", "fingerprint")
"""What every engine's resume file holds (``torch_rng``: torch's global generator)."""


def fingerprint(*parts: object) -> str:
    """A resume fingerprint: the ``|``-joined parts (data, settings, engine), in order."""
    return "|".join(map(str, parts))


def resume_path_for(weights_path: str | Path) -> Path:
    """Where a training run keeps its resume checkpoint: beside its final weights."""
    return Path(weights_path).with_name("resume.pt")


def save_resume(path: Path, state: dict) -> None:
    """Write a resume checkpoint (tensors and plain values only) atomically."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def is_damage(err: Exception) -> bool:
    """Whether ``torch.load``'s error says the file is damaged (truncated, corrupt, foreign),
    rather than that reading it failed (an I/O error, memory): only damage sets a file aside."""
    if isinstance(err, OSError):
        # A truncated zip archive seeks before its start; any other OSError is the disk's.
        return err.errno == errno.EINVAL
    if isinstance(err, MemoryError | torch.OutOfMemoryError):
        return False
    if isinstance(err, RuntimeError) and "can't allocate memory" in str(err):
        return False
    return isinstance(
        err,
        RuntimeError
        | pickle.UnpicklingError
        | ValueError
        | EOFError
        | KeyError
        | IndexError
        | TypeError
        | AttributeError
        | zipfile.BadZipFile,
    )


def read_resume(
    path: Path, fingerprint: str, model, optimizer, keys: Sequence[str], generators: Sequence[str]
) -> dict | None:
    """The resume state to continue from, or None to start at epoch 0.

    ``keys``: what the engine's resume file holds; ``generators``: which of them are random
    generator states. A file that is not a resume file of this model (corrupt, truncated,
    foreign, a code-executing pickle) would block the run forever: it is moved aside to
    ``resume.pt.corrupt-N``, with a line in the log saying why. A file that could not be read
    (an I/O error, no memory) is not damaged: that error propagates. A resume file of other
    data or config is left alone (the next checkpoint replaces it).
    """
    if not path.exists():
        return None
    from mimia.models.checkpoint import torch_load_reason

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        why = _not_resume_file(state, keys)
    except Exception as e:
        if not is_damage(e):
            raise
        reason = torch_load_reason(e) or "the data ends early"
        why = f"{path.stat().st_size} bytes; {type(e).__name__}: {reason}"
    if why is None and state["fingerprint"] != fingerprint:
        print(f"ignoring {path}: made for other data or config", file=sys.stderr)
        return None
    why = why or _does_not_fit(state, model, optimizer, generators)
    if why is None:
        return state
    n = 1
    while (aside := path.with_name(f"{path.name}.corrupt-{n}")).exists():
        n += 1
    os.replace(path, aside)
    print(
        f"resume file {path} is unusable ({why}); moved it to {aside} and starting from epoch 0",
        file=sys.stderr,
    )
    return None


def _not_resume_file(state, keys: Sequence[str]) -> str | None:
    if isinstance(state, dict) and set(keys) <= set(state):
        return None
    found = sorted(map(str, state))[:10] if isinstance(state, dict) else type(state).__name__
    return f"not a mimia resume file: expected keys {list(keys)}, found {found}"


def _does_not_fit(state: dict, model, optimizer, generators: Sequence[str]) -> str | None:
    """Why a resume file of this run's fingerprint cannot be loaded, or None."""
    mine, theirs = model.state_dict(), state["model"]
    if not isinstance(theirs, dict) or set(theirs) != set(mine):
        return "its model weights have other parameter names than this model"
    bad = [k for k, v in mine.items() if getattr(theirs[k], "shape", None) != v.shape]
    if bad:
        return f"its model weights have other shapes than this model ({', '.join(bad[:5])})"
    rng = [state[k] for k in generators]
    if not all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in rng):
        return "its random generator states are not byte tensors"
    if not isinstance(state["epoch"], int) or not isinstance(state["history"], list):
        return "its epoch or history is malformed"
    opt = state["optimizer"]
    groups = opt.get("param_groups") if isinstance(opt, dict) else None
    sizes = [len(g["params"]) for g in optimizer.param_groups]
    if not isinstance(groups, list) or [len(g.get("params", ())) for g in groups] != sizes:
        return "its optimizer state is for other parameters"
    return None
