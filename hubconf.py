"""torch.hub entry points, one per named model (`resnetlab.list_models()`), from a clone of this repository:

    model = torch.hub.load("path/to/resnetlab", "resnet50", source="local", weights="resnet50.pth", num_classes=10)

`weights` is optional: a resnetlab run directory, its checkpoint.pt or model.safetensors, or a torchvision-format
state_dict (.pth); every other keyword goes to `resnetlab.create_model` (num_classes, in_channels, shortcut, ...).
"""

import sys
from pathlib import Path as _Path  # torch.hub.list lists every public callable here as an entry point

dependencies = ["torch"]

# A clone is not installed: its own sources come first, ahead of any installed resnetlab.
sys.path.insert(0, str(_Path(__file__).resolve().parent / "src"))

from resnetlab.factory import create_model as _create_model  # noqa: E402
from resnetlab.models import list_models as _list_models  # noqa: E402


def _entry_point(name: str):
    def entry_point(weights=None, **kwargs):
        return _create_model(name, weights=weights, **kwargs)

    entry_point.__name__ = entry_point.__qualname__ = name
    entry_point.__doc__ = (f"{name}, built by resnetlab.create_model({name!r}, weights=None, **kwargs); weights: "
                           "a run directory, checkpoint.pt, model.safetensors or torchvision-format .pth to load")
    return entry_point


globals().update({name: _entry_point(name) for name in _list_models()})
