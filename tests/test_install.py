"""A non-editable install (the built wheel, no network) resolves and dry-runs the tiny config:
the schemas ship as package data, not beside the Snakefile."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / ".test" / "config" / "config.yaml"


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900, **kw)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    return run


@pytest.mark.slow
def test_an_installed_wheel_resolves_and_dry_runs_the_tiny_config(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    junk = shutil.ignore_patterns("__pycache__", "*.egg-info")
    shutil.copytree(ROOT / "src", source / "src", ignore=junk)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    offline = ["--no-deps", "--no-index"]
    build = [*pip, "wheel", *offline, "--no-build-isolation", "-w", "wheels", "./source"]
    _run(build, cwd=tmp_path)
    (wheel,) = (tmp_path / "wheels").glob("mimia-*.whl")
    site = tmp_path / "site"
    _run([*pip, "install", *offline, "--target", str(site), str(wheel)])
    assert (site / "mimia" / "schemas" / "experiment.schema.yaml").is_file()

    # Nothing of the checkout's src/ on the path: the installed package alone.
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    resolve = (
        "import sys, yaml, mimia; from mimia.config import resolve_experiments; "
        "e = resolve_experiments(yaml.safe_load(open(sys.argv[1]))); "
        "print(mimia.__file__); print(sorted(e), e['tiny']['pretrain']['min_lr'])"
    )
    out = _run([sys.executable, "-c", resolve, str(TINY)], cwd=tmp_path, env=env).stdout
    where, experiments = out.splitlines()
    assert Path(where).is_relative_to(site)
    assert experiments == "['tiny', 'tiny-simmim'] 0.0"  # min_lr: the schema's default

    # A workflow folder without src/ (the Snakefile puts a missing folder on the path).
    flow = tmp_path / "flow"
    flow.mkdir()
    shutil.copy(ROOT / "Snakefile", flow / "Snakefile")
    for folder in ("workflow", "profiles", "envs"):
        shutil.copytree(ROOT / folder, flow / folder, ignore=shutil.ignore_patterns("__pycache__"))
    assert not (flow / "src").exists() and not (flow / "workflow" / "schemas").exists()
    run = _run(
        [sys.executable, "-m", "snakemake", "-s", str(flow / "Snakefile"), "--directory",
         str(tmp_path / "run"), "--configfile", str(TINY), "--cores", "1", "--dry-run",
         "--quiet", "rules"],
        env=env,
    )  # fmt: skip
    total = re.search(r"^total\s+(\d+)", run.stdout, flags=re.M)
    assert total is not None and int(total.group(1)) > 50, run.stdout[-2000:]
