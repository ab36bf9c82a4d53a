"""Token accuracy / exact match against a plain numpy reference."""

import doctest

import numpy as np
import pytest
import torch

import more_lightning.metrics.accuracy as module
from more_lightning.metrics.accuracy import (
    ModalGenerality,
    Reliability,
    TextGenerality,
    TokenAccuracy,
    exact_match,
    token_accuracy,
)

B, T, V = 6, 7, 5


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def _batch(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random logits and labels: labels often equal the argmax (so hits and exact matches occur), with -100 holes."""
    logits = rng.normal(size=(B, T, V)).astype(np.float32)
    labels = np.where(rng.random((B, T)) < 0.7, logits.argmax(-1), rng.integers(0, V, (B, T)))
    labels[rng.random((B, T)) < 0.3] = -100
    labels[:, -1] = logits[:, -1].argmax(-1)  # every sample keeps at least one supervised position
    labels[0] = np.where(labels[0] == -100, -100, logits[0].argmax(-1))  # sample 0 is an exact match
    return logits, labels


def _np_reference(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    acc, em = [], []
    for lg, lb in zip(logits, labels, strict=True):
        sup = lb != -100
        hit = lg.argmax(-1)[sup] == lb[sup]
        acc.append(hit.mean())
        em.append(float(hit.all()))
    return np.array(acc), np.array(em)


def test_functional_matches_numpy(rng):
    logits, labels = _batch(rng)
    ref_acc, ref_em = _np_reference(logits, labels)
    assert ref_em[0] == 1.0 and 0.0 < ref_acc.min() < 1.0  # the example exercises both outcomes
    np.testing.assert_allclose(token_accuracy(torch.from_numpy(logits), torch.from_numpy(labels)).numpy(), ref_acc)
    np.testing.assert_array_equal(exact_match(torch.from_numpy(logits), torch.from_numpy(labels)).numpy(), ref_em)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits(rng, dtype):
    logits, labels = _batch(rng)
    lg = torch.from_numpy(logits).to(dtype)
    ref_acc, _ = _np_reference(lg.float().numpy(), labels)  # same (rounded) logits, so the same argmax
    np.testing.assert_allclose(token_accuracy(lg, torch.from_numpy(labels)).numpy(), ref_acc)


def test_no_supervised_position_raises(rng):
    logits, labels = _batch(rng)
    labels[2] = -100
    with pytest.raises(ValueError, match=r"Sample\(s\) \[2\] have no supervised positions"):
        token_accuracy(torch.from_numpy(logits), torch.from_numpy(labels))
    with pytest.raises(ValueError, match="no supervised"):
        TokenAccuracy().update(torch.from_numpy(logits), torch.from_numpy(labels))


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="Shift logits"):
        token_accuracy(torch.zeros(2, 4, 3), torch.zeros(2, 5, dtype=torch.long))


@pytest.mark.parametrize("cls", [TokenAccuracy, Reliability, TextGenerality, ModalGenerality])
def test_metric_accumulates_and_resets(rng, cls):
    metric = cls()
    assert metric.higher_is_better is True and metric.full_state_update is False
    batches = [_batch(rng) for _ in range(3)]
    for logits, labels in batches:
        metric.update(torch.from_numpy(logits), torch.from_numpy(labels))
    acc, em = zip(*(_np_reference(*b) for b in batches), strict=True)
    np.testing.assert_allclose(metric.compute().item(), 100 * np.concatenate(acc).mean(), rtol=1e-6)
    np.testing.assert_allclose(metric.compute_exact_match().item(), 100 * np.concatenate(em).mean(), rtol=1e-6)

    metric.reset()
    logits, labels = batches[1]
    metric.update(torch.from_numpy(logits), torch.from_numpy(labels))
    acc, em = _np_reference(logits, labels)
    np.testing.assert_allclose(metric.compute().item(), 100 * acc.mean(), rtol=1e-6)
    np.testing.assert_allclose(metric.compute_exact_match().item(), 100 * em.mean(), rtol=1e-6)


def test_custom_ignore_index(rng):
    logits, labels = _batch(rng)
    ref_acc, ref_em = _np_reference(logits, labels)
    relabelled = torch.from_numpy(np.where(labels == -100, -1, labels))
    metric = TokenAccuracy(ignore_index=-1)
    metric.update(torch.from_numpy(logits), relabelled)
    np.testing.assert_allclose(metric.compute().item(), 100 * ref_acc.mean(), rtol=1e-6)
    np.testing.assert_array_equal(exact_match(torch.from_numpy(logits), relabelled, ignore_index=-1).numpy(), ref_em)


def test_docstring_examples():
    result = doctest.testmod(module, extraglobs={"torch": torch})
    assert result.attempted > 0 and result.failed == 0
