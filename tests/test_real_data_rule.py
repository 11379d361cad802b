"""conftest.py's rules: where ../shared is present, a real-data test that skips fails instead; in the detection CI
run (RESNETLAB_REQUIRE_DETECTION=1), a detection test that skips fails. Checked on a checkout made here
(conftest.py copied into it), run by pytest without and with a `shared` folder beside it, and with the variable."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

SKIPPING_TESTS = '''
import pytest

def test_by_the_fixture(shared_data):
    pytest.skip("the file was renamed")

def test_by_its_reason():
    pytest.skip("needs ../shared/data/mnist")

def test_for_another_reason():
    pytest.skip("needs a GPU")

def test_of_a_missing_module():  # names no real data, so the rule cannot see it: the test extra must not skip
    pytest.importorskip("a_module_that_is_not_installed")

@pytest.mark.xfail(reason="a known failure on ../shared data")
def test_expected_to_fail():
    assert False

@pytest.mark.detection
def test_of_detection():
    pytest.skip("the COCO128 images are not here")
'''


@pytest.fixture
def checkout(pytester) -> Path:
    """checkout/tests/ holding conftest.py and the tests above; conftest.py looks for ../shared beside checkout/."""
    tests = pytester.path / "checkout" / "tests"
    tests.mkdir(parents=True)
    shutil.copy(Path(__file__).with_name("conftest.py"), tests / "conftest.py")
    (tests / "test_skips.py").write_text(SKIPPING_TESTS)
    return tests


def test_a_real_data_skip_fails_only_where_shared_is_present(pytester, checkout, monkeypatch):
    monkeypatch.delenv("RESNETLAB_REQUIRE_DETECTION", raising=False)
    pytester.runpytest(checkout).assert_outcomes(skipped=5, xfailed=1)
    (pytester.path / "shared" / "data").mkdir(parents=True)
    result = pytester.runpytest(checkout)
    result.assert_outcomes(failed=2, skipped=3, xfailed=1)
    shared = pytester.path / "shared"
    result.stdout.fnmatch_lines(["*_ test_by_the_fixture _*",
                                 f"skipped although {shared} is present: the file was renamed",
                                 "*_ test_by_its_reason _*",
                                 f"skipped although {shared} is present: needs ../shared/*"])


def test_a_detection_skip_fails_in_the_detection_ci_run(pytester, checkout, monkeypatch):
    monkeypatch.setenv("RESNETLAB_REQUIRE_DETECTION", "1")
    result = pytester.runpytest(checkout)
    result.assert_outcomes(failed=1, skipped=4, xfailed=1)
    result.stdout.fnmatch_lines(["*_ test_of_detection _*",
                                 "skipped although RESNETLAB_REQUIRE_DETECTION=1: the COCO128 images are not here"])
