"""Questions, captions and yes/no pairs refer to unique objects and have the right answers."""

import random

from more_lightning.world.questions import ANSWERS, MME_CATEGORIES, QTYPES, caption, make_vqa, make_yes_no
from more_lightning.world.scenes import Scene, SceneObject, sample_scene

SCENE = Scene((SceneObject("circle", "red", "large", 0), SceneObject("cross", "blue", "small", 4)))


def test_vqa_answers_on_a_known_scene():
    rng = random.Random(0)
    answers = {q: make_vqa(SCENE, q, rng) for q in QTYPES}
    assert answers["count"].answer == "two"
    item = answers["position"]
    assert item.answer == ("top left" if "red circle" in item.question else "center")
    assert len({item.question, item.rephrase, item.held_out_rephrase}) == 3


def test_vqa_answers_are_in_their_vocabulary():
    rng = random.Random(1)
    for _ in range(300):
        scene = sample_scene(rng)
        for qtype in QTYPES:
            item = make_vqa(scene, qtype, rng)
            if item is not None:
                assert item.answer in ANSWERS[qtype]


def test_caption_lists_objects_in_raster_order():
    assert caption(SCENE) == "a large red circle at the top left and a small blue cross at the center"


def test_yes_no_pairs_are_one_yes_one_no():
    rng = random.Random(2)
    for _ in range(100):
        scene = sample_scene(rng)
        for category in MME_CATEGORIES:
            pair = make_yes_no(scene, category, rng)
            if pair is not None:
                (q_yes, yes), (q_no, no) = pair
                assert (yes, no) == ("Yes", "No") and q_yes != q_no
