"""What the embedded world asks about a scene: VQA questions, captions and yes/no questions.

A VQA question picks one object by a *referring expression* — a few of its attributes that no other
object of the scene shares ("the striped star", "the red object at the top left", "the large
arrow") — and asks for another attribute. Every question type has four templates; a benchmark
record asks with one (``src``), paraphrases with another (``rephrase``) and keeps a third for the
held-out paraphrase no loss sees.

===========  ==============================================  =====================================
type         example                                         answers
===========  ==============================================  =====================================
colour       what colour is the striped star?                10 colours
shape        what shape is the red object at the top left?   8 shapes
pattern      what pattern does the large arrow have?         solid striped checked hollow
size         how big is the pink checked object?             small large
position     where is the hollow circle?                     top left ... center ... bottom right
count        how many red objects are there?                 one ... nine
describe     what is the red object?                         the three of size, colour, pattern,
             what is the star at the top left?               shape the question does not name
===========  ==============================================  =====================================

Captions list the objects in raster order: ``a large red striped circle at the top left and a
small blue solid square at the center``. Yes/no questions (MME-like) come in pairs per image, one
*yes* one *no*, in four categories: existence, count, position, color.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from itertools import combinations

from more_lightning.world.scenes import (
    COLOURS,
    NUMBERS,
    PATTERNS,
    PLURALS,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    SceneObject,
)

QTYPES: tuple[str, ...] = ("colour", "shape", "pattern", "size", "position", "count", "describe")
TEMPLATES: dict[str, tuple[str, ...]] = {
    "colour": (
        "what colour is the {ref}?",
        "which colour does the {ref} have?",
        "what is the colour of the {ref}?",
        "tell me the colour of the {ref}.",
    ),
    "shape": (
        "what shape is the {ref}?",
        "which shape does the {ref} have?",
        "what is the shape of the {ref}?",
        "tell me the shape of the {ref}.",
    ),
    "pattern": (
        "what pattern does the {ref} have?",
        "how is the {ref} filled?",
        "what is the pattern of the {ref}?",
        "tell me the pattern of the {ref}.",
    ),
    "size": (
        "what size is the {ref}?",
        "how big is the {ref}?",
        "is the {ref} small or large?",
        "tell me the size of the {ref}.",
    ),
    "position": (
        "where is the {ref}?",
        "in which part of the image is the {ref}?",
        "what is the position of the {ref}?",
        "tell me where the {ref} is.",
    ),
    "count": (
        "how many {things} are there?",
        "how many {things} are in the image?",
        "what is the number of {things}?",
        "count the {things}.",
    ),
    "describe": (
        "what is the {ref}?",
        "what kind of object is the {ref}?",
        "describe the {ref}.",
        "name the {ref}.",
    ),
}
#: Attributes a referring expression may use, in the order it says them.
REF_ATTRIBUTES: tuple[str, ...] = ("size", "colour", "pattern", "shape", "position")
#: The attributes a describe question's answer is made of: the three its question does not name, in this order.
DESCRIBED: tuple[str, ...] = ("size", "colour", "pattern", "shape")
#: How often a describe question names its object by each of :data:`DESCRIBED`: mostly by the attributes
#: whose answers have the most values (naming the size leaves 384 colour-pattern-shape answers).
DESCRIBE_BY: tuple[float, ...] = (0.4, 0.15, 0.3, 0.15)
#: What a kind is: the attributes captions' counterfactuals and existence questions change.
KIND: tuple[str, ...] = ("colour", "pattern", "shape")
#: What a count question can count: objects with the values of these attributes (empty: every object).
COUNTED: tuple[tuple[str, ...], ...] = (
    (),
    ("colour",),
    ("pattern",),
    ("shape",),
    ("size",),
    ("colour", "shape"),
    ("pattern", "shape"),
    ("size", "shape"),
    ("size", "colour"),
    ("colour", "pattern"),
)
ANSWERS: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "pattern": PATTERNS,
    "size": tuple(SIZES),
    "position": POSITIONS,
    "count": NUMBERS,
}
VALUES: dict[str, tuple[str, ...]] = {a: ANSWERS[a] for a in ("colour", "shape", "pattern", "size", "position")}
CAPTION_PROMPTS: tuple[str, ...] = ("a photo of", "an image of", "a picture of", "this image shows")
MME_CATEGORIES: tuple[str, ...] = ("existence", "count", "position", "color")
YES_NO_SUFFIX = " please answer yes or no."
YES_NO_TEMPLATES: dict[str, str] = {
    "existence": "is there a {colour} {pattern} {shape} in the image?",
    "count": "does the image contain {number} objects?",
    "position": "is the {ref} at the {position}?",
    "color": "is the {ref} {colour}?",
}


@dataclass(frozen=True)
class VqaItem:
    """One VQA question about a scene, asked three ways, and its ground-truth answer.

    ``named``: the attributes the question names its referent by (empty for count questions);
    ``target``: the referent (None for count questions).
    """

    qtype: str
    question: str
    rephrase: str
    answer: str
    held_out_rephrase: str = ""
    named: tuple[str, ...] = ()
    target: SceneObject | None = None


def attribute(obj: SceneObject, name: str) -> str:
    return getattr(obj, name)


def referring_expression(obj: SceneObject, named: tuple[str, ...]) -> str:
    """``obj`` described by the attributes ``named``: "large red object", "striped star at the top left"."""
    words = [attribute(obj, a) for a in ("size", "colour", "pattern") if a in named]
    words.append(obj.shape if "shape" in named else "object")
    text = " ".join(words)
    return f"{text} at the {obj.position}" if "position" in named else text


def _unique(scene: Scene, obj: SceneObject, named: tuple[str, ...]) -> bool:
    key = tuple(attribute(obj, a) for a in named)
    return sum(tuple(attribute(o, a) for a in named) == key for o in scene.objects) == 1


def references(scene: Scene, obj: SceneObject, allowed: tuple[str, ...], most: int = 2) -> list[tuple[str, ...]]:
    """Every set of at most ``most`` attributes of ``allowed`` that picks ``obj`` alone in ``scene`` (people
    over-specify too: "the striped star" where "the star" would do)."""
    return [
        named
        for k in range(1, most + 1)
        for named in combinations([a for a in REF_ATTRIBUTES if a in allowed], k)
        if _unique(scene, obj, named)
    ]


def _allowed(qtype: str) -> tuple[str, ...]:
    return tuple(a for a in REF_ATTRIBUTES if a != qtype)


def _describe_reference(scene: Scene, obj: SceneObject, rng: random.Random) -> tuple[str, ...]:
    """One of size / colour / pattern / shape, with the position where that alone is not unique (and half the
    time where it is)."""
    named = tuple(rng.choices(DESCRIBED, weights=DESCRIBE_BY))
    return named if _unique(scene, obj, named) and rng.random() < 0.5 else (*named, "position")


def describe_answer(obj: SceneObject, named: tuple[str, ...]) -> str:
    return " ".join(attribute(obj, a) for a in DESCRIBED if a not in named)


def count_phrase(scene: Scene, like: SceneObject | None, counted: tuple[str, ...]) -> tuple[str, int]:
    """What a count question counts — the objects that share ``like``'s values of ``counted`` ("red stars",
    "striped objects", "objects") — and how many there are."""
    values = [attribute(like, a) for a in ("size", "colour", "pattern") if a in counted] if like else []
    noun = PLURALS[like.shape] if like and "shape" in counted else "objects"
    n = sum(all(attribute(o, a) == attribute(like, a) for a in counted) for o in scene.objects) if like else 0
    return " ".join([*values, noun]), (n if counted else scene.count())


def _templates(qtype: str, fields: dict[str, str], rng: random.Random) -> tuple[str, str, str]:
    first, second, third = rng.sample(range(len(TEMPLATES[qtype])), 3)
    return tuple(TEMPLATES[qtype][k].format(**fields) for k in (first, second, third))


def draw_qtype(rng: random.Random, weights: dict[str, float]) -> str:
    """A question type drawn by its relative ``weights``."""
    return rng.choices(QTYPES, weights=[weights[q] for q in QTYPES])[0]


def make_vqa(scene: Scene, qtype: str, rng: random.Random) -> VqaItem | None:
    """A ``qtype`` question about a uniquely described object of ``scene`` (None if none exists)."""
    if not scene.objects:
        return None
    if qtype == "count":
        counted = rng.choice(COUNTED)
        things, n = count_phrase(scene, rng.choice(scene.objects), counted)
        question, rephrase, held_out = _templates(qtype, {"things": things}, rng)
        return VqaItem(qtype, question, rephrase, NUMBERS[n - 1], held_out)
    obj = rng.choice(scene.objects)
    if qtype == "describe":
        refs = [_describe_reference(scene, obj, rng)]
    else:
        refs = references(scene, obj, _allowed(qtype))
    if not refs:
        return None
    named = rng.choice(refs)
    answer = describe_answer(obj, named) if qtype == "describe" else attribute(obj, qtype)
    question, rephrase, held_out = _templates(qtype, {"ref": referring_expression(obj, named)}, rng)
    return VqaItem(qtype, question, rephrase, answer, held_out, named, obj)


def alternative(item: VqaItem, exclude: tuple[str, ...], rng: random.Random) -> str | None:
    """A plausible wrong answer of ``item``'s type, not in ``exclude``: another value of the asked attribute;
    for describe questions another object of the described kind — its three attributes drawn afresh, the
    object named by the question keeping what the question names (a red object stays red). ``None`` when
    the type has no such answer left (size: small / large, both excluded); nothing is drawn then."""
    if item.qtype != "describe":
        options = [a for a in ANSWERS[item.qtype] if a not in exclude]
        return rng.choice(options) if options else None
    while True:
        alt = " ".join(rng.choice(VALUES[a]) for a in DESCRIBED if a not in item.named)
        if alt not in exclude:
            return alt


def describe(obj: SceneObject) -> str:
    return f"a {obj.size} {obj.colour} {obj.pattern} {obj.shape} at the {obj.position}"


def caption(scene: Scene) -> str:
    """The scene's canonical caption, objects in raster order of their regions."""
    return " and ".join(describe(o) for o in sorted(scene.objects, key=lambda o: o.region))


def counterfactual_scene(scene: Scene, rng: random.Random) -> Scene:
    """The scene with one object's colour, pattern or shape changed (a plausible wrong caption's scene)."""
    i = rng.randrange(scene.count())
    obj = scene.objects[i]
    name = rng.choice(KIND)
    fields = {a: attribute(obj, a) for a in ("shape", "colour", "pattern", "size")}
    fields[name] = rng.choice([v for v in VALUES[name] if v != fields[name]])
    changed = SceneObject(**fields, cell=obj.cell)
    return Scene((*scene.objects[:i], changed, *scene.objects[i + 1 :]))


def make_yes_no(scene: Scene, category: str, rng: random.Random) -> tuple[tuple[str, str], tuple[str, str]] | None:
    """Two yes/no questions of ``category`` about ``scene``: (question, "Yes"), (question, "No")."""
    if not scene.objects:
        return None
    template = YES_NO_TEMPLATES[category] + YES_NO_SUFFIX
    if category == "count":
        n = scene.count()
        wrong = rng.choice([k for k in (n - 1, n + 1) if 1 <= k <= len(NUMBERS)])
        yes, no = {"number": NUMBERS[n - 1]}, {"number": NUMBERS[wrong - 1]}
    elif category == "existence":  # a close distractor: one attribute of a present object changed
        obj = rng.choice(scene.objects)
        yes = {a: attribute(obj, a) for a in KIND}
        present = {tuple(attribute(o, a) for a in KIND) for o in scene.objects}
        while True:
            no = dict(yes)
            name = rng.choice(KIND)
            no[name] = rng.choice([v for v in VALUES[name] if v != yes[name]])
            if tuple(no[a] for a in KIND) not in present:
                break
    else:
        obj = rng.choice(scene.objects)
        asked = "position" if category == "position" else "colour"
        refs = references(scene, obj, tuple(a for a in REF_ATTRIBUTES if a != asked))
        if not refs:
            return None
        ref = referring_expression(obj, rng.choice(refs))
        value = attribute(obj, asked)
        wrong = rng.choice([v for v in VALUES[asked] if v != value])
        key = "position" if asked == "position" else "colour"
        yes, no = {"ref": ref, key: value}, {"ref": ref, key: wrong}
    return (template.format(**yes), "Yes"), (template.format(**no), "No")


def words(text: str) -> list[str]:
    """Split ``text`` the way the tiny LLaVA's tokenizer does (words and punctuation marks)."""
    return re.findall(r"\w+|[^\w\s]", text.lower())


def scene_vocabulary() -> set[str]:
    """Every word a scene question, answer, caption prompt or caption can use."""
    texts = [t for ts in TEMPLATES.values() for t in ts] + list(CAPTION_PROMPTS) + list(YES_NO_TEMPLATES.values())
    texts += [YES_NO_SUFFIX, "a at the and yes no object objects", *POSITIONS, *NUMBERS, *SHAPES, *COLOURS]
    texts += [*PATTERNS, *SIZES, *PLURALS.values()]
    vocab = set()
    for text in texts:
        vocab.update(words(re.sub(r"\{\w+\}", " ", text)))
    return vocab
