"""``mimia verify``: do an experiment's results still match the inputs they recorded?

Every result records the SHA-256 of what it was made from (in Parquet metadata or a model
sidecar's ``info``): ``manifest_sha256``, ``shard_sha256`` + ``shard_file``,
``checkpoint_sha256`` + ``checkpoint_files``, ``inputs_sha256`` and ``target_sha256`` (+
``target_file``); a model's sidecar records its weights' sha256; and every output of a workflow
job has a receipt (``.<name>.chain.json``, :mod:`mimia.provenance`) with its own sha256 and its
inputs'. This re-hashes each result and each recorded input and reports, per artifact, OK or
what was recorded (and by which file) against what is there now, which code made it (this
checkout's or other), and the first broken link of the chain (manifest, shards, models,
per-shard errors, ``errors.parquet``, scores and ROC, ``metrics.json``, summary). Only metadata
is read to learn what a file is; file names are never parsed.
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
# Where each rule's outputs sit in the chain from images to metrics: the first broken link is
# the failing artifact earliest in it (a file without a receipt ranks by what it is).
CHAIN = (
    ("manifest",),
    ("membership", "shard"),
    ("import_target", "pretrain"),
    ("adapt_decoder",),
    ("extract", "embed", "utility"),
    ("collect_errors",),
    ("attack",),
    ("experiment_metrics", "privacy_audit"),
    ("figures", "reconstructions", "summary", "privacy_utility", "ablation_plot"),
)
RANK = {rule: i for i, rules in enumerate(CHAIN) for rule in rules}
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
    rank: int = len(CHAIN)  # its place in the chain (CHAIN), where known
    other_code: bool = False  # made by code other than this checkout's

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
        self._code: dict[str, str] = {}
        self.sidecars: list[tuple[Path, dict]] = []
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
            if not p.name.startswith(".") and not self.dangling(p)
        )
        self.check_links()
        receipts = sorted(self.experiment.rglob(".*.chain.json"))
        # The summary's receipts sit beside the experiment folders; they record its metrics.
        receipts += sorted(self.experiment.parent.glob(".*.chain.json"))
        claims: list[Claim] = []
        for receipt in receipts:
            claims += self.read_receipt(receipt)
        manifests: dict[Path, tuple[str, dict[str, tuple]]] = {}
        for path in files:
            if path.suffix == ".parquet":
                claims += self.read_parquet(path, manifests)
            elif path.suffix == ".json":
                claims += self.read_json(path)
        for path in files:
            if path.suffix == ".safetensors":
                self.check_safetensors(path)
                self.finding(path).rank = min(self.finding(path).rank, RANK["pretrain"])
            elif path.suffix == ".tar":
                self.check_tar(path, manifests)
                self.finding(path).rank = min(self.finding(path).rank, RANK["shard"])
        for path, sidecar in self.sidecars:
            self.check_sidecar_weights(path, sidecar)
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
        self.note_code(self.finding(path), meta.get("code_stage"), meta.get("code_sha256"), meta)
        if MANIFEST_COLUMNS <= set(schema.names):
            self.finding(path).rank = RANK["manifest"]
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
        if "spec" in obj and "weights_sha256" in obj:
            self.check_sidecar(path, obj)
        out = []
        for section in (obj, obj.get("info"), obj.get("metadata")):
            if isinstance(section, dict):
                out += claims_from(section, path)
        return out

    def dangling(self, path: Path) -> bool:
        return path.is_symlink() and not path.exists()

    def check_links(self) -> None:
        """A link whose target is gone: a result fetched from a between-workflow cache whose
        entry (or the whole cache) has been removed since."""
        for folder, _, names in os.walk(self.experiment):
            for name in names:
                path = Path(folder) / name
                if self.dangling(path):
                    self.finding(path).fail(
                        MISSING,
                        f"a link to {os.readlink(path)}, which does not exist (a cache entry "
                        f"removed, or SNAKEMAKE_OUTPUT_CACHE moved); rerun the workflow to make "
                        f"it again",
                    )

    def read_receipt(self, receipt: Path) -> list[Claim]:
        """A workflow job's receipt: the file must still have the sha256 it was written with,
        and its inputs are claims like any recorded hash."""
        try:
            record = json.loads(receipt.read_text())
            name = record["file"]
            if not isinstance(record["sha256"], str):
                raise TypeError("its sha256 is not a string")
        except (OSError, ValueError, KeyError, TypeError) as err:
            self.finding(receipt).fail(UNREADABLE, f"not a readable receipt ({err})")
            return []
        path = receipt.parent / name
        if not path.exists() and not path.is_symlink():
            return []  # a result deleted on purpose: its receipt says nothing now
        if not self.is_under(path) and not self.records_here(record):
            return []  # the summary of other experiments only
        rule = str(record.get("rule"))
        f = self.finding(path)
        f.rank = min(f.rank, RANK.get(rule, len(CHAIN)))
        self.recorded_receipt(f, path, record, rule)
        self.note_code(f, record.get("code_stage"), record.get("code_sha256"), record)
        inputs = record.get("inputs_sha256") or {}
        return [Claim(path, str(p), h, f"inputs_sha256 ({rule})") for p, h in inputs.items()]

    def is_under(self, path: Path) -> bool:
        return path.absolute().is_relative_to(self.experiment)

    def records_here(self, record: dict) -> bool:
        return any(
            (r := self.resolve(str(p))) is not None and self.is_under(r)
            for p in (record.get("inputs_sha256") or {})
        )

    def recorded_receipt(self, f: Finding, path: Path, record: dict, rule: str) -> None:
        if self.dangling(path):
            return  # check_links says so
        try:
            digest = self.sha(path)
        except OSError as err:
            f.fail(UNREADABLE, f"cannot read it ({err})")
            return
        if digest != record["sha256"]:
            f.fail(
                MISMATCH,
                f"rule {rule} wrote it with sha256 {record['sha256']}, found {digest}: changed "
                f"after it was written",
            )
        else:
            f.notes.append(f"as rule {rule} wrote it")

    def note_code(self, f: Finding, stage: Any, code: Any, record: Mapping) -> None:
        """Whether the code that made ``f`` is this checkout's (the stage's code hash now)."""
        if not isinstance(stage, str) or not isinstance(code, str) or "code:" in " ".join(f.notes):
            return
        try:
            now = self.code_now(stage)
        except (OSError, ValueError, SyntaxError):
            now = None
        if code == now:
            f.notes.append("code: this checkout's")
        else:
            f.other_code = True
            f.notes.append(
                f"code: other than this checkout's ({stage} code {code[:12]}, now "
                f"{(now or 'unknown')[:12]}; made at {record.get('commit', 'unknown commit')})"
            )

    def code_now(self, stage: str) -> str:
        from mimia.provenance import code_identity

        if stage not in self._code:
            self._code[stage] = code_identity(stage)
        return self._code[stage]

    def check_sidecar(self, path: Path, sidecar: dict) -> None:
        """A model's sidecar: unedited, and its weights still the ones it was written with."""
        import hashlib

        f = self.finding(path)
        f.rank = min(f.rank, RANK["pretrain"])
        rest = {k: v for k, v in sidecar.items() if k != "sidecar_sha256"}
        if (
            sidecar.get("sidecar_sha256")
            != hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()
        ):
            f.fail(MISMATCH, "edited after it was written (its sidecar_sha256 does not match)")
        prov = sidecar.get("provenance") or {}
        self.note_code(f, prov.get("code_stage"), prov.get("code_sha256"), prov)
        self.sidecars.append((path, sidecar))

    def check_sidecar_weights(self, path: Path, sidecar: dict) -> None:
        """The weights beside a sidecar still have the sha256 it recorded (after their
        structure is checked: a truncated file is reported as such, not as a mismatch)."""
        prov = sidecar.get("provenance") or {}
        weights = path.with_suffix(".safetensors")
        if not weights.exists() or self.finding(weights).status == UNREADABLE:
            return
        w = self.finding(weights)
        self.recorded.add(w.artifact)
        digest = self.sha(weights)
        if digest != sidecar["weights_sha256"]:
            w.fail(
                MISMATCH,
                f"weights_sha256 recorded {sidecar['weights_sha256']} by {self.show(path)} when "
                f"written, found {digest}",
            )
        self.note_code(w, prov.get("code_stage"), prov.get("code_sha256"), prov)

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
        if not manifests:
            f.fail(MISSING, f"no manifest in {self.show(self.experiment)} to check its samples by")
            return
        # With several manifests (a stray copy), the shard must agree with one of them.
        results = sorted(
            ((self.disagreements(rows, m[1]), path) for path, m in manifests.items()),
            key=lambda r: len(r[0]),
        )
        bad, against = results[0]
        which = f" (manifest {self.show(against)})" if len(manifests) > 1 else ""
        if bad:
            sid, role, want = bad[0]
            what = "is not in the manifest" if want is None else f"manifest says {want[0]!r}"
            f.fail(
                MISMATCH,
                f"{len(bad)} of {len(rows)} samples disagree with the manifest{which}, e.g. "
                f"{sid!r} (role {role!r} in the shard) {what}",
            )
        else:
            f.notes.append(f"{len(rows)} samples agree with the manifest{which}")

    @staticmethod
    def disagreements(rows: list, expected: dict) -> list:
        bad = []
        for sid, row in rows:
            want = expected.get(sid)
            got = tuple(row.get(c) for c in ("role", "key", "content_sha256"))[: len(want or ())]
            if want is None or got != tuple(want):
                bad.append((sid, row.get("role"), want))
        return bad


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
    if isinstance(shas, str):  # one model, no path recorded (the utility probes' record)
        yield Claim(recorder, ANY_CHECKPOINT, shas, "checkpoint_sha256")
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
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    other = sum(f.other_code for f in findings)
    if other:
        summary += f"; {other} made by code other than this checkout's"
    lines.append(summary)
    broken = [f for f in findings if f.status != OK]
    if broken:
        first = min(broken, key=lambda f: (f.rank, f.artifact))
        lines.append(f"first broken link: {first.artifact} ({first.status})")
    if counts[MISSING] or counts[UNREADABLE]:
        return 2, lines
    return (1 if counts[MISMATCH] else 0), lines
