"""The --use-conda environment, the Makefile and the package agree on dependencies and pins.

pyproject.toml is the source: envs/mimia.yaml lists its [project] dependencies verbatim
(pins included), the Makefile reads torch's pins from it.
"""

import importlib.metadata
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
ENV = yaml.safe_load((ROOT / "envs" / "mimia.yaml").read_text())


def _requirements(lines) -> dict[str, Requirement]:
    reqs = {}
    for line in lines:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        assert name not in reqs, f"{req.name} is listed twice"
        reqs[name] = req
    return reqs


def _env_pip() -> list[str]:
    pips = [d["pip"] for d in ENV["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pips) == 1, "envs/mimia.yaml needs exactly one pip: list"
    return pips[0]


def test_conda_env_lists_the_package_dependencies_with_the_same_pins():
    package = _requirements(PROJECT["dependencies"])
    env = _requirements(_env_pip())
    assert sorted(env) == sorted(package)
    for name, req in package.items():
        assert (env[name].specifier, env[name].extras, env[name].marker) == (
            req.specifier,
            req.extras,
            req.marker,
        ), f"{name}: envs/mimia.yaml says {env[name]}, pyproject.toml says {req}"


def test_conda_python_satisfies_requires_python():
    pythons = [d for d in ENV["dependencies"] if isinstance(d, str) and d.startswith("python")]
    assert len(pythons) == 1, pythons
    version = pythons[0].split("=", 1)[1].lstrip("=")
    assert Version(version) in SpecifierSet(PROJECT["requires-python"]), pythons[0]
    # Only pip installs Python packages: a conda-forge torch beside pip's would shadow it.
    conda = {
        canonicalize_name(d.split("=")[0].split(">")[0].split("<")[0])
        for d in ENV["dependencies"]
        if isinstance(d, str)
    }
    assert conda == {"python", "pip"}, conda


def _torch_pins() -> list[str]:
    reqs = _requirements(PROJECT["dependencies"])
    pins = []
    for name in ("torch", "torchvision"):
        (spec,) = reqs[name].specifier
        assert spec.operator == "==", f"{name} must be pinned exactly, is {reqs[name]}"
        pins.append(f"{name}=={spec.version}")
    return pins


def test_makefile_installs_the_torch_pins_of_pyproject():
    if shutil.which("make") is None:
        pytest.skip("no make")
    out = subprocess.run(
        ["make", "--no-print-directory", "--eval", "pins: ; @echo $(TORCH_PINS)", "pins"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.split() == _torch_pins()
    # Stated once: no other torch version string in the Makefile.
    makefile = (ROOT / "Makefile").read_text()
    for pin in _torch_pins():
        assert pin not in makefile


def test_slurm_extra_pins_a_plugin_with_squeue_status():
    extras = PROJECT["optional-dependencies"]
    (plugin,) = _requirements(extras["slurm"]).values()
    (spec,) = plugin.specifier
    assert spec.operator == "==" and Version(spec.version) >= Version("2.1"), plugin
    assert "mimia[slurm]" in extras["test"], "CI (.[test]) must get the SLURM plugin"
    try:
        installed = importlib.metadata.version(plugin.name)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{plugin.name} not installed")
    assert installed == spec.version, f"installed {installed}, pinned {spec.version}"
