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
    found = [
        p for p in package.rglob("*.py") if text in p.read_text() and p.name != "stages.py"
    ]
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
    utility |= {"max_iter": 200, "enabled": True}
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
