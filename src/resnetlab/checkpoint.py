"""Checkpoints: written atomically, read without unpickling arbitrary objects, exported as plain weights; and the
weights a model starts from (`load_weights`: create_model's `weights=`, `train --init`, hubconf.py), resnetlab's
own or another project's (LAYOUTS).

A checkpoint is a dict of tensors, numbers, strings, lists and dicts only, so `torch.load(weights_only=True)` reads
it: `format`, `model_name`, `model_kwargs` (what create_model needs), `classes`, `normalize` (the fitted mean),
`model` (the state_dict), `optimizer`, `schedule`, `iteration`, `rng`, `config` (the resolved TrainConfig), `init`
(where the starting weights came from, or None).

Which loader serves what (every file goes through `read_torch_file`: CRC-checked, weights_only; or, for
.safetensors, `read_safetensors`):

- `load_checkpoint`: a whole checkpoint dict of our own, to resume a run or to read what a run recorded.
- `restore_weights`: a checkpoint's weights into the model rebuilt from it, exactly (resume; `factory.load_model`,
  which evaluate, predict and export use; detection's `load_detector`).
- `read_weights` + `load_weights`: starting weights from any file a user may hand us (a run, its checkpoint.pt or
  model.safetensors, a torchvision/timm state_dict, another project's file in one of LAYOUTS), adapted where the
  rules allow (create_model's `weights=`, `train --init`, hubconf.py, `detect train --backbone-weights`; and
  `factory.load_model` for another project's network to evaluate).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from resnetlab.files import write_atomically

if TYPE_CHECKING:
    from resnetlab.data.augment import Normalize

log = logging.getLogger(__name__)

FORMAT = "resnetlab-checkpoint-1"
CHECKPOINT_NAME = "checkpoint.pt"
# torch.save's legacy format (before PyTorch 1.6, and with _use_new_zipfile_serialization=False) starts by pickling
# this number, a 10-byte LONG1, right after the pickle's protocol header.
LEGACY_MAGIC = b"\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, not ours, or for another model."""


def checkpoint_path(path: str | Path) -> Path:
    """A run directory stands for the checkpoint inside it."""
    path = Path(path)
    return path / CHECKPOINT_NAME if path.is_dir() else path


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Write `state` so that `path` holds either the previous checkpoint or this one, never a partial file."""
    write_atomically(path, lambda file: torch.save({"format": FORMAT, **state}, file))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint (or the one in a run directory) with weights_only=True; clear errors name the file."""
    path = checkpoint_path(path)
    state = read_torch_file(path, "checkpoint", map_location)
    if not is_checkpoint(state):
        raise CheckpointError(f"{path} is not a resnetlab checkpoint (no format={FORMAT!r} entry)")
    return state


def read_torch_file(path: Path, what: str, map_location: str | torch.device = "cpu") -> object:
    """torch.load with weights_only=True of a zip archive (torch.save's format), after checking its CRCs, or of a
    file in torch's legacy format, which has no checksums; errors name `what` and the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    return load_torch_bytes(path.read_bytes(), path, what, map_location)


def load_torch_bytes(data: bytes, path: Path, what: str, map_location: str | torch.device = "cpu") -> object:
    """read_torch_file on the bytes of `path`, read once by the caller."""
    try:
        if zipfile.is_zipfile(io.BytesIO(data)):
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                damaged = archive.testzip()  # torch.load skips the CRC checks: a flipped byte would load silently
            if damaged is not None:
                raise zipfile.BadZipFile(f"{damaged} fails its CRC check")
        elif not is_legacy_torch_file(data):
            raise zipfile.BadZipFile("neither a complete zip archive nor a file in torch's legacy format")
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        # weights_only refuses any pickled object other than tensors and plain containers.
        raise CheckpointError(f"{what} {path} holds objects that are not weights; refusing to unpickle them "
                              f"({first_line(error)})") from None
    except Exception as error:  # noqa: BLE001 - a damaged legacy file fails in many ways (EOFError, struct.error, ...)
        raise CheckpointError(f"{what} {path} is truncated or corrupt: {first_line(error)}") from None


def is_legacy_torch_file(data: bytes) -> bool:
    head = data[:32]
    return head[:1] == b"\x80" and LEGACY_MAGIC in head  # \x80 and the protocol: a pickle's header


def is_checkpoint(content: object) -> bool:
    return isinstance(content, dict) and content.get("format") == FORMAT


def first_line(error: Exception) -> str:
    return next(iter(str(error).splitlines()), type(error).__name__)  # some errors (EOFError) have no message


def restore_weights(model: nn.Module, state: dict, path: Path, model_name: str | None = None) -> None:
    """Load the checkpoint's weights into `model`, saying which models differ instead of listing keys."""
    if model_name is not None and state["model_name"] != model_name:
        raise CheckpointError(f"checkpoint {path} is for model {state['model_name']}, not {model_name}")
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        raise CheckpointError(f"checkpoint {path} ({state['model_name']}, {state['model_kwargs']}) does not fit "
                              f"this model: {str(error).splitlines()[1] if error.args else error}") from None


def export_safetensors(model: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Plain weights (the state_dict) as .safetensors: loadable anywhere without pickle."""
    from safetensors.torch import save_file

    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    save_file(tensors, str(path), metadata=metadata)


# ---------------------------------------------------------------------------------------------------------------
# Starting weights: a resnetlab run, a torchvision/timm ResNet file (their state_dict keys are ours), or another
# project's file in a layout resnetlab knows (LAYOUTS: keys renamed to ours, its network's options recorded).

STEM, CLASSIFIER = "conv1.weight", ("fc.weight", "fc.bias")
# Prefixes that wrappers add to every key of the model they wrap: DataParallel and DistributedDataParallel's
# `module.`, torch.compile's `_orig_mod.` (either may wrap the other).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# The entries under which training scripts commonly save the state_dict beside their own bookkeeping.
STATE_DICT_ENTRIES = ("state_dict", "model_state_dict")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@dataclass(frozen=True)
class Layout:
    """Another project's ResNet files: how their keys differ from ours, the constructor arguments that make our
    model compute their network, and the classes and input normalization it was trained with."""

    source: str  # the project that publishes such files
    signature: tuple[str, ...]  # keys that such a file has and ours do not (wrapper prefixes stripped)
    renames: tuple[tuple[str, str], ...]  # (key prefix there, ours)
    model_kwargs: dict[str, object]
    dataset: str
    classes: tuple[str, ...]
    mean: tuple[float, ...]  # per channel, in [0, 1] units, as its inputs were normalized
    std: tuple[float, ...]
    input_side: int  # the side of its (square) training inputs

    def fits(self, tensors: Mapping[str, torch.Tensor]) -> bool:
        return all(key in tensors for key in self.signature)

    def renamed(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        def ours(key: str) -> str:
            for there, here in self.renames:
                if key.startswith(there):
                    return here + key[len(there):]
            return key

        return {ours(key): tensor for key, tensor in tensors.items()}

    def normalize(self) -> Normalize:
        """Its input normalization as a resnetlab run's: the per-channel mean is stored per pixel at the training
        size, from which evaluate and predict learn that size (evaluate.training_side)."""
        from resnetlab.data.augment import Normalize

        mean = torch.tensor(self.mean).view(-1, 1, 1).expand(-1, self.input_side, self.input_side)
        return Normalize(mean, torch.tensor(self.std).view(-1, 1, 1))


LAYOUTS = (
    # github.com/akamaster/pytorch_resnet_cifar10: the CIFAR-10 ResNet-20...1202 of the paper, saved from a
    # DataParallel model as {"state_dict": ..., "best_prec1": ...}; the classifier is `linear`, option A puts the
    # zero channels on both sides of the identity, and the inputs are normalized with ImageNet's mean and std.
    Layout("akamaster/pytorch_resnet_cifar10", signature=(STEM, "layer1.0.conv1.weight", "linear.weight"),
           renames=(("linear.", "fc."),), model_kwargs={"shortcut": "A", "shortcut_padding": "both"},
           dataset="CIFAR-10", classes=CIFAR10_CLASSES, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
           input_side=32),
)


def known_layouts() -> str:
    return ", ".join(["resnetlab runs", "torchvision/timm state_dicts", *(layout.source for layout in LAYOUTS)])


@dataclass(frozen=True)
class Weights:
    """A file of weights to start a model from, as `read_weights` found it."""

    path: Path
    sha256: str
    tensors: dict[str, torch.Tensor]  # with our key names
    recorded_model: str | None  # the model a resnetlab file says it holds; None for a plain state_dict
    layout: Layout | None = None  # another project's layout, recognised from its keys

    def made_for(self) -> str:
        """The model the file holds: as recorded, or as its keys and shapes suggest."""
        name = self.recorded_model or architecture_name(self.tensors)
        if name is None:
            return (f"no ResNet in a layout resnetlab knows ({known_layouts()}; its keys: "
                    f"{first_few(list(self.tensors)) or 'none'})")
        return f"{name} ({inputs_and_classes(self.tensors)})"

    def model_kwargs(self, asked: Mapping[str, object]) -> dict:
        """create_model's keyword arguments `asked`, with those that the file's network needs (its layout's);
        asking for other values of these is an error: the weights would compute another function."""
        needed = self.layout.model_kwargs if self.layout else {}
        clashes = [f"{key}={asked[key]!r}" for key in needed if key in asked and asked[key] != needed[key]]
        if clashes:
            raise CheckpointError(f"weights file {self.path} holds a network of {self.layout.source}, which needs "
                                  f"{', '.join(f'{key}={value!r}' for key, value in needed.items())}, not "
                                  f"{', '.join(clashes)}")
        return {**asked, **needed}

    def provenance(self) -> dict:
        return {"path": str(self.path), "sha256": self.sha256}


def read_weights(source: str | os.PathLike) -> Weights:
    """The weights in a run directory (its checkpoint.pt), a resnetlab checkpoint.pt or model.safetensors, a
    torchvision-format state_dict file (.pth, as torchvision and timm publish them), or another project's file in
    a layout resnetlab knows (LAYOUTS); torch files are read with weights_only=True."""
    path = checkpoint_path(Path(source).expanduser()).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    data = path.read_bytes()  # read once: the tensors and the sha256 come from the same bytes
    if path.suffix == ".safetensors":
        return weights_in(path, data, *read_safetensors(data, path))
    return weights_in(path, data, load_torch_bytes(data, path, "weights file"))


def weights_in(path: Path, data: bytes, content: object, recorded: str | None = None) -> Weights:
    """The weights in what a file (its bytes: `data`) holds: a resnetlab checkpoint's, a state_dict, or the
    state_dict in another training script's checkpoint (STATE_DICT_ENTRIES); wrapper prefixes stripped, a known
    layout's keys renamed."""
    if is_checkpoint(content):
        content, recorded = content["model"], content["model_name"]
    elif isinstance(content, Mapping):
        content = next((content[entry] for entry in STATE_DICT_ENTRIES if isinstance(content.get(entry), Mapping)),
                       content)
    if not isinstance(content, Mapping) or not all(isinstance(name, str) and isinstance(tensor, torch.Tensor)
                                                   for name, tensor in content.items()):
        held = first_few(list(map(str, content))) if isinstance(content, Mapping) else type(content).__name__
        raise CheckpointError(f"weights file {path} is neither a state_dict (tensors by name) nor a resnetlab "
                              f"checkpoint; it holds {held}")
    tensors = {unwrapped(key): tensor for key, tensor in content.items()}
    layout = next((layout for layout in LAYOUTS if layout.fits(tensors)), None)
    if layout is not None:
        tensors = layout.renamed(tensors)
    return Weights(path, hashlib.sha256(data).hexdigest(), tensors, recorded, layout)


def unwrapped(key: str) -> str:
    """A state_dict key without the prefixes of the wrappers around the model it was saved from."""
    while key.startswith(WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def read_safetensors(data: bytes, path: Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """The tensors of a .safetensors file's bytes, and the model its metadata records."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        tensors = load(data)
    except SafetensorError as error:
        raise CheckpointError(f"weights file {path} is truncated or corrupt: {first_line(error)}") from None
    # The file starts with the length of its JSON header (8 bytes, little-endian), which `load` has just read.
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    metadata = header.get("__metadata__") or {}
    return tensors, metadata.get("model")  # export_safetensors records the model; other files do not


def load_weights(model: nn.Module, weights: Weights | str | os.PathLike, model_name: str) -> list[str]:
    """Copy `weights` (read_weights' result, or what it reads) into `model`, a `model_name` just built. Every tensor
    must be there with the model's shape, except:

    - the classifier, when the file is for another number of classes: the model's freshly initialised fc stays;
    - the stem of a 3-channel file in a 1-channel model: conv1's filters are summed over RGB, which computes on a
      gray image what the RGB filters compute on that image repeated in three channels.

    Returns what was adapted, each also logged as a warning. Anything else that does not fit raises one
    CheckpointError naming the file, the model it seems to be for and the first keys that differ."""
    if not isinstance(weights, Weights):
        weights = read_weights(weights)
    own, tensors, adapted = model.state_dict(), dict(weights.tensors), []
    fc_there, fc_here = tensors.get("fc.weight"), own["fc.weight"]
    if (fc_there is not None and fc_there.dim() == 2 and fc_there.shape[1] == fc_here.shape[1]
            and len(fc_there) != len(fc_here)):
        tensors.update({key: own[key] for key in CLASSIFIER})
        adapted.append(f"fc re-initialised for {len(fc_here)} classes (the file's has {len(fc_there)})")
    stem_there, stem_here = tensors.get(STEM), own[STEM]
    if (stem_there is not None and stem_there.dim() == 4 and stem_there.shape[1] == 3
            and stem_there[:, :1].shape == stem_here.shape):
        tensors[STEM] = stem_there.sum(1, keepdim=True)
        adapted.append("conv1 summed over its RGB filters for 1 input channel")
    for key in own:  # BN's batch counters: files saved before BatchNorm counted batches lack them; they are no weight
        if key.endswith("num_batches_tracked"):
            tensors.setdefault(key, own[key])
    problems = fit_problems(tensors, own)
    if problems or weights.recorded_model not in (None, model_name):
        details = f": {'; '.join(problems)}" if problems else ""
        raise CheckpointError(f"weights file {weights.path} seems to be for {weights.made_for()}, not {model_name} "
                              f"({inputs_and_classes(own)}){details}")
    model.load_state_dict(tensors)
    for note in adapted:
        log.warning("weights file %s: %s", weights.path, note)
    return adapted


def fit_problems(there: Mapping[str, torch.Tensor], here: Mapping[str, torch.Tensor]) -> list[str]:
    """What keeps the tensors `there` from loading strictly `here`: the first few keys of each kind."""
    missing = [key for key in here if key not in there]
    unexpected = [key for key in there if key not in here]
    reshaped = [key for key in here if key in there and there[key].shape != here[key].shape]
    problems = [f"{kind} {first_few(keys)}" for kind, keys in (("missing", missing), ("unexpected", unexpected))
                if keys]
    if STEM in reshaped and there[STEM].dim() == 4 and there[STEM].shape[1] != here[STEM].shape[1]:
        reshaped.remove(STEM)
        problems.append(f"conv1 takes {there[STEM].shape[1]} input channels there and {here[STEM].shape[1]} here "
                        "(only a 3-channel stem is adapted, to 1 channel, by summing its filters over RGB)")
    if reshaped:
        problems.append("shapes (file vs model) " + first_few([f"{key} {list(there[key].shape)} vs "
                                                                f"{list(here[key].shape)}" for key in reshaped]))
    return problems


def first_few(items: list[str], count: int = 3) -> str:
    more = f" (and {len(items) - count} more)" if len(items) > count else ""
    return ", ".join(items[:count]) + more


def architecture_name(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """The model a ResNet state_dict's keys suggest, e.g. 'resnet50'; None if it has no ResNet keys. Without
    projection shortcuts a residual net (option A) has a plain net's keys: 'resnet20 or plain20'."""
    blocks = {tuple(key.split(".")[:2]) for key in tensors if key.startswith("layer") and key.count(".") >= 2}
    if STEM not in tensors or not blocks:
        return None
    depth = (3 if any(key.endswith(".conv3.weight") for key in tensors) else 2) * len(blocks) + 2
    projections = any(".downsample." in key for key in tensors)
    return f"resnet{depth}" if projections else f"resnet{depth} or plain{depth}"


def inputs_and_classes(tensors: Mapping[str, torch.Tensor]) -> str:
    stem, fc = tensors.get(STEM), tensors.get("fc.weight")
    classes = "no fc" if fc is None else f"{len(fc)} classes"
    if stem is None or stem.dim() != 4:
        return classes
    return f"{classes}, {stem.shape[1]} input channel{'s' if stem.shape[1] != 1 else ''}"
