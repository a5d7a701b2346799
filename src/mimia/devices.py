"""Where a computation runs and in which precision: the config's device names, autocast, and
the process-group backend of several training processes.

Every CUDA path of mimia goes through these three functions, so the choices they make (bf16
autocast only on CUDA unless asked, NCCL only on CUDA) can be tested on a machine without a
GPU, and a ``cuda`` device on a machine that has none fails with a message, not a CUDA trace.
"""

from __future__ import annotations

import contextlib

import torch

# "auto": bf16 autocast on CUDA, float32 elsewhere (what the workflow runs). "bf16" and "fp32"
# force one, on any device: the float32 reference on a GPU, the bf16 path on a CPU.
PRECISIONS = ("auto", "bf16", "fp32")


def cuda_problem(name: str) -> str | None:
    """Why device ``name`` (``cuda`` or ``cuda:N``) cannot run on this machine; None if it can
    (and for any device that is not CUDA)."""
    if not name.startswith("cuda"):
        return None
    if not torch.cuda.is_available():
        return (
            f"runtime.device is {name!r} but this machine has no usable CUDA device "
            f"(torch {torch.__version__}: torch.cuda.is_available() is False); use 'auto' "
            f"(CUDA when there is one, else CPU) or 'cpu', or run on a GPU node"
        )
    index = torch.device(name).index
    if index is not None and index >= torch.cuda.device_count():
        return (
            f"runtime.device is {name!r} but this machine has {torch.cuda.device_count()} "
            f"CUDA device(s) (cuda:0 to cuda:{torch.cuda.device_count() - 1})"
        )
    return None


def resolve_device(name: str) -> torch.device:
    """The device a config's ``runtime.device`` names: ``auto`` is CUDA when available."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    problem = cuda_problem(name)
    if problem:
        raise RuntimeError(problem)
    return torch.device(name)


def resolve_precision(device: torch.device, precision: str = "auto") -> str:
    """``bf16`` or ``fp32``: what ``precision`` (see PRECISIONS) means on ``device``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {PRECISIONS}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def autocast(device: torch.device, precision: str = "auto"):
    """The context a forward pass runs in: bf16 autocast or plain float32 (see PRECISIONS)."""
    if resolve_precision(device, precision) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def process_group_backend(device: torch.device) -> str:
    """NCCL for CUDA ranks; gloo otherwise (NCCL has no CPU tensors)."""
    return "nccl" if device.type == "cuda" else "gloo"
