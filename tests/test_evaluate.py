"""resnetlab.evaluate and resnetlab.inference: the paper's testing modes against explicitly built inputs, ensembles,
predict, and the `evaluate` / `predict` commands. A tiny resnet20 trained for 10 iterations on the 8x8 digits is the
model."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from run_helpers import tiny_config, write_png_folder

import resnetlab.inference as inference
from resnetlab.checkpoint import load_checkpoint, save_checkpoint
from resnetlab.cli import main as cli_main
from resnetlab.data import FolderDataset, load_dataset
from resnetlab.data.augment import FolderTenCrops, Normalize, resize_shorter
from resnetlab.evaluate import (
    check_multiscale_fits,
    class_probabilities,
    ensemble_probabilities,
    load_models,
    mode_probabilities,
    multiscale_sides,
    top_k_error,
    training_side,
)
from resnetlab.factory import create_model, load_model
from resnetlab.inference import evaluate_checkpoints, predict
from resnetlab.train import train

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    # Few iterations and a small training-error sample: the scores only need to be those of a trained network.
    # On the CPU, as the explicit computations below, so that scores agree to float rounding on a GPU machine too.
    config = tiny_config(tmp_path_factory.mktemp("run") / "out", iterations=10, train_eval_size=100, device="cpu")
    train(config, progress=False)
    return Path(config.out)


@pytest.fixture(scope="module")
def trained(run):
    """The model, its normalization, and the first 64 test images (enough to compare scores, and quick)."""
    model, state = load_model(run)
    return model, Normalize.from_state_dict(state["normalize"]), load_dataset("digits").test.subset(np.arange(64))


def softmax(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).softmax(1)


def test_center_mode_is_class_probabilities(trained):
    model, normalize, test = trained
    expected, labels = class_probabilities(model, test, normalize, device=CPU)
    scores, center_labels = mode_probabilities(model, test, normalize, "center", device=CPU, batch_size=25)
    torch.testing.assert_close(scores, expected)
    assert torch.equal(center_labels, test.labels) and torch.equal(labels, test.labels)


def test_ten_crop_is_the_mean_of_ten_explicit_crops(trained):
    model, normalize, test = trained
    # digits are 8x8: the training padding of 4 at 32x32 is 1 pixel, so crops lie at offsets 0, 1, 2 of 10x10.
    padded = F.pad(test.images, (1, 1, 1, 1))
    offsets = [(0, 0), (0, 2), (2, 0), (2, 2), (1, 1)]  # top-left, top-right, bottom-left, bottom-right, center
    crops = [padded[..., top:top + 8, left:left + 8] for top, left in offsets]
    crops += [crop.flip(-1) for crop in crops]
    expected = torch.stack([softmax(model, normalize(crop)) for crop in crops]).mean(0)
    # 250 views a pass: the 10 crops of 25 images, 25 and a last batch of 14, each through the network at once.
    scores, labels = mode_probabilities(model, test, normalize, "10crop", device=CPU, padding=4, batch_size=250)
    torch.testing.assert_close(scores, expected)
    assert torch.equal(labels, test.labels)
    center, _ = class_probabilities(model, test, normalize, device=CPU)
    assert not torch.allclose(scores, center, atol=1e-3)  # the mode changes the scores


def test_multiscale_is_the_mean_over_explicitly_resized_inputs(trained):
    model, normalize, test = trained
    # The paper's sides 224, 256, 384, 480, 640 for 224 crops, scaled to 8x8 images: 8*s/224 rounded.
    assert multiscale_sides(training_side(normalize)) == [8, 9, 14, 17, 23]
    x = normalize(test.images)
    resized = [F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False) for side in (8, 9, 14, 17, 23)]
    expected = torch.stack([softmax(model, view) for view in resized]).mean(0)
    scores, _ = mode_probabilities(model, test, normalize, "multiscale", device=CPU, batch_size=25)
    torch.testing.assert_close(scores, expected)


def test_multiscale_on_a_folder_batches_images_of_one_size_and_scores_each_alone(tmp_path):
    """Whole folder images of two sizes: batched by size (3 + 2 of 2 sizes, 2 at a time), scored as one by one."""
    rng = np.random.default_rng(0)
    for name, size in [("a0", (40, 40)), ("a1", (40, 40)), ("a2", (40, 40)), ("b0", (48, 36)), ("b1", (48, 36))]:
        (tmp_path / name[0]).mkdir(exist_ok=True)
        pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / name[0] / f"{name}.png")
    folder = FolderDataset(tmp_path, None)
    batches = list(folder.test_views("multiscale", 2, 0, None, 0))
    assert [tuple(images.shape) for images, _ in batches] == [(2, 3, 40, 40), (1, 3, 40, 40), (2, 3, 36, 48)]
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=2).eval()
    normalize = Normalize(torch.full((3, 1, 1), 0.5))
    scores, labels = mode_probabilities(model, folder, normalize, "multiscale", device=CPU, batch_size=20)
    assert labels.tolist() == [0, 0, 0, 1, 1]
    for index in range(5):
        image = normalize(folder[index][0][None])
        alone = torch.stack([softmax(model, resize_shorter(image, side)) for side in multiscale_sides(224)]).mean(0)
        torch.testing.assert_close(scores[index:index + 1], alone, rtol=1e-4, atol=1e-5)


def test_multiscale_is_refused_to_nets_trained_on_small_images_before_reading_data(run, monkeypatch):
    monkeypatch.setattr(inference, "load_dataset", lambda *a, **kw: pytest.fail("read the data of a refused mode"))
    with pytest.raises(ValueError, match=f"--mode multiscale is the paper's ImageNet protocol; "
                                         f"{re.escape(str(run / 'checkpoint.pt'))} was trained on 8x8 images, which "
                                         f"the paper tests on the single view of the original image"):
        evaluate_checkpoints([run], mode="multiscale", device="cpu")


def test_ten_crop_is_refused_for_data_never_mirrored_in_training(run, monkeypatch):
    with pytest.raises(ValueError, match="--mode 10crop averages mirrored views, but digits is never mirrored in "
                                         "training"):
        evaluate_checkpoints([run], mode="10crop", device="cpu")
    mirrored = replace(load_dataset("digits"), flip=True)  # as CIFAR and image folders are
    monkeypatch.setattr(inference, "load_dataset", lambda spec, **settings: mirrored)
    result = evaluate_checkpoints([run], mode="10crop", device="cpu")
    scores, labels = ensemble_probabilities(load_models([run], CPU), mirrored.test, "10crop", device=CPU)
    assert (result["mode"], result["top1_error"]) == ("10crop", pytest.approx(top_k_error(scores, labels, 1)))


def test_multiscale_is_kept_for_nets_trained_on_larger_images_or_on_crops_of_image_folders():
    def state(mean_shape, data=None):
        recorded = {"config": {"data": data}} if data else {}
        return {"normalize": Normalize(torch.zeros(mean_shape)).state_dict(), **recorded}

    for mean_shape in [(3, 65, 65), (3, 224, 224), (3, 1, 1)]:  # (3, 1, 1): a per-channel mean, for 224 crops
        check_multiscale_fits(state(mean_shape), Path("checkpoint.pt"))
    # --resolution 0.25: 56x56 crops of photographs, tested at {56, 64, 96, 120, 160} as the paper's at 224
    check_multiscale_fits(state((3, 56, 56), "folder:imagenette"), Path("checkpoint.pt"))
    for data in (None, "cifar10:runs/cifar"):
        with pytest.raises(ValueError, match="checkpoint.pt was trained on 32x32 images"):
            check_multiscale_fits(state((3, 32, 32), data), Path("checkpoint.pt"))
    with pytest.raises(ValueError, match="checkpoint.pt was trained on 64x64 images"):
        check_multiscale_fits(state((3, 64, 64)), Path("checkpoint.pt"))


def test_folder_ten_crops_are_corners_center_and_flips_of_the_256_resize():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, size=(300, 400, 3), dtype=np.uint8))
    crops = FolderTenCrops()(img)
    resized = torch.from_numpy(np.array(img.resize((341, 256), Image.BILINEAR))).permute(2, 0, 1)
    assert crops.shape == (10, 3, 224, 224) and crops.dtype == torch.uint8
    assert torch.equal(crops[0], resized[:, :224, :224]) and torch.equal(crops[3], resized[:, 32:, 117:])
    assert torch.equal(crops[4], resized[:, 16:240, 58:282]) and torch.equal(crops[9], crops[4].flip(-1))


def test_ensemble_of_a_checkpoint_with_itself_is_the_checkpoint(run, trained):
    model, normalize, test = trained
    single, _ = class_probabilities(model, test, normalize, device=CPU)
    doubled, labels = ensemble_probabilities(load_models([run, run], CPU), test, device=CPU)
    torch.testing.assert_close(doubled, single)
    assert torch.equal(labels, test.labels)


def perturbed_copy(run: Path, path: Path, **changes) -> Path:
    """The run's checkpoint with slightly different weights (and the given entries replaced), saved at `path`."""
    state = load_checkpoint(run)
    generator = torch.Generator().manual_seed(1)
    state["model"] = {name: tensor + 0.05 * torch.randn(tensor.shape, generator=generator)
                      if tensor.is_floating_point() and name.endswith("weight") else tensor
                      for name, tensor in state["model"].items()}
    save_checkpoint({**state, **changes}, path)
    return path


def test_ensemble_averages_the_models_scores(run, trained, tmp_path):
    other = perturbed_copy(run, tmp_path / "other.pt")
    _, _, test = trained
    first, _ = ensemble_probabilities(load_models([run], CPU), test, "10crop", device=CPU)
    second, _ = ensemble_probabilities(load_models([other], CPU), test, "10crop", device=CPU)
    both, _ = ensemble_probabilities(load_models([run, other], CPU), test, "10crop", device=CPU)
    assert not torch.allclose(first, second, atol=1e-3)
    torch.testing.assert_close(both, (first + second) / 2)


def test_ensemble_of_models_with_other_classes_names_both_files(run, tmp_path):
    letters = perturbed_copy(run, tmp_path / "letters.pt", classes=list("abcdefghij"))
    with pytest.raises(ValueError, match=f"cannot ensemble {re.escape(str(run / 'checkpoint.pt'))} and "
                                         f"{re.escape(str(letters))}: they predict different classes"):
        evaluate_checkpoints([run, letters])


def test_evaluate_checkpoints_defaults_to_the_training_dataset(run):
    summary = json.loads((run / "summary.json").read_text())
    result = evaluate_checkpoints([run], device="cpu")
    assert (result["data"], result["mode"], result["images"]) == ("digits", "center", 360)
    assert result["top1_error"] == pytest.approx(summary["test_top1_error"], abs=1e-6)
    assert result["top5_error"] == pytest.approx(summary["test_top5_error"], abs=1e-6)


def write_pngs(folder: Path, test) -> list[Path]:
    """Two digits as 8x8 grayscale PNGs, one as a 24x24 RGB PNG, and one 16x8 (wider than tall)."""
    folder.mkdir()
    arrays = [test.images[0, 0].numpy(), test.images[1, 0].numpy(),
              np.repeat(np.kron(test.images[2, 0].numpy(), np.ones((3, 3), np.uint8))[..., None], 3, axis=2),
              np.kron(test.images[3, 0].numpy(), np.ones((1, 2), np.uint8))]
    paths = [folder / f"{i}.png" for i in range(len(arrays))]
    for array, path in zip(arrays, paths):
        Image.fromarray(array).save(path)
    return paths


def test_predict_gives_the_models_top_five_scores(run, trained, tmp_path):
    model, normalize, test = trained
    paths = write_pngs(tmp_path / "images", test)
    # What the model sees: the 8x8 digits as they are, the RGB one in grayscale resized to 8x8, the wide one with
    # its central 8x8 square kept.
    with Image.open(paths[2]) as rgb, Image.open(paths[3]) as wide_png:
        gray = rgb.convert("L").resize((8, 8), Image.BILINEAR)
        wide = wide_png.crop((4, 0, 12, 8))
    inputs = torch.stack([test.images[0], test.images[1], torch.from_numpy(np.array(gray))[None],
                          torch.from_numpy(np.array(wide))[None]])
    expected = softmax(model, normalize(inputs))
    predictions = predict(run, paths, device="cpu", precision="fp32")  # "auto" may pick bf16 (AMX CPUs)
    assert len(predictions) == 4
    for ranking, scores in zip(predictions, expected):
        assert len(ranking) == 5
        names, probabilities, labels = zip(*ranking)
        assert list(names) == list(labels) == [str(i) for i in scores.topk(5).indices.tolist()]  # digits: no names
        assert list(probabilities) == pytest.approx(scores.topk(5).values.tolist(), abs=1e-5)
        assert list(probabilities) == sorted(probabilities, reverse=True) and sum(probabilities) <= 1 + 1e-6
    every_class = predict(run, paths[:1], k=50, device="cpu", precision="fp32")[0]
    assert len(every_class) == 10 and sum(p.probability for p in every_class) == pytest.approx(1, abs=1e-5)


def test_predict_in_bf16_keeps_the_fp32_ranking_head(run, trained, tmp_path):
    paths = write_pngs(tmp_path / "images", trained[2])
    exact = predict(run, paths, k=1, device="cpu", precision="fp32")
    rounded = predict(run, paths, k=1, device="cpu", precision="bf16")
    assert [r[0][0] for r in rounded] == [e[0][0] for e in exact]
    assert [r[0][1] for r in rounded] == pytest.approx([e[0][1] for e in exact], abs=0.02)
    assert [r[0][1] for r in rounded] != [e[0][1] for e in exact], "bf16 rounds: its scores are not fp32's"
    with pytest.raises(ValueError, match="precision='fp16' is not valid; choose auto, bf16, fp32 or int8"):
        predict(run, paths, precision="fp16")


def test_predict_names_an_unreadable_file(run, tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(ValueError, match=f"cannot read {re.escape(str(text))} as an image"):
        predict(run, [text])
    with pytest.raises(FileNotFoundError, match=f"image {re.escape(str(tmp_path / 'gone.png'))} does not exist"):
        predict(run, [tmp_path / "gone.png"])


def test_cli_evaluate_prints_the_errors(run, capsys):
    result = evaluate_checkpoints([run], mode="center")
    assert cli_main(["evaluate", str(run), "--mode", "center", "--data", "digits", "--batch-size", "64"]) == 0
    out = capsys.readouterr().out
    assert out == (f"{run / 'checkpoint.pt'} on digits (test split, 360 images), center, fp32: "
                   f"top-1 error {100 * result['top1_error']:.2f}%, top-5 error {100 * result['top5_error']:.2f}%\n")
    assert cli_main(["evaluate", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == result


def test_cli_predict_prints_top_k(run, trained, tmp_path, capsys):
    paths = write_pngs(tmp_path / "images", trained[2])
    ranking = predict(run, paths[:2], k=3)
    assert cli_main(["predict", str(run), str(paths[0]), str(paths[1]), "--top", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(paths[0]) and lines[4] == str(paths[1]) and len(lines) == 8
    for line, prediction in zip(lines[1:4] + lines[5:8], ranking[0] + ranking[1]):
        assert line.split() == [f"{prediction.probability:.4f}", prediction.name]


@pytest.mark.parametrize("argv, message", [
    (["evaluate", "{tmp}/missing"], "resnetlab evaluate: error: checkpoint {tmp}/missing does not exist"),
    (["evaluate", "{run}", "--mode", "5crop"], "resnetlab evaluate: error: --mode '5crop' is not a testing mode; "
                                               "choose one of center, 10crop, multiscale"),
    (["evaluate", "{run}", "--mode", "multiscale"], "resnetlab evaluate: error: --mode multiscale is the paper's "
                                                    "ImageNet protocol; {run}/checkpoint.pt was trained on 8x8 images"),
    (["evaluate", "{run}", "--data", "cifar10:{tmp}"], "resnetlab evaluate: error: cifar10: no "),
    (["evaluate", "{run}", "--data", "folder:{tmp}/pngs"], "resnetlab evaluate: error: folder:{tmp}/pngs has classes "
                                                           "['class0', 'class1']... (2), but {run}/checkpoint.pt "
                                                           "predicts ['0', '1', '2']... (10)"),
    (["predict", "{tmp}/missing", "{tmp}/x.png"], "resnetlab predict: error: checkpoint {tmp}/missing does not exist"),
    (["predict", "{run}", "{tmp}/notes.png"], "resnetlab predict: error: cannot read {tmp}/notes.png as an image"),
])
def test_cli_errors_name_the_bad_input(run, tmp_path, capsys, argv, message):
    (tmp_path / "notes.png").write_text("not an image")
    write_png_folder(tmp_path / "pngs")
    fill = {"tmp": str(tmp_path), "run": str(run)}
    assert cli_main([arg.format(**fill) for arg in argv]) == 2
    assert capsys.readouterr().err.startswith(message.format(**fill))
