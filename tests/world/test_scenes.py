"""The scene generator: deterministic, and jittered re-renders keep the content."""

import io
import random

import numpy as np

from more_lightning.world.scenes import (
    BACKGROUND,
    CELL,
    COLOURS,
    GRID,
    LIGHT,
    NUM_CELLS,
    Scene,
    SceneObject,
    cell_region,
    region_cells,
    render,
    sample_scene,
)


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_same_seed_same_bytes():
    for seed in range(5):
        a, b = sample_scene(random.Random(seed)), sample_scene(random.Random(seed))
        assert a == b
        assert _png(render(a)) == _png(render(b))
        assert _png(render(a, jitter=True, seed=7)) == _png(render(b, jitter=True, seed=7))


def _cell_content(image, tolerance: int = 60) -> list[str | None]:
    """Per cell: the scene colour most of its object-like pixels are close to, or None if empty.

    A jittered object 1 px wider than nominal may spill one pixel column into the next cell: fewer than 20
    pixels do not count as content.
    """
    pixels = np.asarray(image, dtype=np.int32)  # (H, W, 3)
    names, palette = list(COLOURS), np.array(list(COLOURS.values()))  # (C, 3)
    content = []
    for cell in range(NUM_CELLS):
        row, col = divmod(cell, GRID)
        patch = pixels[row * CELL : (row + 1) * CELL, col * CELL : (col + 1) * CELL].reshape(-1, 3)  # (256, 3)
        distance = np.abs(patch[:, None, :] - palette[None]).max(-1)  # (256, C)
        near = distance.min(-1) < tolerance
        content.append(names[np.bincount(distance[near].argmin(-1)).argmax()] if near.sum() >= 20 else None)
    return content


def test_rephrase_differs_in_pixels_not_content():
    rng = random.Random(0)
    for i in range(50):
        scene = sample_scene(rng)
        plain, jittered = render(scene), render(scene, jitter=True, seed=i)
        assert (np.asarray(plain) != np.asarray(jittered)).any()
        expected = [None] * NUM_CELLS
        for obj in scene.objects:
            expected[obj.cell] = obj.colour
        assert _cell_content(plain) == expected
        assert _cell_content(jittered) == expected


def test_background_is_flat_without_jitter():
    image = render(sample_scene(random.Random(3)))
    assert image.getpixel((0, 0)) in (BACKGROUND, *COLOURS.values())


def test_objects_sit_in_distinct_regions_of_four_cells():
    assert sorted(c for r in range(9) for c in region_cells(r)) == list(range(NUM_CELLS))
    assert all(cell_region(c) == r for r in range(9) for c in region_cells(r))
    rng = random.Random(4)
    for _ in range(200):
        scene = sample_scene(rng, max_objects=9)
        regions = [o.region for o in scene.objects]
        assert len(set(regions)) == len(regions) and 1 <= scene.count() <= 9


def test_patterns_are_drawn_as_named():
    """Solid: only the colour; striped / checked: the colour and white; hollow: the colour and background inside."""
    seen = {}
    for pattern in ("solid", "striped", "checked", "hollow"):
        image = np.asarray(render(Scene((SceneObject("square", "red", pattern, "large", 14),))), dtype=np.int32)
        row, col = divmod(14, GRID)
        cell = image[row * CELL : (row + 1) * CELL, col * CELL : (col + 1) * CELL].reshape(-1, 3)
        seen[pattern] = {tuple(p) for p in cell}
    red = COLOURS["red"]
    assert seen["solid"] == {red, BACKGROUND}
    assert seen["striped"] == seen["checked"] == {red, LIGHT, BACKGROUND}
    assert seen["hollow"] == {red, BACKGROUND}
    solid = np.asarray(render(Scene((SceneObject("square", "red", "solid", "large", 14),))))
    hollow = np.asarray(render(Scene((SceneObject("square", "red", "hollow", "large", 14),))))
    assert (hollow == red).all(-1).sum() < 0.6 * (solid == red).all(-1).sum()


def test_noise_draws_are_the_random_calls_they_replace():
    from more_lightning.world.scenes import IMAGE_SIZE, _noise_draws

    for seed in range(20):
        expected: dict[tuple[int, int], int] = {}
        calls = random.Random(seed)
        for _ in range(480):
            x, y = calls.randrange(IMAGE_SIZE), calls.randrange(IMAGE_SIZE)
            expected[y, x] = calls.randint(-30, 30)
        fast = random.Random(seed)
        assert _noise_draws(fast, 480) == expected
        assert fast.random() == calls.random()  # the generator is left in the same state


def test_jittered_background_noise_as_drawn_pixel_by_pixel():
    scene = Scene(())  # background only: every pixel is background or noise
    for seed in range(5):
        rng = random.Random(seed)
        shift = rng.randint(-20, 20)
        background = tuple(c + shift for c in BACKGROUND)
        expected = np.empty((96, 96, 3), dtype=np.uint8)
        expected[:] = background
        for _ in range(480):
            x, y = rng.randrange(96), rng.randrange(96)
            v = rng.randint(-30, 30)
            expected[y, x] = tuple(min(255, max(0, c + v)) for c in background)
        np.testing.assert_array_equal(np.asarray(render(scene, jitter=True, seed=seed)), expected)
