"""The hash chain from images to metrics: code identity, receipts, and refusals."""

import shutil
from pathlib import Path

import pytest

import mimia
from mimia.provenance import code_identity

PACKAGE = Path(mimia.__file__).parent


@pytest.fixture
def package_copy(tmp_path) -> Path:
    copy = tmp_path / "mimia"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def defining(package: Path, text: str) -> Path:
    """The module that defines ``text`` (found, not named, so the test survives a move)."""
    found = [p for p in package.rglob("*.py") if text in p.read_text() and p.name != "stages.py"]
    assert len(found) == 1, (text, found)
    return found[0]


def identities(package: Path) -> dict[str, str]:
    stages = ("pretrain", "adapt_decoder", "extract", "summary", "attack")
    return {s: code_identity(s, package) for s in stages}


def edit(path: Path) -> None:
    path.write_text(path.read_text() + "\n# an edit\n")


def test_training_code_changes_the_models_identity_and_not_the_summarys(package_copy):
    before = identities(package_copy)
    edit(defining(package_copy, "class TrainConfig"))
    after = identities(package_copy)
    assert after["pretrain"] != before["pretrain"]
    assert after["adapt_decoder"] != before["adapt_decoder"]
    assert after["summary"] == before["summary"]


def test_masking_code_changes_every_model_and_error_table(package_copy):
    before = identities(package_copy)
    edit(package_copy / "masking.py")
    after = identities(package_copy)
    for stage in ("pretrain", "adapt_decoder", "extract"):
        assert after[stage] != before[stage], stage
    assert after["summary"] == before["summary"]


def test_report_code_changes_the_summary_and_no_model(package_copy):
    before = identities(package_copy)
    edit(defining(package_copy, "def summary("))
    after = identities(package_copy)
    assert after["summary"] != before["summary"]
    for stage in ("pretrain", "adapt_decoder", "extract", "attack"):
        assert after[stage] == before[stage], stage


def test_a_stage_function_edit_changes_only_its_own_identity(package_copy):
    stages = package_copy / "stages.py"
    before = identities(package_copy)
    text = stages.read_text()
    marker = "def summary(\n"
    assert marker in text
    stages.write_text(text.replace(marker, "def summary(  # edited\n"))
    after = identities(package_copy)
    assert after["summary"] != before["summary"]
    assert after["pretrain"] == before["pretrain"]


def test_an_unknown_stage_is_refused():
    with pytest.raises(ValueError, match="no stage function 'nonesuch'"):
        code_identity("nonesuch")


# -- mimia verify on results written by the real functions (tests/test_verify.py) ---------------
def test_verify_checks_the_utility_record_against_the_experiments_models(tmp_path, tiny_spec):
    import torch
    from test_verify import DATASET, EXP, build_results, lines_of, mimia_verify

    from mimia.models import build_model
    from mimia.models.checkpoint import save_model
    from mimia.utility import utility_stage

    files = build_results(tmp_path, tiny_spec)
    utility = {"pooling": "cls", "test_fraction": 0.5, "max_images": 200, "k": 5, "C": 1.0}
    utility |= {"max_iter": 200, "enabled": True, "mask_ratio": 0.75, "num_masks": 1}
    utility |= {"n_bootstrap": 20}
    torch.manual_seed(5)
    stray = tmp_path / "elsewhere/model.safetensors"
    save_model(build_model(tiny_spec), stray, {"model": "target"})
    # The utility of a model that is not the experiment's target.
    record = utility_stage(
        checkpoint=stray,
        manifest=files["manifest"],
        record=tmp_path / EXP / "utility.json",
        split=tmp_path / EXP / "utility.parquet",
        dataset={**DATASET, "path": None, "urls": None, "split": "train"},
        utility=utility,
        seed=0,
    )
    assert 0.0 <= record["linear_probe_accuracy"] <= 1.0
    rc, out = mimia_verify(EXP, cwd=tmp_path)
    assert rc == 1, out
    bad = {ln.split()[1].rstrip(":") for ln in lines_of(out, "MISMATCH")}
    assert bad == {f"{EXP}/utility.json", f"{EXP}/utility.parquet"}, out
    assert f"checkpoint_sha256 recorded {record['checkpoint_sha256']}, but no checkpoint" in out


def test_shards_are_not_reported_ok_without_a_manifest(tmp_path, tiny_spec):
    from test_verify import EXP, build_results, mimia_verify, shard_path

    files = build_results(tmp_path, tiny_spec)
    files["manifest"].unlink()
    rc, out = mimia_verify(EXP, cwd=tmp_path)
    assert rc == 2, out
    line = next(ln for ln in out.splitlines() if shard_path("shadow_member") in ln)
    assert line.startswith("MISSING") and "no manifest" in line, line


def test_with_two_manifests_a_shard_is_still_checked(tmp_path, tiny_spec):
    import json
    import tarfile

    from test_verify import EXP, build_results, lines_of, mimia_verify, shard_path

    files = build_results(tmp_path, tiny_spec)
    shutil.copy(files["manifest"], files["manifest"].with_name("manifest-copy.parquet"))
    # shadow_member's shard (no error table records it) with one sample's role rewritten.
    shard = tmp_path / shard_path("shadow_member")
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i, (m, data) in enumerate(members):
            if m.name.endswith(".json") and i < 4:
                data = json.dumps({**json.loads(data), "role": "target_member"}).encode()
                m.size = len(data)
            import io

            tar.addfile(m, io.BytesIO(data))
    rc, out = mimia_verify(EXP, cwd=tmp_path)
    assert rc == 1, out
    [line] = [ln for ln in lines_of(out, "MISMATCH") if shard_path("shadow_member") in ln]
    assert "1 of 8 samples disagree with the manifest (manifest " in line


# -- the real workflow: a swapped cache entry, edited results, two runs on one folder -----------
@pytest.fixture(scope="module")
def audit(tmp_path_factory):
    """A finished tiny audit whose models went through the between-workflow cache."""
    import yaml
    from test_workflow import CACHED, _snakemake

    root = tmp_path_factory.mktemp("chain")
    cache = root / "cache"
    cache.mkdir()
    workdir = root / "first"
    workdir.mkdir()
    (workdir / "config.yaml").write_text(yaml.safe_dump({**CACHED, "experiments": {"a": {}}}))
    env = {"SNAKEMAKE_OUTPUT_CACHE": str(cache)}
    run = _snakemake(workdir, "--cache", env=env)
    assert run.returncode == 0, run.stderr[-5000:]
    return workdir, env


def verify_in(workdir: Path) -> tuple[int, str]:
    from test_verify import mimia_verify

    return mimia_verify("results/a", cwd=workdir)


def edited_copy(workdir: Path, tmp_path: Path, name: str, edit) -> Path:
    """A copy of the finished workflow folder with result ``name`` rewritten by ``edit``."""
    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy, symlinks=True)
    path = copy / "results/a" / name
    content = path.read_bytes()
    path.unlink()  # a link into the cache is replaced by an edited file
    path.write_bytes(content)
    edit(path)
    return copy


def halve_target_nonmember_errors(path: Path) -> None:
    """The issue's probe: the target's errors on its non-members halved, metadata kept."""
    import polars as pl

    from mimia.provenance import read_metadata, write_parquet

    df = pl.read_parquet(path)
    manifest = pl.read_parquet(path.parent / "data/manifest.parquet")
    out = set(manifest.filter(pl.col("role") == "target_nonmember")["sample_id"])
    halved = df.with_columns(
        error=pl.when((pl.col("model") == "target") & pl.col("sample_id").is_in(out))
        .then(pl.col("error") / 2)
        .otherwise(pl.col("error"))
    )
    assert not halved.equals(df)
    write_parquet(halved, path, read_metadata(path))


def edit_json(**changes):
    def edit(path: Path) -> None:
        import json

        obj = json.loads(path.read_text())
        for dotted, value in changes.items():
            node = obj
            *parents, leaf = dotted.split(".")
            for key in parents:
                node = node[int(key)] if isinstance(node, list) else node[key]
            node[leaf] = value
        path.write_text(json.dumps(obj, indent=2))

    return edit


@pytest.mark.slow
def test_an_untouched_audit_verifies_all_ok(audit):
    workdir, _ = audit
    rc, out = verify_in(workdir)
    assert rc == 0, out
    assert "first broken link" not in out and "other than this checkout" not in out
    assert "MISMATCH" not in out and "code: this checkout's" in out


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, edit",
    [
        ("errors.parquet", halve_target_nonmember_errors),
        ("models/target/model.json", edit_json(**{"info.num_train_images": 7})),
        ("metrics.json", edit_json(**{"results.0.auc": 0.99})),
    ],
)
def test_an_edited_result_is_named_by_verify(audit, tmp_path, name, edit):
    workdir, _ = audit
    copy = edited_copy(workdir, tmp_path, name, edit)
    rc, out = verify_in(copy)
    assert rc == 1, out
    assert f"first broken link: results/a/{name} (MISMATCH)" in out
    [line] = [ln for ln in out.splitlines() if ln.startswith(f"MISMATCH   results/a/{name}:")]
    assert "changed after it was written" in line or "edited after it was written" in line


@pytest.mark.slow
def test_the_attack_refuses_an_edited_error_table(audit, tmp_path):
    from test_workflow import _snakemake

    workdir, env = audit
    copy = edited_copy(workdir, tmp_path, "errors.parquet", halve_target_nonmember_errors)
    run = _snakemake(copy, "--cache", env=env)
    assert run.returncode != 0
    out = run.stdout + run.stderr
    assert "rule attack failed: InputChangedError: input results/a/errors.parquet has" in out
    assert "but rule 'collect_errors' recorded" in out


@pytest.mark.slow
def test_a_swapped_cache_entry_is_refused_naming_the_cache_file(audit, tmp_path):
    import os
    import stat

    import yaml
    from test_workflow import CACHED, _snakemake

    workdir, env = audit
    target = workdir / "results/a/models/target/model.safetensors"
    entry = Path(os.path.realpath(target))
    assert entry != target and entry.is_relative_to(env["SNAKEMAKE_OUTPUT_CACHE"])
    assert not entry.stat().st_mode & 0o222  # sealed: read-only for everyone
    shadow = os.path.realpath(workdir / "results/a/models/shadow0/model.safetensors")
    entry.chmod(stat.S_IRUSR | stat.S_IWUSR)
    shutil.copyfile(shadow, entry)  # what a hostile or careless user of the cache can do
    # The next audit with the same settings is handed the swapped model, and refuses it.
    second = tmp_path / "second"
    second.mkdir()
    (second / "config.yaml").write_text(yaml.safe_dump({**CACHED, "experiments": {"b": {}}}))
    run = _snakemake(second, "--cache", env=env)
    assert run.returncode != 0
    out = run.stdout + run.stderr
    assert f"(cache file {entry}) have sha256" in out, out[-3000:]
    assert "but their sidecar recorded" in out
    # verify names the swapped weights in the first audit as well.
    rc, report = verify_in(workdir)
    assert rc == 1
    assert "first broken link: results/a/models/target/model.safetensors (MISMATCH)" in report


@pytest.mark.slow
def test_two_workflows_on_one_results_folder(audit, tmp_path):
    import subprocess
    import sys

    import yaml
    from test_workflow import CACHED, _snakemake

    workdir, env = audit
    results = workdir / "results"
    other = tmp_path / "other"
    other.mkdir()
    config = {**CACHED, "experiments": {"a": {}}, "results": str(results)}
    (other / "config.yaml").write_text(yaml.safe_dump(config))
    # A run holding the folder (a process that took the workflow's lock and waits).
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from mimia.storage import lock_results; "
            f"lock_results({str(results)!r}); print('held', flush=True); sys.stdin.read()",
        ],
        cwd=workdir,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "held\n"
        run = _snakemake(other, "--forcerun", "summary", env=env)
        assert run.returncode != 0
        out = run.stdout + run.stderr
        assert f"is in use by a run from working directory {workdir} (pid {holder.pid}" in out
    finally:
        holder.stdin.close()
        holder.wait()
    # With the folder free, another config still cannot finish into it, even with nothing
    # left to do by Snakemake's own records (none in this working directory).
    config["defaults"] = {**CACHED["defaults"], "pretrain": {**CACHED["defaults"]["pretrain"]}}
    config["defaults"]["pretrain"]["epochs"] = 3
    (other / "config.yaml").write_text(yaml.safe_dump(config))
    run = _snakemake(other, env=env)
    assert run.returncode != 0
    out = run.stdout + run.stderr
    assert "holds results of experiment 'a' made with another config" in out
    assert f"from working directory {workdir}" in out
    # The same config from another working directory is the same audit: nothing to do.
    config["defaults"] = CACHED["defaults"]
    (other / "config.yaml").write_text(yaml.safe_dump(config))
    run = _snakemake(other, "--dry-run", env=env)
    assert run.returncode == 0, run.stderr[-3000:]
