"""Pre-training with several processes on one node (torch.distributed, one process per device).

``train_mim`` with ``TrainConfig.devices > 1`` calls :func:`launch`: it starts ``devices``
worker processes (``python -m mimia.distributed``, with torchrun's environment contract:
``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), each builds the
model from its spec and weights, joins the process group (NCCL on GPUs, gloo on CPU) and runs
the same training loop as rank ``RANK`` of ``WORLD_SIZE``. Rank 0 writes the resume file and
hands the trained weights and history back to the caller.

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
import threading
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from mimia.devices import process_group_backend, resolve_device

# How long a rank waits for the others at a collective before the run fails.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of this process; ``(0, 1)`` outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """Average of a tensor over every rank (the tensor itself on one process)."""
    _, size = world()
    if size == 1:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / size


def local_device(device: torch.device) -> torch.device:
    """The device of this rank: CUDA devices are taken one per rank, by ``LOCAL_RANK``."""
    if device.type == "cuda" and world()[1] > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    model,
    images: torch.Tensor,
    cfg,
    resume_path: str | Path | None = None,
    trainable=None,
    stop_after_epoch: int | None = None,
    fingerprint: str = "",
) -> list[dict]:
    """Train ``model`` in ``cfg.devices`` worker processes; its weights end as rank 0's.

    Arguments as ``train_mim``'s. Returns rank 0's history (losses averaged over ranks).
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
                # The caller's CPU threads, shared out (on GPUs they only feed the device).
                "threads": max(1, torch.get_num_threads() // size),
            },
            payload,
        )
        src = str(Path(__file__).resolve().parents[1])
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
                    [sys.executable, "-m", "mimia.distributed", str(payload), str(result)],
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


def _exit_with_parent(parent: int) -> None:
    """A rank whose launcher is gone (killed job) stops instead of training on unobserved."""

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _worker(payload_path: str, result_path: str) -> None:
    from mimia.models import ModelSpec, build_model
    from mimia.pretrain import TrainConfig, train_mim

    if "MIMIA_PARENT_PID" in os.environ:
        _exit_with_parent(int(os.environ["MIMIA_PARENT_PID"]))
    # Memory-mapped: the ranks share one page-cached copy of the images.
    job = torch.load(payload_path, map_location="cpu", weights_only=True, mmap=True)
    torch.set_num_threads(job["threads"])
    cfg = TrainConfig(**job["cfg"])
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(process_group_backend(device), timeout=COLLECTIVE_TIMEOUT)
    try:
        model = build_model(ModelSpec.from_dict(job["spec"]))
        model.load_state_dict(job["state"])
        frozen = set(job["frozen"])
        for name, p in model.named_parameters():
            p.requires_grad_(name not in frozen)
        trainable = None
        if job["trainable"] is not None:
            names = set(job["trainable"])
            trainable = [(n, p) for n, p in model.named_parameters() if n in names]
        history = train_mim(
            model,
            job["images"],
            cfg,
            resume_path=job["resume_path"],
            trainable=trainable,
            stop_after_epoch=job["stop_after_epoch"],
            fingerprint=job["fingerprint"],
        )
        if dist.get_rank() == 0:
            tmp = result_path + ".tmp"
            state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
            torch.save({"state": state, "history": history}, tmp)
            os.replace(tmp, result_path)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    _worker(*sys.argv[1:3])
