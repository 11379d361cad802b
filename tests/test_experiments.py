"""The paper's experiments end to end on a tiny budget (digits, a few iterations), checking the files they write
and the numbers in them. The networks are trained once per module: later experiments reuse the degradation
experiment's runs through `runs_dir`, which is itself one of the things tested."""

import json
import math
import os
import shutil
import signal
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from resnetlab.checkpoint import load_checkpoint
from resnetlab.cli import main
from resnetlab.errors import RunStopped
from resnetlab.experiments import DEMO_PRESET, EXPERIMENTS, reproduce
from resnetlab.experiments.degradation import effect_verdict
from resnetlab.experiments.responses import response_stds
from resnetlab.factory import create_model
from resnetlab.paper import CIFAR_PARAMS_M, CIFAR_TEST_ERROR, IMAGENET_GFLOPS, SHORTCUT_TOP1_ERROR
from resnetlab.schedule import LrSchedule

ITERATIONS = 6
# Two test-error evaluations and one checkpoint per run: the tests check the files, not the curves' resolution.
TINY = dict(iterations=ITERATIONS, evaluations=2, checkpoint_every=ITERATIONS)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RUN_KEYS = {"model", "seed", "iterations", "final_train_error", "final_test_error", "curves"}


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def degradation(tmp_path_factory, runs_dir) -> Path:
    out = tmp_path_factory.mktemp("degradation")
    tiny("degradation", out, runs_dir, depths=(20, 32), seeds=2)
    return out


def tiny(experiment: str, out: Path, runs_dir: Path, **overrides) -> list[str]:
    """Run `experiment` at the tiny budget, without output, training into (or reusing from) `runs_dir`; returns
    the lines it logged."""
    preset = replace(EXPERIMENTS[experiment].preset, **TINY)
    lines = []
    reproduce(experiment, out, preset=preset, runs_dir=runs_dir, progress=False, log=lines.append, **overrides)
    return lines


def read_results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def assert_valid_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as image:
        image.verify()
        assert min(image.size) >= 300  # a readable figure, not a placeholder


def test_table1_measures_imagenet_nets_beside_the_paper(tmp_path):
    reproduce("table1", tmp_path, depths=(18, 50), log=lambda line: None)
    rows = {row["name"]: row for row in read_results(tmp_path)["table1"]}
    assert set(rows) == {"resnet18", "resnet50", "plain18", "plain50"}
    assert rows["resnet18"]["params"] == 11_689_512  # torchvision's count
    # Paper Table 1 (stride on the first 1x1): 1.8 and 3.8 GFLOPs; torchvision's placement costs 4.09 for 50.
    assert rows["resnet18"]["gmacs_stride_on_1x1"] == pytest.approx(IMAGENET_GFLOPS[18], rel=0.02)
    assert rows["resnet50"]["gmacs_stride_on_1x1"] == pytest.approx(IMAGENET_GFLOPS[50], rel=0.03)
    assert rows["resnet50"]["gmacs_stride_on_3x3"] == pytest.approx(4.09, abs=0.01)
    assert rows["plain50"]["paper_gflops"] is None
    report = (tmp_path / "report.md").read_text()
    assert "| resnet50 | 50 | 25.56 M | 3.858 | 4.089 | 3.8 |" in report
    assert "![" in report and "(table1.png)" in report
    assert_valid_png(tmp_path / "table1.png")


def test_degradation_writes_runs_curves_report_and_plot(degradation, runs_dir):
    results = read_results(degradation)
    runs = results["runs"]
    assert [(r["label"], r["seed"]) for r in runs] == [
        (label, seed) for seed in (0, 1) for label in ("plain20", "plain32", "resnet20", "resnet32")]
    for run in runs:
        assert RUN_KEYS <= set(run) and run["iterations"] == ITERATIONS
        assert 0 <= run["final_train_error"] <= 1 and 0 <= run["final_test_error"] <= 1
        summary = json.loads((runs_dir / f"{run['label']}-s{run['seed']}" / "summary.json").read_text())
        assert run["final_train_error"] == summary["train_top1_error"]
        train_curve, test_curve = run["curves"]["train_error"], run["curves"]["test_error"]
        assert [i for i, _ in train_curve] == list(range(1, ITERATIONS + 1))
        assert test_curve[-1] == [ITERATIONS, pytest.approx(run["final_test_error"])]
    assert runs[0]["params"] == runs[2]["params"] == 269_434  # plain20 and resnet20 (option A adds nothing)
    report = (degradation / "report.md").read_text()
    plain20 = [r["final_train_error"] for r in runs if r["label"] == "plain20"]
    mean = sum(plain20) / 2
    std = math.sqrt(sum((e - mean) ** 2 for e in plain20))  # sample std of two values
    assert f"| plain20 | 0.27 M | {100 * mean:.2f} ± {100 * std:.2f} |" in report
    assert f"| {CIFAR_TEST_ERROR[20]:.2f} |" in report and f"| {CIFAR_TEST_ERROR[32]:.2f} |" in report
    assert "resnet32 minus resnet20" in report and "mean ± std over 2 seeds" in report
    assert f"torch {torch.__version__}" in report and f"{os.cpu_count()} cores" in report
    assert_valid_png(degradation / "degradation.png")


def test_degradation_rerun_reuses_runs_and_refuses_other_settings(degradation, runs_dir):
    before = read_results(degradation)["runs"]
    lines = []
    preset = replace(EXPERIMENTS["degradation"].preset, **TINY)
    reproduce("degradation", degradation, preset=preset, depths=(20, 32), seeds=2, runs_dir=runs_dir,
              progress=False, log=lines.append)
    assert len(lines) == 8 and all("done earlier, kept" in line for line in lines)
    assert read_results(degradation)["runs"] == before
    with pytest.raises(ValueError, match=r"plain20-s0 holds a run with other settings: .*iterations"):
        reproduce("degradation", degradation, preset=preset, depths=(20,), iterations=ITERATIONS + 1,
                  runs_dir=runs_dir, progress=False, log=lines.append)
    with pytest.raises(ValueError, match=r"plain20-s0 holds a run with other settings: .*resolution"):
        reproduce("degradation", degradation, preset=preset, depths=(20,), resolution=0.5, runs_dir=runs_dir,
                  progress=False, log=lines.append)


def test_every_run_is_checked_before_any_trains(tmp_path, degradation, runs_dir):
    """The last planned run (resnet20 seed 0 after plain20 seed 0) holds other settings: refused before plain20,
    which has no directory yet, trains."""
    runs = tmp_path / "runs"
    shutil.copytree(runs_dir / "resnet20-s0", runs / "resnet20-s0")  # trained for ITERATIONS, not ITERATIONS + 1
    preset = replace(EXPERIMENTS["degradation"].preset, **TINY)
    with pytest.raises(ValueError, match=r"resnet20-s0 holds a run with other settings: .*iterations"):
        reproduce("degradation", tmp_path / "out", preset=preset, depths=(20,), iterations=ITERATIONS + 1,
                  runs_dir=runs, progress=False, log=lambda line: None)
    assert sorted(path.name for path in runs.iterdir()) == ["resnet20-s0"]


def test_ctrl_c_stops_an_experiment_with_its_run_saved_and_the_same_command_continues_it(tmp_path, monkeypatch,
                                                                                         ctrl_c_as_from_a_terminal):
    lr = LrSchedule.lr

    def lr_then_ctrl_c(schedule, at):
        if at == 2:
            signal.raise_signal(signal.SIGINT)
        return lr(schedule, at)

    monkeypatch.setattr(LrSchedule, "lr", lr_then_ctrl_c)
    with pytest.raises(RunStopped, match=r"after iteration 3 of 6; .*plain20-s0.*; the same command again continues "
                                         r"the whole experiment$"):
        tiny("degradation", tmp_path / "out", tmp_path / "runs", depths=(20,), seeds=1)
    assert load_checkpoint(tmp_path / "runs" / "plain20-s0")["iteration"] == 3
    assert not (tmp_path / "runs" / "resnet20-s0").exists()  # the experiment stopped, not just its first run

    monkeypatch.setattr(LrSchedule, "lr", lr)
    lines = tiny("degradation", tmp_path / "out", tmp_path / "runs", depths=(20,), seeds=1)
    assert "resuming 6 iterations" in lines[0]
    assert [run["iterations"] for run in read_results(tmp_path / "out")["runs"]] == [ITERATIONS, ITERATIONS]


def test_so_far_reports_unfinished_runs_at_the_furthest_common_iteration_and_trains_nothing(tmp_path, degradation,
                                                                                            runs_dir):
    runs = tmp_path / "runs"
    shutil.copytree(runs_dir, runs)
    unfinished = runs / "plain32-s1"  # as if stopped after iteration 3: checkpoint and metrics, no summary
    (unfinished / "summary.json").unlink()
    metrics = unfinished / "metrics.jsonl"
    metrics.write_text("".join(line + "\n" for line in metrics.read_text().splitlines()
                               if json.loads(line)["iteration"] <= 3))
    before = {path: path.read_bytes() for path in runs.rglob("*") if path.is_file()}
    preset = replace(EXPERIMENTS["degradation"].preset, **TINY)
    reproduce("degradation", tmp_path / "out", preset=preset, depths=(20, 32), seeds=2, runs_dir=runs,
              progress=False, so_far=True)

    assert {path: path.read_bytes() for path in runs.rglob("*") if path.is_file()} == before
    results = read_results(tmp_path / "out")
    assert results["so_far"]["iteration"] == 3
    assert results["so_far"]["reached"] == {f"{kind}{depth}-s{seed}": 3 if (kind, depth, seed) == ("plain", 32, 1)
                                            else ITERATIONS for kind in ("plain", "resnet") for depth in (20, 32)
                                            for seed in (0, 1)}
    for run in results["runs"]:
        logged = {line["iteration"]: line for line in map(json.loads, (Path(run["run_dir"]) / "metrics.jsonl")
                                                          .read_text().splitlines())}
        assert run["iterations"] == 3 and run["final_train_error"] == logged[3]["train_error"]
        assert run["final_test_error"] == logged[3]["test_error"]
    report = (tmp_path / "out" / "report.md").read_text()
    assert f"**In progress.** Every error below is at iteration 3 of {ITERATIONS}," in report
    assert "--so-far" in results["command"]

    shutil.rmtree(runs / "resnet32-s0")  # not started: reported as such, the others as they stand
    results = reproduce("degradation", tmp_path / "out", preset=preset, depths=(20, 32), seeds=2, runs_dir=runs,
                        progress=False, so_far=True)
    assert results["so_far"]["not_started"] == ["resnet32-s0"] and len(results["runs"]) == 7
    assert "Not started yet, so not below: resnet32-s0." in (tmp_path / "out" / "report.md").read_text()
    for run in runs.iterdir():
        shutil.rmtree(run)
    with pytest.raises(FileNotFoundError, match=f"no run in {runs} has a checkpoint and metrics yet"):
        reproduce("degradation", tmp_path / "out", preset=preset, depths=(20, 32), seeds=2, runs_dir=runs,
                  progress=False, so_far=True)


def test_report_command_rerenders_from_results_json(degradation, capsys):
    (degradation / "report.md").unlink()
    (degradation / "degradation.png").unlink()
    assert main(["report", str(degradation)]) == 0
    assert "Degradation" in (degradation / "report.md").read_text()
    assert_valid_png(degradation / "degradation.png")
    assert main(["report", str(degradation / "nothing-here")]) == 2
    assert "results.json does not exist" in capsys.readouterr().err


def fake_runs(plain_gaps: list[float], residual_gaps: list[float]) -> list[dict]:
    runs = []
    for seed, (plain_gap, residual_gap) in enumerate(zip(plain_gaps, residual_gaps)):
        for model, error in (("plain20", 0.1), ("plain56", 0.1 + plain_gap), ("resnet20", 0.05),
                             ("resnet56", 0.05 + residual_gap)):
            runs.append({"model": model, "seed": seed, "final_train_error": error})
    return runs


def test_effect_verdict_needs_every_seed_to_show_the_plain_gap():
    shown, sentence = effect_verdict(fake_runs([0.2, 0.1], [0.0, -0.01]))
    assert shown is True and "+15.00 ± 7.07 points" in sentence and "-0.50 ± 0.71" in sentence
    shown, sentence = effect_verdict(fake_runs([0.2, -0.01], [0.0, 0.0]))
    assert shown is False and "does not show" in sentence and "plain56 is not above plain20 in every seed" in sentence
    shown, sentence = effect_verdict(fake_runs([0.2, 0.1], [0.02, 0.0]))
    assert shown is False and "resnet56 ends above resnet20 on average" in sentence


def test_shortcuts_compares_options_and_the_plain_net(tmp_path, degradation, runs_dir):
    tiny("shortcuts", tmp_path, runs_dir, depths=(20,))
    runs = {run["label"]: run for run in read_results(tmp_path)["runs"]}
    assert list(runs) == ["plain20", "resnet20-A", "resnet20-B", "resnet20-C"]
    assert runs["plain20"]["params"] == runs["resnet20-A"]["params"]  # A: parameter-free shortcuts
    assert runs["resnet20-A"]["params"] < runs["resnet20-B"]["params"] < runs["resnet20-C"]["params"]
    report = (tmp_path / "report.md").read_text()
    for option, error in SHORTCUT_TOP1_ERROR.items():
        assert f"| {option} | " in report and f"| {error:.2f} |" in report
    assert_valid_png(tmp_path / "shortcuts.png")


def test_depth_reuses_trained_runs_and_reports_params(tmp_path, degradation, runs_dir):
    checkpoints = [runs_dir / f"resnet{depth}-s{seed}" / "checkpoint.pt" for seed in (0, 1) for depth in (20, 32)]
    trained = {path: path.read_bytes() for path in checkpoints}  # by the degradation experiment
    lines = tiny("depth", tmp_path, runs_dir, depths=(20, 32), seeds=2)
    assert len(lines) == 4 and all("done earlier, kept" in line for line in lines), lines
    assert {path: path.read_bytes() for path in trained} == trained  # not trained again
    results = read_results(tmp_path)
    params = {run["model"]: run["params"] for run in results["runs"]}
    for depth in (20, 32):  # 1-channel input: a few hundred fewer than the paper's 3-channel nets
        assert params[f"resnet{depth}"] == pytest.approx(CIFAR_PARAMS_M[depth] * 1e6, rel=0.02)
    report = (tmp_path / "report.md").read_text()
    assert "| 8.75 |" in report and "| 7.51 |" in report
    assert_valid_png(tmp_path / "depth.png")


def test_response_stds_are_the_bn_outputs_before_relu_and_addition():
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10, in_channels=1).eval()
    images = torch.randn(16, 1, 8, 8)
    stds = response_stds(model, images)
    assert len(stds) == 18 and all(s > 0 for s in stds), stds  # 9 blocks of two 3x3 layers
    with torch.no_grad():
        stem = model.relu(model.bn1(model.conv1(images)))
        block = model.layer1[0]
        first = block.bn1(block.conv1(stem))
        second = block.bn2(block.conv2(block.relu(first.clone())))
    assert stds[:2] == pytest.approx([first.std().item(), second.std().item()], rel=1e-5)


def test_responses_reports_layer_stds_of_trained_nets(tmp_path, degradation, runs_dir):
    tiny("responses", tmp_path, runs_dir, depths=(20, 32), seeds=2)
    results = read_results(tmp_path)
    assert results["held_out_images"] == 360  # digits' test split, all of it
    assert [(run["model"], run["seed"]) for run in results["runs"]] == [
        (f"{kind}{depth}", seed) for seed in (0, 1) for kind in ("plain", "resnet") for depth in (20, 32)]
    for run in results["runs"]:
        depth = int(run["model"].removeprefix("plain").removeprefix("resnet"))
        stds = run["response_std"]
        assert len(stds) == depth - 2 and all(s > 0 for s in stds), stds  # every layer but the stem conv and the fc
    report = (tmp_path / "report.md").read_text()
    assert "Fig. 7" in report and "resnet20" in report and "vs plain20" in report
    assert_valid_png(tmp_path / "responses.png")


def test_demo_preset_is_the_calibrated_degradation_budget_on_digits():
    assert (DEMO_PRESET.experiment, DEMO_PRESET.data, DEMO_PRESET.depths) == ("degradation", "digits", (20, 56))
    assert (DEMO_PRESET.iterations, DEMO_PRESET.seeds) == (2000, 2)


def test_demo_command_trains_its_preset_and_writes_the_report(tmp_path, monkeypatch, capsys):
    """`resnetlab demo` end to end, its preset cut to 2 iterations of the 20-layer nets (the preset itself: test
    above)."""
    import resnetlab.experiments as experiments

    preset = replace(DEMO_PRESET, depths=(20,), iterations=2, seeds=1, evaluations=1, checkpoint_every=2)
    monkeypatch.setattr(experiments, "DEMO_PRESET", preset)
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("resnetlab demo: the degradation experiment (paper Fig. 6) on digits: plain and "
                              "residual nets of 20 layers, 2 iterations, 1 seeds")
    results = read_results(out)
    assert results["preset"] == {**asdict(preset), "depths": [20]}
    assert results["command"] == f"resnetlab demo --out {out}"
    assert [run["label"] for run in results["runs"]] == ["plain20", "resnet20"]
    assert all(RUN_KEYS <= set(run) and run["iterations"] == 2 for run in results["runs"])
    assert f"report: {out}/report.md" in printed
    assert_valid_png(out / "degradation.png")


def test_unknown_experiment_bad_depth_and_bad_resolution_are_named(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown experiment 'fig9'"):
        reproduce("fig9", tmp_path)
    assert main(["reproduce", "depth", "--out", str(tmp_path), "--depths", "21"]) == 2
    assert "--model 'resnet21' is not a named model" in capsys.readouterr().err
    assert main(["reproduce", "table2", "--out", str(tmp_path), "--resolution", "0.1"]) == 2
    assert "--resolution 0.1 makes 22-pixel crops" in capsys.readouterr().err


def test_parallel_runs_end_exactly_where_the_same_runs_trained_one_after_the_other_end(tmp_path):
    """--parallel changes how fast, not what: two runs trained at once in processes of their own (one thread each)
    end with the same weights and errors as the same two trained in turn in this process with one thread."""
    preset = replace(EXPERIMENTS["degradation"].preset, **TINY)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        reproduce("degradation", tmp_path / "one-by-one", preset=preset, depths=(20,), progress=False,
                  log=lambda line: None)
        torch.set_num_threads(2)  # shared by 2 processes: one thread each
        lines = []
        reproduce("degradation", tmp_path / "parallel", preset=preset, depths=(20,), progress=False,
                  log=lines.append, parallel=2)
    finally:
        torch.set_num_threads(threads)
    assert sum("(in parallel)" in line for line in lines) == 2
    assert sorted(line.split(":")[0] for line in lines if "train error" in line) == [
        "[1/2] plain20 seed 0", "[2/2] resnet20 seed 0"]
    for label in ("plain20-s0", "resnet20-s0"):
        one, two = (tmp_path / way / "runs" / label for way in ("one-by-one", "parallel"))
        summaries = [json.loads((run / "summary.json").read_text()) for run in (one, two)]
        for key in ("train_top1_error", "test_top1_error", "test_top5_error"):
            assert summaries[0][key] == summaries[1][key]
        weights = [torch.load(run / "checkpoint.pt", weights_only=False)["model"] for run in (one, two)]
        assert weights[0].keys() == weights[1].keys()
        assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])


def test_parallel_failures_are_raised_together_naming_each_run(tmp_path, capsys):
    preset = replace(EXPERIMENTS["degradation"].preset, **TINY)
    with pytest.raises(RuntimeError, match=r"2 of 2 runs failed .*plain20 seed 0: --cuda-graphs needs one CUDA "
                                           r"device.*resnet20 seed 0: --cuda-graphs needs one CUDA device"):
        reproduce("degradation", tmp_path, preset=preset, depths=(20,), progress=False, log=lambda line: None,
                  parallel=2, cuda_graphs=True)
    assert not list(tmp_path.rglob("summary.json"))
    assert main(["reproduce", "depth", "--out", str(tmp_path), "--parallel", "0"]) == 2
    assert "--parallel must be a positive integer, got 0" in capsys.readouterr().err
