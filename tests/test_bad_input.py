"""Malformed bytes fed to every reader, by hypothesis: CIFAR batches, IDX files, image folders, TOML configs and
checkpoints. Each must give a clean result or one of the library's clear errors (ValueError and its subclasses,
FileNotFoundError) that names the file; never another exception, a hang, or a silently wrong result. Every read
runs under `bounded_time`, so a reader that hangs fails its test within seconds instead of blocking the suite."""

from __future__ import annotations

import gzip
import io
import json
import pickle
import re
import shutil
import signal
import struct
import warnings
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from run_helpers import assert_same_tensors

from resnetlab.checkpoint import CheckpointError, load_checkpoint, read_weights, save_checkpoint
from resnetlab.data import FolderDataset, load_dataset, read_idx
from resnetlab.factory import create_model
from resnetlab.recipes import RECIPE_KEYS, RUN_KEYS, TrainConfig, resolve_config, validate

# No per-case deadline: a case that once took 4.8 s on a quiet machine (the first call after start-up) failed the
# suite although the reader behaved; speed is not what these tests check.
FUZZ = settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
# A read of these few-kilobyte inputs takes milliseconds; the 4.8 s first call is the slowest ever seen.
READ_SECONDS = 10


@contextmanager
def bounded_time(what: str):
    """Fail the test if the block runs longer than READ_SECONDS. The alarm raises pytest's failure, which no
    reader's `except Exception` can swallow and which hypothesis reports as a failing example."""
    def expire(signum, frame):
        pytest.fail(f"{what} still running after {READ_SECONDS} s: a reader hangs on bad input")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, READ_SECONDS)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@st.composite
def damaged(draw, valid: bytes) -> bytes:
    """`valid` cut short, with some bytes overwritten, or both; or bytes that were never a file of the kind."""
    kind = draw(st.sampled_from(["random", "truncated", "overwritten", "overwritten and truncated"]))
    if kind == "random":
        return draw(st.binary(max_size=2 * len(valid)))
    data = bytearray(valid)
    if "overwritten" in kind:
        for _ in range(draw(st.integers(1, 8))):
            position = draw(st.integers(0, len(data) - 1))
            data[position] = draw(st.integers(0, 255))
    if "truncated" in kind:
        data = data[: draw(st.integers(0, len(data) - 1))]
    return bytes(data)


def clean_error(error: BaseException, path: Path) -> None:
    """The error is one the library means to raise, and says which file is at fault."""
    assert isinstance(error, (ValueError, FileNotFoundError)), f"{type(error).__name__}: {error}"
    assert str(path) in str(error) or path.name in str(error), f"the message does not name {path}: {error}"


# --------------------------------------------------------------------------------------------------------------
# CIFAR batches
# --------------------------------------------------------------------------------------------------------------

CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory) -> Path:
    """A valid cifar-10-batches-py with 10 images per batch, pickled as numpy pickles them (protocol 2)."""
    folder = tmp_path_factory.mktemp("cifar") / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in CIFAR_FILES[:-1]:
        content = {b"data": rng.integers(0, 256, size=(10, 3072), dtype=np.uint8), b"labels": list(range(10))}
        (folder / name).write_bytes(pickle.dumps(content, protocol=2))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"c%d" % i for i in range(10)]},
                                                       protocol=2))
    assert len(load_dataset(f"cifar10:{folder.parent}").train) == 50
    return folder


@FUZZ
@given(data=st.data(), name=st.sampled_from(["data_batch_3", "test_batch", "batches.meta"]))
def test_damaged_cifar_batch(cifar_dir, data, name):
    path = cifar_dir / name
    valid = path.read_bytes()
    path.write_bytes(data.draw(damaged(valid)))
    try:
        with bounded_time(f"reading a damaged {name}"):
            splits = load_dataset(f"cifar10:{cifar_dir.parent}")
        assert len(splits.train) == 50 and len(splits.test) == 10  # a harmless change (e.g. a pixel)
    except Exception as error:  # noqa: BLE001 - the point is which exceptions come out
        clean_error(error, path)
    finally:
        path.write_bytes(valid)


@pytest.mark.parametrize("content", [
    [1, 2, 3],
    {b"labels": [0]},
    {b"data": "text", b"labels": [0]},
    {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10**30]},
    {b"data": np.zeros((2, 3072), np.uint8), b"labels": {"a": 1}},
    {b"data": [[1, 2], [3]], b"labels": [0, 1]},
    {b"data": np.zeros((2, 3072), np.float64) - 1, b"labels": [0, 1]},
])
def test_cifar_batch_of_the_wrong_shape_or_type(cifar_dir, content):
    path = cifar_dir / "data_batch_2"
    valid = path.read_bytes()
    path.write_bytes(pickle.dumps(content, protocol=2))
    try:
        with pytest.raises((ValueError, FileNotFoundError)) as error, bounded_time("reading a wrong batch"):
            load_dataset(f"cifar10:{cifar_dir.parent}")
        clean_error(error.value, path)
    finally:
        path.write_bytes(valid)


# --------------------------------------------------------------------------------------------------------------
# IDX (MNIST)
# --------------------------------------------------------------------------------------------------------------


def idx_bytes(array: np.ndarray) -> bytes:
    magic = 2051 if array.ndim == 3 else 2049
    return struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory) -> Path:
    """Only the t10k pair, as in the shared data: 20 random 28x28 digits."""
    folder = tmp_path_factory.mktemp("mnist")
    rng = np.random.default_rng(0)
    (folder / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(rng.integers(0, 256, (20, 28, 28), np.uint8)))
    (folder / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.arange(20) % 10))
    assert len(load_dataset(f"mnist:{folder}").test) == 4
    return folder


@FUZZ
@given(data=st.data(), name=st.sampled_from(["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]),
       compress=st.booleans())
def test_damaged_idx_file(mnist_dir, data, name, compress):
    valid = (mnist_dir / name).read_bytes()
    bad = data.draw(damaged(valid))
    path = mnist_dir / (name + ".gz" if compress else name)
    if compress:  # a good gzip stream of bad content, or a damaged gzip stream of good content
        bad = gzip.compress(bad) if data.draw(st.booleans()) else data.draw(damaged(gzip.compress(valid)))
        (mnist_dir / name).unlink()
    path.write_bytes(bad)
    try:
        magic = 2051 if "images" in name else 2049
        try:
            with bounded_time(f"reading a damaged {path.name}"):
                array = read_idx(path, magic)
            assert array.dtype == np.uint8 and array.ndim == magic % 256
        except Exception as error:  # noqa: BLE001
            clean_error(error, path)
        try:
            with bounded_time(f"loading MNIST with a damaged {path.name}"):
                load_dataset(f"mnist:{mnist_dir}")
        except Exception as error:  # noqa: BLE001
            # a readable file with too few images fails at the split, which says so without a file name
            assert isinstance(error, ValueError) and (path.name in str(error) or "cannot take" in str(error)), error
    finally:
        path.unlink()
        (mnist_dir / name).write_bytes(valid)


# --------------------------------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------------------------------


def png_bytes(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (12, 16, 3), np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def png_of_chunks(width: int, height: int, bit_depth: int, color_type: int, interlace: int, pixels: bytes) -> bytes:
    """A PNG whose chunks all have correct CRCs, so the decoder, not the checksum test, meets the nonsense."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, interlace)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


well_formed_nonsense_png = st.builds(
    png_of_chunks, st.integers(0, 64), st.integers(0, 64), st.sampled_from([1, 2, 4, 8, 16, 3]),
    st.sampled_from([0, 2, 3, 4, 6, 5]), st.integers(0, 2),
    st.binary(max_size=300) | st.binary(max_size=3000).map(zlib.compress))


@FUZZ
@given(data=st.data(), count=st.integers(1, 4))
def test_folder_with_broken_images_skips_them(tmp_path, data, count):
    root = tmp_path / "images"
    shutil.rmtree(root, ignore_errors=True)
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    (root / "a" / "good.png").write_bytes(png_bytes(0))  # there is always something to decode
    broken = {}
    for i in range(count):
        name = f"{'ab'[i % 2]}/bad{i}.{data.draw(st.sampled_from(['png', 'jpg', 'JPEG']))}"
        broken[name] = data.draw(st.just(b"") | damaged(png_bytes(i + 1)) | well_formed_nonsense_png)
        (root / name).write_bytes(broken[name])

    with bounded_time("scanning a folder of broken images"):
        dataset = FolderDataset(root, None)
    assert len(dataset.samples) + len(dataset.skipped) == count + 1
    skipped = {path.relative_to(root).as_posix(): reason for path, reason in dataset.skipped}
    assert all(skipped[name] == "empty file" for name, content in broken.items() if not content)
    assert "a/good.png" not in skipped
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a sample that does not decode is announced, then replaced
        for index in range(len(dataset)):
            with bounded_time(f"decoding {dataset.samples[index][0].name}"):
                image, label = dataset[index]
            assert image.dtype == torch.uint8 and image.shape[0] == 3 and label in (0, 1)


def test_folder_skips_a_png_whose_header_pillow_rejects_with_value_error(tmp_path):
    # Found by the fuzzing above: an IHDR length of 0 makes Pillow raise ValueError, not OSError.
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "good.png").write_bytes(png_bytes(0))
    header_zeroed = bytearray(png_bytes(1))
    header_zeroed[8:12] = b"\0\0\0\0"
    (tmp_path / "a" / "zero-ihdr.png").write_bytes(bytes(header_zeroed))
    dataset = FolderDataset(tmp_path, None)
    assert [path.name for path, _ in dataset.samples] == ["good.png"]
    assert [(path.name, reason) for path, reason in dataset.skipped] == [
        ("zero-ihdr.png", "not an image: Truncated IHDR chunk")]


def test_folder_skips_an_image_too_large_to_decode(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "ok.png").write_bytes(png_bytes(0))
    (tmp_path / "a" / "huge.png").write_bytes(png_of_chunks(20_000, 20_000, 8, 2, 0, zlib.compress(b"\0" * 99)))
    with bounded_time("scanning a decompression bomb"):
        dataset = FolderDataset(tmp_path, None)  # 400 megapixels: past Pillow's decompression-bomb limit
    assert [(path.name, reason.split(":")[0]) for path, reason in dataset.skipped] == [("huge.png", "too large")]
    assert len(dataset) == 1 and dataset[0][0].shape == (3, 12, 16)


def test_folder_spec_counts_the_skipped_files(tmp_path):
    for label in "ab":
        (tmp_path / label).mkdir()
        for i in range(5):
            (tmp_path / label / f"{i}.png").write_bytes(png_bytes(i))
    (tmp_path / "a" / "zero.png").write_bytes(b"")
    (tmp_path / "b" / "text.jpg").write_text("hello")
    (tmp_path / "b" / "cut.png").write_bytes(png_bytes(9)[:300])  # the header survives: found when decoded
    splits = load_dataset(f"folder:{tmp_path}")
    assert "skipped 2 unreadable files" in splits.note
    assert len(splits.train) + len(splits.test) == 11


# --------------------------------------------------------------------------------------------------------------
# TOML configs
# --------------------------------------------------------------------------------------------------------------


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return {"nan": "nan", "inf": "inf", "-inf": "-inf"}.get(repr(value), repr(value))
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(map(toml_value, value)) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key} = {toml_value(item)}" for key, item in value.items()) + "}"
    return str(value)


scalars = (st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats()
           | st.text(st.characters(codec="ascii", categories=["L", "N", "P"]), max_size=12)
           | st.sampled_from(["resnet20", "digits", "mnist:x", "folder:", "cifar", "imagenet", "fp16", "A"]))
toml_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.sampled_from(["a", "lr", "b"]), inner, max_size=2), max_leaves=4)
keys = st.sampled_from([*RUN_KEYS, *RECIPE_KEYS, "recipe", "name", "bogus"])


@FUZZ
@given(settings_=st.dictionaries(keys, toml_values, max_size=4))
def test_toml_with_values_of_any_type(tmp_path, settings_):
    path = tmp_path / "run.toml"
    path.write_text("".join(f"{key} = {toml_value(value)}\n"
                            for key, value in {"model": "resnet20", "data": "digits", "out": "o", **settings_}.items()))
    try:
        with bounded_time("reading a TOML config"):
            config = resolve_config("cifar", path)
    except Exception as error:  # noqa: BLE001
        assert isinstance(error, ValueError), f"{type(error).__name__}: {error}"
        return
    validate(config)
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config  # summary.json can hold it


@FUZZ
@given(text=st.text(max_size=200) | st.binary(max_size=200))
def test_toml_of_random_text(tmp_path, text):
    path = tmp_path / "run.toml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    try:
        with bounded_time("reading a TOML config"):
            resolve_config("cifar", path, model="resnet20", data="digits", out="o")
    except Exception as error:  # noqa: BLE001
        assert isinstance(error, ValueError), f"{type(error).__name__}: {error}"
        if "not valid TOML" in str(error):
            clean_error(error, path)


# --------------------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pt"
    model = create_model("resnet20", num_classes=3, in_channels=1)
    save_checkpoint({"model_name": "resnet20", "model": model.state_dict(), "iteration": 7, "config": {"seed": 0}},
                    path)
    return path.read_bytes()


@FUZZ
@given(data=st.data())
def test_damaged_checkpoint(tmp_path, checkpoint_bytes, data):
    original = tmp_path / "original.pt"
    original.write_bytes(checkpoint_bytes)
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(data.draw(damaged(checkpoint_bytes)))
    try:
        with bounded_time("loading a damaged checkpoint"):
            state = load_checkpoint(path)
    except Exception as error:  # noqa: BLE001
        assert isinstance(error, CheckpointError), f"{type(error).__name__}: {error}"
        clean_error(error, path)
        return
    # Loaded: then the damage was to bytes nothing reads (zip bookkeeping), never to the content.
    expected = load_checkpoint(original)
    assert_same_tensors(state.pop("model"), expected.pop("model"))
    assert state == expected


@pytest.fixture(scope="module")
def legacy_weights_bytes(tmp_path_factory) -> bytes:
    """A small weights file as akamaster/pytorch_resnet_cifar10 saves them: torch's legacy (pre-zip) format."""
    path = tmp_path_factory.mktemp("legacy") / "resnet.th"
    torch.manual_seed(0)
    state_dict = {"module.conv1.weight": torch.randn(4, 3, 3, 3), "module.bn1.running_var": torch.rand(4),
                  "module.linear.weight": torch.randn(10, 4)}
    torch.save({"state_dict": state_dict, "best_prec1": 91.73}, path, _use_new_zipfile_serialization=False)
    return path.read_bytes()


@FUZZ
@given(data=st.data())
def test_damaged_legacy_weights_file(tmp_path, legacy_weights_bytes, data):
    path = tmp_path / "resnet.th"
    path.write_bytes(data.draw(damaged(legacy_weights_bytes)))
    try:
        with bounded_time("reading a damaged legacy weights file"), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch announces a damaged protocol byte, then fails
            weights = read_weights(path)
    except Exception as error:  # noqa: BLE001
        assert isinstance(error, CheckpointError), f"{type(error).__name__}: {error}"
        clean_error(error, path)
        return
    # Loaded: the legacy format has no checksums, so damaged tensor bytes read as other values; still only tensors.
    assert all(isinstance(tensor, torch.Tensor) for tensor in weights.tensors.values())


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


def test_pickle_payload_in_a_checkpoint_is_refused(tmp_path):
    marker, path = tmp_path / "pwned", tmp_path / "checkpoint.pt"
    torch.save({"format": "resnetlab-checkpoint-1", "model": {}, "payload": _RunsCode(marker)}, path)
    torch.load(path, weights_only=False)  # an ordinary load runs it ...
    assert marker.exists()
    marker.unlink()
    with pytest.raises(CheckpointError, match=f"checkpoint {re.escape(str(path))} holds objects that are not "
                                              "weights; refusing to unpickle them"):
        load_checkpoint(path)  # ... load_checkpoint does not
    assert not marker.exists()
