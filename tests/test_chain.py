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
