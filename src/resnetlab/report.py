"""What every experiment's report.md shares: the header (what was run, on what hardware, how long it took), mean
and spread over seeds, Markdown tables, matplotlib figures saved with the Agg backend. The body of a report is
written by the experiment's own module; `experiments.render_report` puts the two together.
"""

from __future__ import annotations

import statistics
from pathlib import Path

REPORT_NAME = "report.md"


def header(results: dict, title: str) -> str:
    preset, hw = results["preset"], results["hardware"]
    seeds = preset["seeds"]
    lines = [f"# {title}", "", f"Command: `{results['command']}`", ""]
    if results.get("so_far"):
        reached = ", ".join(f"{run} {iteration:,}" for run, iteration in results["so_far"]["reached"].items())
        lines += [f"**In progress.** Every error below is at iteration {results['so_far']['iteration']:,} of "
                  f"{preset['iterations']:,}, the furthest all runs have reached, and the training error there is the "
                  f"running error of the training batches. The curves go as far as each run has: {reached}. What is "
                  f"measured on the networks themselves uses each run's latest checkpoint."
                  + (f" Not started yet, so not below: {', '.join(results['so_far']['not_started'])}."
                     if results["so_far"].get("not_started") else ""), ""]
    if results["runs"]:
        lines += [f"- Runs: {len(results['runs'])} ({len(group_by_label(results['runs']))} networks x {seeds} "
                  f"seed{'s' if seeds > 1 else ''}), each {preset['iterations']:,} iterations of the "
                  f"`{preset['recipe']}` recipe ({schedule_words(preset)}), the same for every network",
                  f"- Data: `{preset['data']}`"
                  + (f" ({results['data_note']})" if results.get("data_note") else ""),
                  f"- Training time: {format_seconds(results['training_seconds'])} in total (sum over runs); "
                  f"this invocation: {format_seconds(results['wall_seconds'])} (runs finished earlier are reused)"]
    else:
        lines += [f"- Wall time: {format_seconds(results['wall_seconds'])}"]
    lines += [f"- Hardware: {hw['cpu']}, {hw['cores']} cores ({hw['torch_threads']} torch threads)"
              + (f", GPU {hw['cuda']}" if hw.get("cuda") else "") + f"; torch {hw['torch']}, Python {hw['python']}",
              "", ""]
    return "\n".join(lines)


def schedule_words(preset: dict) -> str:
    """How the experiment's runs set the lr, and the image resolution where it is not the recipe's own."""
    drops = preset.get("lr_drops")
    words = (f"lr / 10 at {' and '.join(f'{100 * fraction:g}%' for fraction in drops)} of the iterations" if drops
             else "lr milestones scaled to the run length")
    ramp = preset.get("lr_ramp")
    words += f", after a linear lr ramp over the first {100 * ramp:g}%" if ramp else ""
    resolution = preset.get("resolution", 1)
    return words + (f", image sizes x {resolution:g}" if resolution != 1 else "")


def format_seconds(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes else f"{seconds:.1f} s"


# ---------------------------------------------------------------------------------------------------------------
# Numbers over seeds


def group_by_label(runs: list[dict]) -> dict[str, list[dict]]:
    """Runs grouped by network (label), in the order the networks were first trained."""
    groups: dict[str, list[dict]] = {}
    for run in runs:
        groups.setdefault(run["label"], []).append(run)
    return groups


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def percent(values: list[float]) -> str:
    """'12.34 ± 0.56' (%) over seeds, or '12.34' for one seed."""
    mean, std = mean_std(values)
    return f"{100 * mean:.2f} ± {100 * std:.2f}" if len(values) > 1 else f"{100 * mean:.2f}"


def mean_curve(runs: list[dict], name: str) -> tuple[list[float], list[float]]:
    """The seeds' mean of a curve ('train_error' or 'test_error'): iterations and error in %."""
    curves = [run["curves"][name] for run in runs]
    length = min(len(curve) for curve in curves)  # equal for runs of one preset
    iterations = [point[0] for point in curves[0][:length]]
    errors = [100 * statistics.fmean(curve[i][1] for curve in curves) for i in range(length)]
    return iterations, errors


def markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# Figures


def new_figure(columns: int = 1, rows: int = 1, size: tuple[float, float] | None = None):
    import matplotlib

    matplotlib.use("Agg")  # files only: no display is needed or wanted
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(rows, columns, figsize=size or (5.5 * columns, 4 * rows), squeeze=False)
    return figure, axes


def label_axes(ax, xlabel: str, ylabel: str, legend_size: float | None = None) -> None:
    """The finish every plot shares: axis labels, a light grid and the legend."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)


def save_figure(figure, out: Path, name: str, caption: str) -> str:
    """Save as OUT/NAME and return the Markdown that shows it."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    figure.savefig(out / name, dpi=110)
    plt.close(figure)
    return f"![{caption}]({name})\n\n*{caption}*\n"
