"""Per-edit fit figures and the shared-question split of the retention scores, against direct computations."""

import pytest
import torch

from more_lightning.module import edit_fit, split_by_shared_question


def test_edit_fit_is_the_answer_tokens_nll_and_target_margin():
    logits = torch.randn(1, 6, 11)
    labels = torch.tensor([[-100, -100, -100, 4, 7, -100]])  # answer tokens at positions 3 and 4
    fit = edit_fit(logits, labels)
    rows = [logits[0, 2], logits[0, 3]]  # position t predicts label t + 1
    targets = [4, 7]
    nll = sum(-torch.log_softmax(r, -1)[t] for r, t in zip(rows, targets, strict=True)) / 2
    margins = []
    for r, t in zip(rows, targets, strict=True):
        others = torch.cat([r[:t], r[t + 1 :]])
        margins.append(float(r[t] - others.max()))
    assert fit["nll"] == pytest.approx(float(nll), rel=1e-5)
    assert fit["margin"] == pytest.approx(sum(margins) / 2, rel=1e-5)


def test_split_by_shared_question_groups_edits_whose_text_another_edit_shares():
    per_edit = [
        ("What colour is the circle?", {"rel": 100.0, "avg": 90.0}),
        ("what  colour is the circle?", {"rel": 0.0, "avg": 50.0}),  # same text up to case and spaces
        ("How many objects are there?", {"rel": 100.0, "avg": 80.0}),
    ]
    split = split_by_shared_question(per_edit)
    assert split["shared"] == {"num_edits": 2, "rel": 50.0, "avg": 70.0}
    assert split["unique"] == {"num_edits": 1, "rel": 100.0, "avg": 80.0}
    assert "unique" not in split_by_shared_question(per_edit[:2])
