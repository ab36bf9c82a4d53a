"""MME-style yes/no accuracy: acc, acc+ and score = acc + acc+ (Fu et al., "MME", 2023).

MME asks two yes/no questions per image; acc+ credits an image only when both are answered right. MME reports
these per subtask and sums the subtask scores, so keep one :class:`MMEAccuracy` per subtask.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


def yes_no_correct(logits_at_answer: Tensor, yes_id: int, no_id: int, answers: Tensor) -> Tensor:
    """Whether the model's yes/no answer is right, deciding by the larger of the "yes" and "no" logits.

    Args:
        logits_at_answer: ``(N, V)`` next-token logits at the answer position.
        yes_id: token id of "Yes".
        no_id: token id of "No".
        answers: ``(N,)`` bool ground truth, True for "yes".

    Returns:
        ``(N,)`` bool, True where the prediction (yes iff ``logit[yes_id] > logit[no_id]``; a tie reads as "no")
        equals the answer.

    Example:
        >>> logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 0.0], [1.0, 1.0, 9.0]])
        >>> yes_no_correct(logits, yes_id=0, no_id=1, answers=torch.tensor([True, True, False]))
        tensor([ True, False,  True])
    """
    if logits_at_answer.ndim != 2 or answers.shape != logits_at_answer.shape[:1]:
        raise ValueError(
            f"Expected logits_at_answer (N, V) and answers (N,), got {tuple(logits_at_answer.shape)} and "
            f"{tuple(answers.shape)}."
        )
    vocab = logits_at_answer.shape[1]
    if yes_id == no_id or not (0 <= yes_id < vocab and 0 <= no_id < vocab):
        raise ValueError(f"yes_id ({yes_id}) and no_id ({no_id}) must be distinct token ids in [0, {vocab}).")
    pred_yes = logits_at_answer[:, yes_id] > logits_at_answer[:, no_id]  # (N,)
    return pred_yes == answers.bool()


def _image_ids_to_tensor(image_ids: Sequence[str] | Tensor) -> Tensor:
    """Image ids as a ``(N,)`` long tensor; strings are numbered in order of first appearance."""
    if isinstance(image_ids, Tensor):
        return image_ids.long()
    index: dict[str, int] = {}
    return torch.tensor([index.setdefault(i, len(index)) for i in image_ids], dtype=torch.long)


def _mme_check(image_ids: Tensor, correct: Tensor) -> None:
    if image_ids.ndim != 1 or correct.shape != image_ids.shape:
        raise ValueError(
            f"Expected image_ids (N,) and correct (N,), got {tuple(image_ids.shape)} and {tuple(correct.shape)}."
        )
    if correct.dtype != torch.bool:
        raise ValueError(f"correct must be a bool tensor (e.g. prediction == answer), got dtype {correct.dtype}.")


def _mme_compute(image_ids: Tensor, correct: Tensor) -> dict[str, Tensor]:
    """acc, acc+ and score, in percent, from ``(N,)`` long image ids and ``(N,)`` bool correctness."""
    if correct.numel() == 0:
        raise ValueError("MME accuracy needs at least one answered question; got none.")
    _, image_index = torch.unique(image_ids, return_inverse=True)  # (N,) in [0, n_images)
    n_images = int(image_index.max()) + 1
    wrong_per_image = torch.zeros(n_images, dtype=torch.long, device=correct.device)
    wrong_per_image.scatter_add_(0, image_index, (~correct).long())  # (n_images,)
    acc = 100.0 * correct.float().mean()
    acc_plus = 100.0 * (wrong_per_image == 0).float().mean()
    return {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus}


def mme_scores(image_ids: Sequence[str] | Tensor, correct: Tensor) -> dict[str, Tensor]:
    r"""MME accuracy (acc), per-image accuracy (acc+) and score, in percent.

    .. math:: \mathrm{acc} = \frac{100}{N} \sum_n c_n, \qquad
        \mathrm{acc^+} = \frac{100}{|I|} \sum_{i \in I} \prod_{n : \mathrm{img}(n) = i} c_n, \qquad
        \mathrm{score} = \mathrm{acc} + \mathrm{acc^+} \in [0, 200]

    Args:
        image_ids: ``(N,)`` image of each question, as strings or an integer tensor.
        correct: ``(N,)`` bool, whether each question was answered right.

    Returns:
        ``{"acc", "acc_plus", "score"}``, 0-dim float tensors.

    Example:
        >>> scores = mme_scores(["a", "a", "b", "b"], torch.tensor([True, True, True, False]))
        >>> {k: round(v.item(), 2) for k, v in scores.items()}
        {'acc': 75.0, 'acc_plus': 50.0, 'score': 125.0}
    """
    ids = _image_ids_to_tensor(image_ids).to(correct.device)
    _mme_check(ids, correct)
    return _mme_compute(ids, correct)


class MMEAccuracy(Metric):
    """MME acc / acc+ / score (see :func:`mme_scores`) accumulated over batches of yes/no questions.

    The two questions of an image may arrive in different batches (or processes): the states are the raw per-question
    lists, concatenated before grouping by image id. Ids must therefore be integers that mean the same image on every
    process.

    Example:
        >>> metric = MMEAccuracy()
        >>> metric.update(torch.tensor([0, 0, 1]), torch.tensor([True, True, True]))
        >>> metric.update(torch.tensor([1]), torch.tensor([False]))
        >>> {k: round(v.item(), 2) for k, v in metric.compute().items()}
        {'acc': 75.0, 'acc_plus': 50.0, 'score': 125.0}
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    image_ids: list[Tensor]
    correct: list[Tensor]

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("image_ids", default=[], dist_reduce_fx="cat")
        self.add_state("correct", default=[], dist_reduce_fx="cat")

    def update(self, image_ids: Tensor, correct: Tensor) -> None:
        """Accumulate ``image_ids`` ``(N,)`` integer ids and ``correct`` ``(N,)`` bool."""
        if not isinstance(image_ids, Tensor) or image_ids.is_floating_point():
            raise TypeError(
                "MMEAccuracy.update needs image_ids as an integer tensor (so they can be gathered across processes); "
                "map string ids to integers first, or use mme_scores for a one-off computation."
            )
        _mme_check(image_ids, correct)
        self.image_ids.append(image_ids.long())
        self.correct.append(correct)

    def compute(self) -> dict[str, Tensor]:
        """``{"acc", "acc_plus", "score"}`` in percent over every question seen."""
        if not self.correct:
            raise ValueError("MMEAccuracy.compute called before any update; there are no answers to score.")
        return _mme_compute(dim_zero_cat(self.image_ids), dim_zero_cat(self.correct))
