"""The paper's experiments, one module each, ending in its `Experiment`: the preset (data), the arms (the
networks it trains), what it computes from them and its report.

    reproduce("degradation", "out/deg", data="mnist:../shared/data/mnist", iterations=1000, seeds=2)

trains every run (resumably, see `runner`), writes out/deg/results.json and renders report.md and the plots.
`demo()` is the degradation experiment at the smallest budget that shows the paper's effect on the embedded
digits data on a 2-core CPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from resnetlab.experiments import degradation, depth, jpeg_cost, responses, shortcuts, table1, table2, table3
from resnetlab.experiments.runner import (
    Preset,
    check_preset,
    read_results,
    run_key,
    runs_so_far,
    train_arms,
    write_results,
)
from resnetlab.report import REPORT_NAME, header

EXPERIMENTS = {module.EXPERIMENT.name: module.EXPERIMENT
               for module in (table1, degradation, shortcuts, depth, responses, table2, table3, jpeg_cost)}

# Calibrated on digits (docs/reproduction.md, "Calibrating the demo budget", with the measured errors and times):
# ResNet-56 learns slowly on 8x8 images and reaches ResNet-20's 0% training error only at about 2,000 iterations,
# while plain-56 is still far above plain-20. Two seeds give a spread, and the budget keeps the demo short on a
# 2-core CPU.
DEMO_PRESET = replace(degradation.PRESET, data="digits", depths=(20, 56), iterations=2000, seeds=2)
DEMO_OUT = "resnetlab-demo"


def reproduce(name: str, out: str | Path, *, data: str | None = None, iterations: int | None = None,
              seeds: int | None = None, depths: tuple[int, ...] | None = None, resolution: float | None = None,
              runs_dir: str | Path | None = None, progress: bool = True, log: Callable[[str], None] = print,
              preset: Preset | None = None,
              command: str | None = None, so_far: bool = False, parallel: int = 1, cuda_graphs: bool = False) -> dict:
    """Run experiment `name` into `out` (the preset's settings, overridden by the arguments given); return results.
    With `so_far`, train nothing and report the runs as they stand (runner.runs_so_far). `parallel` and
    `cuda_graphs` change only how fast the runs train (runner.train_arms), not what they compute."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose one of {', '.join(EXPERIMENTS)}")
    experiment = EXPERIMENTS[name]
    overrides = {"data": data, "iterations": iterations, "seeds": seeds, "depths": depths, "resolution": resolution}
    preset = replace(preset or experiment.preset, **{k: v for k, v in overrides.items() if v is not None})
    check_preset(preset)
    out = Path(out)
    runs_dir = Path(runs_dir) if runs_dir is not None else out / "runs"
    started = time.perf_counter()
    arms = experiment.arms(preset)
    if so_far:
        runs, not_started = runs_so_far(preset, arms, runs_dir)
        extra = {"so_far": {"iteration": runs[0]["iterations"], "not_started": not_started,
                            "reached": {run_key(run): run["reached"] for run in runs}}}
    else:
        runs = train_arms(preset, arms, runs_dir, progress=progress, log=log, parallel=parallel,
                          cuda_graphs=cuda_graphs)
        extra = {}
    extra.update(experiment.analyse(preset, runs))
    training = f" --data {preset.data} --iterations {preset.iterations} --seeds {preset.seeds}" if arms else ""
    command = command or (f"resnetlab reproduce {name} --out {out}{training} "
                          f"--depths {','.join(map(str, preset.depths))}"
                          + (f" --resolution {preset.resolution:g}"
                             if preset.resolution != experiment.preset.resolution else "")
                          + (f" --runs-dir {runs_dir}" if runs_dir != out / "runs" else "")
                          + (" --so-far" if so_far else ""))
    results = write_results(out, preset, runs, started, command, **extra)
    render_report(out)
    return results


def render_report(out: str | Path) -> Path:
    """Write DIR/report.md and DIR/*.png from DIR/results.json; return the report's path."""
    out = Path(out)
    results = read_results(out)
    name = results["experiment"]
    if name not in EXPERIMENTS:
        raise ValueError(f"{out}/results.json is from experiment {name!r}, which is not one of "
                         f"{', '.join(EXPERIMENTS)}")
    experiment = EXPERIMENTS[name]
    report = out / REPORT_NAME
    report.write_text(header(results, experiment.title) + experiment.report(results, out))
    return report


def demo(out: str | Path = DEMO_OUT, *, progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """The paper's degradation effect on the embedded digits data: plain20/56 and resnet20/56, same budget."""
    return reproduce("degradation", out, preset=DEMO_PRESET, progress=progress, log=log,
                     command=f"resnetlab demo --out {out}")
