"""``mimia verify``: do an experiment's results still match the inputs they recorded?

Every result records the SHA-256 of what it was made from (in Parquet metadata or a model
sidecar's ``info``): ``manifest_sha256``, ``shard_sha256`` + ``shard_file``,
``checkpoint_sha256`` + ``checkpoint_files``, ``inputs_sha256`` and ``target_sha256`` (+
``target_file``). This re-hashes each recorded input and reports, per artifact, OK or what was
recorded (and by which file) against what is there now. Only metadata is read to learn what a
file is; file names are never parsed.
"""

from __future__ import annotations

import json
import os
import struct
import tarfile
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from mimia.provenance import file_sha256

OK, MISMATCH, MISSING, UNREADABLE = "OK", "MISMATCH", "MISSING", "UNREADABLE"
# Columns that make a Parquet table a split manifest.
MANIFEST_COLUMNS = {"sample_id", "source_index", "role"}
MANIFEST = "manifest"
ANY_CHECKPOINT = "any checkpoint"


@dataclass(frozen=True)
class Claim:
    """``recorder`` recorded ``sha256`` for ``target`` (a path as written, or MANIFEST)."""

    recorder: Path
    target: str
    sha256: str
    key: str


@dataclass
class Finding:
    artifact: str
    status: str = OK
    notes: list[str] = field(default_factory=list)

    problems: list[str] = field(default_factory=list)

    def fail(self, status: str, note: str) -> None:
        # MISSING / UNREADABLE outrank MISMATCH outrank OK.
        order = (OK, MISMATCH, MISSING, UNREADABLE)
        if order.index(status) > order.index(self.status):
            self.status = status
        self.problems.append(note)

    def line(self) -> str:
        notes = self.problems + self.notes
        return f"{self.status:<10} {self.artifact}" + (f": {'; '.join(notes)}" if notes else "")


class Verifier:
    def __init__(self, experiment: Path, root: Path):
        self.experiment = experiment.absolute()
        self.root = root.absolute()
        self.findings: dict[str, Finding] = {}
        self._sha: dict[Path, str] = {}
        self.recorded: set[str] = set()  # artifacts some downstream file records

    # -- reporting ---------------------------------------------------------------------------
    def show(self, path: Path) -> str:
        """A path as the user sees it: under ``root`` relative to it, else absolute."""
        path = path.absolute()
        return str(path.relative_to(self.root)) if path.is_relative_to(self.root) else str(path)

    def finding(self, path: Path | str) -> Finding:
        name = path if isinstance(path, str) else self.show(path)
        return self.findings.setdefault(name, Finding(name))

    def resolve(self, recorded: str) -> Path | None:
        """A recorded path as Snakemake wrote it: relative to ``root``, else to the folder
        holding ``results/`` (the experiment folder's grandparent)."""
        p = Path(recorded)
        candidates = [p] if p.is_absolute() else [self.root / p, self.experiment.parent.parent / p]
        found = next((c for c in candidates if c.exists()), None)
        return None if found is None else Path(os.path.normpath(found))

    def sha(self, path: Path) -> str:
        if path not in self._sha:
            self._sha[path] = file_sha256(path)
        return self._sha[path]

    # -- the checks --------------------------------------------------------------------------
    def run(self) -> list[Finding]:
        files = sorted(
            p
            for ext in ("parquet", "json", "tar", "safetensors")
            for p in self.experiment.rglob(f"*.{ext}")
        )
        claims: list[Claim] = []
        manifests: dict[Path, tuple[str, dict[str, tuple]]] = {}
        for path in files:
            if path.suffix == ".parquet":
                claims += self.read_parquet(path, manifests)
            elif path.suffix == ".json":
                claims += self.read_json(path)
        for path in files:
            if path.suffix == ".safetensors":
                self.check_safetensors(path)
            elif path.suffix == ".tar":
                self.check_tar(path, manifests)
        by_target: dict[str, list[Claim]] = defaultdict(list)
        for claim in claims:
            by_target[claim.target].append(claim)
        for target, group in by_target.items():
            if target == MANIFEST:
                self.check_manifest_claims(group, manifests)
            elif target == ANY_CHECKPOINT:
                self.check_any_checkpoint(group, files)
            else:
                self.check_file_claims(target, group)
        for path in files:
            if path.suffix in (".tar", ".safetensors"):
                f = self.finding(path)
                if f.artifact not in self.recorded:
                    f.notes.append("no downstream file records its sha256")
        return sorted(self.findings.values(), key=lambda f: f.artifact)

    def read_parquet(self, path: Path, manifests: dict) -> list[Claim]:
        try:
            schema = pq.read_schema(path)
        except Exception as err:  # pyarrow raises several types for a damaged file
            self.finding(path).fail(UNREADABLE, f"not a readable Parquet file ({err})")
            return []
        raw = schema.metadata or {}
        meta = {k.decode(): v.decode() for k, v in raw.items() if not k.startswith(b"ARROW")}
        if MANIFEST_COLUMNS <= set(schema.names):
            self.read_manifest(path, meta, manifests)
            return []
        return list(claims_from(meta, path))

    def read_manifest(self, path: Path, meta: dict[str, str], manifests: dict) -> None:
        import polars as pl

        from mimia.data.splits import MANIFEST_SCHEMA, manifest_hash, manifest_rows_sha256

        found = self.finding(path)
        try:
            df = pl.read_parquet(path)
        except Exception as err:
            found.fail(UNREADABLE, f"not a readable Parquet file ({err})")
            return
        digest = manifest_hash(df)
        recorded = meta.get("manifest_sha256")
        if recorded is not None and recorded != digest:
            found.fail(
                MISMATCH,
                f"manifest_sha256 recorded {recorded} in its own metadata, rows hash to {digest}",
            )
        rows_recorded = meta.get("manifest_rows_sha256")
        if rows_recorded is not None and set(MANIFEST_SCHEMA) <= set(df.columns):
            rows_found = manifest_rows_sha256(df)
            if rows_recorded != rows_found:
                found.fail(
                    MISMATCH,
                    f"manifest_rows_sha256 recorded {rows_recorded} in its own metadata, "
                    f"rows hash to {rows_found}",
                )
        cols = [c for c in ("sample_id", "role", "key", "content_sha256") if c in df.columns]
        rows = {r[0]: r[1:] for r in df.select(cols).iter_rows()}
        manifests[path] = (digest, rows)
        found.notes.append(f"manifest_sha256 {digest}")

    def read_json(self, path: Path) -> list[Claim]:
        try:
            obj = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            self.finding(path).fail(UNREADABLE, f"not readable JSON ({err})")
            return []
        if not isinstance(obj, dict):
            return []
        out = []
        for section in (obj, obj.get("info"), obj.get("metadata")):
            if isinstance(section, dict):
                out += claims_from(section, path)
        return out

    def check_manifest_claims(self, claims: list[Claim], manifests: dict) -> None:
        if not manifests:
            f = self.finding("(split manifest)")
            f.fail(
                MISSING,
                f"no manifest in {self.show(self.experiment)}; {len(claims)} files record one, "
                f"e.g. {self.show(claims[0].recorder)}",
            )
            return
        digests = {digest: path for path, (digest, _) in manifests.items()}
        target = next(iter(manifests)) if len(manifests) == 1 else None
        ok = 0
        for claim in claims:
            if claim.sha256 in digests:
                ok += 1
                continue
            where = self.finding(target) if target else self.finding("(split manifest)")
            found = ", ".join(digests)
            where.fail(
                MISMATCH,
                f"manifest_sha256 recorded {claim.sha256} by {self.show(claim.recorder)}, "
                f"found {found}",
            )
        if target is not None and ok:
            self.finding(target).notes.append(f"matches {ok} records")

    def check_file_claims(self, recorded: str, claims: list[Claim]) -> None:
        path = self.resolve(recorded)
        if path is None:
            f = self.finding(recorded)
            f.fail(
                MISSING,
                f"does not exist (under {self.show(self.root)} or "
                f"{self.show(self.experiment.parent.parent)}); recorded by "
                f"{self.show(claims[0].recorder)}",
            )
            return
        f = self.finding(path)
        self.recorded.add(f.artifact)
        try:
            digest = self.sha(path)
        except OSError as err:
            f.fail(UNREADABLE, f"cannot read it ({err})")
            return
        ok = 0
        for claim in claims:
            if claim.sha256 == digest:
                ok += 1
            else:
                f.fail(
                    MISMATCH,
                    f"{claim.key} recorded {claim.sha256} by {self.show(claim.recorder)}, "
                    f"found {digest}",
                )
        if ok:
            f.notes.append(f"sha256 {digest} matches {ok} records")

    def check_any_checkpoint(self, claims: list[Claim], files: list[Path]) -> None:
        weights = {self.sha(p): p for p in files if p.suffix == ".safetensors"}
        for claim in claims:
            match = weights.get(claim.sha256)
            if match is not None:
                self.recorded.add(self.finding(match).artifact)
                self.finding(match).notes.append(
                    f"{claim.key} of {self.show(claim.recorder)} matches"
                )
            else:
                self.finding(claim.recorder).fail(
                    MISMATCH,
                    f"{claim.key} recorded {claim.sha256}, but no checkpoint in "
                    f"{self.show(self.experiment)} has that sha256",
                )

    def check_safetensors(self, path: Path) -> None:
        """The header must parse and describe exactly the file's length (no truncation)."""
        f = self.finding(path)
        try:
            size = path.stat().st_size
            with open(path, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                if n > size:
                    raise ValueError(f"header length {n} exceeds the file size {size}")
                header = json.loads(fh.read(n))
            end = max(
                (t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"),
                default=0,
            )
            if 8 + n + end != size:
                raise ValueError(f"{size} bytes, its header describes {8 + n + end}")
        except (OSError, ValueError, KeyError, TypeError, struct.error) as err:
            f.fail(UNREADABLE, f"not a complete safetensors file ({err})")

    def check_tar(self, path: Path, manifests: dict) -> None:
        """Each sample's stored manifest row must still be the manifest's row."""
        f = self.finding(path)
        try:
            rows = tar_rows(path)
        except (OSError, tarfile.TarError, ValueError) as err:
            f.fail(UNREADABLE, f"not a readable tar shard ({err})")
            return
        if len(manifests) != 1:
            return
        expected = next(iter(manifests.values()))[1]
        bad = []
        for sid, row in rows:
            want = expected.get(sid)
            got = tuple(row.get(c) for c in ("role", "key", "content_sha256"))[: len(want or ())]
            if want is None or got != tuple(want):
                bad.append((sid, row.get("role"), want))
        if bad:
            sid, role, want = bad[0]
            what = "is not in the manifest" if want is None else f"manifest says {want[0]!r}"
            f.fail(
                MISMATCH,
                f"{len(bad)} of {len(rows)} samples disagree with the manifest, e.g. "
                f"{sid!r} (role {role!r} in the shard) {what}",
            )
        else:
            f.notes.append(f"{len(rows)} samples agree with the manifest")


def tar_rows(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """The manifest row stored with each sample; a tar damaged part-way is an error (tarfile
    would stop at the damaged header as if the archive ended there)."""
    rows = []
    with tarfile.open(path) as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".json"):
                row = json.loads(tar.extractfile(member).read())
                rows.append((row.get("sample_id", member.name.removesuffix(".json")), row))
        end = tar.offset
    with open(path, "rb") as f:
        f.seek(end)
        if f.read().strip(b"\0"):
            raise ValueError(f"damaged at byte {end}: data follows what tarfile could read")
    return rows


def _as_dict(value: Any) -> Any:
    if isinstance(value, str) and value.startswith("{"):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def claims_from(meta: Mapping[str, Any], recorder: Path) -> Iterator[Claim]:
    """The input hashes one metadata mapping records."""
    if isinstance(meta.get("manifest_sha256"), str):
        yield Claim(recorder, MANIFEST, meta["manifest_sha256"], "manifest_sha256")
    if meta.get("shard_sha256") and meta.get("shard_file"):
        yield Claim(recorder, str(meta["shard_file"]), meta["shard_sha256"], "shard_sha256")
    shas, paths = _as_dict(meta.get("checkpoint_sha256")), _as_dict(meta.get("checkpoint_files"))
    if isinstance(shas, dict) and isinstance(paths, dict):
        for name, sha in shas.items():
            if name in paths:
                yield Claim(recorder, str(paths[name]), sha, f"checkpoint_sha256[{name!r}]")
    inputs = _as_dict(meta.get("inputs_sha256"))
    if isinstance(inputs, dict):
        for path, sha in inputs.items():
            yield Claim(recorder, str(path), sha, "inputs_sha256")
    if isinstance(meta.get("target_sha256"), str):
        target = str(meta["target_file"]) if meta.get("target_file") else ANY_CHECKPOINT
        yield Claim(recorder, target, meta["target_sha256"], "target_sha256")


def verify(experiment: str | Path, root: str | Path | None = None) -> tuple[int, list[str]]:
    """Exit status (0 all match, 1 a mismatch, 2 something missing or unreadable) and lines."""
    experiment = Path(experiment)
    root = Path(root) if root is not None else Path.cwd()
    if not experiment.is_dir():
        return 2, [f"{experiment} is not a folder (expected results/<experiment>)"]
    findings = Verifier(experiment, root).run()
    if not findings:
        return 2, [f"{experiment} holds no results (.parquet, .json, .tar, .safetensors)"]
    lines = [f.line() for f in findings]
    counts = {s: sum(f.status == s for f in findings) for s in (OK, MISMATCH, MISSING, UNREADABLE)}
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items() if n))
    if counts[MISSING] or counts[UNREADABLE]:
        return 2, lines
    return (1 if counts[MISMATCH] else 0), lines
