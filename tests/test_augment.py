"""Tests for resnetlab.data.augment: crop/flip, per-pixel mean normalization, ImageNet transforms, test-time crops."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from resnetlab.data.augment import (
    CenterCrop,
    Normalize,
    ScaleAugment,
    random_crop_flip,
    resize_shorter,
    ten_crops,
)


def position_coded_batch(n: int, channels: int, height: int, width: int) -> torch.Tensor:
    """n copies of an image whose pixels are all distinct and nonzero, so any crop, flipped or not, is identifiable."""
    image = 1 + torch.arange(channels * height * width).view(channels, height, width) % 255
    return image.to(torch.uint8).expand(n, -1, -1, -1).contiguous()


def crop_candidates(image: torch.Tensor, padding: int) -> tuple[torch.Tensor, list[tuple[int, int, bool]]]:
    """Every crop of the zero-padded (C, H, W) image and its mirror, with their (top, left, flipped)."""
    _, h, w = image.shape
    padded = F.pad(image, (padding, padding, padding, padding))
    crops, keys = [], []
    for top in range(2 * padding + 1):
        for left in range(2 * padding + 1):
            window = padded[:, top : top + h, left : left + w]
            crops += [window, window.flip(-1)]
            keys += [(top, left, False), (top, left, True)]
    return torch.stack(crops), keys


def match_candidates(outputs: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """(N, K) bool: which candidate crops each output image equals."""
    return (outputs[:, None] == candidates[None]).flatten(2).all(2)


# ---- random_crop_flip ----


def test_random_crop_flip_keeps_shape_dtype_device():
    images = torch.randint(0, 256, (5, 3, 12, 10), dtype=torch.uint8)
    out = random_crop_flip(images, padding=4, flip=True, generator=torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == torch.uint8 and out.device == images.device


def test_every_output_is_a_crop_of_the_padded_input_or_its_mirror():
    images = torch.randint(1, 256, (16, 3, 6, 5), dtype=torch.uint8)
    out = random_crop_flip(images, padding=2, flip=True, generator=torch.Generator().manual_seed(1))
    for image, result in zip(images, out):
        candidates, _ = crop_candidates(image, padding=2)
        assert match_candidates(result[None], candidates).any(), "output is not a crop of the padded input"


def test_all_offsets_occur_and_flip_rate_is_one_half():
    padding = 4
    images = position_coded_batch(4000, 1, 8, 8)
    out = random_crop_flip(images, padding=padding, flip=True, generator=torch.Generator().manual_seed(2))
    candidates, keys = crop_candidates(images[0], padding)
    matches = match_candidates(out, candidates)
    assert (matches.sum(1) == 1).all(), "each output must be exactly one crop"
    drawn = [keys[i] for i in matches.int().argmax(1).tolist()]
    assert {(top, left) for top, left, _ in drawn} == {(top, left) for top in range(9) for left in range(9)}
    flip_rate = sum(flipped for _, _, flipped in drawn) / len(drawn)
    assert 0.45 <= flip_rate <= 0.55


def test_flip_false_never_flips():
    images = position_coded_batch(500, 2, 6, 7)
    out = random_crop_flip(images, padding=3, flip=False, generator=torch.Generator().manual_seed(3))
    candidates, keys = crop_candidates(images[0], padding=3)
    matches = match_candidates(out, candidates)
    assert (matches.sum(1) == 1).all()
    assert not any(keys[i][2] for i in matches.int().argmax(1).tolist())


def test_padding_zero_with_flip_gives_the_image_or_its_mirror_both_occurring():
    images = position_coded_batch(200, 3, 4, 6)
    out = random_crop_flip(images, padding=0, flip=True, generator=torch.Generator().manual_seed(4))
    mirrored = (out == images.flip(-1)).flatten(1).all(1)
    unchanged = (out == images).flatten(1).all(1)
    assert (mirrored ^ unchanged).all() and mirrored.any() and unchanged.any()


def test_same_seed_same_output_and_other_seed_differs():
    images = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)

    def run(seed: int) -> torch.Tensor:
        return random_crop_flip(images, padding=4, flip=True, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))


def test_no_padding_no_flip_is_identity():
    images = torch.randint(0, 256, (4, 3, 9, 7), dtype=torch.uint8)
    assert torch.equal(random_crop_flip(images, padding=0, flip=False), images)


def test_channels_last_input_gives_same_crops():
    images = torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8)
    plain = random_crop_flip(images, padding=2, flip=True, generator=torch.Generator().manual_seed(5))
    channels_last = images.contiguous(memory_format=torch.channels_last)
    generator = torch.Generator().manual_seed(5)
    assert torch.equal(random_crop_flip(channels_last, padding=2, flip=True, generator=generator), plain)


def test_random_crop_flip_rejects_bad_arguments():
    with pytest.raises(ValueError, match="padding must be >= 0"):
        random_crop_flip(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), padding=-1, flip=True)
    with pytest.raises(ValueError, match=r"4-d tensor \(N, C, H, W\), got \(3, 4, 4\)"):
        random_crop_flip(torch.zeros(3, 4, 4, dtype=torch.uint8), padding=1, flip=True)


# ---- Normalize ----


@pytest.fixture(scope="module")
def training_images() -> torch.Tensor:
    """2500 images (more than one fitting chunk) whose mean varies by pixel and whose spread varies by channel."""
    gen = torch.Generator().manual_seed(10)
    base = torch.linspace(40, 200, 8 * 8).view(1, 8, 8)
    spread = torch.tensor([10.0, 30.0, 60.0]).view(3, 1, 1)
    noise = torch.randn(2500, 3, 8, 8, generator=gen) * spread
    return (base + noise).round().clamp(0, 255).to(torch.uint8)


def test_fitted_mean_is_the_per_pixel_training_mean(training_images):
    norm = Normalize.fit(training_images)
    assert norm.mean.shape == (3, 8, 8) and norm.mean.dtype == torch.float32 and norm.std is None
    torch.testing.assert_close(norm.mean, training_images.float().mean(0) / 255, atol=1e-6, rtol=0)


def test_normalized_training_set_has_zero_per_pixel_mean(training_images):
    out = Normalize.fit(training_images)(training_images)
    assert out.dtype == torch.float32
    assert out.mean(0).abs().max() < 1e-5
    expected = training_images.float() / 255 - training_images.float().mean(0) / 255
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_per_channel_std_gives_unit_std_per_channel(training_images):
    norm = Normalize.fit(training_images, per_channel_std=True)
    assert norm.std.shape == (3, 1, 1)
    out = norm(training_images)
    per_channel = out.transpose(0, 1).flatten(1)
    torch.testing.assert_close(per_channel.std(1, unbiased=False), torch.ones(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(per_channel.mean(1), torch.zeros(3), atol=1e-5, rtol=0)
    # The channels really had different spreads (10, 30, 60 grey levels), so the division did something.
    assert norm.std[2].item() > 4 * norm.std[0].item()


def test_constant_channel_is_not_divided_by_zero():
    images = torch.randint(0, 256, (10, 2, 4, 4), dtype=torch.uint8)
    images[:, 1] = 77
    norm = Normalize.fit(images, per_channel_std=True)
    assert norm.std[1].item() == 1.0
    assert torch.isfinite(norm(images)).all() and norm(images)[:, 1].abs().max() < 1e-6


def test_state_dict_round_trip_through_a_file(training_images, tmp_path):
    for per_channel_std in (False, True):
        norm = Normalize.fit(training_images, per_channel_std=per_channel_std)
        torch.save(norm.state_dict(), tmp_path / "norm.pt")
        state = torch.load(tmp_path / "norm.pt")
        assert set(state) == {"mean", "std"} and (state["std"] is None) == (not per_channel_std)
        restored = Normalize.from_state_dict(state)
        assert torch.equal(restored(training_images[:16]), norm(training_images[:16]))


def test_other_image_size_uses_the_per_channel_mean(training_images):
    norm = Normalize.fit(training_images)
    larger = torch.randint(0, 256, (2, 3, 12, 10), dtype=torch.uint8)
    channel_mean = (training_images.double().mean((0, 2, 3)) / 255).float().view(3, 1, 1)
    torch.testing.assert_close(norm(larger), larger.float() / 255 - channel_mean, atol=1e-6, rtol=0)


def test_fit_channels_applies_given_statistics_at_any_size():
    norm = Normalize.fit_channels([0.5, 0.25, 0.0], [0.5, 0.25, 1.0])
    images = torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2).expand(1, 3, 5, 2)
    out = norm(images)
    assert out.shape == (1, 3, 5, 2)
    torch.testing.assert_close(out[0, :, 0], torch.tensor([[-1.0, 1.0], [-1.0, 3.0], [0.0, 1.0]]))


def test_channels_last_batch_stays_channels_last(training_images):
    norm = Normalize.fit(training_images, per_channel_std=True)
    batch = training_images[:32].contiguous(memory_format=torch.channels_last)
    out = norm(batch)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, norm(training_images[:32]))


def test_normalize_rejects_bad_inputs(training_images):
    norm = Normalize.fit(training_images)
    with pytest.raises(TypeError, match="uint8 batch, got torch.float32"):
        norm(training_images.float())
    with pytest.raises(ValueError, match="batch has 1 channels but Normalize was fitted on 3"):
        norm(training_images[:, :1])
    with pytest.raises(TypeError, match="expects uint8 images"):
        Normalize.fit(training_images.float())
    with pytest.raises(ValueError, match="std must be positive"):
        Normalize.fit_channels([0.5], [0.0])


# ---- ten_crops ----


def test_ten_crops_are_the_corners_center_and_their_mirrors_in_order():
    images = torch.arange(2 * 3 * 7 * 9).view(2, 3, 7, 9)
    crops = ten_crops(images, 4)
    # 7x9 image, 4x4 crops: the center starts at row (7-4)//2 = 1, column (9-4)//2 = 2.
    expected = [
        images[:, :, 0:4, 0:4],
        images[:, :, 0:4, 5:9],
        images[:, :, 3:7, 0:4],
        images[:, :, 3:7, 5:9],
        images[:, :, 1:5, 2:6],
        images[:, :, 0:4][..., [3, 2, 1, 0]],
        images[:, :, 0:4][..., [8, 7, 6, 5]],
        images[:, :, 3:7][..., [3, 2, 1, 0]],
        images[:, :, 3:7][..., [8, 7, 6, 5]],
        images[:, :, 1:5][..., [5, 4, 3, 2]],
    ]
    assert crops.shape == (10, 2, 3, 4, 4)
    for index, crop in enumerate(expected):
        assert torch.equal(crops[index], crop), f"crop {index}"


def test_ten_crops_rejects_a_crop_larger_than_the_image():
    with pytest.raises(ValueError, match=r"crop must be in \[1, 5\] for 5x8 images, got 6"):
        ten_crops(torch.zeros(1, 3, 5, 8), 6)


# ---- ScaleAugment and CenterCrop ----


def random_pil(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.mark.parametrize("width, height", [(500, 300), (300, 500)])
def test_scale_augment_matches_resize_then_crop_then_flip(width, height):
    img = random_pil(width, height)
    flips_seen = set()
    for seed in range(8):
        params = ScaleAugment(seed=seed).sample(width, height)  # the draws the next line's transform will make
        out = ScaleAugment(seed=seed)(img)
        assert out.shape == (3, 224, 224) and out.dtype == torch.uint8
        resized = np.array(img.resize(params.resized, Image.BILINEAR)).astype(np.int16)
        expected = resized[params.top : params.top + 224, params.left : params.left + 224]
        if params.flip:
            expected = expected[:, ::-1]
        flips_seen.add(params.flip)
        # Only rounding differs (PIL rounds between its two 1-d passes); a crop one pixel off, or a missing flip,
        # would differ by ~85 grey levels on average on this noise image.
        difference = np.abs(out.permute(1, 2, 0).numpy().astype(np.int16) - expected)
        assert difference.max() <= 2 and difference.mean() < 0.5
    assert flips_seen == {True, False}


@pytest.mark.parametrize("width, height", [(500, 300), (300, 500)])
def test_scale_augment_draws_shorter_side_in_range_and_keeps_aspect(width, height):
    aug = ScaleAugment(seed=0)
    draws = [aug.sample(width, height) for _ in range(300)]
    shorter = [min(p.resized) for p in draws]
    assert 256 <= min(shorter) < 270 and 466 < max(shorter) <= 480
    for p in draws:
        assert abs(max(p.resized) - min(p.resized) * 5 / 3) <= 1
        assert 0 <= p.left <= p.resized[0] - 224 and 0 <= p.top <= p.resized[1] - 224


def test_scale_augment_flips_for_some_seeds_only_and_never_when_disabled():
    first_flips = {ScaleAugment(seed=seed).sample(400, 300).flip for seed in range(20)}
    assert first_flips == {True, False}
    aug = ScaleAugment(flip=False, seed=0)
    assert not any(aug.sample(400, 300).flip for _ in range(50))


class _SampleParams(torch.utils.data.Dataset):
    """Each item is the draw a shared ScaleAugment makes in whichever process loads it."""

    def __init__(self, aug: ScaleAugment):
        self.aug = aug

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> torch.Tensor:
        p = self.aug.sample(40, 30)
        return torch.tensor([*p.resized, p.left, p.top, p.flip])


def test_dataloader_workers_draw_independent_streams():
    aug = ScaleAugment(min_size=8, max_size=24, crop=8, seed=0)
    aug.sample(40, 30)  # the parent's generator exists before the fork; the workers must not replay it
    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(_SampleParams(aug), batch_size=None, num_workers=2)
    draws = list(loader)  # items alternate between worker 0 (even) and worker 1 (odd)
    assert not all(torch.equal(a, b) for a, b in zip(draws[0::2], draws[1::2]))
    torch.manual_seed(0)
    assert all(torch.equal(a, b) for a, b in zip(draws, loader)), "workers must be reproducible under torch.manual_seed"


@pytest.mark.parametrize("width, height", [(500, 300), (300, 500)])
def test_center_crop_keeps_a_central_marker_at_the_center(width, height):
    pixels = np.full((height, width, 3), 128, dtype=np.uint8)
    pixels[height // 2 - 20 : height // 2 + 20, width // 2 - 20 : width // 2 + 20] = (255, 0, 0)
    out = CenterCrop(resize=256, crop=224)(Image.fromarray(pixels))
    assert out.shape == (3, 224, 224) and out.dtype == torch.uint8
    # The 40-pixel marker shrinks to ~34 pixels (256/300) around the crop's center (112, 112).
    assert out[:, 98:126, 98:126].eq(torch.tensor([255, 0, 0]).view(3, 1, 1)).all()
    assert out[:, 0, 0].tolist() == [128, 128, 128] and out[:, 223, 223].tolist() == [128, 128, 128]


# ---- resize_shorter ----


@pytest.mark.parametrize(
    "shape, size, expected",
    [((2, 3, 32, 32), 24, (2, 3, 24, 24)), ((1, 3, 30, 50), 15, (1, 3, 15, 25)), ((1, 3, 20, 10), 40, (1, 3, 80, 40))],
)
def test_resize_shorter_shapes_and_constant_images_stay_constant(shape, size, expected):
    images = torch.full(shape, 0.3)
    out = resize_shorter(images, size)
    assert out.shape == expected
    torch.testing.assert_close(out, torch.full(expected, 0.3))


def test_resize_shorter_antialiases_when_shrinking():
    # Alternating columns 0,1,0,1,... shrunk 3x: an antialiased filter averages them to ~0.5 everywhere, while
    # plain bilinear sampling lands on single columns (3i + 1) and keeps the full 0/1 contrast.
    stripes = torch.arange(63).remainder(2).float().expand(1, 1, 63, 63)
    out = resize_shorter(stripes, 21)
    assert (out - 0.5).abs().max() < 0.1


def test_resize_shorter_same_size_and_bad_dtype():
    images = torch.rand(1, 3, 16, 20)
    assert resize_shorter(images, 16) is images
    with pytest.raises(TypeError, match="float batch, got torch.uint8"):
        resize_shorter(images.mul(255).to(torch.uint8), 8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batch_with_cpu_generator_matches_cpu():
    images = torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8)
    on_cpu = random_crop_flip(images, padding=2, flip=True, generator=torch.Generator().manual_seed(0))
    on_gpu = random_crop_flip(images.cuda(), padding=2, flip=True, generator=torch.Generator().manual_seed(0))
    assert on_gpu.device.type == "cuda" and torch.equal(on_gpu.cpu(), on_cpu)
    norm = Normalize.fit(images, per_channel_std=True)
    torch.testing.assert_close(norm(images.cuda()).cpu(), norm(images))
