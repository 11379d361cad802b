"""Real data for the tests: the `shared_data` fixture is the folder ../shared/data beside the checkout (MNIST,
CIFAR-10; see its READMEs). A test that asks for it skips, saying why, only where ../shared is absent. Where
../shared is present, a skip of such a test (through the fixture or its own skip naming the folder) is turned
into a failure: CI must not lose a real-data check to a renamed file or a wrong path without anyone noticing.
Likewise the detection CI run (RESNETLAB_REQUIRE_DETECTION=1, .ci/run) skips no detection test: one that skips
there (COCO128 not found, say) fails."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"needs real data from {SHARED}, which is absent here")
    return SHARED / "data"


@pytest.fixture
def ctrl_c_as_from_a_terminal():
    """SIGINT at Python's default for the test, whatever started pytest: a script's `pytest &` starts it with SIGINT
    ignored, which a training run keeps ignoring (runlog.StopOnSignal)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    expected_failure = hasattr(report, "wasxfail")  # pytest reports an xfail as a skip
    if report.skipped and not expected_failure:
        forbidden = forbidden_skip(item, report)
        if forbidden:
            report.outcome = "failed"
            report.longrepr = f"skipped although {forbidden}: {skip_reason(report)}"


def forbidden_skip(item: pytest.Item, report: pytest.TestReport) -> str | None:
    """Why this skip must fail the run, or None where skipping is allowed."""
    if SHARED.is_dir() and reads_shared_data(item, report):
        return f"{SHARED} is present"
    if os.environ.get("RESNETLAB_REQUIRE_DETECTION") == "1" and item.get_closest_marker("detection"):
        return "RESNETLAB_REQUIRE_DETECTION=1"
    return None


def reads_shared_data(item: pytest.Item, report: pytest.TestReport) -> bool:
    reason = skip_reason(report)
    return "shared_data" in getattr(item, "fixturenames", ()) or str(SHARED) in reason or "../shared" in reason


def skip_reason(report: pytest.TestReport) -> str:
    # A skip's longrepr is (file, line, "Skipped: reason").
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    return reason.removeprefix("Skipped: ")
