"""Scenes of the embedded world: 1–3 coloured shapes on a 3×3 grid, drawn with PIL.

A 48×48 image is a 3×3 grid of 16-px cells, aligned with the tiny LLaVA's 16-px patches, so each
image token sees exactly one cell. Every object sits in its own cell and has a shape, a colour and
a size. :func:`render` draws a scene canonically (centred, nominal size, flat background) or
jittered — the *image rephrase*: offset inside the cell (≤ 1.5 px), ±1 px of size, background and colour
noise — so the pixels differ but the content (what any question asks about) does not.

Everything is a pure function of its ``seed``: same seed ⇒ same scene ⇒ same PNG bytes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "diamond")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 40),
    "blue": (40, 70, 230),
    "yellow": (235, 215, 30),
    "purple": (140, 40, 180),
    "orange": (245, 135, 20),
}
SIZES: dict[str, int] = {"small": 10, "large": 14}  # nominal object width in px
#: Cell names in raster order (cell index = 3 * row + column).
POSITIONS: tuple[str, ...] = (
    "top left",
    "top middle",
    "top right",
    "middle left",
    "center",
    "middle right",
    "bottom left",
    "bottom middle",
    "bottom right",
)
NUMBERS: tuple[str, ...] = ("one", "two", "three")
IMAGE_SIZE = 48
CELL = 16
BACKGROUND = (200, 200, 200)


@dataclass(frozen=True)
class SceneObject:
    """One object: its attributes and the grid cell it occupies (0..8, raster order)."""

    shape: str
    colour: str
    size: str
    cell: int

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]


@dataclass(frozen=True)
class Scene:
    """1–3 objects, each in its own cell, sorted by cell (raster order)."""

    objects: tuple[SceneObject, ...]

    def count(self) -> int:
        return len(self.objects)


def sample_scene(rng: random.Random, max_objects: int = 3, min_objects: int = 1) -> Scene:
    """A random scene: min_objects..max_objects objects in distinct cells with random attributes."""
    n = rng.randint(min_objects, max_objects)
    cells = sorted(rng.sample(range(9), n))
    objects = tuple(
        SceneObject(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(list(SIZES)), c) for c in cells
    )
    return Scene(objects)


def _polygon(shape: str, cx: float, cy: float, w: float) -> list[tuple[float, float]]:
    h = w / 2
    if shape == "triangle":
        return [(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "diamond":
        return [(cx, cy - h), (cx + h, cy), (cx, cy + h), (cx - h, cy)]
    if shape == "cross":
        t = w / 6  # half the bar thickness: bars are a third of the width
        return [
            (cx - t, cy - h), (cx + t, cy - h), (cx + t, cy - t), (cx + h, cy - t), (cx + h, cy + t), (cx + t, cy + t),
            (cx + t, cy + h), (cx - t, cy + h), (cx - t, cy + t), (cx - h, cy + t), (cx - h, cy - t), (cx - t, cy - t),
        ]  # fmt: skip
    raise ValueError(f"no polygon for shape {shape!r}")


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, rng: random.Random | None) -> None:
    w = SIZES[obj.size]
    colour = COLOURS[obj.colour]
    row, col = divmod(obj.cell, 3)
    cx, cy = col * CELL + CELL / 2, row * CELL + CELL / 2
    if rng is not None:  # jitter: size ±1 px, offset within the cell, colour ±15 per channel
        w += rng.choice((-1, 0, 1))
        slack = min(1.5, max(0.0, (CELL - 1 - w) / 2))  # small shifts: the patch embedding is linear
        cx += rng.uniform(-slack, slack)
        cy += rng.uniform(-slack, slack)
        colour = tuple(min(255, max(0, c + rng.randint(-15, 15))) for c in colour)
    h = w / 2
    box = (cx - h, cy - h, cx + h - 1, cy + h - 1)
    if obj.shape == "circle":
        draw.ellipse(box, fill=colour)
    elif obj.shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon(_polygon(obj.shape, cx - 0.5, cy - 0.5, w), fill=colour)


def render(scene: Scene, jitter: bool = False, seed: int = 0) -> Image.Image:
    """Draw ``scene`` as a 48×48 RGB image; ``jitter`` re-renders it differently (same content)."""
    rng = random.Random(seed) if jitter else None
    background = BACKGROUND
    if rng is not None:
        shift = rng.randint(-20, 20)
        background = tuple(c + shift for c in BACKGROUND)
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), background)
    if rng is not None:  # sparse pixel noise on the background
        pixels = image.load()
        for _ in range(120):
            x, y = rng.randrange(IMAGE_SIZE), rng.randrange(IMAGE_SIZE)
            v = rng.randint(-30, 30)
            pixels[x, y] = tuple(min(255, max(0, c + v)) for c in background)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw_object(draw, obj, rng)
    return image
