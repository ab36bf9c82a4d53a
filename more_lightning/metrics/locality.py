"""Locality: how little an edit moved the model's answers on unrelated inputs (T-Loc / M-Loc, DESIGN.md §3).

Every function takes log-probabilities (``log_softmax`` outputs) of the edited model ``logp`` and of the reference
(pre-edit) model ``ref_logp`` under the same prefix, and a ``mask`` of the answer positions to score. Half-precision
inputs are upcast to float32 before any arithmetic.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

EDIT_SCORE_KEYS: tuple[str, ...] = ("rel", "t_gen", "m_gen", "t_loc", "m_loc")


def _check_locality_inputs(logp: Tensor, ref_logp: Tensor, mask: Tensor) -> None:
    """Raise a ValueError naming the problem if shapes disagree or a sample has no masked position."""
    if logp.ndim != 3 or logp.shape != ref_logp.shape or mask.shape != logp.shape[:2]:
        raise ValueError(
            f"Expected logp and ref_logp (B, T, V) and mask (B, T), got logp {tuple(logp.shape)}, ref_logp "
            f"{tuple(ref_logp.shape)} and mask {tuple(mask.shape)}."
        )
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor marking the answer positions, got dtype {mask.dtype}.")
    empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            f"Sample(s) {empty} have no masked position; locality is undefined. The mask must mark the answer "
            "positions of each locality sample."
        )


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` ``(B, T)`` over the positions where ``mask`` ``(B, T)`` is True -> ``(B,)``."""
    return (values * mask).sum(dim=1) / mask.sum(dim=1)


def _kl_per_position(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """``KL(p || p_ref)`` at every position, ``(B, T, V)`` -> ``(B, T)``, computed in float32."""
    logp, ref_logp = logp.float(), ref_logp.float()
    p = logp.exp()
    # 0 * log(0 / q) = 0: guard positions where logp = -inf (otherwise 0 * -inf = NaN).
    terms = torch.where(p > 0, p * (logp - ref_logp), torch.zeros_like(p))  # (B, T, V)
    # KL >= 0 exactly; rounding of (half-precision) log-probs that do not quite normalise can push it below 0.
    return terms.sum(dim=-1).clamp_min(0.0)


def locality_kl(logp: Tensor, ref_logp: Tensor, mask: Tensor) -> Tensor:
    r"""Per-sample KL divergence of the edited from the reference next-token distribution, averaged over the mask.

    .. math:: \mathrm{KL}_b = \frac{1}{|M_b|} \sum_{i \in M_b} \sum_v p_{b,i,v}
        \left(\log p_{b,i,v} - \log p^{\mathrm{ref}}_{b,i,v}\right)

    Args:
        logp: ``(B, T, V)`` log-probabilities of the edited model.
        ref_logp: ``(B, T, V)`` log-probabilities of the reference (pre-edit) model.
        mask: ``(B, T)`` bool, the answer positions :math:`M_b` to average over.

    Returns:
        ``(B,)`` float32, non-negative.

    Example:
        >>> ref = torch.log(torch.tensor([[[0.5, 0.5], [0.5, 0.5]]]))
        >>> logp = torch.log(torch.tensor([[[0.5, 0.5], [0.9, 0.1]]]))
        >>> locality_kl(logp, ref, torch.tensor([[True, False]]))
        tensor([0.])
        >>> locality_kl(logp, ref, torch.tensor([[True, True]]))  # (0 + 0.9 ln 1.8 + 0.1 ln 0.2) / 2
        tensor([0.1840])
    """
    _check_locality_inputs(logp, ref_logp, mask)
    return _masked_mean(_kl_per_position(logp, ref_logp), mask)


def locality_score(logp: Tensor, ref_logp: Tensor, mask: Tensor) -> Tensor:
    r"""Per-sample locality :math:`\exp(-\mathrm{KL}_b)` in ``[0, 1]`` (1 = the edit left the answer untouched).

    :math:`\mathrm{KL}_b` is :func:`locality_kl`.

    Example:
        >>> ref = torch.log(torch.tensor([[[0.5, 0.5], [0.5, 0.5]]]))
        >>> logp = torch.log(torch.tensor([[[0.5, 0.5], [0.9, 0.1]]]))
        >>> locality_score(logp, ref, torch.tensor([[True, True]]))
        tensor([0.8319])
    """
    return torch.exp(-locality_kl(logp, ref_logp, mask))


def argmax_agreement(logp: Tensor, ref_logp: Tensor, mask: Tensor) -> Tensor:
    r"""Per-sample fraction of masked positions where edited and reference argmax agree (MMEdit/EasyEdit locality).

    .. math:: \mathrm{agree}_b = \frac{1}{|M_b|} \sum_{i \in M_b}
        [\arg\max_v \log p_{b,i,v} = \arg\max_v \log p^{\mathrm{ref}}_{b,i,v}]

    Example:
        >>> ref = torch.log(torch.tensor([[[0.6, 0.4], [0.6, 0.4]]]))
        >>> logp = torch.log(torch.tensor([[[0.7, 0.3], [0.3, 0.7]]]))
        >>> argmax_agreement(logp, ref, torch.tensor([[True, True]]))
        tensor([0.5000])
    """
    _check_locality_inputs(logp, ref_logp, mask)
    agree = logp.float().argmax(dim=-1) == ref_logp.float().argmax(dim=-1)  # (B, T)
    return _masked_mean(agree.float(), mask)


class _MeanPercent(Metric):
    """Mean of a per-sample score in ``[0, 1]``, reported in percent; subclasses set ``_score_fn``."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    plot_lower_bound = 0.0
    plot_upper_bound = 100.0

    score_sum: Tensor
    count: Tensor

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("score_sum", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0), dist_reduce_fx="sum")

    @staticmethod
    def _score_fn(logp: Tensor, ref_logp: Tensor, mask: Tensor) -> Tensor:
        raise NotImplementedError

    def update(self, logp: Tensor, ref_logp: Tensor, mask: Tensor) -> None:
        """Accumulate a batch: ``logp``, ``ref_logp`` ``(B, T, V)`` log-probabilities, ``mask`` ``(B, T)`` bool."""
        scores = self._score_fn(logp, ref_logp, mask)  # (B,)
        self.score_sum += scores.sum()
        self.count += scores.numel()

    def compute(self) -> Tensor:
        """Mean score over samples, in percent."""
        return 100.0 * self.score_sum / self.count


class LocalityScore(_MeanPercent):
    r"""Mean :math:`\exp(-\mathrm{KL}(p \,\|\, p^{\mathrm{ref}}))` over samples (see :func:`locality_score`), percent.

    Example:
        >>> ref = torch.log(torch.tensor([[[0.5, 0.5]]]))
        >>> metric = LocalityScore()
        >>> metric.update(ref, ref, torch.tensor([[True]]))
        >>> metric.update(torch.log(torch.tensor([[[0.9, 0.1]]])), ref, torch.tensor([[True]]))
        >>> round(metric.compute().item(), 2)  # (100 + 100 * exp(-(0.9 ln 1.8 + 0.1 ln 0.2))) / 2
        84.6
    """

    _score_fn = staticmethod(locality_score)


class TextLocality(LocalityScore):
    """T-Loc: locality score on unrelated text-only questions (answer positions under the pre-edit answer prefix)."""


class ModalLocality(LocalityScore):
    """M-Loc: locality score on unrelated image-question pairs (answer positions under the pre-edit answer prefix)."""


class LocalityAgreement(_MeanPercent):
    r"""Mean argmax agreement with the reference model over samples (see :func:`argmax_agreement`), percent.

    This is the MMEdit/EasyEdit locality convention, reported so numbers compare with those papers.

    Example:
        >>> ref = torch.log(torch.tensor([[[0.6, 0.4], [0.6, 0.4]]]))
        >>> metric = LocalityAgreement()
        >>> metric.update(torch.log(torch.tensor([[[0.7, 0.3], [0.3, 0.7]]])), ref, torch.tensor([[True, True]]))
        >>> metric.compute()
        tensor(50.)
    """

    _score_fn = staticmethod(argmax_agreement)


def average_score(scores: Mapping[str, float | Tensor], keys: Sequence[str] = EDIT_SCORE_KEYS) -> float:
    """Avg: the plain mean of the five edit scores ``rel, t_gen, m_gen, t_loc, m_loc`` (DESIGN.md §3).

    Extra entries in ``scores`` are ignored; all scores must be on the same scale (percent).

    Example:
        >>> average_score({"rel": 100.0, "t_gen": 90.0, "m_gen": 80.0, "t_loc": 70.0, "m_loc": 60.0, "em": 5.0})
        80.0
    """
    missing = [k for k in keys if k not in scores]
    if missing:
        raise KeyError(f"average_score needs the scores {list(keys)}; missing {missing} (got {sorted(scores)}).")
    return sum(float(scores[k]) for k in keys) / len(keys)
