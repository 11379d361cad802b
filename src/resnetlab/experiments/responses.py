"""Layer responses (paper Sec. 4.2, Fig. 7): the standard deviation of each 3x3 layer's response.

A response is a 3x3 conv's output after its BN and before the ReLU or the shortcut addition: in a BasicBlock,
the outputs of `bn1` and `bn2`. They are read with forward hooks on trained plain and residual nets, in eval mode,
on held-out (test) images; the std is taken over all the response's elements. The paper finds the ResNets'
responses generally smaller than the plain nets', and smaller the deeper the ResNet: the residual functions are
closer to zero than non-residual ones.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import torch

from resnetlab.data.augment import Normalize
from resnetlab.data.spec import load_dataset
from resnetlab.experiments.runner import Arm, Experiment, Preset
from resnetlab.factory import load_model
from resnetlab.models import BasicBlock
from resnetlab.report import group_by_label, label_axes, markdown_table, new_figure, save_figure

TITLE = "Layer responses of plain and residual nets (paper Fig. 7)"
PRESET = Preset("responses", depths=(20, 56), iterations=2000)
HELD_OUT_IMAGES = 500


def arms(preset: Preset) -> list[Arm]:
    return [Arm(f"{kind}{depth}") for kind in ("plain", "resnet") for depth in preset.depths]


@torch.no_grad()
def response_stds(model: torch.nn.Module, images: torch.Tensor) -> list[float]:
    """The std of every BasicBlock's bn1 and bn2 output on `images` (normalized), in layer order."""
    layers = [bn for block in model.modules() if isinstance(block, BasicBlock) for bn in (block.bn1, block.bn2)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no BasicBlocks: Fig. 7 is about the 3x3 layers of CIFAR nets")
    stds = [math.nan] * len(layers)  # a layer whose hook never fired stays NaN, not a plausible number

    def recorder(index: int):
        def record(module, inputs, output: torch.Tensor) -> None:
            stds[index] = output.float().std().item()  # now: the block's in-place ReLU overwrites bn1's output

        return record

    hooks = [bn.register_forward_hook(recorder(index)) for index, bn in enumerate(layers)]
    try:
        model.eval()(images)
    finally:
        for hook in hooks:
            hook.remove()
    return stds


def analyse(preset: Preset, runs: list[dict]) -> dict:
    """Adds `response_std` (one per 3x3 layer, in order) to every run."""
    test = load_dataset(preset.data).test
    images, _ = next(test.evaluation_batches(HELD_OUT_IMAGES))
    for run in runs:
        model, state = load_model(run["run_dir"])
        run["response_std"] = response_stds(model, Normalize.from_state_dict(state["normalize"])(images))
    return {"held_out_images": len(images)}


def mean_over_seeds(group: list[dict]) -> list[float]:
    return [statistics.fmean(values) for values in zip(*(run["response_std"] for run in group))]


def report(results: dict, out: Path) -> str:
    groups = group_by_label(results["runs"])
    means = {label: mean_over_seeds(group) for label, group in groups.items()}
    rows = [[label, len(stds), f"{statistics.fmean(stds):.3f}", f"{max(stds):.3f}", f"{min(stds):.3f}"]
            for label, stds in means.items()]
    table = markdown_table(["network", "3x3 layers", "mean response std", "largest", "smallest"], rows)
    return ("## Response magnitudes\n\n"
            f"Std of each 3x3 layer's response (after BN, before ReLU/addition) on {results['held_out_images']} "
            "held-out images, mean over seeds.\n\n" + table + "\n" + comparison(means) + "\n\n## Plot\n\n"
            + plot_responses(means, out))


def comparison(means: dict[str, list[float]]) -> str:
    """The paper's two observations, checked on the mean response std."""
    average = {label: statistics.fmean(stds) for label, stds in means.items()}
    lines = ["Paper: ResNets respond less than plain nets of the same depth, and deeper ResNets respond less."]
    for label in average:
        if label.startswith("resnet") and f"plain{label.removeprefix('resnet')}" in average:
            plain = f"plain{label.removeprefix('resnet')}"
            holds = "holds" if average[label] < average[plain] else "does not hold"
            lines.append(f"- {label} {average[label]:.3f} vs {plain} {average[plain]:.3f}: {holds}")
    resnets = sorted((int(label.removeprefix("resnet")), label) for label in average if label.startswith("resnet"))
    for (_, shallow), (_, deep) in zip(resnets, resnets[1:]):
        holds = "holds" if average[deep] < average[shallow] else "does not hold"
        lines.append(f"- {deep} {average[deep]:.3f} vs {shallow} {average[shallow]:.3f}: {holds}")
    return "\n".join(lines) + "\n"


def plot_responses(means: dict[str, list[float]], out: Path) -> str:
    """Paper Fig. 7: top, in the layers' order; bottom, sorted in descending order."""
    figure, axes = new_figure(rows=2, size=(7, 7))
    for index, (label, stds) in enumerate(means.items()):
        style = dict(color=f"C{index}", linestyle="--" if label.startswith("plain") else "-", label=label)
        axes[0][0].plot(range(1, len(stds) + 1), stds, **style)
        axes[1][0].plot(range(1, len(stds) + 1), sorted(stds, reverse=True), **style)
    for ax, order in zip((axes[0][0], axes[1][0]), ("layer index (original order)", "layer index (sorted by std)")):
        label_axes(ax, order, "std of the response", legend_size=8)
    return save_figure(figure, out, "responses.png",
                       "Standard deviation of each 3x3 layer's response on held-out images: in layer order (top) "
                       "and sorted (bottom); plain nets dashed, ResNets solid (paper Fig. 7).")


EXPERIMENT = Experiment(TITLE, PRESET, arms, report, analyse)
