"""The jpeg-cost experiment: one network trained on each form of the same images, each tested on every form. Here
end to end on two tiny official-layout CIFAR-10 folders (the second a changed copy of the first); the real
measurement on the official-pixel subset takes hours (docs/reproduction.md)."""

from __future__ import annotations

import json
import pickle
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from test_formats import write_cifar10

from resnetlab.cli import main
from resnetlab.experiments import EXPERIMENTS, jpeg_cost, reproduce
from resnetlab.experiments.runner import Arm

TINY = dict(iterations=4, evaluations=2, checkpoint_every=4, seeds=2)


def test_the_preset_trains_resnet20_on_each_form_for_a_hundred_passes_with_the_cifar_drops(tmp_path):
    preset = jpeg_cost.PRESET
    assert EXPERIMENTS["jpeg-cost"] is jpeg_cost.EXPERIMENT
    arms = jpeg_cost.arms(preset)
    assert [arm.label for arm in arms] == ["resnet20-cifar-official", "resnet20-cifar-official-jpeg"]
    config = preset.configure(arms[1], 2, tmp_path)
    assert config.data == "cifar10:runs/cifar-official-jpeg" and config.seed == 2
    # The paper's drops at 1/2 and 3/4 of the schedule; 4,000 batches of 128 pass over the 5,085 images 100 times.
    assert (config.recipe.name, config.recipe.iterations, config.recipe.lr_milestones) == ("cifar", 4000, (2000, 3000))
    assert 100 <= config.recipe.iterations * config.recipe.batch_size / 5085 < 101
    assert preset.seeds == 3


@pytest.mark.parametrize(("data", "message"), [
    ("cifar10:a", "give --data REFERENCE,OTHER"),
    ("cifar10:a,", "give --data REFERENCE,OTHER"),
    ("cifar10:x/same,cifar10:y/same", "each form needs a folder of its own name"),
    ("cifar10:a,imagenet:b", "unknown dataset 'imagenet:b'"),
])
def test_data_that_is_not_two_named_forms_is_refused_before_training(tmp_path, data, message):
    with pytest.raises(ValueError, match=message):
        reproduce("jpeg-cost", tmp_path, data=data, log=lambda line: None)
    assert not (tmp_path / "runs").exists()


def changed_copy(source: Path, target: Path) -> None:
    """`source`'s CIFAR-10 folder with every test image inverted, as a stand-in for a lossy copy."""
    shutil.copytree(source, target)
    path = target / "cifar-10-batches-py" / "test_batch"
    content = pickle.loads(path.read_bytes(), encoding="bytes")
    content[b"data"] = 255 - np.asarray(content[b"data"])
    path.write_bytes(pickle.dumps(content, protocol=2))


@pytest.fixture(scope="module")
def crossed(tmp_path_factory) -> tuple[Path, str, str]:
    root = tmp_path_factory.mktemp("forms")
    write_cifar10(root / "official", writer=2, per_class=2)
    changed_copy(root / "official", root / "lossy")
    reference, other = f"cifar10:{root / 'official'}", f"cifar10:{root / 'lossy'}"
    out = root / "experiment"
    reproduce("jpeg-cost", out, preset=replace(jpeg_cost.PRESET, data=f"{reference},{other}", **TINY),
              progress=False, log=lambda line: None)
    return out, reference, other


def test_every_run_is_tested_on_every_form(crossed, capsys):
    out, reference, other = crossed
    results = json.loads((out / "results.json").read_text())
    runs = results["runs"]
    assert [(run["label"], run["seed"], run["data"]) for run in runs] == [
        ("resnet20-official", 0, reference), ("resnet20-lossy", 0, other),
        ("resnet20-official", 1, reference), ("resnet20-lossy", 1, other)]
    for run in runs:
        tested = results["cross_test"][f"{run['label']}-s{run['seed']}"]
        assert set(tested) == {"official", "lossy"}
        own = "official" if run["data"] == reference else "lossy"
        assert tested[own] == pytest.approx(run["final_test_error"])  # its own test error, measured again
        assert main(["evaluate", run["run_dir"], "--data", other, "--json"]) == 0
        assert tested["lossy"] == pytest.approx(json.loads(capsys.readouterr().out)["top1_error"])


def test_the_report_holds_the_cross_table_and_each_forms_cost(crossed):
    out, _, _ = crossed
    results = json.loads((out / "results.json").read_text())
    report = (out / "report.md").read_text()
    tested = results["cross_test"]
    official = [100 * tested[f"resnet20-official-s{seed}"]["official"] for seed in (0, 1)]
    lossy_on_lossy = [100 * tested[f"resnet20-lossy-s{seed}"]["lossy"] for seed in (0, 1)]
    assert "| network | trained on | test error % on official | test error % on lossy |" in report
    mean = sum(official) / 2
    std = abs(official[0] - official[1]) / 2 ** 0.5
    assert f"| resnet20-official | official | {mean:.2f} ± {std:.2f} |" in report
    differences = [b - a for a, b in zip(official, lossy_on_lossy)]
    assert (f"trained and tested on lossy instead of official: **{sum(differences) / 2:+.2f} ± "
            f"{abs(differences[0] - differences[1]) / 2 ** 0.5:.2f} points**") in report


def test_the_cost_pairs_runs_of_the_same_seed():
    results = {"preset": {"data": "cifar10:a/official,cifar10:a/jpeg"}, "runs": [], "cross_test": {}}
    for seed, (official, jpeg) in enumerate([(0.10, 0.15), (0.20, 0.24), (0.12, 0.18)]):
        for form, error in (("official", official), ("jpeg", jpeg)):
            arm = Arm("resnet20", data=f"cifar10:a/{form}")
            results["runs"].append({"model": "resnet20", "label": arm.label, "seed": seed, "data": arm.data})
            results["cross_test"][f"{arm.label}-s{seed}"] = {form: error}
    # Differences 5, 4 and 6 points: mean 5, std 1 (the unpaired stds would be 5.3 and 4.6).
    assert jpeg_cost.costs(results) == ["- resnet20: trained and tested on jpeg instead of official: **+5.00 ± 1.00 "
                                        "points** of test error (per seed: +5.00, +4.00, +6.00)"]
