"""The CUDA paths that a machine without a GPU can check: the bf16 autocast branch of
extraction and training (on the CPU, where autocast has a bf16 mode too), device selection and
the process-group backend."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from scipy.stats import spearmanr

from mimia.config import check_runtime_devices
from mimia.devices import autocast, process_group_backend, resolve_device
from mimia.models import build_model
from mimia.models.scoring import score_batch
from mimia.training import TrainConfig, train_mim

ROOT = Path(__file__).resolve().parents[1]
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")

# bf16 keeps 8 significant bits (relative rounding 2^-9 = 0.2 %); a reconstruction error is
# a mean over many patches, so per-op rounding largely averages out. Measured on these tiny
# models: <= 0.09 % per sample (extraction), <= 0.03 % per epoch's loss (training). The bounds
# leave 10x room and are the ones bench/gpu.py applies on a GPU (see bench/README.md).
ERROR_RTOL = 1e-2
LOSS_RTOL = 1e-2
MIN_SPEARMAN = 0.999


def _images(n, size=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize("recipe", ["mae", "simmim"])
def test_bf16_extraction_gives_the_float32_errors(tiny_spec, recipe):
    spec = dataclasses.replace(tiny_spec, recipe=recipe)
    torch.manual_seed(0)
    model = build_model(spec).eval()
    imgs, ids = _images(64), [f"s{i}" for i in range(64)]
    fp32 = score_batch(model, imgs, ids, 0, 0.75, 4, precision="fp32")
    bf16 = score_batch(model, imgs, ids, 0, 0.75, 4, precision="bf16")
    for column in ("error", "error_all", "patch_error_median"):
        a, b = fp32[column].flatten(), bf16[column].flatten()
        assert b.dtype == torch.float32
        rel = ((b - a).abs() / a).max().item()
        # bf16 did run (a no-op autocast would give the float32 numbers exactly) ...
        assert rel > 1e-6, column
        # ... and agrees with float32 within bf16's rounding.
        assert rel < ERROR_RTOL, (column, rel)
        assert spearmanr(a, b).statistic > MIN_SPEARMAN, column
    # On the CPU the default is float32: the errors the workflow writes there.
    default = score_batch(model, imgs, ids, 0, 0.75, 4)
    assert torch.equal(default["error"], fp32["error"])


def test_bf16_training_follows_the_float32_losses(tiny_spec):
    cfg = TrainConfig.from_section(
        {"epochs": 4, "batch_size": 16, "blr": 1e-2, "warmup_epochs": 1}, seed=0, device="cpu"
    )
    losses, weights = {}, {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = build_model(tiny_spec)
        history = train_mim(model, _images(64), dataclasses.replace(cfg, precision=precision))
        losses[precision] = torch.tensor([h["loss"] for h in history])
        weights[precision] = model.state_dict()
    rel = ((losses["bf16"] - losses["fp32"]).abs() / losses["fp32"]).max().item()
    assert 0 < rel < LOSS_RTOL, rel
    # The trajectory is the run's, not noise around a constant: it falls by far more.
    assert losses["fp32"][0] - losses["fp32"][-1] > 10 * LOSS_RTOL * losses["fp32"][0]
    # Weights are kept in float32 under autocast.
    assert all(v.dtype == weights["fp32"][k].dtype for k, v in weights["bf16"].items())
    # The precision does not enter the resume fingerprint (like device and compile).
    assert cfg.fingerprint() == dataclasses.replace(cfg, precision="bf16").fingerprint()


def test_autocast_modes():
    cpu = torch.device("cpu")
    with autocast(cpu, "bf16"):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with autocast(cpu):  # auto on the CPU: float32
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    with pytest.raises(ValueError, match="precision 'fp16' is not one of"):
        autocast(cpu, "fp16")


def test_nccl_only_for_cuda_ranks():
    assert process_group_backend(torch.device("cuda", 1)) == "nccl"
    assert process_group_backend(torch.device("cpu")) == "gloo"
    # auto without a GPU is the CPU, so gloo.
    if not torch.cuda.is_available():
        assert process_group_backend(resolve_device("auto")) == "gloo"


@NO_CUDA
def test_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(RuntimeError, match="'cuda' but this machine has no usable CUDA"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")


def _exp(device):
    return {"runtime": {"device": device}}


@NO_CUDA
def test_config_refuses_cuda_before_any_job():
    experiments = {"a": _exp("auto"), "b": _exp("cuda:1")}
    with pytest.raises(ValueError, match=r"experiment 'b': runtime.device is 'cuda:1' but .*gpu"):
        check_runtime_devices(experiments, gpu=0, local=False)
    with pytest.raises(ValueError, match=r"experiment 'b': .* no usable CUDA device"):
        check_runtime_devices(experiments, gpu=1, local=True)
    # On a cluster the jobs' nodes have the GPUs, not this machine.
    check_runtime_devices(experiments, gpu=1, local=False)
    check_runtime_devices({"a": _exp("auto"), "c": _exp("cpu")}, gpu=0, local=True)


@NO_CUDA
def test_workflow_with_cuda_and_no_gpu_stops_at_the_dag(tmp_path):
    config = {
        "gpu": 1,
        "experiments": {"e": {}},
        "defaults": {"dataset": {"name": "digits"}, "runtime": {"device": "cuda"}},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--cores", "1"]
    cmd += ["--directory", str(tmp_path), "--configfile", str(tmp_path / "config.yaml")]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert run.returncode != 0
    assert "experiment 'e': runtime.device is 'cuda' but this machine has no usable" in run.stderr
    assert not (tmp_path / "results").exists()  # no job ran
