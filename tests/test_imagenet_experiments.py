"""The ImageNet-side experiments (table2: Fig. 4 and Table 2; table3: Tables 3-5) as data: the networks they train,
the recipe each run gets, and the verdict and tables their reports draw from results. Training them end to end
takes hours (docs/reproduction.md); tests/test_imagenette.py trains the same folder path on real photographs."""

from __future__ import annotations

from dataclasses import asdict

from resnetlab.experiments import EXPERIMENTS, table2, table3
from resnetlab.experiments.runner import Arm
from resnetlab.paper import IMAGENET_TOP1_ERROR
from resnetlab.report import schedule_words


def test_table2_trains_the_papers_four_networks_with_option_a_shallow_pair_first():
    assert [arm.label for arm in table2.arms(table2.PRESET)] == ["plain18", "resnet18-A", "plain34", "resnet34-A"]
    assert EXPERIMENTS["table2"] is table2.EXPERIMENT and EXPERIMENTS["table3"] is table3.EXPERIMENT


def test_table2_runs_the_imagenet_recipe_at_half_resolution_with_fixed_drops(tmp_path):
    config = table2.PRESET.configure(Arm("resnet34", "A"), 0, tmp_path)
    recipe = config.recipe
    assert (recipe.name, recipe.batch_size, recipe.lr, recipe.momentum, recipe.weight_decay) == (
        "imagenet", 256, 0.1, 0.9, 1e-4)
    assert (recipe.iterations, recipe.lr_milestones, recipe.plateau_patience) == (800, (400, 600), 0)
    assert recipe.ramp_iterations == 160  # option-A ResNets blow up at lr 0.1 from the first step (docs)
    assert (recipe.resolution, config.shortcut, config.data) == (0.5, "A", "folder:imagenette")
    assert (config.eval_every, config.checkpoint_every, config.log_every) == (80, 100, 8)


def test_table3_reuses_table2s_plain34_and_resnet34_a_and_adds_b_and_c(tmp_path):
    labels = [arm.label for arm in table3.EXPERIMENT.arms(table3.PRESET)]
    assert labels == ["plain34", "resnet34-A", "resnet34-B", "resnet34-C"]
    for arm in (Arm("plain34"), Arm("resnet34", "A")):
        assert table3.PRESET.configure(arm, 0, tmp_path) == table2.PRESET.configure(arm, 0, tmp_path)


def run(label: str, train: float, val: float, seed: int = 0) -> dict:
    model = label.split("-")[0]
    return {"model": model, "label": label, "shortcut": "A" if model.startswith("resnet") else None, "seed": seed,
            "final_train_error": train, "final_test_error": val, "params": 11e6}


def test_table2_verdict_needs_both_errors_to_move_the_papers_way():
    shows = [run("plain18", 0.10, 0.20), run("resnet18-A", 0.08, 0.18), run("plain34", 0.15, 0.25),
             run("resnet34-A", 0.06, 0.16)]
    assert "**The paper's Fig. 4 shows**" in table2.effect_verdict(shows)
    validation_only = [*shows[:3], run("resnet34-A", 0.06, 0.19)]  # ResNet-34 trains lower, validates higher
    verdict = table2.effect_verdict(validation_only)
    assert "**Not all of the paper's Fig. 4 shows at this budget**" in verdict
    assert "resnet34 minus resnet18: +1.00 points (not lower in every seed)" in verdict


def test_table2_sets_ten_crop_errors_beside_the_papers():
    runs = [run("plain18", 0.10, 0.20), run("plain34", 0.15, 0.25)]
    results = {"runs": runs, "ten_crop": {"plain18-s0": {"top1_error": 0.195, "top5_error": 0.05}}}
    rows = table2.table(results).splitlines()
    assert rows[2].split(" | ")[4:] == ["19.50", f"{IMAGENET_TOP1_ERROR['plain18']:.2f} |"]
    assert rows[3].split(" | ")[4] == "—"  # plain34 has no 10-crop result yet


def test_the_report_header_says_how_the_lr_moves_and_at_what_resolution():
    assert schedule_words(asdict(table2.PRESET)) == ("lr / 10 at 50% and 75% of the iterations, after a linear lr "
                                                     "ramp over the first 20%, image sizes x 0.5")
    assert schedule_words({"lr_drops": None}) == "lr milestones scaled to the run length"


def test_table2_follows_each_depth_gap_along_the_evaluations():
    curves = {"plain18": (0.60, 0.50, 0.40), "plain34": (0.55, 0.55, 0.45),  # above from iteration 160 on
              "resnet18-A": (0.50, 0.40, 0.30), "resnet34-A": (0.60, 0.45, 0.32)}  # never below, closing
    runs = [{**run(label, 0.0, errors[-1]), "curves": {"test_error": [[80, errors[0]], [160, errors[1]],
                                                                      [240, errors[2]]]}}
            for label, errors in curves.items()]
    along = table2.gaps_along_the_way(runs)
    assert "| 80 | -5.00 | +10.00 |" in along and "| 240 | +5.00 | +2.00 |" in along
    assert "- plain34 has been above plain18 since iteration 160." in along
    assert "- resnet34 is not below resnet18 at the last evaluation; the gap went from +10.00 to +2.00 points." in along
    assert table2.gaps_along_the_way(runs[:2]) == ""  # no ResNet pair: nothing to follow


def test_the_table2_and_table3_reports_render_from_results_alone(tmp_path):
    """The reports come hours after the runs start: they must render from results.json's entries, figure included."""
    from resnetlab.evaluate import MODES

    labels = ["plain18", "resnet18-A", "plain34", "resnet34-A", "resnet34-B", "resnet34-C"]
    runs = [{**run(label, 0.1 + i / 100, 0.2 + i / 100), "shortcut": label.partition("-")[2] or None,
             "curves": {"train_error": [[8, 0.9], [800, 0.1 + i / 100]],
                        "test_error": [[80, 0.8], [800, 0.2 + i / 100]]}}
            for i, label in enumerate(labels)]
    measured = {"top1_error": 0.25, "top5_error": 0.05, "images": 3925, "seconds": 61.0}
    fig4 = table2.report({"runs": runs[:4], "ten_crop": {f"{label}-s0": measured for label in labels[:4]}}, tmp_path)
    assert "| plain34 | 11.00 M | 12.00 | 22.00 | 25.00 |" in fig4 and "### The validation gaps along the way" in fig4
    assert (tmp_path / "fig4.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    shortcut_runs = runs[2:]
    modes = {f"{r['label']}-s0": {mode: measured for mode in (MODES if r["shortcut"] else ("10crop",))}
             for r in shortcut_runs}
    tables = table3.report({"runs": shortcut_runs, "modes": modes,
                            "ensemble": {**measured, "top1_error": 0.22, "members": labels[3:]}}, tmp_path)
    assert "| resnet34-C | C | 11.00 M | 25.00 | 5.00 | 24.19 / 7.40 |" in tables
    assert "| resnet34-B | 25.00 (1 min 1 s) | 25.00 (1 min 1 s) | 25.00 (1 min 1 s) | 24.52 / 21.84 |" in tables
    assert "top-1 22.00%, top-5 5.00%, against 25.00% top-1 for its best member" in tables
