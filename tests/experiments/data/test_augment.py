"""experiments.augment: each transformation against its closed form, and the batch-level guarantees
(per-image randomness, reproducibility from the generator, shapes and range)."""
import math

import pytest
import torch

from experiments.data import ImageDataset
from experiments.data.augment import (
    AugmentConfig,
    augment,
    blur_kernel_size,
    crop_and_flip,
    gaussian_blur,
    rand_augment,
    random_resized_crop_boxes,
)

IDENTITY = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, blur_p=0.0)


def noise(batch=8, channels=1, size=28, seed=0):
    return torch.rand(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


def run(images, seed=0, **config):
    return augment(images, AugmentConfig(**config), torch.Generator().manual_seed(seed))


def test_identity_config_returns_the_input():
    images = noise(channels=3)
    assert torch.allclose(run(images, **IDENTITY), images, atol=1e-5, rtol=0)


def test_flip_only_mirrors_left_right():
    images = noise()
    assert torch.allclose(run(images, **{**IDENTITY, "flip_p": 1.0}), torch.flip(images, dims=[3]), atol=1e-5, rtol=0)


def test_same_seed_same_views_other_seed_other_views():
    images = noise()
    assert torch.equal(run(images, seed=1), run(images, seed=1))
    assert not torch.allclose(run(images, seed=1), run(images, seed=2))


def test_every_image_gets_its_own_parameters():
    views = run(noise(batch=1).expand(16, -1, -1, -1).contiguous())
    flat = views.flatten(1)
    distances = torch.cdist(flat, flat)
    assert (distances + torch.eye(16) * 1e9).min() > 1e-3  # no two views of the same image coincide


def test_shape_dtype_and_range_with_every_transformation_on():
    images = noise(batch=5, channels=3, size=40)
    views = run(images, output_size=24, jitter_p=1.0, brightness=1.0, contrast=1.0, blur_p=1.0, solarize_p=1.0)
    assert views.shape == (5, 3, 24, 24) and views.dtype == torch.float32
    assert views.min() >= 0 and views.max() <= 1


def test_white_and_black_images_stay_in_range_despite_rounding():
    images = torch.cat([torch.ones(64, 1, 28, 28), torch.zeros(64, 1, 28, 28)])
    views = run(images, jitter_p=0.0, blur_p=1.0)
    assert views[:64].max() == 1 and views[:64].min() > 0.999 and views[64:].min() == 0 and views[64:].max() < 1e-3


def test_crop_areas_lie_in_crop_scale_and_boxes_inside_the_image():
    scale, ratio = (0.2, 1.0), (3 / 4, 4 / 3)
    boxes = random_resized_crop_boxes(20000, 1.0, scale, ratio, torch.Generator().manual_seed(0))
    center_x, center_y, width, height = boxes.unbind(dim=1)
    area = width * height
    assert area.min() >= scale[0] - 1e-9 and area.max() <= scale[1] + 1e-9
    assert abs(area.mean().item() - sum(scale) / 2) < 0.01  # area uniform in scale
    for center, size in ((center_x, width), (center_y, height)):
        assert (center - size / 2).min() >= -1e-9 and (center + size / 2).max() <= 1 + 1e-9
    # below area 3/4 every drawn ratio fits, so it is log-uniform in `ratio`, unclipped
    log_ratio = torch.log(width / height)[area < 0.74]
    assert log_ratio.min() >= math.log(ratio[0]) - 1e-9 and log_ratio.max() <= math.log(ratio[1]) + 1e-9
    assert abs(log_ratio.mean().item()) < 0.01 and log_ratio.std() > 0.15


def test_ratio_is_measured_in_pixels_on_a_wide_image():
    aspect = 2.0  # width = 2 * height
    boxes = random_resized_crop_boxes(2000, aspect, (0.1, 0.3), (1.0, 1.0), torch.Generator().manual_seed(0))
    width_px, height_px = boxes[:, 2] * aspect, boxes[:, 3]
    assert torch.allclose(width_px, height_px)


def test_ratio_is_clipped_to_fit_so_the_area_is_as_drawn():
    boxes = random_resized_crop_boxes(2000, 1.0, (0.9, 1.0), (1 / 3, 3.0), torch.Generator().manual_seed(0))
    area = boxes[:, 2] * boxes[:, 3]
    assert boxes[:, 2:].max() <= 1 and area.min() >= 0.9 - 1e-9
    full = random_resized_crop_boxes(10, 1.0, (1.0, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(0))
    assert torch.allclose(full, torch.tensor([0.5, 0.5, 1.0, 1.0], dtype=full.dtype).expand(10, 4))


def test_crop_zooms_by_the_box_size():
    # input value = the position of the pixel centre as a fraction of the width (channel 0) or of the
    # height (channel 1), so the view's neighbouring columns (rows) differ by box width (height) / output
    # size, mirrored left-right when flipped
    size = 28
    position = (torch.arange(size) + 0.5) / size
    ramps = torch.stack([position.expand(size, size), position[:, None].expand(size, size)])
    boxes = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.4, 0.6, 0.25, 0.5]])
    views = crop_and_flip(ramps.expand(2, 2, size, size), boxes, torch.tensor([False, True]), output_size=size)
    column_steps = (views[:, 0, :, 1:] - views[:, 0, :, :-1])[:, :, 2:-2]  # away from the edges, where
    row_steps = (views[:, 1, 1:, :] - views[:, 1, :-1, :])[:, 2:-2, :]  # bilinear is exact on a ramp
    for i, (width, height, sign) in enumerate([(0.5, 0.5, 1), (0.25, 0.5, -1)]):
        assert torch.allclose(column_steps[i], torch.full_like(column_steps[i], sign * width / size), atol=1e-5)
        assert torch.allclose(row_steps[i], torch.full_like(row_steps[i], height / size), atol=1e-5)
    middle = slice(size // 2 - 1, size // 2 + 1)
    assert torch.allclose(views[:, 0, :, middle].mean(dim=(1, 2)), boxes[:, 0], atol=1e-5)
    assert torch.allclose(views[:, 1, middle, :].mean(dim=(1, 2)), boxes[:, 1], atol=1e-5)


def test_brightness_scales_each_image_by_one_factor_in_range():
    images = 0.1 + 0.4 * noise()  # in [0.1, 0.5]: factors up to 1.5 keep it unclipped
    views = run(images, **{**IDENTITY, "jitter_p": 1.0, "brightness": 0.5, "contrast": 0.0})
    factor = views / images
    per_image = factor.flatten(1).mean(dim=1)
    assert torch.allclose(factor, per_image[:, None, None, None].expand_as(factor), atol=1e-4)
    assert per_image.min() >= 0.5 - 1e-4 and per_image.max() <= 1.5 + 1e-4 and per_image.std() > 0.05


def test_contrast_keeps_the_mean_and_scales_deviations():
    images = 0.3 + 0.4 * noise()  # in [0.3, 0.7]: factors up to 1.4 keep it unclipped
    views = run(images, **{**IDENTITY, "jitter_p": 1.0, "brightness": 0.0, "contrast": 0.4})
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(views.mean(dim=(1, 2, 3), keepdim=True), mean, atol=1e-5)
    factor = ((views - mean) * (images - mean)).flatten(1).sum(1) / ((images - mean) ** 2).flatten(1).sum(1)
    assert torch.allclose(views - mean, factor[:, None, None, None] * (images - mean), atol=1e-5)
    assert factor.min() >= 0.6 - 1e-4 and factor.max() <= 1.4 + 1e-4


def test_jitter_probability_is_per_image():
    images = 0.2 + 0.5 * noise(batch=2000, size=4)
    views = run(images, **{**IDENTITY, "jitter_p": 0.3, "output_size": 4})
    changed = (views - images).flatten(1).abs().amax(dim=1) > 1e-4
    assert abs(changed.float().mean().item() - 0.3) < 0.05


def test_solarize_inverts_pixels_above_the_threshold():
    images = noise()
    views = run(images, **IDENTITY, solarize_p=1.0, solarize_threshold=0.3)
    expected = torch.where(images >= 0.3, 1 - images, images)
    assert torch.allclose(views, expected, atol=1e-5)


def test_blur_impulse_response_is_the_normalised_gaussian():
    size, sigmas = 21, torch.tensor([0.5, 1.5])
    impulse = torch.zeros(2, 1, size, size)
    impulse[:, :, size // 2, size // 2] = 1
    kernel_size = blur_kernel_size(1.5, size)
    blurred = gaussian_blur(impulse, sigmas, kernel_size)
    offsets = torch.arange(size, dtype=torch.float64) - size // 2
    for image, sigma in zip(blurred, sigmas.double()):
        inside = offsets.abs() <= kernel_size // 2
        g = torch.exp(-offsets**2 / (2 * sigma**2)) * inside
        expected = torch.outer(g, g) / g.sum() ** 2
        assert torch.allclose(image[0].double(), expected, atol=1e-6)


def test_blur_keeps_a_constant_image_and_smooths_noise():
    constant = torch.full((3, 1, 28, 28), 0.37)
    sigma = torch.tensor([0.3, 1.0, 2.0])
    assert torch.allclose(gaussian_blur(constant, sigma, 13), constant, atol=1e-6)
    images = noise(batch=3)
    blurred = run(images, **{**IDENTITY, "blur_p": 1.0, "blur_sigma": (1.0, 2.0)})
    assert (blurred.flatten(1).var(dim=1) < 0.5 * images.flatten(1).var(dim=1)).all()
    assert torch.allclose(blurred.mean(dim=(1, 2, 3)), images.mean(dim=(1, 2, 3)), atol=0.02)


def test_blur_kernel_size_covers_three_sigma_and_fits_the_image():
    assert blur_kernel_size(2.0, 28) == 13
    assert blur_kernel_size(0.1, 28) == 3
    assert blur_kernel_size(10.0, 28) == 27 and blur_kernel_size(10.0, 9) == 9
    assert run(noise(batch=2, size=5), output_size=1, blur_p=1.0).shape == (2, 1, 1, 1)


def test_config_lists_become_tuples():
    config = AugmentConfig(crop_scale=[0.5, 1.0])
    assert config.crop_scale == (0.5, 1.0) and hash(config) == hash(AugmentConfig(crop_scale=(0.5, 1.0)))


@pytest.mark.parametrize("bad", [dict(output_size=0), dict(output_size=2.5), dict(flip_p=1.5), dict(jitter_p=-0.1),
                                 dict(blur_p=2), dict(solarize_p=-1), dict(brightness=1.2), dict(contrast=-0.1),
                                 dict(crop_scale=(0.5, 0.2)), dict(crop_scale=(0.0, 1.0)), dict(crop_scale=(0.5, 1.5)),
                                 dict(crop_ratio=(0.0, 1.0)), dict(crop_ratio=(2.0, 1.0)), dict(blur_sigma=(0.0, 1.0)),
                                 dict(blur_sigma=(1.0,)), dict(solarize_threshold=1.5)])
def test_bad_config_raises(bad):
    with pytest.raises(ValueError):
        AugmentConfig(**bad)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="float images"):
        augment(torch.zeros(2, 28, 28), AugmentConfig(), torch.Generator())
    with pytest.raises(ValueError, match="float images"):
        augment(torch.zeros(2, 1, 28, 28, dtype=torch.uint8), AugmentConfig(), torch.Generator())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_views_match_cpu_views():
    images = noise(batch=16)
    config = dict(jitter_p=0.5, blur_p=0.5, solarize_p=0.5)
    on_gpu = run(images.cuda(), seed=3, **config)
    assert on_gpu.device.type == "cuda"
    assert torch.allclose(on_gpu.cpu(), run(images, seed=3, **config), atol=1e-4)


def random_dataset(n, num_classes, seed):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, num_classes, (n,), generator=generator)
    return ImageDataset("synthetic", images, labels, tuple(str(c) for c in range(num_classes)))


def test_rand_augment_is_reproducible_per_seed_and_leaves_the_global_rng_alone():
    images = random_dataset(16, 2, seed=0).images
    state = torch.get_rng_state()
    first = rand_augment(images, torch.Generator().manual_seed(1))
    assert torch.equal(torch.get_rng_state(), state)
    assert first.dtype == torch.uint8 and first.shape == images.shape
    assert torch.equal(first, rand_augment(images, torch.Generator().manual_seed(1)))
    assert not torch.equal(first, rand_augment(images, torch.Generator().manual_seed(2)))
    generator = torch.Generator().manual_seed(1)
    rand_augment(images, generator)
    assert not torch.equal(first, rand_augment(images, generator))  # the generator advances
    assert torch.equal(rand_augment(images, torch.Generator().manual_seed(1), num_ops=0), images)


def test_rand_augment_draws_ops_per_image():
    same = random_dataset(1, 2, seed=3).images.expand(32, -1, -1).contiguous()
    out = rand_augment(same, torch.Generator().manual_seed(0), num_ops=6)
    assert len({bytes(image.numpy()) for image in out}) > 16
