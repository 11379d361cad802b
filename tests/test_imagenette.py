"""Real photographs: the image-folder path (scale augmentation, the ImageNet networks, the resolution factor, class
names from synsets.txt) trained and tested on Imagenette, 10 ImageNet classes.

The photographs come from ../shared/data/imagenette, written as class folders by its own make_folders.py; a
class-balanced part of them is linked into pytest's temporary directories, and nothing made from them is kept.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from resnetlab.cli import main
from resnetlab.data import load_dataset

IMAGENETTE_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenette"
needs_imagenette = pytest.mark.skipif(not (IMAGENETTE_DIR / "make_folders.py").is_file(),
                                      reason=f"the Imagenette photographs are not here ({IMAGENETTE_DIR})")

TRAIN_PER_CLASS, VAL_PER_CLASS = 100, 40
# ResNet-18 at resolution 0.25 (56x56 crops), 150 iterations of 64 on the 1,000 training photographs above, lr 0.025
# (the paper's 0.1 for 256, scaled to the batch; 0.1 itself leaves it at 84% after 150 iterations) then 0.0025 from
# iteration 100: 54.25%, 52.75% and 56.25% validation error for seeds 0, 1 and 2 (chance: 90%), in 50 s on 2 quiet
# cores. The bar leaves 14 points of margin: a folder path that stops learning photographs fails it.
ITERATIONS = 150
VAL_ERROR_BAR = 0.70


@pytest.fixture(scope="module")
def imagenette(tmp_path_factory) -> Path:
    """A class-balanced part of Imagenette: TRAIN_PER_CLASS and VAL_PER_CLASS photographs of each class, linked."""
    whole = tmp_path_factory.mktemp("imagenette-whole")
    subprocess.run([sys.executable, str(IMAGENETTE_DIR / "make_folders.py"), str(whole)], check=True,
                   capture_output=True)
    part = tmp_path_factory.mktemp("imagenette")
    for split, count in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        for class_dir in sorted((whole / split).iterdir()):
            (part / split / class_dir.name).mkdir(parents=True)
            for photo in sorted(class_dir.iterdir())[:count]:
                (part / split / class_dir.name / photo.name).symlink_to(photo)
    (part / "synsets.txt").write_bytes((whole / "synsets.txt").read_bytes())
    return part


@needs_imagenette
def test_folders_read_with_imagenet_class_names_and_scaled_sizes(imagenette):
    data = load_dataset(f"folder:{imagenette}", resolution=0.25)
    assert (len(data.train), len(data.test)) == (10 * TRAIN_PER_CLASS, 10 * VAL_PER_CLASS)
    assert data.classes[0] == "n01440764" and data.class_names[0] == "tench"
    assert data.class_names[-1] == "parachute"
    assert data.image_size == 56
    images, labels = next(iter(data.train.training_batches(batch_size=8, seed=0, start=0, stop=1, flip=True,
                                                           padding=0, workers=0)))
    assert tuple(images.shape) == (8, 3, 56, 56)
    center, _ = next(iter(data.test.evaluation_batches(4)))
    assert tuple(center.shape) == (4, 3, 56, 56)


@pytest.fixture(scope="module")
def resnet18_run(imagenette, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "resnet18"
    assert main(["train", "--model", "resnet18", "--recipe", "imagenet", "--data", f"folder:{imagenette}",
                 "--resolution", "0.25", "--batch-size", "64", "--lr", "0.025", "--iterations", str(ITERATIONS),
                 "--lr-milestones", "100", "--workers", "2", "--out", str(out), "--quiet"]) == 0
    return out


@needs_imagenette
def test_resnet18_learns_photographs_at_a_quarter_resolution(resnet18_run):
    summary = json.loads((resnet18_run / "summary.json").read_text())
    assert summary["config"]["recipe"]["resolution"] == 0.25
    assert summary["test_top1_error"] < VAL_ERROR_BAR, summary["test_top1_error"]


@needs_imagenette
def test_predict_names_the_class_of_a_photograph(resnet18_run, imagenette, capsys):
    tench = sorted((imagenette / "val" / "n01440764").iterdir())[0]
    assert main(["predict", str(resnet18_run), str(tench), "--top", "10", "--precision", "fp32"]) == 0
    path_line, *ranking = capsys.readouterr().out.splitlines()
    names = [line.split(maxsplit=1)[1] for line in ranking]
    assert path_line == str(tench) and len(names) == 10
    assert "tench" in names and not any(name.startswith("n0") for name in names)  # names, not WordNet ids
    assert main(["predict", str(resnet18_run), str(tench), "--top", "10", "--precision", "fp32", "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    by_label = {entry["label"]: entry for entry in result["top"]}
    assert by_label["n01440764"]["name"] == "tench"
    assert sum(entry["probability"] for entry in result["top"]) == pytest.approx(1, abs=1e-4)
