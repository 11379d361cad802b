"""Error against depth (paper Table 6): ResNets of 20 to 110 layers (1202 when asked) with the same recipe.

The paper's CIFAR-10 test errors fall from 8.75% (20 layers) to 6.43% (110) and rise again at 1202 (7.93%,
overfitting). Parameters are counted on the networks as trained (1-channel input for MNIST and digits, so a few
hundred fewer than the paper's 3-channel counts).
"""

from __future__ import annotations

from pathlib import Path

from resnetlab.experiments.runner import Arm, Experiment, Preset
from resnetlab.paper import CIFAR_PARAMS_M, CIFAR_REPRODUCTION_TEST_ERROR, CIFAR_TEST_ERROR
from resnetlab.report import group_by_label, label_axes, markdown_table, mean_std, new_figure, percent, save_figure

TITLE = "Error against depth (paper Table 6)"
PRESET = Preset("depth", depths=(20, 32, 44, 56, 110), iterations=2000)


def arms(preset: Preset) -> list[Arm]:
    return [Arm(f"resnet{depth}") for depth in preset.depths]


def depth_of(run: dict) -> int:
    return int(run["model"].removeprefix("resnet"))


def report(results: dict, out: Path) -> str:
    groups = group_by_label(results["runs"])
    rows = []
    for label, group in groups.items():
        depth = depth_of(group[0])
        rows.append([label, depth, f"{group[0]['params'] / 1e6:.3f} M", f"{CIFAR_PARAMS_M.get(depth, '—')} M",
                     f"{group[0]['iterations']:,}", percent([r["final_train_error"] for r in group]),
                     percent([r["final_test_error"] for r in group]), CIFAR_TEST_ERROR.get(depth, "—"),
                     CIFAR_REPRODUCTION_TEST_ERROR.get(depth, "—")])
    table = markdown_table(["network", "layers", "params", "paper params", "iterations", "final train error %",
                            "final test error %", "paper CIFAR-10 test error %",
                            "best-known reproduction, CIFAR-10 test error %"], rows)
    return "## Final errors\n\n" + table + "\n## Plot\n\n" + plot_depth(groups, out)


def plot_depth(groups: dict[str, list[dict]], out: Path) -> str:
    figure, axes = new_figure()
    ax = axes[0][0]
    depths = [depth_of(group[0]) for group in groups.values()]
    for key, name, style in (("final_train_error", "train error", "s--"), ("final_test_error", "test error", "o-")):
        stats = [mean_std([100 * r[key] for r in group]) for group in groups.values()]
        ax.errorbar(depths, [m for m, _ in stats], yerr=[s for _, s in stats], fmt=style, capsize=3,
                    label=f"measured {name}")
    paper_depths = [d for d in depths if d in CIFAR_TEST_ERROR]
    ax.plot(paper_depths, [CIFAR_TEST_ERROR[d] for d in paper_depths], "k^:", label="paper test error (CIFAR-10)")
    ax.set_xscale("log")
    ax.set_xticks(depths, [str(d) for d in depths])
    ax.minorticks_off()  # the log axis's own labels (3x10^1, ...) would overlap the depths
    ax.set_ylim(bottom=0)  # the paper's errors sit below the measured ones: keep the legend clear of them
    label_axes(ax, "layers", "error (%)")
    return save_figure(figure, out, "depth.png",
                       "Final error against depth (mean over seeds; bars: std), beside the paper's CIFAR-10 test "
                       "errors (Table 6).")


EXPERIMENT = Experiment(TITLE, PRESET, arms, report)
