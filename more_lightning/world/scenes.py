"""Scenes of the embedded world: up to nine patterned shapes on a 6×6 grid of cells, drawn with PIL.

A 96×96 image is a 6×6 grid of 16-px cells, aligned with the tiny LLaVA's 16-px patches, so each
of its 36 image tokens sees exactly one cell. The grid is read as a 3×3 grid of *regions* of 2×2
cells — the positions questions name ("top left", ..., "bottom right"); a region holds at most one
object, in one of its four cells. An object has a shape (8), a colour (12), a pattern (4) and a
size (2): 768 kinds. :func:`render` draws a scene canonically (centred in its cell,
nominal size, flat background) or jittered — the *image rephrase*: offset inside the cell
(≤ 1.5 px), ±1 px of size, background and colour noise — so the pixels differ but the content
(what any question asks about) does not.

Everything is a pure function of its ``seed``: same seed ⇒ same scene ⇒ same PNG bytes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "diamond", "star", "bar", "arrow")
#: Plural of each shape, as count questions say it.
PLURALS: dict[str, str] = {s: s + ("es" if s.endswith("s") else "s") for s in SHAPES}
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 40),
    "blue": (40, 70, 230),
    "yellow": (235, 215, 30),
    "purple": (140, 40, 180),
    "orange": (245, 135, 20),
    "pink": (250, 120, 190),
    "brown": (130, 75, 30),
    "cyan": (30, 200, 215),
    "black": (25, 25, 25),
    "lime": (150, 225, 40),
    "navy": (20, 25, 115),
}
#: How an object is filled: all in its colour, horizontal stripes, a checkerboard, or only its outline.
PATTERNS: tuple[str, ...] = ("solid", "striped", "checked", "hollow")
SIZES: dict[str, int] = {"small": 11, "large": 15}  # nominal object width in px
#: Region names in raster order (region index = 3 * row + column); a region is 2×2 cells.
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
NUMBERS: tuple[str, ...] = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
IMAGE_SIZE = 96
CELL = 16
GRID = IMAGE_SIZE // CELL  # 6 cells a side: 36 image tokens
NUM_CELLS = GRID * GRID
BACKGROUND = (200, 200, 200)
#: The second colour of striped and checked objects.
LIGHT = (255, 255, 255)
#: Object count range of :func:`sample_scene` by default.
MAX_OBJECTS = 5


def region_cells(region: int) -> tuple[int, ...]:
    """The four cells (raster index on the 6×6 grid) of ``region`` (0..8)."""
    row, col = divmod(region, 3)
    return tuple((2 * row + dr) * GRID + 2 * col + dc for dr in (0, 1) for dc in (0, 1))


def cell_region(cell: int) -> int:
    row, col = divmod(cell, GRID)
    return 3 * (row // 2) + col // 2


@dataclass(frozen=True)
class SceneObject:
    """One object: its attributes and the grid cell it occupies (0..35, raster order)."""

    shape: str
    colour: str
    pattern: str
    size: str
    cell: int

    @property
    def region(self) -> int:
        return cell_region(self.cell)

    @property
    def position(self) -> str:
        return POSITIONS[self.region]


@dataclass(frozen=True)
class Scene:
    """Objects in distinct regions, sorted by cell (raster order)."""

    objects: tuple[SceneObject, ...]

    def count(self) -> int:
        return len(self.objects)


def random_object(rng: random.Random, cell: int) -> SceneObject:
    return SceneObject(
        rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(PATTERNS), rng.choice(list(SIZES)), cell
    )


def sample_scene(rng: random.Random, max_objects: int = MAX_OBJECTS, min_objects: int = 1) -> Scene:
    """A random scene: min_objects..max_objects objects in distinct regions with random attributes."""
    n = rng.randint(min_objects, max_objects)
    regions = sorted(rng.sample(range(9), n))
    cells = sorted(rng.choice(region_cells(r)) for r in regions)
    return Scene(tuple(random_object(rng, c) for c in cells))


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
    if shape == "star":  # five points, inner radius 0.45 of the outer
        points = []
        for k in range(10):
            radius = h if k % 2 == 0 else 0.45 * h
            angle = np.pi * (k / 5 - 0.5)
            points.append((cx + radius * np.cos(angle), cy + radius * np.sin(angle)))
        return points
    if shape == "bar":  # a wide, low rectangle
        return [(cx - h, cy - h / 2), (cx + h, cy - h / 2), (cx + h, cy + h / 2), (cx - h, cy + h / 2)]
    if shape == "arrow":  # pointing up: a head over a shaft
        t = w / 5
        return [
            (cx, cy - h),
            (cx + h, cy),
            (cx + t, cy),
            (cx + t, cy + h),
            (cx - t, cy + h),
            (cx - t, cy),
            (cx - h, cy),
        ]
    raise ValueError(f"no polygon for shape {shape!r}")


def _mask(shape: str, cx: float, cy: float, w: float) -> np.ndarray:
    """(IMAGE_SIZE, IMAGE_SIZE) bool: the pixels the object covers."""
    canvas = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw = ImageDraw.Draw(canvas)
    h = w / 2
    if shape == "circle":
        draw.ellipse((cx - h, cy - h, cx + h - 1, cy + h - 1), fill=255)
    elif shape == "square":
        draw.rectangle((cx - h, cy - h, cx + h - 1, cy + h - 1), fill=255)
    else:
        draw.polygon(_polygon(shape, cx - 0.5, cy - 0.5, w), fill=255)
    return np.asarray(canvas) > 127


#: Row and column index of every pixel, for the patterns.
_GRID_YS, _GRID_XS = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]


def _fill(mask: np.ndarray, pattern: str, x0: int, y0: int) -> np.ndarray:
    """The part of ``mask`` drawn in the object's colour; the rest of the mask is :data:`LIGHT`, except for
    ``hollow`` objects, whose inside stays background. ``(x0, y0)`` anchors stripes and checks to the object."""
    if pattern == "solid":
        return mask
    ys, xs = _GRID_YS, _GRID_XS
    if pattern == "striped":  # 2-px horizontal stripes
        return mask & (((ys - y0) // 2) % 2 == 0)
    if pattern == "checked":  # 2×2-px checks
        return mask & ((((ys - y0) // 2) + ((xs - x0) // 2)) % 2 == 0)
    if pattern == "hollow":  # a 2-px outline
        inner = mask.copy()
        for _ in range(2):
            inner = inner & np.roll(inner, 1, 0) & np.roll(inner, -1, 0) & np.roll(inner, 1, 1) & np.roll(inner, -1, 1)
        return mask & ~inner
    raise ValueError(f"no pattern {pattern!r}")


def _draw_object(pixels: np.ndarray, obj: SceneObject, rng: random.Random | None) -> None:
    w = SIZES[obj.size]
    colour = COLOURS[obj.colour]
    row, col = divmod(obj.cell, GRID)
    cx, cy = col * CELL + CELL / 2, row * CELL + CELL / 2
    if rng is not None:  # jitter: size ±1 px, offset within the cell, colour ±15 per channel
        w += rng.choice((-1, 0, 1))
        slack = min(1.5, max(0.0, (CELL - 1 - w) / 2))  # small shifts: the patch embedding is linear
        cx += rng.uniform(-slack, slack)
        cy += rng.uniform(-slack, slack)
        colour = tuple(min(255, max(0, c + rng.randint(-15, 15))) for c in colour)
    mask = _mask(obj.shape, cx, cy, w)
    painted = _fill(mask, obj.pattern, round(cx - w / 2), round(cy - w / 2))
    if obj.pattern != "hollow":
        pixels[mask] = LIGHT
    pixels[painted] = colour


def _noise_draws(rng: random.Random, n: int) -> dict[tuple[int, int], int]:
    """``n`` draws of ``x, y = randrange(IMAGE_SIZE), randrange(IMAGE_SIZE)`` and ``randint(-30, 30)`` from
    ``rng``, as {(y, x): shift} (a later draw of the same pixel wins).

    Written out as the rejection sampling ``random.Random`` does on ``getrandbits`` (tested equal to the
    calls): the same numbers at a fifth of the cost, and pinned even if a later Python changes
    ``randrange``.
    """
    getrandbits = rng.getrandbits
    side_bits, shift_bits = IMAGE_SIZE.bit_length(), (61).bit_length()
    shifts: dict[tuple[int, int], int] = {}
    for _ in range(n):
        x = getrandbits(side_bits)
        while x >= IMAGE_SIZE:
            x = getrandbits(side_bits)
        y = getrandbits(side_bits)
        while y >= IMAGE_SIZE:
            y = getrandbits(side_bits)
        v = getrandbits(shift_bits)
        while v >= 61:
            v = getrandbits(shift_bits)
        shifts[y, x] = v - 30
    return shifts


def render(scene: Scene, jitter: bool = False, seed: int = 0) -> Image.Image:
    """Draw ``scene`` as a 96×96 RGB image; ``jitter`` re-renders it differently (same content)."""
    rng = random.Random(seed) if jitter else None
    background = BACKGROUND
    if rng is not None:
        shift = rng.randint(-20, 20)
        background = tuple(c + shift for c in BACKGROUND)
    pixels = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    pixels[:] = background
    if rng is not None:  # sparse pixel noise on the background: 480 draws of (x, y, shift), a later one wins
        shifts = _noise_draws(rng, 480)
        ys, xs = np.array(list(shifts), dtype=np.intp).T
        values = np.array(list(shifts.values()), dtype=np.int32)[:, None] + np.array(background, dtype=np.int32)
        pixels[ys, xs] = np.clip(values, 0, 255)
    for obj in scene.objects:
        _draw_object(pixels, obj, rng)
    return Image.fromarray(pixels, "RGB")
