"""Complexity of the ImageNet nets (paper Table 1): parameters and multiply-adds at 224x224, measured by a forward
pass, for both places of a bottleneck's stride-2 (the paper's first 1x1, torchvision's 3x3), beside the paper's
FLOPs. Nothing is trained.
"""

from __future__ import annotations

from pathlib import Path

from resnetlab.complexity import complexity, native_input_size
from resnetlab.experiments.runner import Arm, Experiment, Preset
from resnetlab.factory import create_model
from resnetlab.models import IMAGENET_LAYERS
from resnetlab.paper import IMAGENET_GFLOPS
from resnetlab.report import label_axes, markdown_table, new_figure, save_figure

TITLE = "Complexity of the ImageNet ResNets (paper Table 1)"
PRESET = Preset("table1", depths=tuple(IMAGENET_LAYERS))


def arms(preset: Preset) -> list[Arm]:
    return []


def analyse(preset: Preset, runs: list[dict]) -> dict:
    """One row per ImageNet ResNet and plain net of the preset's depths: params and GMACs with either stride
    placement, and the paper's figure."""
    rows = []
    for kind in ("resnet", "plain"):
        for depth in preset.depths:
            name = f"{kind}{depth}"
            on_3x3, on_1x1 = (complexity(create_model(name, stride_in_1x1=placement), native_input_size("imagenet"))
                              for placement in (False, True))
            rows.append({"name": name, "depth": depth, "params": on_3x3.params, "gmacs_stride_on_3x3": on_3x3.gmacs,
                         "gmacs_stride_on_1x1": on_1x1.gmacs,
                         "paper_gflops": IMAGENET_GFLOPS.get(depth) if kind == "resnet" else None})
    return {"table1": rows}


def report(results: dict, out: Path) -> str:
    rows = [[r["name"], r["depth"], f"{r['params'] / 1e6:.2f} M", f"{r['gmacs_stride_on_1x1']:.3f}",
             f"{r['gmacs_stride_on_3x3']:.3f}", "—" if r["paper_gflops"] is None else r["paper_gflops"]]
            for r in results["table1"]]
    table = markdown_table(["network", "layers", "params", "GMACs, stride on 1x1 (paper)",
                            "GMACs, stride on 3x3 (torchvision)", "paper GFLOPs (Table 1)"], rows)
    return ("## Table 1\n\n" + table + "\n"
            "MACs count the convolutions and the fully connected layer at 3x224x224, as the paper's FLOPs do. "
            "Plain nets have the residual nets' layers without the shortcuts, so the same MACs up to the "
            "projection shortcuts (the paper gives no figure for them).\n\n## Plot\n\n" + plot_complexity(results, out))


def plot_complexity(results: dict, out: Path) -> str:
    figure, axes = new_figure()
    ax = axes[0][0]
    resnets = [r for r in results["table1"] if r["name"].startswith("resnet")]
    depths = [r["depth"] for r in resnets]
    ax.plot(depths, [r["gmacs_stride_on_1x1"] for r in resnets], "o-", label="measured, stride on 1x1 (paper)")
    ax.plot(depths, [r["gmacs_stride_on_3x3"] for r in resnets], "s--", label="measured, stride on 3x3 (torchvision)")
    ax.plot(depths, [r["paper_gflops"] for r in resnets], "k^:", label="paper Table 1")
    label_axes(ax, "layers", "multiply-adds (G) per 224x224 image")
    return save_figure(figure, out, "table1.png",
                       "Multiply-adds of the ImageNet ResNets against depth, measured with both stride placements, "
                       "beside the paper's Table 1.")


EXPERIMENT = Experiment(TITLE, PRESET, arms, report, analyse)
