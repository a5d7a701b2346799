"""bench/gpu.py's smoke mode on the CPU: every section runs with tiny models (torch.compile
only with --cpu-compile), so the script that waits for a GPU session does not rot in between.
bench/extract.py's subprocess is in a slow test; the workflow section runs by hand."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench(tmp_path, *sections: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "record.json"
    cmd = [sys.executable, str(ROOT / "bench" / "gpu.py"), "--device", "cpu", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [*cmd, "--sections", *sections], capture_output=True, text=True, timeout=1800, env=env
    )
    return run, json.loads(out.read_text())


def test_smoke_mode_runs_every_cpu_branch(tmp_path):
    sections = ["train", "compile", "extract", "ddp", "share"]
    run, record = _bench(tmp_path, *sections)
    assert record["errors"] == {}, record["errors"]
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    s = record["sections"]
    # Training: bf16 (the CPU's autocast) against float32 from the same start, FLOPs counted.
    for r in s["train"].values():
        assert 0 < r["loss_gap_rel"] <= record["tolerances"]["loss_rtol"]
        assert r["flops_per_step"] > 0 and r["bf16"]["tflops"] > 0
        assert len(r["fp32"]["losses"]) == r["steps"]
    assert "--cpu-compile" in s["compile"]["skipped"]  # inductor's C++ build: minutes
    members = s["extract"]["members"]
    assert all(members["checks"].values()), members
    assert 0 < members["max_rel_error"] and members["auc_ci95_fp32"][0] <= members["auc"]["fp32"]
    assert s["ddp"] == s["ddp"] | {"processes": 1, "backend": "gloo", "ok": True}
    assert set(s["share"]["results"]) == {"1", "2"}
    assert "FAIL" not in run.stdout


@pytest.mark.slow
def test_smoke_mode_runs_extract_bench(tmp_path):
    # bench/extract.py in a subprocess builds a ViT-B/16 and an HF ViTMAE at 224 px. The
    # workflow section is left to a hand run (`bench/gpu.py --device cpu --sections workflow`,
    # about 3 min): on the CPU its two runs are the same CPU run, and the GPU share it uses is
    # run for real by test_gpu_share.
    run, record = _bench(tmp_path, "extract_bench")
    assert record["errors"] == {}, record["errors"]
    assert run.returncode == 0, run.stdout[-3000:]
    assert record["sections"]["extract_bench"]["mimia_over_naive"] > 0
