"""The package's import structure: what importing the trainer loads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def modules_loaded_by(statement: str) -> set[str]:
    """The modules a fresh interpreter holds after `statement` (a child process: this one has imported everything)."""
    script = f"import sys\n{statement}\nprint('\\n'.join(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                            env={"PYTHONPATH": str(SRC), "PATH": ""})
    return set(result.stdout.split())


def test_training_imports_no_onnx_or_int8_code():
    loaded = modules_loaded_by("import resnetlab.train")
    assert "resnetlab.train" in loaded and "resnetlab.evaluate" in loaded  # the statement ran as meant
    unwanted = {"resnetlab.export", "resnetlab.quantize", "resnetlab.inference", "onnx", "onnxruntime"}
    assert not unwanted & loaded, f"import resnetlab.train loaded {sorted(unwanted & loaded)}"
