"""Degradation (paper Sec. 4.2, Fig. 6; Fig. 4 on ImageNet): deeper plain nets train *worse*, deeper ResNets do not.

Plain and residual CIFAR nets of every depth are trained with the same recipe, data, iterations and seeds. The
paper's claim is about the training error: plain-56 ends above plain-20, while ResNet-56 ends at or below
ResNet-20. The check below compares the deepest with the shallowest net of each kind, seed by seed.
"""

from __future__ import annotations

from pathlib import Path

from resnetlab.experiments.runner import Arm, Experiment, Preset
from resnetlab.paper import CIFAR_TEST_ERROR
from resnetlab.recipes import TrainConfig
from resnetlab.report import (
    group_by_label,
    label_axes,
    markdown_table,
    mean_curve,
    mean_std,
    new_figure,
    percent,
    save_figure,
)

TITLE = "Degradation: plain vs residual nets of increasing depth (paper Fig. 6)"
PRESET = Preset("degradation", depths=(20, 32, 44, 56), iterations=2000)
KINDS = ("plain", "resnet")  # plain on the left, residual on the right, as in the paper


def arms(preset: Preset) -> list[Arm]:
    return [Arm(f"{kind}{depth}") for kind in KINDS for depth in preset.depths]


def depth_gaps(runs: list[dict], kind: str, error_key: str = "final_train_error") -> dict | None:
    """Final error (training, or `error_key`) of the deepest minus the shallowest `kind` net, per seed (None with one
    depth)."""
    depths = sorted({int(run["model"].removeprefix(kind)) for run in runs if run["model"].startswith(kind)})
    if len(depths) < 2:
        return None
    error = {(run["model"], run["seed"]): run[error_key] for run in runs}
    shallow, deep = f"{kind}{depths[0]}", f"{kind}{depths[-1]}"
    seeds = sorted({seed for model, seed in error if model == shallow}
                   & {seed for model, seed in error if model == deep})
    gaps = [error[deep, seed] - error[shallow, seed] for seed in seeds]
    mean, std = mean_std(gaps)
    return {"shallow": shallow, "deep": deep, "gaps": gaps, "mean": mean, "std": std}


def effect_verdict(runs: list[dict]) -> tuple[bool | None, str]:
    """Whether the paper's effect shows, and a sentence that says how strongly (None: not enough depths)."""
    plain, residual = depth_gaps(runs, "plain"), depth_gaps(runs, "resnet")
    if plain is None or residual is None:
        return None, "Only one depth was trained, so there is no depth comparison to make."
    plain_shows = all(gap > 0 for gap in plain["gaps"])
    residual_shows = residual["mean"] <= 0
    seeds = len(plain["gaps"])
    spread = f"mean ± std over {seeds} seeds" if seeds > 1 else "one seed, so no spread"
    sentence = (f"Final training error, {plain['deep']} minus {plain['shallow']}: {points(plain)} points; "
                f"{residual['deep']} minus {residual['shallow']}: {points(residual)} points "
                f"({spread}; per seed: plain {', '.join(f'{100 * g:+.2f}' for g in plain['gaps'])}, residual "
                f"{', '.join(f'{100 * g:+.2f}' for g in residual['gaps'])}). ")
    if plain_shows and residual_shows:
        return True, sentence + ("**The paper's effect shows**: the deeper plain net ends with a higher training "
                                 "error in every seed, and the deeper ResNet ends at or below the shallower one.")
    missing = ([] if plain_shows else [f"{plain['deep']} is not above {plain['shallow']} in every seed"]) + \
              ([] if residual_shows else [f"{residual['deep']} ends above {residual['shallow']} on average"])
    return False, sentence + f"**The paper's effect does not show at this budget**: {'; '.join(missing)}."


def points(gap: dict) -> str:
    return f"{100 * gap['mean']:+.2f}" + (f" ± {100 * gap['std']:.2f}" if len(gap["gaps"]) > 1 else "")


def paper_figure(model: str) -> str:
    if model.startswith("plain"):
        return "not tabulated (Fig. 6: rises with depth)"
    depth = int(model.removeprefix("resnet"))
    return f"{CIFAR_TEST_ERROR[depth]:.2f}" if depth in CIFAR_TEST_ERROR else "—"


def results_table(runs: list[dict]) -> str:
    rows = [[label, f"{group[0]['params'] / 1e6:.2f} M", percent([r["final_train_error"] for r in group]),
             percent([r["final_test_error"] for r in group]), paper_figure(group[0]["model"])]
            for label, group in group_by_label(runs).items()]
    return markdown_table(["network", "params", "final train error %", "final test error %",
                           "paper, CIFAR-10 test error % (Table 6)"], rows)


def plot_curves(runs: list[dict], out: Path, *, file_name: str = "degradation.png", paper_figure: str = "Fig. 6",
                held_out: str = "test") -> str:
    """Paper Fig. 6 (Fig. 4 on ImageNet): training error dashed, `held_out` error bold, one colour per depth; plain
    left, residual right."""
    groups = group_by_label(runs)
    figure, axes = new_figure(columns=len(KINDS))
    for ax, kind in zip(axes[0], KINDS):
        for index, (label, group) in enumerate((name, g) for name, g in groups.items() if name.startswith(kind)):
            colour = f"C{index}"
            ax.plot(*mean_curve(group, "train_error"), "--", color=colour, linewidth=1, label=f"{label} train")
            ax.plot(*mean_curve(group, "test_error"), "-", color=colour, linewidth=2, label=f"{label} {held_out}")
        ax.set_title("plain networks" if kind == "plain" else "residual networks (ResNets)")
        ax.set_ylim(bottom=0)
        label_axes(ax, "iterations", "error (%)", legend_size=7)
    return save_figure(figure, out, file_name,
                       f"Training error (dashed, running mean of the training batches) and {held_out} error (bold) "
                       f"against iterations, mean over seeds. Left: plain nets; right: ResNets (paper {paper_figure}).")


def report(results: dict, out: Path) -> str:
    runs = results["runs"]
    _, verdict = effect_verdict(runs)
    measured = ("" if results.get("so_far") else
                f"The final training error is measured in eval mode on the first {TrainConfig.train_eval_size:,} "
                "(un-augmented) training images, or all of them in smaller sets; the curves' training error is the "
                "running error of the augmented training batches, as in the paper.\n\n")
    return ("## Final errors\n\n" + results_table(runs) + "\n" + measured +
            "## Does the degradation problem show?\n\n" + verdict + "\n\n## Curves\n\n" + plot_curves(runs, out))


EXPERIMENT = Experiment(TITLE, PRESET, arms, report)
