"""Locality KL / exp(-KL) / argmax agreement against a plain numpy reference."""

import doctest

import numpy as np
import pytest
import torch

import more_lightning.metrics.locality as module
from more_lightning.metrics.locality import (
    LocalityAgreement,
    LocalityScore,
    ModalLocality,
    TextLocality,
    argmax_agreement,
    average_score,
    locality_kl,
    locality_score,
)

B, T, V = 5, 6, 11


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _batch(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reference log-probs, edited = reference + noise (so argmaxes sometimes flip), random mask, float64."""
    ref = rng.normal(size=(B, T, V)) * 2
    logp = _log_softmax(ref + rng.normal(size=(B, T, V)))
    mask = rng.random((B, T)) < 0.6
    mask[:, 0] = True
    return logp, _log_softmax(ref), mask


def _np_kl(logp: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> np.ndarray:
    kl = (np.exp(logp) * (logp - ref)).sum(-1)  # (B, T)
    return np.array([kl[b][mask[b]].mean() for b in range(len(kl))])


def _np_agree(logp: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> np.ndarray:
    agree = logp.argmax(-1) == ref.argmax(-1)
    return np.array([agree[b][mask[b]].mean() for b in range(len(agree))])


def _t(*arrays: np.ndarray, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    return [torch.from_numpy(a) if a.dtype == bool else torch.from_numpy(a).to(dtype) for a in arrays]


def test_functional_matches_numpy(rng):
    logp, ref, mask = _batch(rng)
    kl = _np_kl(logp, ref, mask)
    agree = _np_agree(logp, ref, mask)
    assert 0.0 < agree.min() < 1.0 or 0.0 < agree.max() < 1.0  # the noise flips some argmaxes
    np.testing.assert_allclose(locality_kl(*_t(logp, ref, mask)).numpy(), kl, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(locality_score(*_t(logp, ref, mask)).numpy(), np.exp(-kl), rtol=1e-4)
    np.testing.assert_allclose(argmax_agreement(*_t(logp, ref, mask)).numpy(), agree)


def test_identical_distributions_are_perfectly_local(rng):
    _, ref, mask = _batch(rng)
    p, m = _t(ref, mask)
    assert torch.equal(locality_kl(p, p, m), torch.zeros(B))
    assert torch.equal(locality_score(p, p, m), torch.ones(B))
    assert torch.equal(argmax_agreement(p, p, m), torch.ones(B))


@pytest.mark.parametrize(("dtype", "atol"), [(torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
def test_half_precision_is_finite_and_close(rng, dtype, atol):
    logp, ref, mask = _batch(rng)
    score = locality_score(*_t(logp, ref, mask, dtype=dtype))
    assert score.dtype == torch.float32 and torch.isfinite(score).all()
    assert ((score >= 0) & (score <= 1)).all()
    np.testing.assert_allclose(score.numpy(), np.exp(-_np_kl(logp, ref, mask)), atol=atol)


def test_zero_probabilities_do_not_give_nan():
    logp = torch.log(torch.tensor([[[1.0, 0.0, 0.0]]])).half()  # -inf entries
    ref = torch.log(torch.tensor([[[0.5, 0.25, 0.25]]])).half()
    mask = torch.tensor([[True]])
    np.testing.assert_allclose(locality_kl(logp, ref, mask).item(), np.log(2), rtol=1e-3)
    assert locality_kl(ref, logp, mask).item() == float("inf")  # p_ref = 0 where p > 0
    assert locality_score(ref, logp, mask).item() == 0.0


def test_bad_inputs_raise(rng):
    logp, ref, mask = _t(*_batch(rng))
    with pytest.raises(ValueError, match="Expected logp"):
        locality_kl(logp, ref[:, :-1], mask)
    with pytest.raises(ValueError, match="bool"):
        locality_kl(logp, ref, mask.float())
    mask[3] = False
    with pytest.raises(ValueError, match=r"Sample\(s\) \[3\] have no masked position"):
        argmax_agreement(logp, ref, mask)


@pytest.mark.parametrize(
    ("cls", "reference"),
    [
        (LocalityScore, lambda *b: np.exp(-_np_kl(*b))),
        (TextLocality, lambda *b: np.exp(-_np_kl(*b))),
        (ModalLocality, lambda *b: np.exp(-_np_kl(*b))),
        (LocalityAgreement, _np_agree),
    ],
)
def test_metric_accumulates_and_resets(rng, cls, reference):
    metric = cls()
    assert metric.higher_is_better is True and metric.full_state_update is False
    batches = [_batch(rng) for _ in range(3)]
    for batch in batches:
        metric.update(*_t(*batch))
    expected = 100 * np.concatenate([reference(*b) for b in batches]).mean()
    np.testing.assert_allclose(metric.compute().item(), expected, rtol=1e-5)

    metric.reset()
    metric.update(*_t(*batches[2]))
    np.testing.assert_allclose(metric.compute().item(), 100 * reference(*batches[2]).mean(), rtol=1e-5)


def test_average_score():
    scores = {"rel": 99.0, "t_gen": 90.0, "m_gen": 85.0, "t_loc": torch.tensor(70.0), "m_loc": 56.0, "rel_em": 1.0}
    assert average_score(scores) == pytest.approx(np.mean([99.0, 90.0, 85.0, 70.0, 56.0]))
    del scores["m_loc"]
    with pytest.raises(KeyError, match="m_loc"):
        average_score(scores)


def test_docstring_examples():
    result = doctest.testmod(module, extraglobs={"torch": torch})
    assert result.attempted > 0 and result.failed == 0
