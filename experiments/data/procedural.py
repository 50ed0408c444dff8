"""Procedural pretraining images: a licence-clean, human-free stand-in for Fashion-MNIST's training set
(PASS, Asano et al. 2021, pretrains without people in the data; here there are no photographs at all,
as in Baradad et al. 2021, "Learning to see by looking at noise").

What is generated. `generate_images(n, seed)` returns n grayscale uint8 images [n, size, size] (28 by
default) and, for diagnostics only, the index into GENERATORS of the generator that drew each; every image
picks one of the five uniformly at random. Generators work in coordinates spanning [-1, 1] across the
image and draw shapes from signed distances with a one-pixel ramp at the edges (anti-aliasing), so what
they draw does not depend on `size` beyond resolution:

    dead_leaves        Lee, Mumford & Huang's dead-leaves model: 64 opaque ellipses and rectangles of random
                       gray, aspect and angle, with radii of density ~ r^-3 from 1.4 pixels to half the
                       image (scale invariant in between), each hiding what lies below it
    shapes_on_texture  one to four shaded ellipses, rectangles and convex polygons (3 to 8 sides) occluding
                       one another over a low-contrast 1/f-noise background
    gabor_patches      a sum of one to three oriented sinusoids under gaussian envelopes: narrow envelopes
                       make Gabor patches, wide ones full-field gratings; a random gain sharpens the
                       sinusoid towards a square wave (edges)
    spectral_noise     gaussian noise with amplitude spectrum 1/f^alpha, alpha uniform in [0.75, 2.25]
                       (natural images have alpha ~ 1), stretched along a random direction for oriented
                       texture, through a sigmoid of random gain (from soft clouds to sharp-edged blobs)
    strokes            one to five quadratic Bezier curves of random width and gray, as distance fields

Then every image is stretched to span [0, 1], blurred with a gaussian (sigma 0.4 to 1.2 pixels) with
probability 0.3, inverted with probability 0.5 and put in a random intensity window of width
log-uniform in [0.25, 1] (varied contrast and brightness), and rounded to uint8.

Speed. Everything is batched torch on the CPU: occluding shapes and strokes are drawn only on the
pixels of their bounding boxes and composited with scatter operations (and one sort), with no loop over
images or pixels. 60000 images at 28x28 take 8 to 10 s on one thread of a busy 2-core machine.
generate_images runs torch on one thread while it works (and restores the setting): on that machine
torch's default two threads made it ten times slower (97 s), the tensors of a chunk being too small to
share out.

How it is seeded. Images are made in chunks of CHUNK_SIZE; chunk c is drawn from a torch CPU generator
seeded by numpy's SeedSequence((seed, c)), so image i depends only on (seed, i) and `size` (and on the
torch version, whose random number algorithms and float kernels fix the exact pixels):
generate_images(k, seed) is the first k images of generate_images(n, seed) for every k <= n, and a set of
any size is a prefix of one endless stream. Different seeds give unrelated streams.

No humans, no third-party content. Every pixel is computed by the code in this file from pseudo-random
numbers; no photograph, drawing, font or dataset goes in. So there is no person in any image and nothing
to license but this project's own code; the images are generated data, distributable under it.

How to use it. Pretrain on it in place of Fashion-MNIST's 60000 training images, then linear-probe on
Fashion-MNIST, MNIST and animal-mnist as usual:

    images, generator_index = generate_images(60000, seed=0)
    dataset = ImageDataset("procedural", images, generator_index, GENERATOR_NAMES)  # experiments.data

The labels are not classes to probe, only which generator drew an image. For held-out images take another
seed, or images past the training prefix of the same stream.
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import numpy as np
import torch

from experiments.data.augment import blur_kernel_size, gaussian_blur

CHUNK_SIZE = 256  # images drawn from one seeded generator: part of the stream's definition
LEAVES = 64
LEAF_RADIUS = (0.1, 1.0)  # in half image widths: 1.4 pixels to half the image at size 28
SHAPES = 4
POLYGON_SIDES = 8  # at most
GABOR_COMPONENTS = 3
STROKES = 5
STROKE_SEGMENTS = 8  # straight pieces a Bezier curve is drawn as
BLUR_P, BLUR_SIGMA = 0.3, (0.4, 1.2)  # sigma in pixels
INVERT_P = 0.5
CONTRAST_WINDOW = (0.25, 1.0)  # width of the final intensity range, log-uniform


def generate_images(n: int, seed: int, size: int = 28) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images [n, size, size] and int64 [n] indices into GENERATORS of the generator that drew each.
    n >= 0, seed >= 0 and size >= 8 must be integers (ValueError otherwise)."""
    for name, value, minimum in (("n", n, 0), ("seed", seed, 0), ("size", size, 8)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if n == 0:
        return torch.zeros(0, size, size, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # chunk-sized tensors: thread hand-offs cost more than they save (module docstring)
    try:
        images, labels = zip(*(generate_chunk(chunk_generator(int(seed), chunk), int(size))
                               for chunk in range(-(-n // CHUNK_SIZE))))
        return torch.cat(images)[:n], torch.cat(labels)[:n]
    finally:
        torch.set_num_threads(threads)


def chunk_generator(seed: int, chunk: int) -> torch.Generator:
    """SeedSequence hashes (seed, chunk) into a well-mixed 64-bit state: nearby pairs give unrelated streams."""
    state = np.random.SeedSequence((seed, chunk)).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def generate_chunk(generator: torch.Generator, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CHUNK_SIZE images: each picks a generator uniformly, then each generator draws its images as one batch."""
    labels = torch.randint(len(GENERATORS), (CHUNK_SIZE,), generator=generator)
    images = torch.empty(CHUNK_SIZE, size, size)
    for index, draw in enumerate(GENERATORS):
        chosen = torch.nonzero(labels == index).squeeze(1)
        if len(chosen):  # the FFT refuses empty batches
            images[chosen] = draw(len(chosen), size, generator)
    return to_uint8(vary_contrast(images, generator)), labels


# ---- the generators: (count, size, generator) -> float [count, size, size], values in [0, 1] -----------------

def dead_leaves(count: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Ellipses and rectangles dropped on a uniform background, later ones on top. Radius density ~ r^-3
    is the one under which the picture looks the same at every scale (Lee, Mumford & Huang 2001)."""
    radius = power_law_radii(count * LEAVES, *LEAF_RADIUS, generator)
    centre = uniform((2, count * LEAVES), -1.1, 1.1, generator)  # leaves may hang over the border
    shapes = random_shapes(torch.arange(count).repeat_interleave(LEAVES), centre, radius, (ELLIPSE, RECTANGLE),
                           0.0, generator)
    return paint_shapes(torch.rand(count, 1, 1, generator=generator).expand(count, size, size), shapes)


def shapes_on_texture(count: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Ellipses, rectangles and convex polygons, each shaded by a linear ramp, occluding one another over
    1/f noise."""
    background = uniform((count, 1, 1), 0.2, 0.8, generator)
    texture = uniform((count, 1, 1), 0.03, 0.15, generator) * power_law_noise(count, size, generator)
    image = torch.arange(count).repeat_interleave(SHAPES)
    shown = (torch.arange(SHAPES) < torch.randint(1, SHAPES + 1, (count, 1), generator=generator)).flatten()
    shapes = random_shapes(image, uniform((2, count * SHAPES), -0.7, 0.7, generator),
                           log_uniform(count * SHAPES, 0.15, 0.7, generator), (ELLIPSE, RECTANGLE, POLYGON), 0.3,
                           generator)
    shapes = Shapes(*(field[shown] for field in shapes))
    return paint_shapes(background + texture, shapes).clamp(0, 1)


def gabor_patches(count: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Sum of sinusoids under gaussian envelopes; tanh(gain * cos) / tanh(gain) runs from a sinusoid
    (small gain) to a square wave (large gain)."""
    x, y = pixel_grid(size)
    shape = (count, GABOR_COMPONENTS, 1, 1)
    shown = (torch.arange(GABOR_COMPONENTS)[:, None, None]
             < torch.randint(1, GABOR_COMPONENTS + 1, (count, 1, 1, 1), generator=generator))
    amplitude = uniform(shape, 0.3, 1.0, generator) * shown
    angle = uniform(shape, 0, math.pi, generator)
    wavelength = log_uniform(shape, 3 * 2 / size, 3.0, generator)  # from 3 pixels (above Nyquist) to 1.5 images
    phase = uniform(shape, 0, 2 * math.pi, generator)
    gain = log_uniform(shape, 0.3, 8.0, generator)
    sigma = log_uniform(shape, 0.2, 4.0, generator)  # envelope width; at 4 a full-field grating
    cx, cy = uniform((2, *shape), -0.7, 0.7, generator)
    along = torch.cos(angle) * x + torch.sin(angle) * y
    wave = torch.tanh(gain * torch.cos(2 * math.pi * along / wavelength + phase)) / torch.tanh(gain)
    envelope = torch.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma**2))
    return 0.5 + 0.5 * (amplitude * envelope * wave).sum(dim=1) / amplitude.sum(dim=1)


def spectral_noise(count: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """1/f^alpha noise through a sigmoid: a small gain keeps the gaussian clouds, a large one thresholds
    them into blobs with sharp, fractal edges."""
    gain = log_uniform((count, 1, 1), 0.5, 8.0, generator)
    return torch.sigmoid(gain * power_law_noise(count, size, generator))


def strokes(count: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Quadratic Bezier curves with round ends: a stroke covers what lies within its half-width of the curve,
    taken as STROKE_SEGMENTS straight segments (the stroke's coverage is the most any segment covers)."""
    pixel = 2 / size
    layers = count * STROKES
    control = uniform((layers, 3, 1, 2), -0.9, 0.9, generator)
    half_width = log_uniform(layers, 0.6, 2.5, generator) * pixel
    gray = torch.rand(count, STROKES, 1, 1, generator=generator)
    shown = torch.arange(STROKES) < torch.randint(1, STROKES + 1, (count, 1), generator=generator)
    image = torch.rand(count, 1, 1, generator=generator).expand(count, size, size)
    t = torch.linspace(0, 1, STROKE_SEGMENTS + 1)[:, None]
    points = (1 - t) ** 2 * control[:, 0] + 2 * t * (1 - t) * control[:, 1] + t**2 * control[:, 2]  # [L, S + 1, 2]
    start, end = points[:, :-1].reshape(-1, 2), points[:, 1:].reshape(-1, 2)  # one row per segment
    reach = half_width.repeat_interleave(STROKE_SEGMENTS)[:, None] + pixel
    low, high = torch.minimum(start, end) - reach, torch.maximum(start, end) + reach
    segment, row, col = pixels_in_boxes(low[:, 0], high[:, 0], low[:, 1], high[:, 1], size)
    x, y = pixel_centre(col, size), pixel_centre(row, size)
    layer = segment // STROKE_SEGMENTS
    distance = segment_distance(x, y, start[segment], end[segment]) - half_width[layer]
    alpha = torch.zeros(layers * size * size).scatter_reduce(
        0, (layer * size + row) * size + col, coverage(distance, size), reduce="amax").view(count, STROKES, size, size)
    alpha = alpha * shown[:, :, None, None]
    for k in range(STROKES):
        image = image + alpha[:, k] * (gray[:, k] - image)
    return image


GENERATORS = (dead_leaves, shapes_on_texture, gabor_patches, spectral_noise, strokes)
GENERATOR_NAMES = tuple(draw.__name__ for draw in GENERATORS)


# ---- occluding shapes ------------------------------------------------------------------------------------------

ELLIPSE, RECTANGLE, POLYGON = range(3)


class Shapes(NamedTuple):
    """Filled shapes, one row each, in painting order: later rows lie on top within an image."""
    image: torch.Tensor  # int64 [L]: the image a shape is painted in
    cx: torch.Tensor
    cy: torch.Tensor
    radius: torch.Tensor  # semi-axis along `angle`; for a polygon the radius of its inscribed circle
    aspect: torch.Tensor  # the shape is squeezed by this factor across `angle`
    angle: torch.Tensor
    kind: torch.Tensor  # int64: ELLIPSE, RECTANGLE or POLYGON
    normals: torch.Tensor  # [L, POLYGON_SIDES] directions of a polygon's side normals, before the squeeze
    gray: torch.Tensor
    shading: torch.Tensor  # gray change across one radius along `angle`


def random_shapes(image, centre, radius, kinds: tuple[int, ...], max_shading: float,
                  generator: torch.Generator) -> Shapes:
    """Shapes of kinds drawn uniformly from `kinds`, with random aspect, angle and gray.

    A polygon of 3 to POLYGON_SIDES sides is the intersection of the half-planes tangent to a circle at
    directions 2 pi (k + j_k) / sides, j_k uniform in [-0.15, 0.15], which keeps every gap between normals
    under pi: the polygon is convex and bounded. Unused normal slots repeat the first: no extra constraint."""
    count = len(image)
    aspect = uniform(count, 0.4, 1.0, generator)
    angle = uniform(count, 0, 2 * math.pi, generator)
    kind = torch.tensor(kinds)[torch.randint(len(kinds), (count,), generator=generator)]
    sides = torch.randint(3, POLYGON_SIDES + 1, (count, 1), generator=generator)
    slot = torch.arange(POLYGON_SIDES)
    normals = 2 * math.pi * (slot + uniform((count, POLYGON_SIDES), -0.15, 0.15, generator)) / sides
    normals = torch.where(slot < sides, normals, normals[:, :1])
    gray = torch.rand(count, generator=generator)
    shading = uniform(count, -max_shading, max_shading, generator)
    return Shapes(image, centre[0], centre[1], radius, aspect, angle, kind, normals, gray, shading)


def paint_shapes(background: torch.Tensor, shapes: Shapes) -> torch.Tensor:
    """Paint `shapes` over background [B, H, W], each shape only on the pixels its bounding box holds.
    Per-pixel shape parameters are gathered with index_select and the kinds' distances blended by arithmetic
    rather than boolean masks: in torch, masks and advanced indexing cost many times an arithmetic op."""
    count, size, _ = background.shape
    cos, sin = torch.cos(shapes.angle), torch.sin(shapes.angle)
    half_diagonal = torch.sqrt(1 + shapes.aspect**2)
    corner = torch.where(shapes.kind == RECTANGLE, half_diagonal, 1.0)  # farthest point / radius
    corner = torch.where(shapes.kind == POLYGON, 1 / torch.cos(max_normal_gap(shapes.normals) / 2), corner)
    reach = shapes.radius * corner + 2 / size
    box, row, col = pixels_in_boxes(shapes.cx - reach, shapes.cx + reach, shapes.cy - reach, shapes.cy + reach, size)

    def take(values):
        return values.index_select(0, box)

    dx, dy = pixel_centre(col, size) - take(shapes.cx), pixel_centre(row, size) - take(shapes.cy)
    u, v = take(cos) * dx + take(sin) * dy, take(cos) * dy - take(sin) * dx
    a, b = take(shapes.radius), take(shapes.radius * shapes.aspect)
    ellipse = ellipse_distance(u, v, a, b)
    distance = ellipse + take((shapes.kind == RECTANGLE).float()) * (rectangle_distance(u, v, a, b) - ellipse)
    polygon = torch.nonzero(take(shapes.kind) == POLYGON).squeeze(1)
    lines = (line.index_select(0, box[polygon]) for line in side_lines(shapes.normals, shapes.aspect, shapes.radius))
    distance[polygon] = polygon_distance(u[polygon], v[polygon], *lines)
    fill = take(shapes.gray) + take(shapes.shading / shapes.radius) * u
    pixel = (take(shapes.image) * size + row) * size + col
    return paint_over(background.reshape(-1), pixel, box, coverage(distance, size), fill).view(count, size, size)


def paint_over(background, pixel, order, alpha, fill) -> torch.Tensor:
    """Paint layers over background [N] in increasing `order` [E]: entry e covers fraction alpha[e] of
    pixel[e] with fill[e], at most one entry per (pixel, order); entries may come in any order.

    A pixel shows its topmost fully covering layer (else the background), seen through the partly covering
    layers above it: each of those paints alpha * fill and lets through 1 - alpha of what lies below. Only
    those partial layers are sorted, to composite them back to front; the layers under the topmost full
    one, most of them, are hidden and dropped first."""
    full = alpha >= 1
    top = torch.full(background.shape, -1).scatter_reduce(0, pixel, (order + 1) * full - 1, reduce="amax")
    top_here = top.index_select(0, pixel)
    under = background * (top < 0) + torch.zeros_like(background).scatter_add(0, pixel, fill * (order == top_here))
    partial = torch.nonzero((order > top_here) & (alpha > 0)).squeeze(1)
    pixel, order, alpha, fill = (values.index_select(0, partial) for values in (pixel, order, alpha, fill))
    span = int(order.max()) + 1 if len(order) else 1
    by_pixel = torch.sort(pixel * span + order).indices  # grouped by pixel, back to front within one
    pixel, alpha, fill = pixel[by_pixel], alpha[by_pixel], fill[by_pixel]
    # of layer k's paint, the part seen is the product of (1 - alpha) over the layers above it in its pixel:
    # a sum of logs from after k to the pixel's last entry (float64: the running sum spans every pixel)
    log_clear = torch.log1p(-alpha.double())
    running = torch.cumsum(log_clear, 0)
    last = torch.full(background.shape, -1).scatter_reduce(0, pixel, torch.arange(len(pixel)), reduce="amax")
    seen = torch.exp(running.index_select(0, last.index_select(0, pixel)) - running).to(background.dtype)
    clear = torch.exp(torch.zeros(background.shape, dtype=torch.float64).scatter_add(0, pixel, log_clear))
    return under * clear.to(background.dtype) + torch.zeros_like(background).scatter_add(0, pixel, alpha * fill * seen)


def side_lines(normals, aspect, radius) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Polygon sides as lines in the shape's axes (u, v), [L, K] each: (p, q, c) with signed distance
    p u + q v - c. Side k bounds {cos(n_k) u + sin(n_k) v / aspect <= radius}; dividing by the length of
    its normal (cos(n_k), sin(n_k) / aspect) makes it a distance."""
    normal_u, normal_v = torch.cos(normals), torch.sin(normals) / aspect[:, None]
    length = torch.sqrt(normal_u**2 + normal_v**2)
    return normal_u / length, normal_v / length, radius[:, None] / length


def max_normal_gap(normals: torch.Tensor) -> torch.Tensor:
    """The widest angle between consecutive side normals [L, K] of each polygon (repeats give gaps of
    zero); its vertices lie within radius / cos(gap / 2) of the centre, before the squeeze, which only shrinks."""
    ordered = torch.sort(torch.remainder(normals, 2 * math.pi), dim=1).values
    wrap = ordered[:, :1] + 2 * math.pi - ordered[:, -1:]
    return torch.cat([ordered.diff(dim=1), wrap], dim=1).amax(dim=1)


# ---- distances and pixels ---------------------------------------------------------------------------------------

def pixel_centre(index: torch.Tensor, size: int) -> torch.Tensor:
    """Coordinate of a pixel row or column: the image spans [-1, 1] edge to edge."""
    return (index + 0.5) * (2 / size) - 1


def pixel_grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (columns) and y (rows) of every pixel, [size, size] each."""
    centres = pixel_centre(torch.arange(size), size)
    y, x = torch.meshgrid(centres, centres, indexing="ij")
    return x, y


def pixels_in_boxes(low_x, high_x, low_y, high_y, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pixels whose centres lie in each box ([L] bounds), clipped to the image: one entry per
    (box, pixel), as box index, row and column [E], box by box in row-major order."""
    def pixel_range(low, high):
        first = torch.ceil((low + 1) * size / 2 - 0.5).clamp(0, size).long()
        last = torch.floor((high + 1) * size / 2 - 0.5).clamp(-1, size - 1).long()
        return first, (last - first + 1).clamp(min=0)

    first_col, cols = pixel_range(low_x, high_x)
    first_row, rows = pixel_range(low_y, high_y)
    counts = rows * cols
    box = torch.repeat_interleave(counts)
    offset = torch.arange(len(box)) - (torch.cumsum(counts, 0) - counts).index_select(0, box)
    cols = cols.index_select(0, box)
    row = torch.div(offset, cols, rounding_mode="floor")
    return box, first_row.index_select(0, box) + row, first_col.index_select(0, box) + offset - row * cols


def coverage(distance: torch.Tensor, size: int) -> torch.Tensor:
    """Fraction of a pixel inside a shape, from the signed distance (negative inside) of its centre to the
    edge: a ramp one pixel (2 / size) wide, i.e. box-filter anti-aliasing of a straight edge."""
    return (0.5 - distance * (size / 2)).clamp(0, 1)


def ellipse_distance(u, v, a, b) -> torch.Tensor:
    """Signed distance to the ellipse (u / a)^2 + (v / b)^2 = 1, b <= a, to first order: (rho - 1) / |grad rho|
    for rho = |(u / a, v / b)|, exact on the boundary. |grad rho| >= 1 / a everywhere, which also settles the
    centre, where the gradient is undefined."""
    rho = torch.sqrt((u / a) ** 2 + (v / b) ** 2)
    gradient = torch.sqrt((u / a**2) ** 2 + (v / b**2) ** 2) / rho.clamp(min=1e-12)
    return (rho - 1) / torch.maximum(gradient, 1 / a)


def rectangle_distance(u, v, a, b) -> torch.Tensor:
    """Signed distance to the rectangle |u| <= a, |v| <= b: exact inside and off the sides, short of it
    off the corners (within a pixel of them, harmless for coverage)."""
    return torch.maximum(u.abs() - a, v.abs() - b)


def polygon_distance(u, v, p, q, c) -> torch.Tensor:
    """Signed distance to convex polygons given by `side_lines` rows [E, K]: the largest distance to a side's
    line, exact inside and off the middle of sides, short of it off the corners."""
    return (p * u[:, None] + q * v[:, None] - c).amax(dim=1)


def segment_distance(x, y, start, end) -> torch.Tensor:
    """Distance from points (x, y) [E] to segments start-end [E, 2]: to the nearest point of the segment,
    found by projecting onto its line and clamping to its ends."""
    step = end - start
    offset = torch.stack([x, y], dim=1) - start
    t = ((offset * step).sum(1) / (step**2).sum(1).clamp(min=1e-12)).clamp(0, 1)
    return torch.linalg.vector_norm(offset - t[:, None] * step, dim=1)


def power_law_noise(count: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise [count, size, size] of zero mean and unit std per image, with amplitude spectrum
    1/f^alpha (alpha uniform in [0.75, 2.25]) after frequencies are stretched by s along a random
    direction and by 1/s across it (s log-uniform in [1/3, 3]), for oriented texture. Periodic (FFT)."""
    alpha = uniform((count, 1, 1), 0.75, 2.25, generator)
    stretch = log_uniform((count, 1, 1), 1 / 3, 3.0, generator)
    angle = uniform((count, 1, 1), 0, math.pi, generator)
    spectrum = torch.fft.rfft2(torch.randn(count, size, size, generator=generator))
    fx, fy = torch.fft.rfftfreq(size)[None, :], torch.fft.fftfreq(size)[:, None]
    along, across = torch.cos(angle) * fx + torch.sin(angle) * fy, torch.cos(angle) * fy - torch.sin(angle) * fx
    frequency = torch.sqrt((stretch * along) ** 2 + (across / stretch) ** 2)
    amplitude = torch.where(frequency > 0, frequency.clamp(min=1e-12) ** -alpha, 0.0)  # no DC: zero mean
    noise = torch.fft.irfft2(spectrum * amplitude, s=(size, size))
    return noise / noise.std(dim=(1, 2), keepdim=True).clamp(min=1e-12)


# ---- shared photometry ----------------------------------------------------------------------------------------

def vary_contrast(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Stretch each image to [0, 1], blur some, invert half, then put each in a random intensity window."""
    count = len(images)
    low = images.amin(dim=(1, 2), keepdim=True)
    images = (images - low) / (images.amax(dim=(1, 2), keepdim=True) - low).clamp(min=1e-6)
    blur = torch.rand(count, generator=generator) < BLUR_P
    sigma = uniform(count, *BLUR_SIGMA, generator)
    invert = torch.rand(count, 1, 1, generator=generator) < INVERT_P
    width = log_uniform((count, 1, 1), *CONTRAST_WINDOW, generator)
    bottom = torch.rand(count, 1, 1, generator=generator) * (1 - width)
    if blur.any():
        kernel_size = blur_kernel_size(BLUR_SIGMA[1], images.shape[-1])
        images[blur] = gaussian_blur(images[blur, None], sigma[blur], kernel_size)[:, 0]
    images = torch.where(invert, 1 - images, images)
    return bottom + width * images


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    return (images * 255).round().clamp(0, 255).to(torch.uint8)


# ---- random numbers --------------------------------------------------------------------------------------------

def uniform(shape, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator)


def log_uniform(shape, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return torch.exp(uniform(shape, math.log(low), math.log(high), generator))


def power_law_radii(shape, r_min: float, r_max: float, generator: torch.Generator) -> torch.Tensor:
    """Radii of density ~ r^-3 on [r_min, r_max], by inverting the CDF (r_min^-2 - r^-2) / (r_min^-2 - r_max^-2)."""
    u = torch.rand(shape, generator=generator)
    return (r_min**-2 - u * (r_min**-2 - r_max**-2)) ** -0.5
