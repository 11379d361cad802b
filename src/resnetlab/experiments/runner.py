"""What every experiment shares: its preset (data), training its runs resumably, and the results.json it writes.

An experiment trains a list of *arms* (a named model, optionally with another shortcut option), each once per
seed, into RUNS/<arm>-s<seed>/ with `resnetlab.train.train`. A run whose summary.json exists is not trained again
(after checking that it was trained with the same settings); a run with only a checkpoint is resumed from it.
Runs are trained one after the other, or with `parallel` several at once in worker processes (for a GPU: on a
small CPU, parallel runs only compete for the same cores).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import platform
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from resnetlab.checkpoint import checkpoint_path
from resnetlab.data.spec import DatasetSpec
from resnetlab.errors import RunStopped
from resnetlab.factory import load_model
from resnetlab.files import write_json_atomically
from resnetlab.inference import evaluate_checkpoints
from resnetlab.recipes import COMPUTE_KEYS, TrainConfig, check_positive_int, resolve_config
from resnetlab.train import resume_config, train

RESULTS_NAME = "results.json"


@dataclass(frozen=True)
class Arm:
    """One network an experiment trains: a named model, with its default shortcut unless `shortcut` is given, on the
    preset's data unless `data` (a dataset spec) is given."""

    model: str
    shortcut: str | None = None
    data: str | None = None

    @property
    def label(self) -> str:
        """The run directory's name without the seed: 'resnet20', 'resnet34-B', 'resnet20-cifar-official'."""
        return "-".join(part for part in (self.model, self.shortcut, self.data and data_name(self.data)) if part)


def data_name(spec: str) -> str:
    """A dataset spec's short name: its folder's name ('cifar-official'), or its kind where it has no path."""
    kind, path = DatasetSpec.parse(spec)
    return path.name if path else kind


@dataclass(frozen=True)
class Preset:
    """Everything an experiment's runs use. Every arm gets the same data, recipe, iterations and seeds."""

    experiment: str
    data: str = "digits"
    recipe: str = "cifar"
    iterations: int = 1000
    seeds: int = 1  # seeds 0 .. seeds-1
    depths: tuple[int, ...] = (20, 32, 44, 56)
    evaluations: int = 20  # test-error points along each curve (the last one is the final test error)
    curve_points: int = 100  # training-error points along each curve
    checkpoint_every: int = 500  # an interrupted run resumes from its last checkpoint, losing fewer iterations
    resolution: float = 1.0  # image folders: the recipe's image sizes times this (Recipe.resolution)
    # Fractions of the iterations at which the lr is divided by 10, in place of the recipe's own schedule (None: the
    # recipe's). The ImageNet recipe's "divide when the error plateaus" drops each network at its own moment; at a
    # short budget fixed drops give every network the same schedule, as the paper's Fig. 4 curves show theirs.
    lr_drops: tuple[float, ...] | None = None
    # The fraction of the iterations over which the lr rises linearly to its value (Recipe.ramp_iterations; 0: none).
    lr_ramp: float = 0.0

    def configure(self, arm: Arm, seed: int, out: Path) -> TrainConfig:
        schedule = {} if self.lr_drops is None else {
            "lr_milestones": tuple(round(self.iterations * fraction) for fraction in self.lr_drops),
            "plateau_patience": 0}
        if self.lr_ramp:
            schedule["ramp_iterations"] = round(self.iterations * self.lr_ramp)
        return resolve_config(self.recipe, model=arm.model, shortcut=arm.shortcut, data=arm.data or self.data,
                              out=str(out),
                              iterations=self.iterations, seed=seed, resolution=self.resolution,
                              eval_every=max(1, self.iterations // self.evaluations),
                              checkpoint_every=min(self.checkpoint_every, self.iterations),
                              log_every=max(1, self.iterations // self.curve_points), **schedule)


def no_analysis(preset: Preset, runs: list[dict]) -> dict:
    return {}


@dataclass(frozen=True)
class Experiment:
    """One of the paper's experiments: its default preset, the networks it trains, what it computes from the trained
    runs (added to results.json) and the body of its report (tables beside the paper's figures, plots)."""

    title: str
    preset: Preset
    arms: Callable[[Preset], list[Arm]]
    report: Callable[[dict, Path], str]
    analyse: Callable[[Preset, list[dict]], dict] = no_analysis

    @property
    def name(self) -> str:
        return self.preset.experiment


def check_preset(preset: Preset) -> None:
    check_positive_int("seeds", preset.seeds)
    if not preset.depths or any(isinstance(d, bool) or not isinstance(d, int) for d in preset.depths):
        raise ValueError(f"--depths must be a comma-separated list of depths, got {preset.depths!r}")


def train_arms(preset: Preset, arms: list[Arm], runs_dir: Path, *, progress: bool = True,
               log: Callable[[str], None] = print, parallel: int = 1, cuda_graphs: bool = False) -> list[dict]:
    """Train (or skip, or resume) every arm for every seed, seed by seed, and return one entry per run.

    Every run's directory is checked before any training starts. With `parallel` > 1, up to that many runs train at
    once, in as many worker processes: one small CIFAR net leaves most of a GPU idle (best under CUDA MPS), so
    several together finish sooner; on a small CPU they only share the cores. A run that fails does not stop the
    others; the failures are raised together at the end."""
    check_positive_int("parallel", parallel)
    planned = [(arm, seed) for seed in range(preset.seeds) for arm in arms]
    summaries, to_train = {}, []
    for number, (arm, seed) in enumerate(planned, start=1):
        out = run_dir(runs_dir, arm, seed)
        config = replace(preset.configure(arm, seed, out), cuda_graphs=cuda_graphs)
        summary_file = out / "summary.json"
        if summary_file.is_file():
            summary = json.loads(summary_file.read_text())
            check_same_settings(TrainConfig.from_dict(summary["config"]), config, out)
            log(f"[{number}/{len(planned)}] {arm.label} seed {seed}: done earlier, kept ({out})")
            summaries[arm, seed] = summary
            continue
        resume = checkpoint_path(out).is_file()
        if resume:
            check_same_settings(resume_config(out), config, out)
        to_train.append((f"[{number}/{len(planned)}] {arm.label} seed {seed}", (arm, seed), config, resume))
    if parallel == 1 or len(to_train) <= 1:
        for name, key, config, resume in to_train:
            log(start_line(name, preset, config, resume))
            try:
                summaries[key] = train(config, resume=resume, progress=progress)
            except RunStopped as stopped:  # Ctrl-C: the run saved where it was, and so did every run before it
                raise RunStopped(f"{stopped}; the same command again continues the whole experiment",
                                 stopped.signal_number) from None
            log(f"    {result_line(summaries[key])}")
    else:
        summaries.update(train_in_processes(to_train, preset, parallel, log))
    return [run_entry(arm, seed, summaries[arm, seed], run_dir(runs_dir, arm, seed)) for arm, seed in planned]


def run_name(label: str, seed: int) -> str:
    """A run's directory name, which is also its key in an experiment's results: 'resnet34-A-s0'."""
    return f"{label}-s{seed}"


def run_dir(runs_dir: Path, arm: Arm, seed: int) -> Path:
    return runs_dir / run_name(arm.label, seed)


def start_line(name: str, preset: Preset, config: TrainConfig, resume: bool) -> str:
    action = "resuming" if resume else "training"
    return f"{name}: {action} {preset.iterations} iterations on {config.data} -> {config.out}"


def result_line(summary: dict) -> str:
    return (f"train error {100 * summary['train_top1_error']:.2f}%, "
            f"test error {100 * summary['test_top1_error']:.2f}%, {summary['wall_seconds']:.0f} s")


def train_in_processes(to_train: list, preset: Preset, parallel: int, log: Callable[[str], None]) -> dict:
    """Train the runs `parallel` at a time in as many worker processes, which share the CPU threads."""
    threads = max(1, torch.get_num_threads() // parallel)
    spawn = multiprocessing.get_context("spawn")  # a forked process cannot use CUDA
    summaries, failures = {}, {}
    with ProcessPoolExecutor(parallel, mp_context=spawn, initializer=torch.set_num_threads,
                             initargs=(threads,)) as pool:
        futures = {}
        for name, key, config, resume in to_train:
            log(f"{start_line(name, preset, config, resume)} (in parallel)")
            futures[pool.submit(train, config, resume=resume, progress=False)] = name, key
        for future in as_completed(futures):
            name, key = futures[future]
            try:
                summaries[key] = future.result()
            except Exception as error:  # the other runs go on; all failures are raised below
                failures[name] = error
                log(f"{name}: failed: {error}")
            else:
                log(f"{name}: {result_line(summaries[key])}")
    if failures:
        listed = "; ".join(f"{name}: {failures[name]}" for name, *_ in to_train if name in failures)
        raise RuntimeError(f"{len(failures)} of {len(to_train)} runs failed (finished runs are kept; run the same "
                           f"command again to retry the others): {listed}")
    return summaries


def runs_so_far(preset: Preset, arms: list[Arm], runs_dir: Path) -> tuple[list[dict], list[str]]:
    """Every planned run that has started, trained or still training, with its errors taken at the furthest
    iteration that all of them have logged (runs at different iterations are not comparable): a report on a long
    reproduction before it ends; and the names of the runs not started yet (no checkpoint and metrics). Trains
    nothing. The training error there is the running error of the training batches (the curves' kind), not the
    final eval-mode error on the training set."""
    found, not_started = [], []
    for arm, seed in [(arm, seed) for seed in range(preset.seeds) for arm in arms]:
        out = run_dir(runs_dir, arm, seed)
        if not checkpoint_path(out).is_file() or not (out / "metrics.jsonl").is_file():
            not_started.append(out.name)
            continue
        model, state = load_model(out)
        check_same_settings(TrainConfig.from_dict({**state["config"], "out": str(out)}),
                            preset.configure(arm, seed, out), out)
        found.append((arm, seed, out, model, state, *read_curves(out / "metrics.jsonl")))
    if not found:
        raise FileNotFoundError(f"no run in {runs_dir} has a checkpoint and metrics yet: start the experiment first "
                                "(without --so-far)")
    common = min(train_curve[-1][0] for *_, train_curve, _ in found)
    entries = []
    for arm, seed, out, model, state, train_curve, test_curve in found:
        tests = [error for iteration, error in test_curve if iteration <= common]
        if not tests:
            raise ValueError(f"{out} has no test error at or before iteration {common:,}, the furthest all runs "
                             f"have reached; wait for its first evaluation")
        entries.append({
            **describe_run(arm, seed, out, model, state["config"]["data"], state["data_note"],
                           (train_curve, test_curve)),
            "iterations": common, "reached": train_curve[-1][0],
            "final_train_error": [error for iteration, error in train_curve if iteration <= common][-1],
            "final_test_error": tests[-1], "wall_seconds": state["elapsed_seconds"],
        })
    return entries, not_started


def check_same_settings(found: TrainConfig, wanted: TrainConfig, out: Path) -> None:
    """A run directory from other settings must not pass for this experiment's run. Where and how fast it was
    computed (COMPUTE_KEYS: device, CUDA graphs, ...) does not matter."""
    found_values, wanted_values = found.to_dict(), wanted.to_dict()
    differing = sorted(key for key in wanted_values if key not in ("out", *COMPUTE_KEYS)
                       and found_values.get(key) != wanted_values[key])
    if differing:
        details = ", ".join(f"{key} {found_values.get(key)!r} (wanted {wanted_values[key]!r})" for key in differing)
        raise ValueError(f"{out} holds a run with other settings: {details}; delete it or use another --out")


def run_entry(arm: Arm, seed: int, summary: dict, out: Path) -> dict:
    """A finished run as results.json records it: describe_run and its final errors."""
    model, _ = load_model(out)
    return {**describe_run(arm, seed, out, model, summary["config"]["data"], summary["data_note"],
                           read_curves(out / "metrics.jsonl")),
            "iterations": summary["iterations"], "final_train_error": summary["train_top1_error"],
            "final_test_error": summary["test_top1_error"], "wall_seconds": summary["wall_seconds"]}


def describe_run(arm: Arm, seed: int, out: Path, model: torch.nn.Module, data: str, data_note: str,
                 curves: tuple[list, list]) -> dict:
    """What results.json records of a run, finished or not, besides its errors: what it trained, the size of the
    network, where it is and its curves (read_curves)."""
    train_curve, test_curve = curves
    return {"model": arm.model, "shortcut": arm.shortcut, "label": arm.label, "data": data, "seed": seed,
            "params": sum(p.numel() for p in model.parameters()), "run_dir": str(out), "data_note": data_note,
            "curves": {"train_error": train_curve, "test_error": test_curve}}


def run_key(run: dict) -> str:
    """The name of a results entry's run (run_name)."""
    return run_name(run["label"], run["seed"])


def evaluate_runs(run_dirs: list[str], mode: str = "center", data: str | None = None) -> dict:
    """Top-1 and top-5 error of one trained run, or of several as an ensemble, on the test split of `data` (default:
    their own), and the seconds it took; with a progress bar, as these evaluations take minutes on image folders."""
    started = time.perf_counter()
    result = evaluate_checkpoints(run_dirs, data=data, mode=mode, workers=2, progress=True)
    return {"top1_error": result["top1_error"], "top5_error": result["top5_error"], "images": result["images"],
            "seconds": time.perf_counter() - started}


def read_curves(metrics: Path) -> tuple[list[list[float]], list[list[float]]]:
    """[iteration, error] pairs: the running training error of each log line and the test error of evaluations."""
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    train_curve = [[r["iteration"], r["train_error"]] for r in records]
    test_curve = [[r["iteration"], r["test_error"]] for r in records if "test_error" in r]
    return train_curve, test_curve


def hardware() -> dict:
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_results(out: Path, preset: Preset, runs: list[dict], started: float, command: str, **extra) -> dict:
    results = {
        "experiment": preset.experiment, "preset": asdict(preset), "command": command, "hardware": hardware(),
        "data_note": runs[0]["data_note"] if runs else None,
        "wall_seconds": time.perf_counter() - started,
        "training_seconds": sum(run["wall_seconds"] for run in runs), "runs": runs, **extra,
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomically(out / RESULTS_NAME, results)
    return results


def read_results(out: str | Path) -> dict:
    path = Path(out) / RESULTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run `resnetlab reproduce EXPERIMENT --out {out}` first")
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(results, dict) or "experiment" not in results or "runs" not in results:
        raise ValueError(f"{path} is not a resnetlab results file (no 'experiment' and 'runs' entries)")
    return results
