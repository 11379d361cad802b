"""conftest.py's rule: where ../shared is present, a real-data test that skips fails instead. Checked on a checkout
made here (conftest.py copied into it), run by pytest without and with a `shared` folder beside it."""

from __future__ import annotations

import shutil
from pathlib import Path

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
'''


def test_a_real_data_skip_fails_only_where_shared_is_present(pytester):
    tests = pytester.path / "checkout" / "tests"  # conftest.py looks for ../shared beside the checkout
    tests.mkdir(parents=True)
    shutil.copy(Path(__file__).with_name("conftest.py"), tests / "conftest.py")
    (tests / "test_real_data.py").write_text(SKIPPING_TESTS)

    pytester.runpytest(tests).assert_outcomes(skipped=4, xfailed=1)
    (pytester.path / "shared" / "data").mkdir(parents=True)
    result = pytester.runpytest(tests)
    result.assert_outcomes(failed=2, skipped=2, xfailed=1)
    shared = pytester.path / "shared"
    result.stdout.fnmatch_lines(["*_ test_by_the_fixture _*",
                                 f"skipped although {shared} is present: the file was renamed",
                                 "*_ test_by_its_reason _*",
                                 f"skipped although {shared} is present: needs ../shared/*"])
