"""DAG build cost: dry-run wall time and peak RSS against ``snakemake --version`` (the floor)
and against a bare Snakefile with the same number of jobs (Snakemake's own per-job cost).

The default digits experiment with ``split.shard_size`` 400, 10 and 1 gives about 100, 1,000
and 10,000 jobs. Each dry run starts from an empty results folder in a temporary directory,
so every job is scheduled. Peak RSS is the child's own (``os.wait4``). The bare workflow has
two chained rules with a log, a resource and two params functions each, and nothing else:
what Snakemake itself costs per job, which no workflow can go below.

Goals on the 2-core development CPU: start-up within 2 s of the floor, 10,000 jobs in under
20 s, under 300 MB for the DAG.

    python bench/dag.py [--shard-sizes 400 10 1] [--repeat 2]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def measure(cmd: list[str], cwd: str) -> tuple[float, float, str]:
    """Wall seconds, peak RSS in MB and output of one command."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out[-3000:]}")
    return seconds, usage.ru_maxrss / 1024, out


def dry_run(shard_size: int, workdir: Path) -> tuple[float, float, int]:
    config = {"experiments": {"digits-mae": {"split": {"shard_size": shard_size}}}}
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    cmd = [
        *SNAKEMAKE,
        "-s",
        str(ROOT / "Snakefile"),
        "--directory",
        str(workdir),
        "--configfile",
        str(workdir / "config.yaml"),
        "--cores",
        "1",
        "--dry-run",
        "--quiet",
        "rules",
    ]
    seconds, rss, out = measure(cmd, str(workdir))
    total = re.search(r"^total\s+(\d+)", out, flags=re.M)
    if total is None:
        raise RuntimeError(f"no job count in the dry run's output:\n{out[-2000:]}")
    return seconds, rss, int(total.group(1))


BARE = """
rule all:
    input: expand("out/{{i}}.txt", i=range({n}))
rule one:
    input: "in/{{i}}.src"
    output: "out/{{i}}.txt"
    params: a=lambda wc: 1, b=lambda wc: 2
    resources: mem_mb=100
    log: "logs/{{i}}.log"
    shell: "touch {{output}}"
rule src:
    output: "in/{{i}}.src"
    params: a=lambda wc: 1, b=lambda wc: 2
    resources: mem_mb=100
    log: "logs/src{{i}}.log"
    shell: "touch {{output}}"
"""


def bare_run(jobs: int, workdir: Path) -> float:
    """Wall seconds of a dry run of a bare Snakefile with ``jobs`` jobs."""
    (workdir / "Snakefile").write_text(BARE.format(n=max((jobs - 1) // 2, 1)))
    cmd = [*SNAKEMAKE, "--cores", "1", "--dry-run", "--quiet", "rules"]
    return measure(cmd, str(workdir))[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shard-sizes", type=int, nargs="+", default=[400, 10, 1])
    parser.add_argument("--repeat", type=int, default=2, help="best of N runs")
    args = parser.parse_args()

    floor = min(measure([*SNAKEMAKE, "--version"], str(ROOT)) for _ in range(args.repeat))
    print(f"floor: snakemake --version  {floor[0]:6.2f} s  {floor[1]:6.0f} MB")
    print(
        f"{'shard_size':>10} {'jobs':>7} {'wall s':>8} {'- floor':>8} {'MB':>6} {'ms/job':>7}"
        f" {'bare s':>7} {'/ bare':>7}"
    )
    for size in args.shard_sizes:
        best = None
        for _ in range(args.repeat):
            with tempfile.TemporaryDirectory() as tmp:
                run = dry_run(size, Path(tmp))
            best = run if best is None or run[0] < best[0] else best
        seconds, rss, jobs = best
        per_job = 1000 * (seconds - floor[0]) / jobs
        bare = []
        for _ in range(args.repeat):
            with tempfile.TemporaryDirectory() as tmp:
                bare.append(bare_run(jobs, Path(tmp)))
        print(
            f"{size:>10} {jobs:>7} {seconds:>8.2f} {seconds - floor[0]:>8.2f} {rss:>6.0f}"
            f" {per_job:>7.2f} {min(bare):>7.2f} {seconds / min(bare):>7.2f}"
        )


if __name__ == "__main__":
    main()
