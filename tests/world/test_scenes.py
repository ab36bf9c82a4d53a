"""The scene generator: deterministic, and jittered re-renders keep the content."""

import io
import random

import numpy as np

from more_lightning.world.scenes import BACKGROUND, CELL, COLOURS, render, sample_scene


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
    """Per cell: the scene colour most of its object-like pixels are close to, or None if empty."""
    pixels = np.asarray(image, dtype=np.int32)  # (H, W, 3)
    names, palette = list(COLOURS), np.array(list(COLOURS.values()))  # (C, 3)
    content = []
    for cell in range(9):
        row, col = divmod(cell, 3)
        patch = pixels[row * CELL : (row + 1) * CELL, col * CELL : (col + 1) * CELL].reshape(-1, 3)  # (256, 3)
        distance = np.abs(patch[:, None, :] - palette[None]).max(-1)  # (256, C)
        near = distance.min(-1) < tolerance
        content.append(names[np.bincount(distance[near].argmin(-1)).argmax()] if near.sum() >= 12 else None)
    return content


def test_rephrase_differs_in_pixels_not_content():
    rng = random.Random(0)
    for i in range(50):
        scene = sample_scene(rng)
        plain, jittered = render(scene), render(scene, jitter=True, seed=i)
        assert (np.asarray(plain) != np.asarray(jittered)).any()
        expected = [None] * 9
        for obj in scene.objects:
            expected[obj.cell] = obj.colour
        assert _cell_content(plain) == expected
        assert _cell_content(jittered) == expected


def test_background_is_flat_without_jitter():
    image = render(sample_scene(random.Random(3)))
    assert image.getpixel((0, 0)) in (BACKGROUND, *COLOURS.values())
