import math

import pytest
import torch

from mimia.models import build_model
from mimia.training import TrainConfig, lr_at, train_mim


def _images(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 16, 16), generator=g, dtype=torch.uint8)


def test_lr_schedule_is_maes():
    cfg = TrainConfig.from_section(
        {"epochs": 10, "warmup_epochs": 2, "blr": 1e-3, "batch_size": 128, "min_lr": 1e-5}
    )
    assert cfg.lr == pytest.approx(5e-4)
    assert lr_at(0.0, cfg) == 0.0
    assert lr_at(1.0, cfg) == pytest.approx(2.5e-4)
    assert lr_at(2.0, cfg) == pytest.approx(5e-4)
    assert lr_at(6.0, cfg) == pytest.approx(
        1e-5 + (5e-4 - 1e-5) * 0.5 * (1 + math.cos(math.pi / 2))
    )
    assert lr_at(10.0, cfg) == pytest.approx(1e-5)


def test_training_lowers_the_loss(tiny_spec):
    torch.manual_seed(0)
    model = build_model(tiny_spec)
    hist = train_mim(
        model,
        _images(),
        TrainConfig.from_section({"epochs": 8, "batch_size": 8, "blr": 1e-2, "warmup_epochs": 1}),
    )
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert [h["epoch"] for h in hist] == list(range(8))


def test_killed_then_resumed_training_equals_uninterrupted(tiny_spec, tmp_path):
    cfg = TrainConfig.from_section(
        {"epochs": 6, "batch_size": 8, "blr": 1e-2, "warmup_epochs": 1, "checkpoint_every": 2}
        | {"augment": True},
        seed=3,
    )
    images = _images()

    torch.manual_seed(0)
    straight = build_model(tiny_spec)
    full = train_mim(straight, images, cfg)

    torch.manual_seed(0)
    first = build_model(tiny_spec)
    resume = tmp_path / "resume.pt"
    # Stops after epoch 2 (0-based): the last checkpoint holds epoch 1, so epoch 2 is redone,
    # as after a kill -9 between checkpoints.
    train_mim(first, images, cfg, resume_path=resume, stop_after_epoch=2)
    assert resume.exists()

    torch.manual_seed(123)  # a fresh process: different global RNG, different init
    second = build_model(tiny_spec)
    resumed = train_mim(second, images, cfg, resume_path=resume)

    assert [h["loss"] for h in resumed] == [h["loss"] for h in full]
    for (name, a), b in zip(
        straight.state_dict().items(), second.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


def test_stale_resume_file_is_ignored(tiny_spec, tmp_path):
    cfg = TrainConfig.from_section(
        {"epochs": 2, "batch_size": 8, "warmup_epochs": 1, "checkpoint_every": 1}
    )
    resume = tmp_path / "resume.pt"
    train_mim(build_model(tiny_spec), _images(), cfg, resume_path=resume, fingerprint="old")
    hist = train_mim(build_model(tiny_spec), _images(), cfg, resume_path=resume, fingerprint="new")
    assert [h["epoch"] for h in hist] == [0, 1]


KILL_SCRIPT = """
import sys, torch
from mimia.models import ModelSpec, build_model
from mimia.training import TrainConfig, train_mim
torch.set_num_threads(1)
spec = ModelSpec.from_dict(__import__("json").loads(sys.argv[1]))
images = torch.load(sys.argv[2], weights_only=True)
torch.manual_seed(0)
model = build_model(spec)
cfg = TrainConfig.from_section(
    {"epochs": 40, "batch_size": 8, "blr": 1e-2, "warmup_epochs": 2, "checkpoint_every": 1},
    seed=5,
)
train_mim(model, images, cfg, resume_path=sys.argv[3], fingerprint="f")
torch.save(model.state_dict(), sys.argv[4])
"""


def test_kill_9_then_restart_resumes_and_matches(tiny_spec, tmp_path):
    import json
    import signal
    import subprocess
    import sys
    import time

    images = _images(16)
    torch.save(images, tmp_path / "images.pt")
    args = [
        sys.executable,
        "-c",
        KILL_SCRIPT,
        json.dumps(tiny_spec.to_dict()),
        str(tmp_path / "images.pt"),
        str(tmp_path / "resume.pt"),
    ]
    proc = subprocess.Popen([*args, str(tmp_path / "killed.pt")], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if (tmp_path / "resume.pt").exists():
            state = torch.load(tmp_path / "resume.pt", weights_only=True)
            if 3 <= state["epoch"] < 30:
                break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed.pt").exists(), "training finished before it could be killed"
    resumed = subprocess.run([*args, str(tmp_path / "resumed.pt")], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr
    (tmp_path / "resume.pt").unlink()
    straight = subprocess.run(
        [*args, str(tmp_path / "straight.pt")], capture_output=True, text=True
    )
    assert straight.returncode == 0, straight.stderr[-2000:]
    a = torch.load(tmp_path / "resumed.pt", weights_only=True)
    b = torch.load(tmp_path / "straight.pt", weights_only=True)
    for key in b:
        assert torch.equal(a[key], b[key]), key


def test_a_resume_file_that_cannot_be_read_stops_the_run_and_stays(tiny_spec, tmp_path):
    """An I/O error is not damage: moving the file aside would throw away a good checkpoint
    on a flaky disk. Reading /proc/self/mem from its start fails with EIO, for real."""
    import errno

    cfg = TrainConfig.from_section(
        {"epochs": 2, "batch_size": 8, "warmup_epochs": 1, "checkpoint_every": 1}
    )
    resume = tmp_path / "resume.pt"
    resume.symlink_to("/proc/self/mem")
    with pytest.raises(OSError) as err:
        train_mim(build_model(tiny_spec), _images(), cfg, resume_path=resume, fingerprint="f")
    assert err.value.errno == errno.EIO
    assert resume.is_symlink() and not list(tmp_path.glob("resume.pt.corrupt-*"))


def test_a_truncated_resume_file_is_damage_and_training_starts_over(tiny_spec, tmp_path):
    cfg = TrainConfig.from_section(
        {"epochs": 2, "batch_size": 8, "warmup_epochs": 1, "checkpoint_every": 1}
    )
    resume = tmp_path / "resume.pt"
    train_mim(build_model(tiny_spec), _images(), cfg, resume_path=resume, stop_after_epoch=0)
    data = resume.read_bytes()
    for n, cut in enumerate((0, 100, len(data) // 2, len(data) - 10), start=1):
        resume.write_bytes(data[:cut])
        hist = train_mim(build_model(tiny_spec), _images(), cfg, resume_path=resume)
        assert [h["epoch"] for h in hist] == [0, 1], cut
        assert resume.with_name(f"resume.pt.corrupt-{n}").stat().st_size == cut
