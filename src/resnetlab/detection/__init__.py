"""Object detection: Faster R-CNN on the paper's backbones (He et al. 2015, Sec. 4.3 and Appendix A).

An optional part of resnetlab: it needs torchvision and pycocotools (``pip install -e '.[detection]'``), which
the classification install does without. Importing this package needs neither; its modules `model`, `train` and
`inference` need torchvision, and the COCO evaluation needs pycocotools.
"""

from __future__ import annotations

import importlib.util

from resnetlab.errors import ResnetlabError

EXTRA_PACKAGES = ("torchvision", "pycocotools")


def missing_packages() -> list[str]:
    return [name for name in EXTRA_PACKAGES if importlib.util.find_spec(name) is None]


def require_detection_extra() -> None:
    """Fail with the install command, not an ImportError from deep inside, when the extra is not installed."""
    missing = missing_packages()
    if missing:
        raise ResnetlabError(f"detection needs {' and '.join(missing)}, which this install does not have: "
                           "pip install -e '.[detection]' (torchvision must match the installed torch)")
