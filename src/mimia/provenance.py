"""What every result file records about how it was made (Parquet key-value metadata)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

import mimia


def provenance(**fields: Any) -> dict[str, str]:
    meta = {"mimia_version": mimia.__version__}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in fields.items()})
    return meta


def write_parquet(df: pl.DataFrame | pa.Table, path: str | Path, metadata: dict[str, str]) -> None:
    """zstd Parquet with ``metadata`` in the schema, written to a temp file then renamed."""
    table = df.to_arrow() if isinstance(df, pl.DataFrame) else df
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)


def read_metadata(path: str | Path) -> dict[str, str]:
    raw = pq.read_schema(path).metadata or {}
    return {k.decode(): v.decode() for k, v in raw.items() if not k.startswith(b"ARROW")}
