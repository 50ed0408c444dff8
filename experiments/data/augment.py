"""SimCLR / MoCo v2 style view augmentation, batched: every image gets its own random parameters, and
no step loops over images in Python; and RandAugment for fine-tuning (rand_augment).

    random resized crop + horizontal flip  -> one affine sampling grid per image (bilinear)
    brightness and contrast jitter         -> with probability jitter_p
    gaussian blur                          -> with probability blur_p, per-image sigma, separable grouped conv
    solarize                               -> with probability solarize_p (BYOL's second view)

All random numbers are drawn on the CPU from the caller's generator, in a fixed amount per image
whatever the probabilities, so a run is reproducible and resumable on any device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

RANDAUGMENT_OPS = 2  # timm's default number of ops, used by the medical-MAE paper's "rand-m6-mstd0.5-inc1"
RANDAUGMENT_MAGNITUDE = 6  # of 10: the "m6" in the paper's scripts


@dataclass(frozen=True)
class AugmentConfig:
    output_size: int = 28
    crop_scale: tuple[float, float] = (0.2, 1.0)  # crop area as a fraction of the image's
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop width / height, sampled log-uniformly
    flip_p: float = 0.5
    jitter_p: float = 0.8  # brightness/contrast jitter applied with this probability
    brightness: float = 0.4  # factor in [1 - brightness, 1 + brightness]
    contrast: float = 0.4  # factor in [1 - contrast, 1 + contrast]
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # in output pixels
    solarize_p: float = 0.0
    solarize_threshold: float = 0.5

    def __post_init__(self):
        for field in fields(self):  # config files give lists; keep the config hashable and comparable
            if isinstance(getattr(self, field.name), list):
                object.__setattr__(self, field.name, tuple(getattr(self, field.name)))
        if not isinstance(self.output_size, int) or self.output_size < 1:
            raise ValueError(f"output_size must be an integer >= 1, got {self.output_size!r}")
        for name in ("flip_p", "jitter_p", "blur_p", "solarize_p", "brightness", "contrast", "solarize_threshold"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name, upper in (("crop_scale", 1.0), ("crop_ratio", math.inf), ("blur_sigma", math.inf)):
            value = getattr(self, name)
            if len(value) != 2 or not 0 < value[0] <= value[1] <= upper:
                raise ValueError(f"{name} must be a range (low, high) with 0 < low <= high <= {upper}, got {value}")


def augment(images: torch.Tensor, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """float [B, C, H, W] in [0, 1] (any device) -> one random view of each, float [B, C, S, S] in [0, 1]."""
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"expected float images [B, C, H, W], got {images.dtype} {tuple(images.shape)}")
    if generator.device.type != "cpu":
        raise ValueError(f"the generator must be a CPU generator, got one on {generator.device}")
    batch, _, height, width = images.shape
    boxes = random_resized_crop_boxes(batch, width / height, config.crop_scale, config.crop_ratio, generator)
    u = torch.rand(7, batch, generator=generator, dtype=torch.float64)
    flip = u[0] < config.flip_p
    jitter = u[1] < config.jitter_p
    blur = u[2] < config.blur_p
    solarize_now = u[3] < config.solarize_p
    brightness = 1 + config.brightness * (2 * u[4] - 1)
    contrast = 1 + config.contrast * (2 * u[5] - 1)
    sigma = config.blur_sigma[0] + (config.blur_sigma[1] - config.blur_sigma[0]) * u[6]

    def on_device(values: torch.Tensor) -> torch.Tensor:
        return values.to(device=images.device, dtype=images.dtype if values.is_floating_point() else values.dtype)

    def where(mask: torch.Tensor, transformed: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
        return torch.where(on_device(mask)[:, None, None, None], transformed, original)

    views = crop_and_flip(images, on_device(boxes), on_device(flip), config.output_size)
    if jitter.any():  # masks live on the CPU: skipping an unused step costs no device sync
        views = where(jitter, adjust_contrast(adjust_brightness(views, on_device(brightness)), on_device(contrast)),
                      views)
    if blur.any():
        kernel_size = blur_kernel_size(config.blur_sigma[1], config.output_size)
        views = where(blur, gaussian_blur(views, on_device(sigma), kernel_size), views)
    if solarize_now.any():
        views = where(solarize_now, solarize(views, config.solarize_threshold), views)
    return views.clamp(0, 1)  # bilinear sampling and blurring can overshoot [0, 1] by rounding


def random_resized_crop_boxes(batch: int, aspect: float, scale: tuple[float, float], ratio: tuple[float, float],
                              generator: torch.Generator) -> torch.Tensor:
    """Crop boxes [B, 4] = (center x, center y, width, height) as fractions of an image of width/height `aspect`.

    As torchvision's RandomResizedCrop: area fraction uniform in `scale`, width/height ratio log-uniform
    in `ratio`, position uniform over the places the box fits. Where torchvision retries boxes that do
    not fit, the ratio is clipped to the range that fits at that area, so the area is always as drawn."""
    u = torch.rand(4, batch, generator=generator, dtype=torch.float64)
    area = scale[0] + (scale[1] - scale[0]) * u[0]
    log_ratio = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[1]
    # width fraction sqrt(area * ratio / aspect) <= 1 and height fraction sqrt(area * aspect / ratio) <= 1
    log_ratio = torch.minimum(torch.maximum(log_ratio, torch.log(area * aspect)), torch.log(aspect / area))
    width = torch.sqrt(area * torch.exp(log_ratio) / aspect).clamp(max=1)  # clamp: rounding only
    height = torch.sqrt(area * aspect / torch.exp(log_ratio)).clamp(max=1)
    center_x = width / 2 + (1 - width) * u[2]
    center_y = height / 2 + (1 - height) * u[3]
    return torch.stack([center_x, center_y, width, height], dim=1)


def crop_and_flip(images: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, output_size: int) -> torch.Tensor:
    """Resample each image's box to output_size x output_size, mirrored left-right where `flip`.

    In grid_sample's coordinates the image spans [-1, 1], so output point p samples the input at
    (2 * center - 1) + size * p, with the x scale negated to mirror the crop."""
    center_x, center_y, width, height = boxes.unbind(dim=1)
    theta = torch.zeros(len(images), 2, 3, dtype=images.dtype, device=images.device)
    theta[:, 0, 0] = torch.where(flip, -width, width)
    theta[:, 0, 2] = 2 * center_x - 1
    theta[:, 1, 1] = height
    theta[:, 1, 2] = 2 * center_y - 1
    grid = F.affine_grid(theta, [len(images), images.shape[1], output_size, output_size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def adjust_brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (images * factor[:, None, None, None]).clamp(0, 1)


def adjust_contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend each image with its own mean intensity."""
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    return (mean + factor[:, None, None, None] * (images - mean)).clamp(0, 1)


def blur_kernel_size(max_sigma: float, image_size: int) -> int:
    """Odd, covering +-3 sigma of the widest blur, no larger than the image (reflect padding needs that)."""
    return min(2 * math.ceil(3 * max_sigma) + 1, image_size if image_size % 2 else image_size - 1)


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Blur image i with a normalised gaussian of std sigma[i]: the 2-d kernel is separable, so two 1-d
    passes, each a grouped convolution with one kernel per (image, channel)."""
    batch, channels, height, width = images.shape
    offsets = torch.arange(kernel_size, dtype=images.dtype, device=images.device) - kernel_size // 2
    kernels = torch.exp(-offsets**2 / (2 * sigma[:, None] ** 2))
    kernels = (kernels / kernels.sum(dim=1, keepdim=True)).repeat_interleave(channels, dim=0)  # [B * C, K]
    pad = kernel_size // 2
    x = F.pad(images.reshape(1, batch * channels, height, width), (pad, pad, pad, pad), mode="reflect")
    x = F.conv2d(x, kernels[:, None, :, None], groups=batch * channels)  # vertical
    x = F.conv2d(x, kernels[:, None, None, :], groups=batch * channels)  # horizontal
    return x.reshape(batch, channels, height, width)


def solarize(images: torch.Tensor, threshold: float) -> torch.Tensor:
    return torch.where(images >= threshold, 1 - images, images)


def rand_augment(images: torch.Tensor, generator: torch.Generator, num_ops: int = RANDAUGMENT_OPS,
                 magnitude: int = RANDAUGMENT_MAGNITUDE) -> torch.Tensor:
    """RandAugment (Cubuk et al. 2020) on uint8 [B, H, W] images, each image with its own ops.

    The medical-MAE paper's scripts pass timm's `--aa rand-m6-mstd0.5-inc1`: magnitude 6 on timm's 0-10
    scale, timm's default of 2 ops an image. This is torchvision's RandAugment with num_magnitude_bins=11,
    so that magnitude m is m/10 of each op's range as in timm (rotate 30 degrees, shear 0.3, translate 0.45
    of the side, enhance 0.9 at m=10). Left out of timm's variant: the magnitude noise (mstd0.5), each op's
    0.5 probability and the op set ("inc1": invert, solarize-add; torchvision has identity instead).

    torchvision draws from torch's global generator, so the draws run in a fork of it seeded from
    `generator`: the result depends only on the generator, which advances, and the caller's global state
    is left as it was. A Python loop over images (torchvision draws one set of ops a call): for 256 images,
    0.05 s with 2 ops and 0.13 s with 6 on one CPU thread, several times that with torch on 2 threads."""
    if images.dtype != torch.uint8 or images.dim() != 3:
        raise ValueError(f"expected uint8 [B, H, W] images, got {images.dtype} {tuple(images.shape)}")
    if not 0 <= magnitude <= 10:
        raise ValueError(f"magnitude must be in 0..10, got {magnitude}")
    transform = v2.RandAugment(num_ops=num_ops, magnitude=magnitude, num_magnitude_bins=11)
    seed = int(torch.randint(2**62, (), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.cat([transform(image[None]) for image in images.cpu()]).to(images.device)
