"""The DDP launcher: training in several processes on one node, one per device.

:func:`launch` starts ``devices`` worker processes (``python -m mimia.training.worker``, with
torchrun's environment contract: ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
``MASTER_PORT``); each builds the model from its spec and weights, joins the process group
(NCCL on GPUs, gloo on CPU) and runs :func:`mimia.training.loop.fit` with the
:class:`~mimia.training.engines.DDP` engine as rank ``RANK`` of ``WORLD_SIZE``. Rank 0 writes
the resume file and hands the trained weights, the history and the hooks' results back.

Workers are fresh interpreters rather than ``multiprocessing`` children: a spawned child
re-executes its parent's main script, which for a Snakemake ``script:`` is the stage itself.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from mimia.devices import resolve_device
from mimia.training.early_stopping import EarlyStopping
from mimia.training.recipe import TrainConfig

WORKER = "mimia.training.worker"
"""The module each rank runs (``python -m``); not imported by the package, so it runs fresh."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    model,
    images: torch.Tensor,
    cfg: TrainConfig,
    resume_path: str | Path | None = None,
    trainable=None,
    stop_after_epoch: int | None = None,
    fingerprint: str = "",
    early_stopping: EarlyStopping | None = None,
) -> list[dict]:
    """Train ``model`` in ``cfg.devices`` worker processes; its weights end as rank 0's.

    Arguments as :func:`mimia.training.loop.fit`'s (``early_stopping``: the one epoch hook a
    worker can rebuild; its result is loaded back into it). Returns rank 0's history (losses
    averaged over ranks).
    """
    size = cfg.devices
    device = resolve_device(cfg.device)
    if device.type == "cuda" and torch.cuda.device_count() < size:
        raise ValueError(
            f"pretrain.devices={size} but this node has {torch.cuda.device_count()} CUDA "
            f"devices: ask the scheduler for {size} GPUs (resources gpu) or lower devices"
        )
    workdir = Path(tempfile.mkdtemp(prefix="mimia-ddp-"))
    procs: list[subprocess.Popen] = []
    try:
        payload, result = workdir / "payload.pt", workdir / "result.pt"
        torch.save(
            {
                "spec": model.spec.to_dict(),
                "state": model.state_dict(),
                "frozen": [n for n, p in model.named_parameters() if not p.requires_grad],
                "trainable": None if trainable is None else [n for n, _ in trainable],
                "images": images,
                "cfg": dataclasses.asdict(cfg),
                "resume_path": None if resume_path is None else str(resume_path),
                "stop_after_epoch": stop_after_epoch,
                "fingerprint": fingerprint,
                "early_stopping": None if early_stopping is None else early_stopping.payload(),
                # The caller's CPU threads, shared out (on GPUs they only feed the device).
                "threads": max(1, torch.get_num_threads() // size),
            },
            payload,
        )
        src = str(Path(__file__).resolve().parents[2])
        base = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(_free_port()),
            "WORLD_SIZE": str(size),
            "MIMIA_PARENT_PID": str(os.getpid()),
        }
        for rank in range(size):
            env = {**base, "RANK": str(rank), "LOCAL_RANK": str(rank)}
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", WORKER, str(payload), str(result)],
                    env=env,
                )
            )
        _wait(procs)
        out = torch.load(result, map_location="cpu", weights_only=True)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        shutil.rmtree(workdir, ignore_errors=True)
    model.load_state_dict(out["state"])
    model.eval()
    if early_stopping is not None:
        early_stopping.load_result(out["early_stopping"])
    return out["history"]


def _wait(procs: list[subprocess.Popen]) -> None:
    """Until every rank ends; the first rank that fails stops the others (they would wait at
    the next collective until the timeout)."""
    while True:
        codes = [p.poll() for p in procs]
        failed = [(rank, code) for rank, code in enumerate(codes) if code not in (None, 0)]
        if failed:
            rank, code = failed[0]
            raise RuntimeError(
                f"training process rank {rank} of {len(procs)} exited with status {code} "
                "(its error is in the log above)"
            )
        if all(code == 0 for code in codes):
            return
        time.sleep(0.2)
