"""What every result file records about how it was made.

Parquet results carry it as key-value metadata; every output of a workflow job also gets a
*receipt* beside it (``.<name>.chain.json``): its own SHA-256, the SHA-256 of every input the
job read, the hash of the code that made it (:func:`code_identity`) and the checkout's commit.
Receipts link each result to its inputs' receipts, a hash chain from the split manifest to the
summary that ``mimia verify`` walks, and a job refuses an input that is no longer what its
producer recorded (:func:`check_inputs`).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
import platform
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

import mimia
from mimia.storage import atomic_path, write_json


def provenance(**fields: Any) -> dict[str, str]:
    """``fields`` (JSON-encoded unless strings) plus the software and machine that ran.

    Trained weights depend on the torch build, the CPU and the thread count, so they are
    recorded; torch is not imported for it (light stages stay light).
    """
    meta = {"mimia_version": mimia.__version__, **machine(), **_JOB}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in fields.items()})
    return meta


def machine() -> dict[str, str]:
    info = {
        "python_version": platform.python_version(),
        "numpy_version": _version("numpy"),
        "torch_version": _version("torch"),
        "cpu": cpu_model(),
        "platform": platform.platform(),
    }
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch_version"] = torch.__version__
        info["torch_threads"] = str(torch.get_num_threads())
        if torch.cuda.is_initialized():
            info["cuda_device"] = torch.cuda.get_device_name()
    return info


def _version(package: str) -> str:
    module = sys.modules.get(package)
    if module is not None:
        return module.__version__
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


@functools.cache
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "Model", "Hardware")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_parquet(df: pl.DataFrame | pa.Table, path: str | Path, metadata: dict[str, str]) -> None:
    """zstd Parquet with ``metadata`` in the schema, written atomically."""
    table = df.to_arrow() if isinstance(df, pl.DataFrame) else df
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def read_metadata(path: str | Path) -> dict[str, str]:
    raw = pq.read_schema(path).metadata or {}
    return {k.decode(): v.decode() for k, v in raw.items() if not k.startswith(b"ARROW")}


def file_sha256(path: str | Path) -> str:
    # A job hashes its inputs before it runs and the stage hashes some again (a checkpoint of a
    # few hundred MB): one read per file version. A rename keeps inode and mtime, so a hash
    # taken of a temp file serves the final name too.
    st = os.stat(path)
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _SHA:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _SHA[key] = h.hexdigest()
    return _SHA[key]


_SHA: dict[tuple[int, int, int, int], str] = {}


# -- code identity ------------------------------------------------------------------------------
PACKAGE = Path(mimia.__file__).parent


def code_identity(stage: str, package: str | Path = PACKAGE) -> str:
    """SHA-256 of the code the stage function ``mimia.stages.<stage>`` runs.

    It covers the stage function's own source and the ``stages`` helpers it calls, and every
    ``mimia`` module reachable from their imports (module- and function-level imports alike,
    with the packages that hold them), read from the import graph of ``package``'s sources
    without importing anything: a change to the report code leaves a model's identity alone, a
    change to masking or training does not.
    """
    root = Path(package).absolute()
    stages_file = root / "stages.py"
    tree = ast.parse(stages_file.read_text(), str(stages_file))
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    if stage not in functions:
        raise ValueError(f"{stages_file} has no stage function {stage!r}")
    # The stage and the stages helpers it names, transitively.
    used, todo = set(), [stage]
    while todo:
        name = todo.pop()
        if name in used:
            continue
        used.add(name)
        todo += [
            n.id for n in ast.walk(functions[name]) if isinstance(n, ast.Name) and n.id in functions
        ]
    module_imports = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
    modules: set[str] = set()
    todo_modules = [
        m
        for node in module_imports + [n for f in used for n in ast.walk(functions[f])]
        for m in _imported(node, "mimia.stages", root)
    ]
    while todo_modules:
        name = todo_modules.pop()
        if name in modules:
            continue
        path = _module_file(name, root)
        if path is None:
            continue
        modules.add(name)
        parent = name.rpartition(".")[0]
        if parent:
            todo_modules.append(parent)
        todo_modules += _module_imports(name, root)
    h = hashlib.sha256()
    source = stages_file.read_text()
    for name in sorted(used):
        h.update(f"stages.{name}\0{ast.get_source_segment(source, functions[name])}\0".encode())
    for name in sorted(modules - {"mimia.stages"}):
        h.update(f"{name}\0".encode() + _module_file(name, root).read_bytes() + b"\0")
    return h.hexdigest()


def _module_imports(name: str, root: Path) -> list[str]:
    path = _module_file(name, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    return _parsed_imports(path.read_text(), str(path), package, root)


@functools.cache  # keyed by the source text: every rule of a workflow reads the same modules
def _parsed_imports(source: str, filename: str, package: str, root: Path) -> list[str]:
    module = ast.parse(source, filename)
    return [m for node in ast.walk(module) for m in _imported(node, package, root)]


def _imported(node: ast.AST, package: str, root: Path) -> list[str]:
    """The ``mimia`` modules an import statement (in a module of ``package``) loads."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "mimia"]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
        name = ".".join(base + ([node.module] if node.module else []))
    else:
        name = node.module or ""
    if name.split(".")[0] != "mimia":
        return []
    # ``from mimia.models import checkpoint`` loads a module by a name the statement imports.
    return [name] + [
        f"{name}.{a.name}" for a in node.names if _module_file(f"{name}.{a.name}", root)
    ]


def _module_file(name: str, root: Path) -> Path | None:
    """The source file of module ``name`` (``mimia...``) under package folder ``root``."""
    folder = root.joinpath(*name.split(".")[1:])
    for path in (folder / "__init__.py", folder.with_suffix(".py")):
        if path.is_file() and path.is_relative_to(root):
            return path
    return None


@functools.cache
def checkout_commit() -> str:
    """``git describe --always --dirty`` of the checkout mimia runs from, else its version."""
    top = PACKAGE.parent.parent
    if (top / ".git").exists():
        try:
            out = subprocess.run(
                ["git", "-C", str(top), "describe", "--always", "--dirty"],
                capture_output=True,
                text=True,
                timeout=60,
            )
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return f"mimia {mimia.__version__}"


# -- receipts: the hash chain -------------------------------------------------------------------
# What the running job adds to every provenance() record (set by ``stages.run_script``).
_JOB: dict[str, str] = {}


class InputChangedError(RuntimeError):
    """An input is not the file its producer recorded (edited, swapped, or damaged since)."""


def receipt_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}.chain.json")


def read_receipt(path: str | Path) -> dict[str, Any] | None:
    """The receipt of result ``path``, or None if it has none (not made by a workflow job)."""
    try:
        receipt = json.loads(receipt_path(path).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise InputChangedError(f"receipt {receipt_path(path)} is unreadable ({err})") from None
    return receipt if isinstance(receipt, dict) else None


def shown(path: str | Path) -> str:
    """``path``, and the file it resolves to when it is a link (a between-workflow cache
    entry), so that a message names the file that actually changed."""
    real = os.path.realpath(path)
    return f"{path} (cache file {real})" if os.path.islink(path) else str(path)


def check_inputs(paths: list[str]) -> dict[str, str]:
    """SHA-256 of each input file, refusing one that differs from what its producer's receipt
    records (naming the file and the rule that made it)."""
    hashes = {}
    for path in paths:
        if not os.path.isfile(path):
            continue
        sha = file_sha256(path)
        receipt = read_receipt(path)
        if receipt is not None and receipt.get("sha256") != sha:
            raise InputChangedError(
                f"input {shown(path)} has sha256 {sha}, but rule {receipt.get('rule')!r} recorded "
                f"{receipt.get('sha256')} when it wrote it ({receipt_path(path)}): the file was "
                f"changed since; delete it and rerun to make it again"
            )
        hashes[str(path)] = sha
    return hashes


def begin_job(rule: str, code_sha256: str | None, inputs_sha256: dict[str, str]) -> None:
    """What every result of the running job records: its code, commit and inputs."""
    _JOB.clear()
    _JOB.update(commit=checkout_commit(), code_stage=rule)
    if code_sha256:
        _JOB["code_sha256"] = code_sha256
    _JOB["inputs_sha256"] = json.dumps(inputs_sha256)


def job_record() -> dict[str, Any]:
    """The running job's record (empty outside a workflow job), JSON values decoded."""
    return {k: json.loads(v) if k == "inputs_sha256" else v for k, v in _JOB.items()}


def write_receipts(outputs: list[str], rule: str, wildcards: dict[str, str]) -> None:
    """A receipt beside each output of a finished job: its sha256 and the job's record."""
    record = job_record()
    for path in outputs:
        if os.path.isfile(path):
            write_json(
                receipt_path(path),
                {
                    "file": Path(path).name,
                    "sha256": file_sha256(path),
                    "rule": rule,
                    "wildcards": wildcards,
                    **record,
                },
            )
