"""Shortcut options of ResNet-34 and the testing modes (paper Sec. 4.1: Table 3, the testing columns of Tables 3-5,
and an ensemble as in Table 5), on an image folder.

ResNet-34 is trained with shortcuts A (identity, zero-padded channels), B (projections where the shape changes) and C
(projections everywhere), beside plain-34, with the preset of `table2`: point --runs-dir at table2's runs and its
plain-34 and ResNet-34 A are reused, so only B and C train. Each network is tested as in Table 3 (10-crop, top-1
and top-5); each ResNet-34 also in the three testing modes, center view, 10-crop and the fully-convolutional
multi-scale test, each with its time; then the ResNet-34s together as an ensemble.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from resnetlab.evaluate import MODES
from resnetlab.experiments import shortcuts, table2
from resnetlab.experiments.runner import Experiment, Preset, evaluate_runs, run_key
from resnetlab.paper import MULTISCALE_ERROR, SHORTCUT_TOP1_ERROR, SHORTCUT_TOP5_ERROR
from resnetlab.report import format_seconds, markdown_table

TITLE = "Shortcut options of ResNet-34, testing modes and an ensemble (paper Tables 3-5)"
PRESET = replace(table2.PRESET, experiment="table3", depths=(34,))
ENSEMBLE_MODE = "10crop"


def testing_modes(preset: Preset, runs: list[dict]) -> dict:
    """Every run in 10-crop (Table 3); each ResNet in every mode; the ResNets as one ensemble."""
    modes = {run_key(run): {mode: evaluate_runs([run["run_dir"]], mode)
                                   for mode in (MODES if run["shortcut"] else (ENSEMBLE_MODE,))}
             for run in runs}
    residual = [run["run_dir"] for run in runs if run["shortcut"]]
    ensemble = evaluate_runs(residual, ENSEMBLE_MODE) if len(residual) > 1 else None
    return {"modes": modes, "ensemble": ensemble and {**ensemble, "members": [Path(d).name for d in residual]}}


def shortcut_table(results: dict) -> str:
    rows = []
    for run in results["runs"]:
        crops = results["modes"][run_key(run)][ENSEMBLE_MODE]
        option = shortcuts.variant(run)
        rows.append([run["label"], option, f"{run['params'] / 1e6:.2f} M", f"{100 * crops['top1_error']:.2f}",
                     f"{100 * crops['top5_error']:.2f}",
                     f"{SHORTCUT_TOP1_ERROR[option]:.2f} / {SHORTCUT_TOP5_ERROR[option]:.2f}"])
    return markdown_table(["network", "shortcut", "params", "val top-1 %, 10-crop", "val top-5 %, 10-crop",
                           "paper: ImageNet top-1 / top-5 %, 10-crop (Table 3)"], rows)


def modes_table(results: dict) -> str:
    rows = []
    for run in results["runs"]:
        if not run["shortcut"]:
            continue
        measured = results["modes"][run_key(run)]
        paper = MULTISCALE_ERROR.get(run["shortcut"])
        rows.append([run["label"], *(f"{100 * measured[m]['top1_error']:.2f} ({format_seconds(measured[m]['seconds'])})"
                                     for m in MODES),
                     f"{SHORTCUT_TOP1_ERROR[run['shortcut']]:.2f} / " + (f"{paper:.2f}" if paper else "—")])
    return markdown_table(["network", *(f"val top-1 %, {mode} (time)" for mode in MODES),
                           "paper: top-1 %, 10-crop / multi-scale (Tables 3, 4)"], rows)


def ensemble_line(results: dict) -> str:
    ensemble = results.get("ensemble")
    if not ensemble:
        return "Fewer than two ResNets were trained, so there is no ensemble."
    best = min((results["modes"][run_key(run)][ENSEMBLE_MODE]["top1_error"], run["label"])
               for run in results["runs"] if run["shortcut"])
    return (f"The ensemble of {', '.join(ensemble['members'])} ({ENSEMBLE_MODE}, softmax scores averaged): top-1 "
            f"{100 * ensemble['top1_error']:.2f}%, top-5 {100 * ensemble['top5_error']:.2f}%, against "
            f"{100 * best[0]:.2f}% top-1 for its best member, {best[1]} ({format_seconds(ensemble['seconds'])}). "
            "The paper's ensemble of six networks of different depths reaches 3.57% top-5 error on the ImageNet "
            "test set (Table 5).")


def report(results: dict, out: Path) -> str:
    return ("## Table 3: shortcut options\n\n" + shortcut_table(results) + "\n"
            "Errors on the held-out folder; the paper's are on ImageNet's 1,000 classes, so only their order "
            "compares: plain-34 far behind, then A, B and C within a point of each other.\n\n"
            "## Testing modes\n\n" + modes_table(results) + "\n"
            "The paper's order is multi-scale < 10-crop < center view. Multi-scale resizes each whole image to "
            "every scale of {224, 256, 384, 480, 640} times the crop size over 224.\n\n"
            "## Ensemble (Table 5)\n\n" + ensemble_line(results) + "\n")


# The networks of the shortcuts experiment: plain, then the ResNet with each option.
EXPERIMENT = Experiment(TITLE, PRESET, shortcuts.arms, report, analyse=testing_modes)
