"""Questions, captions and yes/no pairs refer to unique objects and have the right answers."""

import random

from more_lightning.world.questions import (
    ANSWERS,
    DESCRIBED,
    MME_CATEGORIES,
    QTYPES,
    alternative,
    caption,
    count_phrase,
    make_vqa,
    make_yes_no,
    referring_expression,
    scene_vocabulary,
    words,
)
from more_lightning.world.scenes import Scene, SceneObject, sample_scene

RED = SceneObject("circle", "red", "striped", "large", 0)
BLUE = SceneObject("cross", "blue", "solid", "small", 21)  # region 4: the center
SCENE = Scene((RED, BLUE))


def _matching(scene: Scene, obj: SceneObject, named: tuple[str, ...]) -> list[SceneObject]:
    return [o for o in scene.objects if all(getattr(o, a) == getattr(obj, a) for a in named)]


def test_vqa_answers_on_a_known_scene():
    rng = random.Random(0)
    for _ in range(20):
        item = make_vqa(SCENE, "position", rng)
        assert item.answer == ("top left" if item.target == RED else "center")
        assert len({item.question, item.rephrase, item.held_out_rephrase}) == 3
    assert count_phrase(SCENE, RED, ()) == ("objects", 2)
    assert count_phrase(SCENE, RED, ("colour",)) == ("red objects", 1)
    assert count_phrase(SCENE, BLUE, ("size", "shape")) == ("small crosses", 1)
    assert referring_expression(RED, ("pattern", "position")) == "striped object at the top left"
    assert referring_expression(BLUE, ("size", "shape")) == "small cross"


def test_questions_name_exactly_their_referent_and_answer_it():
    rng = random.Random(1)
    for _ in range(300):
        scene = sample_scene(rng, min_objects=2)
        for qtype in QTYPES:
            item = make_vqa(scene, qtype, rng)
            if item is None or qtype == "count":
                continue
            assert f"the {referring_expression(item.target, item.named)}" in item.question
            assert _matching(scene, item.target, item.named) == [item.target], item.question
            if qtype == "describe":
                said = [getattr(item.target, a) for a in DESCRIBED if a not in item.named]
                assert item.answer == " ".join(said) and len(said) == 3
            else:
                assert item.answer == getattr(item.target, qtype)
                assert item.answer in ANSWERS[qtype] and qtype not in item.named


def test_count_answers_count_the_named_objects():
    rng = random.Random(2)
    for _ in range(300):
        scene = sample_scene(rng)
        item = make_vqa(scene, "count", rng)
        said = set(words(item.question))
        n = sum(
            all(w in {o.size, o.colour, o.pattern, o.shape, o.shape + "s", o.shape + "es"} for w in said & _ATTRS)
            for o in scene.objects
        )
        assert item.answer == ANSWERS["count"][n - 1], item.question


_ATTRS = set(scene_vocabulary()) - {"how", "many", "are", "there", "in", "the", "image", "what", "is", "number"}
_ATTRS -= {"of", "count", "?", ".", "objects"}


def test_alternatives_are_other_answers_of_the_type():
    rng = random.Random(3)
    for _ in range(300):
        scene = sample_scene(rng, min_objects=2)
        for qtype in QTYPES:
            item = make_vqa(scene, qtype, rng)
            if item is None:
                continue
            alt = alternative(item, (item.answer,), rng)
            assert alt != item.answer
            if qtype == "describe":
                assert len(alt.split()) == 3 and set(alt.split()) <= scene_vocabulary()
            else:
                assert alt in ANSWERS[qtype]


def test_caption_lists_objects_in_raster_order():
    assert caption(SCENE) == "a large red striped circle at the top left and a small blue solid cross at the center"


def test_yes_no_pairs_are_one_yes_one_no():
    rng = random.Random(2)
    for _ in range(100):
        scene = sample_scene(rng)
        for category in MME_CATEGORIES:
            pair = make_yes_no(scene, category, rng)
            if pair is not None:
                (q_yes, yes), (q_no, no) = pair
                assert (yes, no) == ("Yes", "No") and q_yes != q_no
