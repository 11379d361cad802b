"""Shortcut options (paper Sec. 3.3 / Table 3): identity with zero-padding (A), projections where the shape changes
(B), projections everywhere (C), and the plain net, at the same depth, recipe, data and iterations.

The paper compares them as ResNet-34 on ImageNet; here they are CIFAR nets (default depth 20), so the paper's
numbers are set beside ours for their order (plain worst, then A > B > C by small margins), not their values.
"""

from __future__ import annotations

from pathlib import Path

from resnetlab.experiments.runner import Arm, Experiment, Preset
from resnetlab.models import SHORTCUTS
from resnetlab.paper import SHORTCUT_TOP1_ERROR
from resnetlab.report import group_by_label, markdown_table, mean_std, new_figure, percent, save_figure

TITLE = "Shortcut options A, B, C and the plain net (paper Table 3)"
PRESET = Preset("shortcuts", depths=(20,), iterations=2000)


def arms(preset: Preset) -> list[Arm]:
    return [arm for depth in preset.depths
            for arm in [Arm(f"plain{depth}"), *(Arm(f"resnet{depth}", option) for option in SHORTCUTS)]]


def variant(run: dict) -> str:
    return run["shortcut"] or "plain"


def report(results: dict, out: Path) -> str:
    groups = group_by_label(results["runs"])
    rows = [[label, variant(group[0]), f"{group[0]['params']:,}", percent([r["final_train_error"] for r in group]),
             percent([r["final_test_error"] for r in group]), f"{SHORTCUT_TOP1_ERROR[variant(group[0])]:.2f}"]
            for label, group in groups.items()]
    table = markdown_table(["network", "shortcut", "params", "final train error %", "final test error %",
                            "paper: ResNet-34 / plain-34 ImageNet top-1 % (Table 3)"], rows)
    return ("## Final errors\n\n" + table + "\n"
            "The paper's gaps between A, B and C are small (0.3 to 0.8 points on ImageNet) next to the gap to the "
            "plain net (3.5 points); at a small budget the spread over seeds can be as large as the A/B/C gaps.\n\n"
            "## Plot\n\n" + plot_errors(groups, out))


def plot_errors(groups: dict[str, list[dict]], out: Path) -> str:
    figure, axes = new_figure()
    ax = axes[0][0]
    labels = list(groups)
    for offset, (key, name) in ((-0.2, ("final_train_error", "train")), (0.2, ("final_test_error", "test"))):
        stats = [mean_std([100 * r[key] for r in groups[label]]) for label in labels]
        ax.bar([i + offset for i in range(len(labels))], [m for m, _ in stats], width=0.4,
               yerr=[s for _, s in stats], capsize=3, label=f"final {name} error")
    ax.set_xticks(range(len(labels)), labels, rotation=20)
    ax.set_xlabel("network (shortcut option)")
    ax.set_ylabel("error (%)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    return save_figure(figure, out, "shortcuts.png",
                       "Final training and test error of the plain net and of ResNets with shortcut options A, B "
                       "and C (mean over seeds; bars: std).")


EXPERIMENT = Experiment(TITLE, PRESET, arms, report)
