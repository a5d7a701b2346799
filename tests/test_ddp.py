"""Pre-training in two processes (torch.distributed, gloo on CPU) against one process."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mimia.models import build_model
from mimia.training import TrainConfig, train_mim

# Global batch 8: one process with batch 8, or two with 4 each. accum_iter 2 exercises the
# micro-steps whose gradients are not yet averaged over ranks.
ONE = TrainConfig.from_section(
    {"epochs": 3, "batch_size": 8, "accum_iter": 2, "blr": 1e-2, "warmup_epochs": 1}
    | {"augment": True},
    seed=3,
)
TWO = dataclasses.replace(ONE, batch_size=4, devices=2)


def _images(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 16, 16), generator=g, dtype=torch.uint8)


def _train(spec, cfg, **kwargs):
    torch.manual_seed(0)
    model = build_model(spec)
    history = train_mim(model, _images(), cfg, **kwargs)
    return model, history


def test_two_processes_follow_the_one_process_trajectory(tiny_spec):
    one, one_hist = _train(tiny_spec, ONE)
    two, two_hist = _train(tiny_spec, TWO)
    assert [h["epoch"] for h in two_hist] == [0, 1, 2]
    assert [h["lr"] for h in two_hist] == pytest.approx([h["lr"] for h in one_hist], rel=1e-12)
    assert [h["loss"] for h in two_hist] == pytest.approx([h["loss"] for h in one_hist], rel=1e-5)
    # Attention key biases get gradients of pure rounding noise (softmax ignores them), which
    # Adam scales up to lr-sized steps: hence an absolute tolerance near the learning rate.
    for (name, a), b in zip(one.state_dict().items(), two.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-4, msg=name)
    # The tolerance is far tighter than what separates a different run: one process on the
    # per-process batch alone (other data order, masks and learning rate).
    _, small_hist = _train(tiny_spec, dataclasses.replace(ONE, batch_size=4))
    gap = max(abs(a["loss"] - b["loss"]) for a, b in zip(small_hist, one_hist, strict=True))
    assert gap > 1e-3


def test_lr_follows_the_effective_batch():
    assert TWO.lr == ONE.lr == pytest.approx(1e-2 * 8 * 2 / 256)


def test_more_processes_than_images_is_a_clear_error(tiny_spec):
    model = build_model(tiny_spec)
    cfg = dataclasses.replace(TWO, batch_size=20, epochs=1)
    with pytest.raises(ValueError, match="fewer than one global batch of 40"):
        train_mim(model, _images(32), cfg)


KILL_SCRIPT = """
import sys, json, torch
from mimia.models import ModelSpec, build_model
from mimia.training import TrainConfig, train_mim
torch.set_num_threads(1)
spec = ModelSpec.from_dict(json.loads(sys.argv[1]))
torch.manual_seed(0)
model = build_model(spec)
cfg = TrainConfig.from_section(
    {"epochs": 16, "batch_size": 4, "devices": 2, "blr": 1e-2, "warmup_epochs": 2,
     "checkpoint_every": 1, "augment": True},
    seed=5,
)
g = torch.Generator().manual_seed(1)
images = torch.randint(0, 256, (16, 3, 16, 16), generator=g, dtype=torch.uint8)
train_mim(model, images, cfg, resume_path=sys.argv[2], fingerprint="f")
torch.save(model.state_dict(), sys.argv[3])
"""


def _ranks_of(marker: Path) -> list[int]:
    """Pids of training ranks whose command line names a file under ``marker``."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "mimia.training.worker" in cmd and str(marker) in cmd:
            pids.append(int(proc.name))
    return pids


def test_kill_9_of_a_two_process_run_then_restart_matches_uninterrupted(tiny_spec, tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    resume = tmp_path / "resume.pt"
    args = [sys.executable, "-c", KILL_SCRIPT, json.dumps(tiny_spec.to_dict()), str(resume)]
    proc = subprocess.Popen([*args, str(tmp_path / "killed.pt")], env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if resume.exists():
            epoch = torch.load(resume, weights_only=True)["epoch"]
            if 2 <= epoch < 12:
                break
        time.sleep(0.05)
    ranks = _ranks_of(tmp_path)
    assert len(ranks) == 2, "training finished or never started its two ranks"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 30
    while _ranks_of(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _ranks_of(tmp_path), "ranks outlived their killed launcher"
    assert not (tmp_path / "killed.pt").exists()

    resumed = subprocess.run(
        [*args, str(tmp_path / "resumed.pt")], env=env, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr
    resume.unlink()
    straight = subprocess.run(
        [*args, str(tmp_path / "straight.pt")], env=env, capture_output=True, text=True
    )
    assert straight.returncode == 0, straight.stderr[-2000:]
    assert "resumed from" not in straight.stderr
    a = torch.load(tmp_path / "resumed.pt", weights_only=True)
    b = torch.load(tmp_path / "straight.pt", weights_only=True)
    for key in b:
        assert torch.equal(a[key], b[key]), key
