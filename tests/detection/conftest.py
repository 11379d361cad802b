"""Detection tests: where the detection extra (torchvision, pycocotools) is not installed, those that need it
skip with that reason; the CI step that installs the extra sets RESNETLAB_REQUIRE_DETECTION=1, which turns that
skip into a failure, so a broken install cannot pass as skipped tests."""

from __future__ import annotations

import os

import pytest

from resnetlab.detection import missing_packages

MISSING = missing_packages()


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "tests/detection/" in item.nodeid.replace(os.sep, "/"):
            item.add_marker(pytest.mark.detection)


def pytest_configure(config):
    if MISSING and os.environ.get("RESNETLAB_REQUIRE_DETECTION") == "1":
        raise pytest.UsageError(f"RESNETLAB_REQUIRE_DETECTION=1 but {', '.join(MISSING)} cannot be imported")
