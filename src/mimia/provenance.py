"""What every result file records about how it was made (Parquet key-value metadata)."""

from __future__ import annotations

import functools
import hashlib
import json
import platform
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

import mimia
from mimia.storage import atomic_path


def provenance(**fields: Any) -> dict[str, str]:
    """``fields`` (JSON-encoded unless strings) plus the software and machine that ran.

    Trained weights depend on the torch build, the CPU and the thread count, so they are
    recorded; torch is not imported for it (light stages stay light).
    """
    meta = {"mimia_version": mimia.__version__, **machine()}
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
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
