"""The real-data rule of tests/conftest.py: a test whose real data set (../shared) is absent skips with the
reason, and fails with the same reason under ``SMAF_REQUIRE_SHARED=1``, which CI (.ci/run) sets."""
from __future__ import annotations

from pathlib import Path

import conftest
import pytest

FIXTURES = [("pets_root", "PETS_ROOT"), ("msrc_root", "MSRC_ROOT"), ("voc_meta", "VOC_META")]


@pytest.mark.parametrize("require", [None, "0", "1"], ids=["unset", "0", "1"])
@pytest.mark.parametrize("fixture, constant", FIXTURES, ids=[f for f, _ in FIXTURES])
def test_absent_real_data_skips_unless_required_then_fails_with_the_reason(request, monkeypatch, tmp_path, fixture,
                                                                           constant, require):
    absent = tmp_path / "shared" / "data" / "absent"
    monkeypatch.setattr(conftest, constant, absent)
    if require is None:
        monkeypatch.delenv("SMAF_REQUIRE_SHARED", raising=False)
    else:
        monkeypatch.setenv("SMAF_REQUIRE_SHARED", require)
    outcome = pytest.fail.Exception if require == "1" else pytest.skip.Exception
    with pytest.raises((pytest.skip.Exception, pytest.fail.Exception)) as info:   # either, so a wrong one fails
        request.getfixturevalue(fixture)
    assert type(info.value) is outcome
    assert f"not found at {absent} (../shared beside the repo, or set SMAF_SHARED)" in info.value.msg


@pytest.mark.parametrize("fixture, constant", FIXTURES, ids=[f for f, _ in FIXTURES])
def test_present_real_data_is_returned_when_required(request, monkeypatch, tmp_path, fixture, constant):
    root = tmp_path / "set"
    for folder in ("JPEGImages", "SegmentationClassAug_val"):
        (root / folder).mkdir(parents=True)
    monkeypatch.setattr(conftest, constant, root)
    monkeypatch.setenv("SMAF_REQUIRE_SHARED", "1")
    assert request.getfixturevalue(fixture) == root


def test_ci_runs_the_tests_with_real_data_required():
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    lines = [line for line in ci.splitlines() if "script/test.sh" in line and not line.lstrip().startswith("#")]
    assert lines and all("SMAF_REQUIRE_SHARED=1" in line for line in lines), lines
