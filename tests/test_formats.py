"""resnetlab.data: every dataset format read back from files written here in the real layouts, and the
downloader against a local HTTP server."""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import re
import struct
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from resnetlab.data import (
    ARCHIVES,
    MIRRORS,
    ArrayDataset,
    DatasetSpec,
    FolderDataset,
    download,
    downloads,
    load_dataset,
    stratified_split,
)
from resnetlab.data.augment import ImageSizes

MNIST_T10K_CLASS_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


# --------------------------------------------------------------------------------------------------------------
# CIFAR
# --------------------------------------------------------------------------------------------------------------


class _Python2Pickler(pickle._Pickler):
    """Writes pickles the way Python 2 wrote the official CIFAR files: bytes as BINSTRING, numpy as numpy.core."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def _dump(content: dict, path: Path, writer: str | int) -> None:
    if writer == "python2":
        buffer = io.BytesIO()
        _Python2Pickler(buffer, protocol=2).dump(content)
        # GLOBAL opcodes are newline-terminated text, so renaming the module in place keeps the stream valid.
        path.write_bytes(buffer.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n"))
    else:
        path.write_bytes(pickle.dumps(content, protocol=writer))


def _cifar_rows(rng: np.random.Generator, num_classes: int, per_class: int) -> tuple[np.ndarray, list[int]]:
    labels = [c for c in range(num_classes) for _ in range(per_class)]
    rng.shuffle(labels)
    return rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8), labels


def write_cifar10(root: Path, writer: str | int = "python2", per_class: int = 2) -> dict:
    """An official-layout cifar-10-batches-py with 5 train batches of 10*per_class images and a test batch."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"class{i}".encode() for i in range(10)]
    _dump({b"label_names": names, b"num_cases_per_batch": 10 * per_class, b"num_vis": 3072},
          folder / "batches.meta", writer)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data, labels = _cifar_rows(rng, 10, per_class)
        _dump({b"batch_label": name.encode(), b"labels": labels, b"data": data,
               b"filenames": [f"{name}_{i}.png".encode() for i in range(len(labels))]}, folder / name, writer)
        batches[name] = (data, labels)
    return batches


@pytest.mark.parametrize("writer", ["python2", 2, 5])
def test_cifar10_pixels_labels_and_channel_order(tmp_path, writer):
    batches = write_cifar10(tmp_path, writer)
    splits = load_dataset(f"cifar10:{tmp_path}")
    train_rows = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)])
    train_labels = sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])

    assert splits.classes == [f"class{i}" for i in range(10)]
    assert (splits.num_classes, splits.in_channels, splits.image_size, splits.flip) == (10, 3, 32, True)
    assert splits.val is None and "official split" in splits.note
    images = splits.train.images
    assert images.dtype == torch.uint8 and images.shape == (100, 3, 32, 32) and images.is_contiguous()
    assert splits.train.labels.dtype == torch.int64 and splits.train.labels.tolist() == train_labels
    # A row is 1024 red values, then green, then blue, each plane row by row.
    row = train_rows[7]
    assert images[7, 0].flatten().tolist() == row[:1024].tolist()
    assert images[7, 1, 0, 0] == row[1024] and images[7, 2, 31, 31] == row[3071] and images[7, 0, 1, 0] == row[32]
    assert np.array_equal(images.numpy().reshape(100, 3072), train_rows)
    assert np.array_equal(splits.test.images.numpy().reshape(20, 3072), batches["test_batch"][0])
    assert splits.test.labels.tolist() == batches["test_batch"][1]


def test_cifar10_accepts_the_batches_folder_itself(tmp_path):
    write_cifar10(tmp_path)
    from_parent = load_dataset(f"cifar10:{tmp_path}")
    from_folder = load_dataset(f"cifar10:{tmp_path / 'cifar-10-batches-py'}")
    assert torch.equal(from_parent.train.images, from_folder.train.images)


def test_cifar10_validation_split_is_stratified_seeded_and_disjoint(tmp_path):
    write_cifar10(tmp_path, per_class=4)  # 200 training images, 20 per class
    whole = load_dataset(f"cifar10:{tmp_path}").train
    splits = load_dataset(f"cifar10:{tmp_path}", val_size=50, seed=3)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (150, 50, 40)
    assert np.bincount(splits.val.labels.numpy(), minlength=10).tolist() == [5] * 10
    assert "val: 50 training images held out (stratified, seed 3)" in splits.note
    # Train and val partition the original rows, each keeping its own label.
    def rows(ds: ArrayDataset) -> set[tuple[bytes, int]]:
        return {(bytes(x.numpy()), int(y)) for x, y in zip(ds.images, ds.labels, strict=True)}

    assert rows(splits.train) | rows(splits.val) == rows(whole) and not rows(splits.train) & rows(splits.val)
    same_seed = load_dataset(f"cifar10:{tmp_path}", val_size=50, seed=3)
    other_seed = load_dataset(f"cifar10:{tmp_path}", val_size=50, seed=4)
    assert torch.equal(same_seed.val.images, splits.val.images)
    assert not torch.equal(other_seed.val.images, splits.val.images)


def test_cifar100_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    fine_names = [f"fine{i:02d}".encode() for i in range(100)]
    _dump({b"fine_label_names": fine_names, b"coarse_label_names": [f"c{i}".encode() for i in range(20)]},
          folder / "meta", 2)
    written = {}
    for name, per_class in (("train", 2), ("test", 1)):
        data, fine = _cifar_rows(rng, 100, per_class)
        _dump({b"filenames": [b"x.png"] * len(fine), b"batch_label": name.encode(), b"fine_labels": fine,
               b"coarse_labels": [f // 5 for f in fine], b"data": data}, folder / name, 2)
        written[name] = (data, fine)
    splits = load_dataset(f"cifar100:{tmp_path}", val_size=100)
    assert splits.classes == [n.decode() for n in fine_names] and splits.num_classes == 100
    assert splits.test.labels.tolist() == written["test"][1]
    assert np.array_equal(splits.test.images.numpy().reshape(-1, 3072), written["test"][0])
    assert np.bincount(splits.val.labels.numpy(), minlength=100).tolist() == [1] * 100
    assert len(splits.train) == 100


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


def test_malicious_pickle_is_refused(tmp_path):
    write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    evil = pickle.dumps({b"data": _RunsCode(marker), b"labels": []}, protocol=2)
    pickle.loads(evil)  # a plain unpickler really runs it ...
    assert marker.exists()
    marker.unlink()
    (tmp_path / "cifar-10-batches-py" / "data_batch_2").write_bytes(evil)
    with pytest.raises(pickle.UnpicklingError, match=r"data_batch_2: refusing to unpickle __builtin__\.exec"):
        load_dataset(f"cifar10:{tmp_path}")  # ... the CIFAR reader does not
    assert not marker.exists()


def test_missing_cifar_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"cifar10: no CIFAR-10 batches in .*expected cifar-10-batches-py/ "
                                                r"with data_batch_1\.\.5, test_batch and batches\.meta"):
        load_dataset(f"cifar10:{tmp_path}")
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing .*cifar-10-batches-py/data_batch_3"):
        load_dataset(f"cifar10:{tmp_path}")


# --------------------------------------------------------------------------------------------------------------
# MNIST / IDX
# --------------------------------------------------------------------------------------------------------------


def idx_bytes(array: np.ndarray) -> bytes:
    magic = 2051 if array.ndim == 3 else 2049
    return struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()


def write_mnist(folder: Path, n_train: int, n_test: int, compress: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """The four MNIST IDX files with random digits; returns the arrays written, keyed by file name."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        arrays[f"{prefix}-images-idx3-ubyte"] = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        arrays[f"{prefix}-labels-idx1-ubyte"] = np.arange(n, dtype=np.uint8) % 10
    for name, array in arrays.items():
        if compress:
            (folder / f"{name}.gz").write_bytes(gzip.compress(idx_bytes(array)))
        else:
            (folder / name).write_bytes(idx_bytes(array))
    return arrays


@pytest.mark.parametrize("compress", [True, False])
def test_mnist_idx_read_back_and_padded(tmp_path, compress):
    arrays = write_mnist(tmp_path, n_train=30, n_test=20, compress=compress)
    splits = load_dataset(f"mnist:{tmp_path}")
    assert (splits.in_channels, splits.image_size, splits.flip, splits.num_classes) == (1, 32, False, 10)
    assert splits.train.images.shape == (30, 1, 32, 32) and splits.test.images.shape == (20, 1, 32, 32)
    assert np.array_equal(splits.train.images[:, 0, 2:30, 2:30].numpy(), arrays["train-images-idx3-ubyte"])
    assert np.array_equal(splits.test.images[:, 0, 2:30, 2:30].numpy(), arrays["t10k-images-idx3-ubyte"])
    assert splits.train.labels.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    border = splits.train.images.clone()
    border[:, :, 2:30, 2:30] = 0
    assert border.count_nonzero() == 0
    assert "30 train / 20 test (official split)" in splits.note


def test_idx_truncated_file_says_what_was_expected(tmp_path):
    write_mnist(tmp_path, n_train=10, n_test=10, compress=False)
    images = tmp_path / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[: 16 + 1234])
    with pytest.raises(ValueError, match=re.escape(f"{images}: IDX image file truncated: header says 10x28x28 = "
                                                   "7840 bytes of pixels, found 1234")):
        load_dataset(f"mnist:{tmp_path}")


def test_idx_cut_gzip_stream_names_the_file(tmp_path):
    write_mnist(tmp_path, n_train=10, n_test=10, compress=True)
    labels = tmp_path / "t10k-labels-idx1-ubyte.gz"
    labels.write_bytes(labels.read_bytes()[:-12])
    with pytest.raises(ValueError, match=re.escape(f"{labels}: corrupt gzip stream")):
        load_dataset(f"mnist:{tmp_path}")


def test_idx_wrong_magic(tmp_path):
    write_mnist(tmp_path, n_train=10, n_test=10, compress=False)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes((tmp_path / "train-images-idx3-ubyte").read_bytes())
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte: not an IDX label file: magic number 2051, "
                                         "expected 2049"):
        load_dataset(f"mnist:{tmp_path}")


def test_mnist_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"mnist: no t10k-images-idx3-ubyte\[\.gz\].*expected the IDX files "
                                                r"train-images-idx3-ubyte\[\.gz\]"):
        load_dataset(f"mnist:{tmp_path}")


def test_real_mnist_t10k_is_split_8000_2000_the_same_way_every_time(shared_data):
    splits = load_dataset(f"mnist:{shared_data / 'mnist'}", seed=123)  # the fixed split ignores `seed`
    again = load_dataset(f"mnist:{shared_data / 'mnist'}")
    assert (len(splits.train), len(splits.test)) == (8000, 2000)
    assert splits.train.images.shape == (8000, 1, 32, 32) and splits.test.images.shape == (2000, 1, 32, 32)
    assert "split 8,000 train / 2,000 test (stratified, fixed seed 0)" in splits.note
    train_counts = np.bincount(splits.train.labels.numpy(), minlength=10)
    test_counts = np.bincount(splits.test.labels.numpy(), minlength=10)
    assert (train_counts + test_counts).tolist() == MNIST_T10K_CLASS_COUNTS
    assert np.all(np.abs(test_counts - np.array(MNIST_T10K_CLASS_COUNTS) / 5) < 1)
    for images in (splits.train.images, splits.test.images):
        assert images[:, :, :2].count_nonzero() == images[:, :, -2:].count_nonzero() == 0
        assert images[:, :, :, :2].count_nonzero() == images[:, :, :, -2:].count_nonzero() == 0
        assert images[:, :, 2:30, 2:30].count_nonzero() > 0
    assert torch.equal(splits.train.images, again.train.images) and torch.equal(splits.test.labels, again.test.labels)


# --------------------------------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------------------------------


def test_digits_sizes_dtype_and_range():
    from sklearn.datasets import load_digits

    splits = load_dataset("digits")
    assert (len(splits.train), len(splits.test)) == (1437, 360)
    assert splits.train.images.shape == (1437, 1, 8, 8) and splits.train.images.dtype == torch.uint8
    assert (splits.in_channels, splits.image_size, splits.flip, splits.classes) == (1, 8, False, list("0123456789"))
    both = torch.cat([splits.train.images, splits.test.images])
    assert int(both.min()) == 0 and int(both.max()) == 255
    expected = load_digits().images.astype(np.int64) * 255 // 16
    assert int(both.sum()) == int(expected.sum())
    assert np.all(np.abs(np.bincount(splits.test.labels.numpy()) - np.bincount(load_digits().target) / 1797 * 360) < 1)
    assert torch.equal(load_dataset("digits").test.images, splits.test.images)


# --------------------------------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------------------------------

COLORS = {"cat": (200, 10, 10), "ant": (10, 200, 10), "bee": (10, 10, 200)}


def make_image_folder(root: Path, per_class: int = 3) -> None:
    """root/<class>/ with PNGs (and one JPEG) of a solid colour per class, in several sizes and suffix cases."""
    for name, color in COLORS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            suffix = ".PNG" if i == 0 else ".png"
            Image.new("RGB", (20 + i, 10 + i), color).save(root / name / f"img{i}{suffix}")
        Image.new("L", (12, 12), 128).save(root / name / "gray.JPEG", format="JPEG")
        (root / name / "notes.txt").write_text("ignored: not an image suffix")


def test_folder_scan_skips_broken_files_and_labels_follow_sorted_names(tmp_path):
    make_image_folder(tmp_path)
    (tmp_path / "bee" / "empty.png").write_bytes(b"")
    (tmp_path / "cat" / "x.jpg").write_text("this is not a JPEG")
    noise = np.random.default_rng(0).integers(0, 256, size=(256, 256, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="JPEG", quality=95)
    (tmp_path / "ant" / "img1_truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])

    dataset = FolderDataset(tmp_path, None)
    assert dataset.classes == ["ant", "bee", "cat"]
    assert [(p.name, reason.split(":")[0]) for p, reason in dataset.skipped] == [
        ("empty.png", "empty file"), ("x.jpg", "not an image")]
    assert len(dataset) == 3 * 4 + 1  # 3 PNG + 1 JPEG per class, and the truncated JPEG (its header is fine)
    assert [(p.parent.name, label) for p, label in dataset.samples] == [
        (p.parent.name, ["ant", "bee", "cat"].index(p.parent.name)) for p, _ in dataset.samples]
    assert dataset.labels.tolist() == [0] * 5 + [1] * 4 + [2] * 4

    first_png = next(i for i, (p, _) in enumerate(dataset.samples) if p.name == "img0.PNG" and p.parent.name == "bee")
    image, label = dataset[first_png]
    assert label == 1 and image.dtype == torch.uint8 and image.shape == (3, 10, 20)
    assert image[:, 4, 7].tolist() == list(COLORS["bee"])
    gray, _ = dataset[[p.name for p, _ in dataset.samples].index("gray.JPEG")]
    assert gray.shape == (3, 12, 12) and torch.equal(gray[0], gray[2])  # L converted to RGB

    truncated = [p.name for p, _ in dataset.samples].index("img1_truncated.jpg")
    with pytest.warns(RuntimeWarning, match="img1_truncated.jpg: cannot decode"):
        image, label = dataset[truncated]
    next_label = dataset.samples[truncated + 1][1]
    assert label == next_label and torch.equal(image, dataset[truncated + 1][0])

    dataset.transform = lambda img: torch.tensor(img.size)
    assert dataset[first_png][0].tolist() == [20, 10]


def test_folder_train_val_layout(tmp_path):
    make_image_folder(tmp_path / "train")
    (tmp_path / "val" / "cat").mkdir(parents=True)
    Image.new("RGB", (8, 8), COLORS["cat"]).save(tmp_path / "val" / "cat" / "v.png")
    splits = load_dataset(f"folder:{tmp_path}", val_size=3)
    assert splits.classes == ["ant", "bee", "cat"] and splits.num_classes == 3
    assert (splits.in_channels, splits.image_size, splits.flip) == (3, 224, True)
    assert isinstance(splits.test, FolderDataset) and splits.test.labels.tolist() == [2]
    assert (len(splits.train), len(splits.val)) == (9, 3)
    assert sorted(splits.val.labels.tolist()) == [0, 1, 2]
    assert {p for p, _ in splits.train.samples}.isdisjoint(p for p, _ in splits.val.samples)

    (tmp_path / "val" / "dog").mkdir()
    with pytest.raises(ValueError, match=r"has class folders \['dog'\] that are not among the 3 training classes"):
        load_dataset(f"folder:{tmp_path}")


def test_folder_resolution_scales_every_view(tmp_path):
    make_image_folder(tmp_path / "train")
    (tmp_path / "val" / "cat").mkdir(parents=True)
    Image.new("RGB", (300, 200), COLORS["cat"]).save(tmp_path / "val" / "cat" / "v.png")
    splits = load_dataset(f"folder:{tmp_path}", resolution=0.5)
    assert splits.train.sizes == ImageSizes(128, 240, 112, 128) and splits.image_size == 112
    images, _ = next(iter(splits.train.training_batches(batch_size=4, seed=0, start=0, stop=1, flip=True, padding=0,
                                                        workers=0)))
    assert tuple(images.shape) == (4, 3, 112, 112)
    center, _ = next(iter(splits.test.evaluation_batches(1)))
    crops, _ = next(iter(splits.test.test_views("10crop", 1, 0, None, 0)))
    assert tuple(center.shape) == (1, 3, 112, 112) and tuple(crops.shape) == (10, 1, 3, 112, 112)
    assert ImageSizes.scaled(1) == ImageSizes(256, 480, 224, 256)


def test_resolution_is_refused_for_data_of_a_fixed_size():
    with pytest.raises(ValueError, match="--resolution 0.5 scales the image sizes of folder data .* digits images "
                                         "are used at their own size"):
        load_dataset("digits", resolution=0.5)


def test_class_names_come_from_synsets_txt(tmp_path):
    make_image_folder(tmp_path / "train")
    (tmp_path / "synsets.txt").write_text("ant formica\nbee honey bee\nwasp not a class here\ncat\n\n")
    splits = load_dataset(f"folder:{tmp_path}")
    assert splits.classes == ["ant", "bee", "cat"]
    assert splits.class_names == ["formica", "honey bee", "cat"]  # cat's line names nothing: its folder name stays
    (tmp_path / "synsets.txt").write_bytes(b"\xff\xfe bad")
    with pytest.raises(ValueError, match="cannot read the class names in .*synsets.txt"):
        load_dataset(f"folder:{tmp_path}")


def test_a_bounded_evaluation_of_a_folder_takes_every_class(tmp_path):
    make_image_folder(tmp_path, per_class=9)
    dataset = FolderDataset(tmp_path, None)  # 30 images in class order: 10 ants, 10 bees, 10 cats
    labels = torch.cat([labels for _, labels in dataset.evaluation_batches(4, limit=6)])
    assert sorted(labels.tolist()) == [0, 0, 1, 1, 2, 2]
    assert len(dataset.bounded(None)) == len(dataset.bounded(100)) == 30


def test_folder_without_train_dir_is_split_80_20_per_class(tmp_path):
    make_image_folder(tmp_path, per_class=9)  # 10 images per class
    splits = load_dataset(f"folder:{tmp_path}")
    assert (len(splits.train), len(splits.test)) == (24, 6)
    assert np.bincount(splits.test.labels.numpy()).tolist() == [2, 2, 2]
    train_paths, test_paths = {p for p, _ in splits.train.samples}, {p for p, _ in splits.test.samples}
    assert train_paths.isdisjoint(test_paths) and len(train_paths | test_paths) == 30
    assert "80/20" in splits.note
    again = load_dataset(f"folder:{tmp_path}")
    assert again.test.samples == splits.test.samples
    splits.train.transform = lambda img: torch.zeros(1)
    assert splits.test.transform is None  # each split's transform is its own


# --------------------------------------------------------------------------------------------------------------
# Downloads
# --------------------------------------------------------------------------------------------------------------


class _RangeHandler(BaseHTTPRequestHandler):
    """Serves server.state.files; honours `Range: bytes=N-` unless told not to; can cut one response short."""

    def do_GET(self) -> None:
        state = self.server.state
        name = self.path.lstrip("/")
        body = state.files.get(name)
        if body is None:
            self.send_error(404)
            return
        range_header = self.headers.get("Range")
        start = 0
        if range_header and not state.ignore_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", range_header).group(1))
            if start >= len(body):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        payload = body[start:]
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if name in state.drop_once:  # promise the whole payload, send half, close the connection
            state.drop_once.discard(name)
            payload = payload[: len(payload) // 2]
        # Logged before the bytes go out: a client that has read them all may check the log at once, while this
        # thread could still be between the write and the append on a loaded machine.
        state.log.append((name, range_header, len(payload)))
        self.wfile.write(payload)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setattr(downloads, "RETRY_BACKOFF_S", 0.0)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _RangeHandler)
    httpd.state = SimpleNamespace(files={}, log=[], drop_once=set(), ignore_range=False,
                                  url=f"http://127.0.0.1:{httpd.server_address[1]}/")
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd.state
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def md5_of(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


BODY = np.random.default_rng(7).integers(0, 256, size=200_000, dtype=np.uint8).tobytes()


def fetch(server, dest: Path, md5: str | None = None) -> Path:
    return download(server.url + "blob.bin", dest, md5 or md5_of(BODY), retries=2, timeout=5, progress=False)


def test_download_fresh_then_cached(server, tmp_path):
    server.files["blob.bin"] = BODY
    dest = tmp_path / "sub" / "blob.bin"
    assert fetch(server, dest) == dest
    assert dest.read_bytes() == BODY and not (tmp_path / "sub" / "blob.bin.part").exists()
    assert server.log == [("blob.bin", None, len(BODY))]
    fetch(server, dest)
    assert len(server.log) == 1  # present with the right md5: no request


def test_download_resumes_from_part_file(server, tmp_path):
    server.files["blob.bin"] = BODY
    dest = tmp_path / "blob.bin"
    (tmp_path / "blob.bin.part").write_bytes(BODY[:50_000])
    fetch(server, dest)
    assert server.log == [("blob.bin", "bytes=50000-", len(BODY) - 50_000)]
    assert dest.read_bytes() == BODY


def test_download_restarts_when_server_ignores_range(server, tmp_path):
    server.files["blob.bin"] = BODY
    server.ignore_range = True
    (tmp_path / "blob.bin.part").write_bytes(b"x" * 1000)  # would corrupt the file if appended to
    fetch(server, tmp_path / "blob.bin")
    assert server.log == [("blob.bin", "bytes=1000-", len(BODY))]
    assert (tmp_path / "blob.bin").read_bytes() == BODY


def test_download_retries_after_dropped_connection(server, tmp_path):
    server.files["blob.bin"] = BODY
    server.drop_once.add("blob.bin")
    fetch(server, tmp_path / "blob.bin")
    half = len(BODY) // 2
    assert server.log == [("blob.bin", None, half), ("blob.bin", f"bytes={half}-", len(BODY) - half)]
    assert (tmp_path / "blob.bin").read_bytes() == BODY


def test_download_md5_mismatch_leaves_nothing(server, tmp_path):
    server.files["blob.bin"] = BODY
    wrong = "0" * 32
    with pytest.raises(ValueError, match=f"blob.bin: md5 mismatch: expected {wrong}, got {md5_of(BODY)}"):
        fetch(server, tmp_path / "blob.bin", md5=wrong)
    assert list(tmp_path.iterdir()) == []


def test_download_http_error_is_not_retried(server, tmp_path):
    with pytest.raises(OSError, match="blob.bin: HTTP 404"):
        fetch(server, tmp_path / "blob.bin")
    assert list(tmp_path.iterdir()) == []


def test_load_mnist_with_download_end_to_end(server, tmp_path, monkeypatch):
    arrays = write_mnist(tmp_path / "made", n_train=40, n_test=20, compress=True)
    md5s = {}
    for path in (tmp_path / "made").iterdir():
        server.files[path.name] = path.read_bytes()
        md5s[path.name] = md5_of(path.read_bytes())
    monkeypatch.setitem(MIRRORS, "mnist", [server.url + "missing/", server.url])  # first mirror: 404
    monkeypatch.setitem(ARCHIVES, "mnist", md5s)
    data_dir = tmp_path / "mnist"
    splits = load_dataset(f"mnist:{data_dir}", download=True)
    assert sorted(p.name for p in data_dir.iterdir()) == sorted(md5s)
    assert np.array_equal(splits.train.images[:, 0, 2:30, 2:30].numpy(), arrays["train-images-idx3-ubyte"])
    assert splits.test.labels.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    requests = len(server.log)
    load_dataset(f"mnist:{data_dir}", download=True)
    assert len(server.log) == requests  # everything present: nothing fetched again


def _tar_gz(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_load_cifar10_with_download_extracts_into_cache(server, tmp_path, monkeypatch):
    batches = write_cifar10(tmp_path / "made")
    archive = _tar_gz({f"cifar-10-batches-py/{p.name}": p.read_bytes()
                       for p in (tmp_path / "made" / "cifar-10-batches-py").iterdir()})
    server.files["cifar-10-python.tar.gz"] = archive
    monkeypatch.setitem(MIRRORS, "cifar10", [server.url])
    monkeypatch.setitem(ARCHIVES, "cifar10", {"cifar-10-python.tar.gz": md5_of(archive)})
    splits = load_dataset("cifar10", download=True, cache_dir=tmp_path / "cache")
    assert str(tmp_path / "cache" / "cifar10" / "cifar-10-batches-py") in splits.note
    assert splits.test.labels.tolist() == batches["test_batch"][1]
    assert sorted(p.name for p in (tmp_path / "cache" / "cifar10").iterdir()) == [
        "cifar-10-batches-py", "cifar-10-python.tar.gz"]


def test_archive_with_path_traversal_is_refused(server, tmp_path, monkeypatch):
    archive = _tar_gz({"cifar-10-batches-py/test_batch": b"x", "../escaped": b"x"})
    server.files["cifar-10-python.tar.gz"] = archive
    monkeypatch.setitem(MIRRORS, "cifar10", [server.url])
    monkeypatch.setitem(ARCHIVES, "cifar10", {"cifar-10-python.tar.gz": md5_of(archive)})
    with pytest.raises(ValueError, match=r"refusing member '\.\./escaped'"):
        load_dataset(f"cifar10:{tmp_path / 'data'}", download=True)
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "data" / "cifar-10-batches-py").exists()


# --------------------------------------------------------------------------------------------------------------
# Specs and splitting
# --------------------------------------------------------------------------------------------------------------


def test_dataset_spec_parses_kind_and_path():
    spec = DatasetSpec.parse("cifar10:/a/b")
    assert (spec.kind, spec.path) == ("cifar10", Path("/a/b"))
    assert DatasetSpec.parse("digits") == ("digits", None)
    assert DatasetSpec.parse("mnist") == ("mnist", None)
    with pytest.raises(ValueError, match="unknown dataset 'imagenet:/x': valid kinds are cifar10:PATH, "
                                         "cifar100:PATH, mnist:PATH, folder:PATH, digits"):
        DatasetSpec.parse("imagenet:/x")
    with pytest.raises(ValueError, match="digits takes no path"):
        DatasetSpec.parse("digits:/x")
    with pytest.raises(ValueError, match="folder needs a path"):
        DatasetSpec.parse("folder")


def test_val_size_must_leave_training_images():
    with pytest.raises(ValueError, match=r"val_size=1437 must be smaller than the training set \(1437 images\)"):
        load_dataset("digits", val_size=1437)


def test_stratified_split_exact_total_and_class_shares():
    labels = np.repeat(np.arange(3), [50, 30, 20])
    first, second = stratified_split(labels, 15, seed=0)
    assert len(second) == 15 and np.bincount(labels[second]).tolist() == [8, 4, 3]  # 7.5, 4.5, 3: .5s to class 0
    assert np.array_equal(np.sort(np.concatenate([first, second])), np.arange(100))
    with pytest.raises(ValueError, match="cannot take 100 of 100 items"):
        stratified_split(labels, 100, seed=0)


def test_array_dataset_checks_dtypes():
    with pytest.raises(ValueError, match="images must be uint8"):
        ArrayDataset(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.int64))
    assert len(ArrayDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64))) == 2
