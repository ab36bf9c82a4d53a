"""MME acc / acc+ / score against a hand-computed example and a plain numpy reference."""

import doctest

import numpy as np
import pytest
import torch

import more_lightning.metrics.mme as module
from more_lightning.metrics.mme import MMEAccuracy, mme_scores, yes_no_correct


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def _np_mme(image_ids: np.ndarray, correct: np.ndarray) -> dict[str, float]:
    acc = 100 * correct.mean()
    acc_plus = 100 * np.mean([correct[image_ids == i].all() for i in np.unique(image_ids)])
    return {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus}


def _assert_scores(got: dict[str, torch.Tensor], expected: dict[str, float]) -> None:
    assert set(got) == {"acc", "acc_plus", "score"}
    for key, value in expected.items():
        np.testing.assert_allclose(got[key].item(), value, rtol=1e-5, err_msg=key)


def test_hand_computed_example():
    # 3 images x 2 questions: img1 both right, img2 one right, img3 one right -> 4/6 questions, 1/3 images.
    image_ids = ["img1", "img1", "img2", "img2", "img3", "img3"]
    correct = torch.tensor([True, True, True, False, False, True])
    expected = {"acc": 400 / 6, "acc_plus": 100 / 3, "score": 100.0}
    _assert_scores(mme_scores(image_ids, correct), expected)
    assert round(mme_scores(image_ids, correct)["acc"].item(), 2) == 66.67
    _assert_scores(mme_scores(torch.tensor([7, 7, 3, 3, 5, 5]), correct), expected)


def test_functional_matches_numpy(rng):
    image_ids = rng.permutation(np.repeat(np.arange(20), 2))  # the two questions of an image are not adjacent
    correct = rng.random(40) < 0.7
    _assert_scores(mme_scores(torch.from_numpy(image_ids), torch.from_numpy(correct)), _np_mme(image_ids, correct))


def test_metric_groups_across_updates_and_resets(rng):
    image_ids = rng.permutation(np.repeat(np.arange(30), 2))
    correct = rng.random(60) < 0.6
    metric = MMEAccuracy()
    assert metric.higher_is_better is True and metric.full_state_update is False
    for ids, cor in zip(np.array_split(image_ids, 4), np.array_split(correct, 4), strict=True):
        metric.update(torch.from_numpy(ids), torch.from_numpy(cor))
    _assert_scores(metric.compute(), _np_mme(image_ids, correct))

    metric.reset()
    metric.update(torch.from_numpy(image_ids[:10]), torch.from_numpy(correct[:10]))
    _assert_scores(metric.compute(), _np_mme(image_ids[:10], correct[:10]))


def test_metric_input_errors():
    metric = MMEAccuracy()
    with pytest.raises(TypeError, match="integer tensor"):
        metric.update(["a", "b"], torch.tensor([True, False]))
    with pytest.raises(ValueError, match="bool"):
        metric.update(torch.tensor([0, 0]), torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="before any update"):
        metric.compute()


def test_yes_no_correct_matches_numpy(rng):
    logits = rng.normal(size=(50, 9)).astype(np.float32)
    answers = rng.random(50) < 0.5
    yes_id, no_id = 4, 7
    expected = (logits[:, yes_id] > logits[:, no_id]) == answers
    got = yes_no_correct(torch.from_numpy(logits), yes_id, no_id, torch.from_numpy(answers))
    assert got.dtype == torch.bool
    np.testing.assert_array_equal(got.numpy(), expected)


def test_yes_no_tie_reads_as_no_and_bad_ids_raise():
    logits = torch.zeros(2, 3)
    assert yes_no_correct(logits, 0, 1, torch.tensor([True, False])).tolist() == [False, True]
    with pytest.raises(ValueError, match="distinct"):
        yes_no_correct(logits, 1, 1, torch.tensor([True, False]))
    with pytest.raises(ValueError, match="distinct"):
        yes_no_correct(logits, 0, 3, torch.tensor([True, False]))


def test_docstring_examples():
    result = doctest.testmod(module, extraglobs={"torch": torch})
    assert result.attempted > 0 and result.failed == 0
