"""Plain against residual ImageNet networks of 18 and 34 layers (paper Sec. 4.1, Fig. 4 and Table 2).

The paper trains plain-18/34 and ResNet-18/34 (option A: identity shortcuts, zero-padded where the channels grow,
so a ResNet has exactly its plain net's parameters) with the ImageNet recipe. Plain-34 ends with a higher training
and validation error than plain-18 (the degradation problem); ResNet-34 ends lower than ResNet-18. Table 2 gives
their top-1 validation errors under 10-crop testing.

Here they train on an image folder (the preset is sized for Imagenette, 10 ImageNet classes, on a 2-core CPU): the
ImageNet recipe at half resolution (112x112 crops of images resized to [128, 240]), batch 256, lr 0.1 divided by
10 at 50% and 75% of the iterations, reached by a linear ramp over the first 20%: at lr 0.1 from the first step the
option-A ResNets blow up and, in a run this short, never catch up (docs/reproduction.md). The report draws Fig. 4's
two panels and Table 2 beside the paper's numbers.
"""

from __future__ import annotations

from pathlib import Path

from resnetlab.experiments import degradation
from resnetlab.experiments.runner import Arm, Experiment, Preset, evaluate_runs, run_key
from resnetlab.paper import IMAGENET_TOP1_ERROR
from resnetlab.report import group_by_label, markdown_table, percent

TITLE = "Plain and residual ImageNet networks of 18 and 34 layers (paper Fig. 4 and Table 2)"
# About 6 hours for the four runs on a 2-core CPU (docs/reproduction.md); 800 iterations of 256 are 22 epochs of
# Imagenette's 9,469 training images.
PRESET = Preset("table2", data="folder:imagenette", recipe="imagenet", depths=(18, 34), iterations=800,
                evaluations=10, checkpoint_every=100, resolution=0.5, lr_drops=(0.5, 0.75), lr_ramp=0.2)


def arms(preset: Preset) -> list[Arm]:
    """The shallower pair first, so that the cheaper half of the comparison is done first."""
    return [Arm(f"{kind}{depth}", None if kind == "plain" else "A")
            for depth in preset.depths for kind in degradation.KINDS]


def ten_crop_errors(preset: Preset, runs: list[dict]) -> dict:
    """Table 2's testing: top-1 and top-5 validation error of each run under 10-crop testing."""
    return {"ten_crop": {run_key(run): evaluate_runs([run["run_dir"]], "10crop") for run in runs}}


def table(results: dict) -> str:
    ten_crop = results.get("ten_crop", {})
    rows = []
    for label, group in group_by_label(results["runs"]).items():
        crops = [ten_crop[run_key(run)]["top1_error"] for run in group if run_key(run) in ten_crop]
        rows.append([label, f"{group[0]['params'] / 1e6:.2f} M", percent([r["final_train_error"] for r in group]),
                     percent([r["final_test_error"] for r in group]), percent(crops) if crops else "—",
                     f"{IMAGENET_TOP1_ERROR[group[0]['model']]:.2f}"])
    return markdown_table(["network", "params", "final train error %", "val error %, center view",
                           "val error %, 10-crop", "paper: ImageNet val top-1 %, 10-crop (Table 2)"], rows)


def effect_verdict(runs: list[dict]) -> str:
    """Whether plain-34 ends above plain-18 and ResNet-34 below ResNet-18, in training and in validation error."""
    lines, shows = [], True
    for key, name in (("final_train_error", "training"), ("final_test_error", "validation")):
        plain, residual = degradation.depth_gaps(runs, "plain", key), degradation.depth_gaps(runs, "resnet", key)
        if plain is None or residual is None:
            return "Only one depth was trained, so there is no depth comparison to make."
        plain_rises, residual_falls = all(g > 0 for g in plain["gaps"]), all(g < 0 for g in residual["gaps"])
        shows = shows and plain_rises and residual_falls
        lines.append(f"- Final {name} error, {plain['deep']} minus {plain['shallow']}: {degradation.points(plain)} "
                     f"points ({'higher' if plain_rises else 'not higher'} in every seed); {residual['deep']} minus "
                     f"{residual['shallow']}: {degradation.points(residual)} points "
                     f"({'lower' if residual_falls else 'not lower'} in every seed).")
    return "\n".join(lines) + ("\n\n**The paper's Fig. 4 shows**: the deeper plain net ends higher, the deeper ResNet "
                               "lower, in training and in validation error." if shows else
                               "\n\n**Not all of the paper's Fig. 4 shows at this budget**: see the lines above.")


def gaps_along_the_way(runs: list[dict]) -> str:
    """Deeper minus shallower validation error at every evaluation all runs share, for each kind, and since when
    its sign has been the paper's: where the order settles, and whether a gap of the wrong sign is closing, says
    what budget would show it. Empty where a kind has one depth."""
    evaluated = [dict(run["curves"]["test_error"]) for run in runs]
    iterations = sorted(set.intersection(*map(set, evaluated))) if runs else []
    gaps = {kind: [degradation.depth_gaps([{**run, "error_at": errors[iteration]}
                                           for run, errors in zip(runs, evaluated)], kind, "error_at")
                   for iteration in iterations] for kind in degradation.KINDS}
    if not iterations or None in gaps["plain"] + gaps["resnet"]:
        return ""
    first = {kind: gaps[kind][0] for kind in degradation.KINDS}
    rows = [[f"{iteration:,}", degradation.points(gaps["plain"][i]), degradation.points(gaps["resnet"][i])]
            for i, iteration in enumerate(iterations)]
    lines = []
    for kind, papers_way in (("plain", "above"), ("resnet", "below")):
        deep, shallow = first[kind]["deep"], first[kind]["shallow"]
        right = [(gap["mean"] > 0) == (papers_way == "above") for gap in gaps[kind]]
        if right[-1]:
            wrong_before = max((i for i, ok in enumerate(right) if not ok), default=-1)
            lines.append(f"- {deep} has been {papers_way} {shallow} since iteration {iterations[wrong_before + 1]:,}.")
        else:
            lines.append(f"- {deep} is not {papers_way} {shallow} at the last evaluation; the gap went from "
                         f"{degradation.points(gaps[kind][0])} to {degradation.points(gaps[kind][-1])} points.")
    headers = ["iteration", *(f"{first[kind]['deep']} minus {first[kind]['shallow']}, val error points"
                              for kind in degradation.KINDS)]
    return (markdown_table(headers, rows) + "\nMean over seeds at every evaluation, center view.\n\n"
            + "\n".join(lines))


def report(results: dict, out: Path) -> str:
    runs = results["runs"]
    verdict = effect_verdict(runs)
    along = gaps_along_the_way(runs)
    return ("## Table 2\n\n" + table(results) + "\n"
            "The final training error is measured in eval mode on the training images' center views; the "
            "validation errors on the held-out folder. The paper's numbers are on ImageNet's 1,000 classes, so only "
            "their order compares.\n\n"
            "## Does the degradation problem show?\n\n" + verdict + "\n\n"
            + (f"### The validation gaps along the way\n\n{along}\n\n" if along else "")
            +
            "## Fig. 4\n\n" + degradation.plot_curves(runs, out, file_name="fig4.png", paper_figure="Fig. 4",
                                                      held_out="validation"))


EXPERIMENT = Experiment(TITLE, PRESET, arms, report, analyse=ten_crop_errors)
