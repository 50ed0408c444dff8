"""experiments.procedural: the stream's guarantees (shapes, determinism, prefix stability across chunks,
seeds, the generator mix, non-degenerate images, argument checks), and the drawing helpers against
closed forms and a naive back-to-front painter."""
import math

import pytest
import torch

from experiments.data.procedural import (
    CHUNK_SIZE,
    ELLIPSE,
    GENERATOR_NAMES,
    GENERATORS,
    POLYGON,
    POLYGON_SIDES,
    RECTANGLE,
    coverage,
    ellipse_distance,
    generate_images,
    max_normal_gap,
    paint_over,
    paint_shapes,
    pixel_grid,
    pixels_in_boxes,
    polygon_distance,
    power_law_noise,
    power_law_radii,
    random_shapes,
    rectangle_distance,
    segment_distance,
    side_lines,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def stream():
    return generate_images(3000, seed=0)


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


# ---- the stream ----------------------------------------------------------------------------------------------

def test_shapes_dtypes_and_labels(stream):
    images, labels = stream
    assert images.dtype == torch.uint8 and images.shape == (3000, 28, 28)
    assert labels.dtype == torch.int64 and labels.shape == (3000,)
    assert 0 <= int(labels.min()) and int(labels.max()) < len(GENERATORS) == len(GENERATOR_NAMES)
    for size in (8, 41):
        images, labels = generate_images(5, seed=0, size=size)
        assert images.shape == (5, size, size) and labels.shape == (5,)
    images, labels = generate_images(0, seed=0)
    assert images.shape == (0, 28, 28) and images.dtype == torch.uint8 and labels.shape == (0,)


def test_same_seed_same_images():
    first, second = generate_images(300, seed=3), generate_images(300, seed=3)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_every_prefix_is_the_shorter_stream_across_chunk_boundaries():
    images, labels = generate_images(2 * CHUNK_SIZE + 5, seed=1)
    for k in (1, CHUNK_SIZE - 1, CHUNK_SIZE, CHUNK_SIZE + 1, 2 * CHUNK_SIZE + 2):
        prefix_images, prefix_labels = generate_images(k, seed=1)
        assert torch.equal(prefix_images, images[:k]) and torch.equal(prefix_labels, labels[:k]), k


def test_different_seeds_share_no_image():
    first = {bytes(image.numpy()) for image in generate_images(300, seed=0)[0]}
    second = {bytes(image.numpy()) for image in generate_images(300, seed=1)[0]}
    assert len(first) == len(second) == 300 and not first & second


def test_generators_are_chosen_uniformly(stream):
    _, labels = stream
    counts = torch.bincount(labels, minlength=len(GENERATORS)).double()
    expected = len(labels) / len(GENERATORS)
    spread = math.sqrt(len(labels) * (1 / len(GENERATORS)) * (1 - 1 / len(GENERATORS)))  # binomial std
    assert ((counts - expected).abs() < 5 * spread).all(), counts


def test_images_are_not_degenerate(stream):
    images, labels = stream
    pixels = images.flatten(1).double() / 255
    std = pixels.std(dim=1)
    assert (std > 4 / 255).double().mean() > 0.99
    for index in range(len(GENERATORS)):
        assert std[labels == index].median() > 0.05, GENERATOR_NAMES[index]
    assert len(torch.unique(images.flatten(1), dim=0)) == len(images)  # no duplicates
    assert int(images.min()) == 0 and int(images.max()) == 255  # contrast windows reach both ends


@pytest.mark.parametrize("arguments", [dict(n=-1, seed=0), dict(n=2.0, seed=0), dict(n="3", seed=0),
                                       dict(n=True, seed=0), dict(n=3, seed=-1), dict(n=3, seed=0.5),
                                       dict(n=3, seed=None), dict(n=3, seed=0, size=7), dict(n=3, seed=0, size=28.0)])
def test_bad_arguments_raise(arguments):
    with pytest.raises(ValueError):
        generate_images(**arguments)


@pytest.mark.parametrize("size", [8, 28])
def test_every_generator_draws_finite_values_in_the_unit_range(size):
    for draw in GENERATORS:
        images = draw(7, size, generator())
        assert images.shape == (7, size, size) and images.is_floating_point(), draw.__name__
        assert images.isfinite().all() and images.min() >= -1e-6 and images.max() <= 1 + 1e-6, draw.__name__


# ---- drawing helpers -------------------------------------------------------------------------------------------

def test_pixels_in_boxes_matches_brute_force():
    size = 10
    g = generator(1)
    low_x, low_y = torch.rand(40, generator=g) * 3 - 1.5, torch.rand(40, generator=g) * 3 - 1.5
    width, height = torch.rand(40, generator=g) * 1.5 - 0.2, torch.rand(40, generator=g) * 1.5 - 0.2  # some empty
    box, row, col = pixels_in_boxes(low_x, low_x + width, low_y, low_y + height, size)
    expected = [(b, r, c) for b in range(40) for r in range(size) for c in range(size)
                if low_x[b] <= (c + 0.5) * 2 / size - 1 <= low_x[b] + width[b]
                and low_y[b] <= (r + 0.5) * 2 / size - 1 <= low_y[b] + height[b]]
    assert list(zip(box.tolist(), row.tolist(), col.tolist())) == expected


def naive_painting(background, shapes):
    """Every shape on every pixel, back to front, also counting the partial layers above the topmost full one."""
    x, y = pixel_grid(background.shape[-1])
    images, partial_above = background.clone(), torch.zeros(background.shape, dtype=torch.long)
    for i in range(len(shapes.image)):
        dx, dy = x - shapes.cx[i], y - shapes.cy[i]
        cos, sin = math.cos(shapes.angle[i]), math.sin(shapes.angle[i])
        u, v = cos * dx + sin * dy, cos * dy - sin * dx
        a, b = shapes.radius[i], shapes.radius[i] * shapes.aspect[i]
        if shapes.kind[i] == ELLIPSE:
            distance = ellipse_distance(u, v, a, b)
        elif shapes.kind[i] == RECTANGLE:
            distance = rectangle_distance(u, v, a, b)
        else:
            lines = [line[i].expand(u.numel(), -1) for line in side_lines(shapes.normals, shapes.aspect, shapes.radius)]
            distance = polygon_distance(u.flatten(), v.flatten(), *lines).view_as(u)
        alpha = coverage(distance, background.shape[-1])
        fill = shapes.gray[i] + shapes.shading[i] / shapes.radius[i] * u
        image = shapes.image[i]
        images[image] = images[image] + alpha * (fill - images[image])
        partial_above[image] = torch.where(alpha >= 1, 0, partial_above[image] + (alpha > 0).long())
    return images, partial_above


@pytest.mark.parametrize("kinds", [(ELLIPSE, RECTANGLE), (POLYGON,)])
def test_paint_shapes_matches_naive_back_to_front_painting(kinds):
    """Also where several edges share a pixel (the sorted path), and with no bounding box cutting a shape short."""
    g = generator(2)
    count, per_image, size = 4, 12, 20
    radius = torch.exp(torch.empty(count * per_image).uniform_(math.log(0.05), math.log(0.8), generator=g))
    centre = torch.rand(2, count * per_image, generator=g) * 2.2 - 1.1
    shapes = random_shapes(torch.arange(count).repeat_interleave(per_image), centre, radius, kinds, 0.3, g)
    background = torch.rand(count, size, size, generator=g)
    expected, partial_above = naive_painting(background, shapes)
    assert (partial_above >= 2).sum() > 10
    assert torch.allclose(paint_shapes(background, shapes), expected, atol=1e-5, rtol=0)


def test_paint_over_small_cases_by_hand():
    one_pixel = torch.zeros(1, dtype=torch.long)

    def paint(background, orders, alphas, fills):
        pixel, orders = one_pixel.repeat(len(orders)), torch.tensor(orders, dtype=torch.long)
        return paint_over(torch.tensor([background]), pixel, orders, torch.tensor(alphas), torch.tensor(fills)).item()

    assert paint(0.3, [0], [0.25], [1.0]) == pytest.approx(0.3 * 0.75 + 0.25)
    assert paint(0.3, [0, 1], [1.0, 0.5], [0.2, 1.0]) == pytest.approx(0.6)
    assert paint(0.3, [1, 0], [0.5, 1.0], [1.0, 0.2]) == pytest.approx(0.6)  # entries in any order
    assert paint(0.3, [0, 1, 2], [1.0, 0.5, 1.0], [0.2, 1.0, 0.9]) == pytest.approx(0.9)
    assert paint(0.3, [0, 1], [0.5, 0.0], [1.0, 0.0]) == pytest.approx(0.65)  # zero coverage changes nothing
    three_edges = ((0.3 * 0.5 + 0.5 * 0.0) * 0.5 + 0.5 * 0.2) * 0.5 + 0.5 * 1.0  # orders 0, 1, 2 in turn
    assert paint(0.3, [2, 0, 1], [0.5, 0.5, 0.5], [1.0, 0.0, 0.2]) == pytest.approx(three_edges)
    assert paint(0.3, [], [], []) == pytest.approx(0.3)


def test_distances_against_closed_forms():
    g = generator(3)
    u, v = torch.randn(200, generator=g), torch.randn(200, generator=g)
    r = torch.full_like(u, 0.7)
    assert torch.allclose(ellipse_distance(u, v, r, r), torch.hypot(u, v) - 0.7, atol=1e-6)  # circle: exact
    assert ellipse_distance(torch.zeros(1), torch.zeros(1), r[:1], r[:1]).item() == pytest.approx(-0.7)
    t = torch.rand(200, generator=g) * 2 * math.pi
    a, b = torch.full_like(t, 2.0), torch.full_like(t, 1.0)
    assert ellipse_distance(2 * torch.cos(t), torch.sin(t), a, b).abs().max() < 1e-6  # on the boundary
    assert (ellipse_distance(2.2 * torch.cos(t), 1.1 * torch.sin(t), a, b) > 0).all()
    assert (ellipse_distance(1.8 * torch.cos(t), 0.9 * torch.sin(t), a, b) < 0).all()
    delta = torch.linspace(-0.5, 0.5, 11)
    two, one = torch.full_like(delta, 2.0), torch.full_like(delta, 1.0)
    assert torch.allclose(ellipse_distance(2 + delta, 0 * delta, two, one), delta, atol=1e-6)  # on the axes
    assert torch.allclose(ellipse_distance(0 * delta, 1 + delta, two, one), delta, atol=1e-6)
    assert torch.allclose(rectangle_distance(2 + delta, 0 * delta, two, one), delta, atol=1e-6)
    assert torch.allclose(rectangle_distance(0 * delta, -1 - delta, two, one), delta, atol=1e-6)
    x = torch.tensor([0.5, -0.4, 1.3, 0.2])
    y = torch.tensor([0.3, 0.3, -0.4, 0.0])
    start, end = torch.tensor([[0.0, 0.0]]).expand(4, 2), torch.tensor([[1.0, 0.0]]).expand(4, 2)
    assert torch.allclose(segment_distance(x, y, start, end), torch.tensor([0.3, 0.5, 0.5, 0.0]))


@pytest.mark.parametrize("aspect", [1.0, 0.5])
def test_square_normals_make_the_rectangle(aspect):
    """Normals at 0, 90, 180, 270 degrees (then repeats) around radius r, squeezed by `aspect`, bound the
    rectangle |u| <= r, |v| <= aspect r, and the max over the four side lines is its distance everywhere."""
    normals = torch.tensor([[0.0, math.pi / 2, math.pi, 3 * math.pi / 2] + [0.0] * (POLYGON_SIDES - 4)])
    lines = side_lines(normals, torch.tensor([aspect]), torch.tensor([0.6]))
    g = generator(4)
    u, v = torch.randn(300, generator=g), torch.randn(300, generator=g)
    distance = polygon_distance(u, v, *(line.expand(300, -1) for line in lines))
    assert torch.allclose(distance, rectangle_distance(u, v, 0.6, 0.6 * aspect), atol=1e-6)
    assert max_normal_gap(normals).item() == pytest.approx(math.pi / 2)


def test_max_normal_gap_against_sorting_by_hand():
    g = generator(5)
    normals = torch.rand(20, POLYGON_SIDES, generator=g) * 4 * math.pi - math.pi
    for row, gap in zip(normals.tolist(), max_normal_gap(normals).tolist()):
        angles = sorted(angle % (2 * math.pi) for angle in row)
        gaps = [later - earlier for earlier, later in zip(angles, angles[1:])] + [angles[0] + 2 * math.pi - angles[-1]]
        assert gap == pytest.approx(max(gaps), abs=1e-5)


def test_coverage_is_a_one_pixel_ramp():
    size = 20
    pixel = 2 / size
    distance = torch.tensor([-2, -0.5, -0.25, 0, 0.25, 0.5, 2]) * pixel
    assert torch.allclose(coverage(distance, size), torch.tensor([1, 1, 0.75, 0.5, 0.25, 0, 0]), atol=1e-6)


def test_power_law_radii_follow_their_cdf():
    r_min, r_max = 0.1, 1.0
    radii = power_law_radii(20000, r_min, r_max, generator(6))
    assert radii.min() >= r_min and radii.max() <= r_max
    for r in (0.12, 0.15, 0.2, 0.3, 0.5, 0.8):
        cdf = (r_min**-2 - r**-2) / (r_min**-2 - r_max**-2)
        assert (radii <= r).double().mean().item() == pytest.approx(cdf, abs=0.02), r


def test_power_law_noise_is_standardised_with_power_falling_off():
    noise = power_law_noise(64, 28, generator(7))
    assert noise.mean(dim=(1, 2)).abs().max() < 1e-5  # no DC
    assert torch.allclose(noise.std(dim=(1, 2)), torch.ones(64), atol=1e-5)
    power = torch.fft.fft2(noise).abs().pow(2).mean(dim=0)
    frequency = torch.hypot(torch.fft.fftfreq(28)[:, None], torch.fft.fftfreq(28)[None, :])
    low, high = power[(frequency > 0) & (frequency < 0.1)].mean(), power[frequency > 0.35].mean()
    assert low > 5 * high  # white noise would give 1; 1/f^0.75 alone ~ (0.35 / 0.1)^1.5 ~ 6.5
