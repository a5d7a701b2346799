"""One rank of a DDP run, started by :func:`mimia.training.launch.launch` as
``python -m mimia.training.worker PAYLOAD RESULT`` with torchrun's environment contract."""

from __future__ import annotations

import os
import sys
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from mimia.devices import process_group_backend, resolve_device
from mimia.training.early_stopping import EarlyStopping
from mimia.training.engines import DDP
from mimia.training.loop import fit
from mimia.training.recipe import TrainConfig

# How long a rank waits for the others at a collective before the run fails.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


def _exit_with_parent(parent: int) -> None:
    """A rank whose launcher is gone (killed job) stops instead of training on unobserved."""

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _worker(payload_path: str, result_path: str) -> None:
    from mimia.models import ModelSpec, build_model

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
        hook = None
        if job["early_stopping"] is not None:
            hook = EarlyStopping.from_payload(job["early_stopping"], cfg)
        history = fit(
            model,
            job["images"],
            cfg,
            DDP(trainable),
            resume_path=job["resume_path"],
            fingerprint=job["fingerprint"],
            hooks=[hook] if hook else [],
            stop_after_epoch=job["stop_after_epoch"],
        )
        if dist.get_rank() == 0:
            tmp = result_path + ".tmp"
            state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
            result = None if hook is None else hook.result()
            torch.save({"state": state, "history": history, "early_stopping": result}, tmp)
            os.replace(tmp, result_path)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    _worker(*sys.argv[1:3])
