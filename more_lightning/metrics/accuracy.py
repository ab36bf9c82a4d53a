"""Teacher-forced token accuracy and exact match: the Rel / T-Gen / M-Gen metrics (DESIGN.md §3).

Inputs are already aligned by the engine: ``logits[b, i]`` predicts ``labels[b, i]``; positions whose label is
``ignore_index`` (``-100``) are not supervised (prompt, image tokens, padding).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

IGNORE_INDEX = -100


def _token_hits(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> tuple[Tensor, Tensor]:
    """Check shapes and return ``(hits, mask)``, both ``(B, T)`` bool: argmax is right / position is supervised."""
    if logits.ndim != 3 or labels.ndim != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(
            f"Expected logits (B, T, V) and labels (B, T) with matching B and T, got logits {tuple(logits.shape)} and "
            f"labels {tuple(labels.shape)}. Shift logits so that logits[b, i] predicts labels[b, i] before calling."
        )
    mask = labels != ignore_index  # (B, T)
    empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            f"Sample(s) {empty} have no supervised positions (every label is {ignore_index}); token accuracy is "
            "undefined. Check that the target tokens were labelled and not truncated away by the max length."
        )
    hits = (logits.argmax(dim=-1) == labels) & mask  # (B, T)
    return hits, mask


def token_accuracy(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    r"""Per-sample fraction of supervised target tokens predicted right under teacher forcing.

    .. math:: \mathrm{acc}_b = \frac{1}{|S_b|} \sum_{i \in S_b} [\arg\max_v z_{b,i,v} = y_{b,i}],
        \qquad S_b = \{i : y_{b,i} \ne -100\}

    Args:
        logits: ``(B, T, V)`` scores, ``logits[b, i]`` predicts ``labels[b, i]``.
        labels: ``(B, T)`` token ids, ``ignore_index`` where unsupervised.
        ignore_index: label value of unsupervised positions.

    Returns:
        ``(B,)`` float32 accuracies in ``[0, 1]``.

    Raises:
        ValueError: if shapes disagree or a sample has no supervised position.

    Example:
        >>> logits = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]])  # argmax: 1, 0, 1
        >>> token_accuracy(logits, torch.tensor([[-100, 0, 0]]))
        tensor([0.5000])
    """
    hits, mask = _token_hits(logits, labels, ignore_index)
    return hits.sum(dim=1).float() / mask.sum(dim=1).float()


def exact_match(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    r"""Per-sample 1.0 if every supervised target token is the argmax, else 0.0.

    .. math:: \mathrm{em}_b = \prod_{i \in S_b} [\arg\max_v z_{b,i,v} = y_{b,i}]

    This equals "greedy generation reproduces the target": greedy decoding that has emitted a right prefix sees
    exactly the teacher-forced input, so it stays on the target iff every teacher-forced argmax is right.

    Args:
        logits: ``(B, T, V)`` scores, ``logits[b, i]`` predicts ``labels[b, i]``.
        labels: ``(B, T)`` token ids, ``ignore_index`` where unsupervised.
        ignore_index: label value of unsupervised positions.

    Returns:
        ``(B,)`` float32 tensor of 0.0 / 1.0.

    Example:
        >>> logits = torch.tensor([[[0.0, 1.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]])  # argmax: [1, 0], [1, 1]
        >>> exact_match(logits, torch.tensor([[1, 0], [1, 0]]))
        tensor([1., 0.])
    """
    hits, mask = _token_hits(logits, labels, ignore_index)
    return (hits == mask).all(dim=1).float()


def _token_accuracy_update(
    logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[Tensor, Tensor, int]:
    """Return ``(sum of per-sample accuracies, sum of exact matches, number of samples)`` for one batch."""
    hits, mask = _token_hits(logits, labels, ignore_index)
    acc = hits.sum(dim=1).float() / mask.sum(dim=1).float()  # (B,)
    em = (hits == mask).all(dim=1).float()  # (B,)
    return acc.sum(), em.sum(), labels.shape[0]


def _percent_mean(total: Tensor, count: Tensor) -> Tensor:
    """``100 * total / count``; NaN when nothing was accumulated."""
    return 100.0 * total / count


class TokenAccuracy(Metric):
    r"""Mean teacher-forced token accuracy over samples, in percent (0–100).

    .. math:: \mathrm{TokenAccuracy} = \frac{100}{N} \sum_{b=1}^{N} \mathrm{acc}_b

    where :math:`\mathrm{acc}_b` is :func:`token_accuracy` of sample ``b`` (each sample weighs the same, whatever
    its target length). The exact-match rate over the same samples is :meth:`compute_exact_match`.

    Example:
        >>> metric = TokenAccuracy()
        >>> logits = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])  # argmax: 1, 0
        >>> metric.update(logits, torch.tensor([[1, 0]]))
        >>> metric.update(logits, torch.tensor([[1, 1]]))
        >>> metric.compute()
        tensor(75.)
        >>> metric.compute_exact_match()
        tensor(50.)
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    plot_lower_bound = 0.0
    plot_upper_bound = 100.0

    acc_sum: Tensor
    em_sum: Tensor
    count: Tensor

    def __init__(self, ignore_index: int = IGNORE_INDEX, **kwargs) -> None:
        super().__init__(**kwargs)
        self.ignore_index = ignore_index
        self.add_state("acc_sum", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("em_sum", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, logits: Tensor, labels: Tensor) -> None:
        """Accumulate a batch: ``logits`` ``(B, T, V)``, ``labels`` ``(B, T)`` with ``-100`` where unsupervised."""
        acc_sum, em_sum, n = _token_accuracy_update(logits, labels, self.ignore_index)
        self.acc_sum += acc_sum
        self.em_sum += em_sum
        self.count += n

    def compute(self) -> Tensor:
        """Mean token accuracy in percent."""
        return _percent_mean(self.acc_sum, self.count)

    def compute_exact_match(self) -> Tensor:
        """Exact-match rate (greedy generation equals the target) in percent, synced across processes."""
        with self.sync_context(dist_sync_fn=self.dist_sync_fn):
            return _percent_mean(self.em_sum, self.count).clone()


class Reliability(TokenAccuracy):
    """Rel: token accuracy of the edit target given the edit input (image + question) right after / after the stream."""


class TextGenerality(TokenAccuracy):
    """T-Gen: token accuracy of the edit target given the image and a rephrased question."""


class ModalGenerality(TokenAccuracy):
    """M-Gen: token accuracy of the edit target given a rephrased (different) image and the original question."""
