"""Checkpoints: written atomically, read without unpickling arbitrary objects, exported as plain weights.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts only, so `torch.load(weights_only=True)` reads
it: `format`, `model_name`, `model_kwargs` (what create_model needs), `classes`, `normalize` (the fitted mean),
`model` (the state_dict), `optimizer`, `schedule`, `iteration`, `rng`, `config` (the resolved TrainConfig).
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch
from torch import nn

from resnetlab.files import write_atomically

FORMAT = "resnetlab-checkpoint-1"
CHECKPOINT_NAME = "checkpoint.pt"


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
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()  # torch.load skips the CRC checks: a flipped byte would load silently
        if damaged is not None:
            raise zipfile.BadZipFile(f"{damaged} fails its CRC check")
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        # weights_only refuses any pickled object other than tensors and plain containers.
        raise CheckpointError(f"checkpoint {path} holds objects that are not weights; refusing to unpickle them "
                              f"({first_line(error)})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as error:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt: {first_line(error)}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a resnetlab checkpoint (no format={FORMAT!r} entry)")
    return state


def first_line(error: Exception) -> str:
    return next(iter(str(error).splitlines()), type(error).__name__)  # some errors (EOFError) have no message


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """The model a checkpoint was trained as, with its weights, in eval mode; and the checkpoint itself."""
    from resnetlab.models import create_model

    state = load_checkpoint(path, map_location)
    model = create_model(state["model_name"], **state["model_kwargs"])
    restore_weights(model, state, checkpoint_path(path))
    return model.eval(), state


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
