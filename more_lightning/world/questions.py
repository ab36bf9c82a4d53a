"""What the embedded world asks about a scene: VQA questions, captions and yes/no questions.

Every question type has three templates, so a benchmark record can ask with one (``src``),
paraphrase with another (``rephrase``) and keep the third for the held-out paraphrase no loss
sees. Referents are always unique in their scene (the colour question names a shape that occurs
once, ...). Answers are words of the scene vocabulary:

===========  =========================================  ===============================
type         example                                    answers
===========  =========================================  ===============================
colour       what colour is the circle?                 red green blue yellow purple orange
shape        what shape is the red object?              circle square triangle cross diamond
size         what size is the red circle?               small large
count        how many objects are there?                one two three
position     where is the red circle?                   top left ... center ... bottom right
===========  =========================================  ===============================

Captions list the objects in raster order: ``a large red circle at the top left and a small blue
square at the center``. Yes/no questions (MME-like) come in pairs per image, one *yes* one *no*,
in four categories: existence, count, position, color.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from more_lightning.world.scenes import COLOURS, NUMBERS, POSITIONS, SHAPES, SIZES, Scene, SceneObject

QTYPES: tuple[str, ...] = ("colour", "shape", "size", "count", "position")
TEMPLATES: dict[str, tuple[str, ...]] = {
    "colour": (
        "what colour is the {shape}?",
        "which colour does the {shape} have?",
        "what is the colour of the {shape}?",
    ),
    "shape": (
        "what shape is the {colour} object?",
        "which shape does the {colour} object have?",
        "what is the shape of the {colour} object?",
    ),
    "size": (
        "what size is the {colour} {shape}?",
        "how big is the {colour} {shape}?",
        "is the {colour} {shape} small or large?",
    ),
    "count": ("how many objects are there?", "how many objects are in the image?", "what is the number of objects?"),
    "position": (
        "where is the {colour} {shape}?",
        "in which part of the image is the {colour} {shape}?",
        "what is the position of the {colour} {shape}?",
    ),
}
#: VQA type -> the attributes its question names the referent by (the referent is unique by them).
NAMED_BY: dict[str, tuple[str, ...]] = {
    "colour": ("shape",),
    "shape": ("colour",),
    "size": ("colour", "shape"),
    "position": ("colour", "shape"),
}
ANSWERS: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "size": tuple(SIZES),
    "count": NUMBERS,
    "position": POSITIONS,
}
CAPTION_PROMPTS: tuple[str, ...] = ("a photo of", "an image of", "a picture of", "this image shows")
MME_CATEGORIES: tuple[str, ...] = ("existence", "count", "position", "color")
YES_NO_SUFFIX = " please answer yes or no."
YES_NO_TEMPLATES: dict[str, str] = {
    "existence": "is there a {colour} {shape} in the image?",
    "count": "does the image contain {number} objects?",
    "position": "is the {colour} {shape} at the {position}?",
    "color": "is the {shape} {colour}?",
}


@dataclass(frozen=True)
class VqaItem:
    """One VQA question about a scene, asked three ways, and its ground-truth answer."""

    qtype: str
    question: str
    rephrase: str
    answer: str
    held_out_rephrase: str = ""


def _unique(scene: Scene, key) -> list[SceneObject]:
    values = [key(o) for o in scene.objects]
    return [o for o in scene.objects if values.count(key(o)) == 1]


def make_vqa(scene: Scene, qtype: str, rng: random.Random) -> VqaItem | None:
    """A ``qtype`` question about a uniquely described object of ``scene`` (None if none exists)."""
    if qtype == "count":
        fields, answer = {}, NUMBERS[scene.count() - 1]
    else:
        candidates = _unique(scene, lambda o: tuple(getattr(o, a) for a in NAMED_BY[qtype]))
        if not candidates:
            return None
        obj = rng.choice(candidates)
        fields = {"shape": obj.shape, "colour": obj.colour}
        answer = {"colour": obj.colour, "shape": obj.shape, "size": obj.size, "position": obj.position}[qtype]
    first, second = rng.sample(range(len(TEMPLATES[qtype])), 2)
    third = next(k for k in range(len(TEMPLATES[qtype])) if k not in (first, second))  # no extra draw
    question, rephrase, held_out = (TEMPLATES[qtype][k].format(**fields) for k in (first, second, third))
    return VqaItem(qtype, question, rephrase, answer, held_out)


def caption(scene: Scene) -> str:
    """The scene's canonical caption, objects in raster order."""
    parts = [f"a {o.size} {o.colour} {o.shape} at the {o.position}" for o in scene.objects]
    return " and ".join(parts)


def counterfactual_scene(scene: Scene, rng: random.Random) -> Scene:
    """The scene with one object's colour or shape changed (a plausible wrong caption's scene)."""
    i = rng.randrange(scene.count())
    obj = scene.objects[i]
    if rng.random() < 0.5:
        changed = SceneObject(obj.shape, rng.choice([c for c in COLOURS if c != obj.colour]), obj.size, obj.cell)
    else:
        changed = SceneObject(rng.choice([s for s in SHAPES if s != obj.shape]), obj.colour, obj.size, obj.cell)
    return Scene((*scene.objects[:i], changed, *scene.objects[i + 1 :]))


def make_yes_no(scene: Scene, category: str, rng: random.Random) -> tuple[tuple[str, str], tuple[str, str]] | None:
    """Two yes/no questions of ``category`` about ``scene``: (question, "Yes"), (question, "No")."""
    template = YES_NO_TEMPLATES[category] + YES_NO_SUFFIX
    if category == "count":
        n = scene.count()
        wrong = rng.choice([k for k in range(1, len(NUMBERS) + 1) if k != n])
        yes, no = {"number": NUMBERS[n - 1]}, {"number": NUMBERS[wrong - 1]}
    else:
        key = (lambda o: o.shape) if category == "color" else (lambda o: (o.colour, o.shape))
        candidates = _unique(scene, key)
        if not candidates:
            return None
        obj = rng.choice(candidates)
        yes = {"colour": obj.colour, "shape": obj.shape, "position": obj.position}
        no = dict(yes)
        if category == "existence":  # a close distractor: one attribute of a present object changed
            present = {(o.colour, o.shape) for o in scene.objects}
            absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
            close = [(c, s) for c, s in absent if c == obj.colour or s == obj.shape]
            no["colour"], no["shape"] = rng.choice(close or absent)
        elif category == "position":
            no["position"] = rng.choice([p for p in POSITIONS if p != obj.position])
        else:
            no["colour"] = rng.choice([c for c in COLOURS if c != obj.colour])
    return (template.format(**yes), "Yes"), (template.format(**no), "No")


def words(text: str) -> list[str]:
    """Split ``text`` the way the tiny LLaVA's tokenizer does (words and punctuation marks)."""
    return re.findall(r"\w+|[^\w\s]", text.lower())


def scene_vocabulary() -> set[str]:
    """Every word a scene question, answer, caption prompt or caption can use."""
    texts = [t for ts in TEMPLATES.values() for t in ts] + list(CAPTION_PROMPTS) + list(YES_NO_TEMPLATES.values())
    texts += [YES_NO_SUFFIX, "a at the and yes no", *POSITIONS, *NUMBERS, *SHAPES, *COLOURS, *SIZES]
    vocab = set()
    for text in texts:
        vocab.update(words(re.sub(r"\{\w+\}", " ", text)))
    return vocab
