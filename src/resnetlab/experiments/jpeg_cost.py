"""What a lossy copy of a dataset costs: the same network trained on each form of the same images, and each trained
network tested on every form's test images.

The paper's CIFAR-10 errors are measured on the official lossless pixels, while a copy (like the JPEG copy of
CIFAR-10 that this project's full-size runs use) changes every pixel a little. `--data` lists the forms,
comma-separated, the reference first; with the official-pixel subset of CIFAR-10 (5,085 training, 1,017 test
images) written once as it is and once through a JPEG round trip at quality 75:

    resnetlab reproduce jpeg-cost --data cifar10:runs/cifar-official,cifar10:runs/cifar-official-jpeg \\
        --out runs/jpeg-cost

The cost of a form is its diagonal entry (trained and tested on it) minus the reference's: what a number measured
on that form adds to the same number measured on the reference. The off-diagonal entries say what a network trained
on one form does on the other (a JPEG-trained net tested on official pixels, and the reverse). The preset runs
4,000 iterations of the CIFAR recipe (lr / 10 at 2,000 and 3,000): 100 passes over 5,085 images. That converges
at this size: in six runs of ResNet-20 the mean test error of the last five of 20 evaluations is within 0.6 points
of the five before, and the training error ends at 0.8-1.6% (docs/reproduction.md). The paper's 182 passes (8,000
iterations here) would double the six runs' two hours on a 2-core CPU.
"""

from __future__ import annotations

from pathlib import Path

from resnetlab.experiments.runner import Arm, Experiment, Preset, data_name, evaluate_runs, run_key
from resnetlab.report import group_by_label, markdown_table, mean_std, percent

TITLE = "What a lossy copy of the data costs: one network trained and tested on each form of the same images"
PRESET = Preset("jpeg-cost", data="cifar10:runs/cifar-official,cifar10:runs/cifar-official-jpeg", depths=(20,),
                iterations=4000, seeds=3, checkpoint_every=500)


def forms(data: str) -> list[str]:
    """The dataset specs of `--data`, the reference first."""
    specs = [spec.strip() for spec in data.split(",")]
    if len(specs) < 2 or not all(specs):
        raise ValueError(f"jpeg-cost compares forms of the same images: give --data REFERENCE,OTHER[,...] (two or "
                         f"more dataset specs, comma-separated), got {data!r}")
    names = [data_name(spec) for spec in specs]
    if len(set(names)) < len(names):
        raise ValueError(f"--data {data!r}: each form needs a folder of its own name (its runs are named after it), "
                         f"found {', '.join(names)}")
    return specs


def arms(preset: Preset) -> list[Arm]:
    return [Arm(f"resnet{depth}", data=spec) for depth in preset.depths for spec in forms(preset.data)]


def cross_test(preset: Preset, runs: list[dict]) -> dict:
    """Every run's top-1 test error on every form's test images (the center view, as its own test error)."""
    return {"cross_test": {run_key(run): {data_name(spec): evaluate_runs([run["run_dir"]], data=spec)["top1_error"]
                                          for spec in forms(preset.data)}
                           for run in runs}}


def cross_table(results: dict) -> str:
    names = [data_name(spec) for spec in forms(results["preset"]["data"])]
    rows = []
    for label, group in group_by_label(results["runs"]).items():
        errors = [results["cross_test"][run_key(run)] for run in group]
        rows.append([label, data_name(group[0]["data"]), *(percent([e[name] for e in errors]) for name in names)])
    return markdown_table(["network", "trained on", *(f"test error % on {name}" for name in names)], rows)


def costs(results: dict) -> list[str]:
    """Each form's diagonal minus the reference's, per depth: the mean and std of the differences between runs of the
    same seed (same initialization and batch order, so the seed's own luck largely cancels)."""
    names = [data_name(spec) for spec in forms(results["preset"]["data"])]
    own = {}  # (model, form, seed): the run's test error on the form it trained on
    for run in results["runs"]:
        form = data_name(run["data"])
        own[run["model"], form, run["seed"]] = results["cross_test"][run_key(run)][form]
    lines = []
    for model in dict.fromkeys(run["model"] for run in results["runs"]):
        seeds = sorted(seed for m, name, seed in own if m == model and name == names[0])
        for name in names[1:]:
            differences = [100 * (own[model, name, seed] - own[model, names[0], seed]) for seed in seeds
                           if (model, name, seed) in own]
            mean, std = mean_std(differences)
            lines.append(f"- {model}: trained and tested on {name} instead of {names[0]}: **{mean:+.2f}"
                         + (f" ± {std:.2f}" if len(differences) > 1 else "") + f" points** of test error "
                         f"(per seed: {', '.join(f'{d:+.2f}' for d in differences)})")
    return lines


def report(results: dict, out: Path) -> str:
    first_data_note = results["runs"][0]["data_note"] if results["runs"] else ""
    return ("## Trained on each form, tested on each form\n\n" + cross_table(results) + "\n"
            f"Mean ± std over seeds of the top-1 test error, center view. Data of the first run: {first_data_note}.\n\n"
            "## What each form costs\n\n" + "\n".join(costs(results)) + "\n\n"
            "A test error measured on a form is this much above the same network's error measured on "
            f"{data_name(forms(results['preset']['data'])[0])} (trained and tested on its own form each).\n")


EXPERIMENT = Experiment(TITLE, PRESET, arms, report, analyse=cross_test)
