"""GeneralCapability: per-category MME tags before the stream and every k edits, figure, clear errors."""

from __future__ import annotations

import pytest

from callbacks.general_capability import answer_token_ids


def test_stream_tags_and_figure(stream_run) -> None:
    scalars = stream_run.scalars
    for category in ("existence", "artwork"):
        for key in ("acc", "acc_plus", "score"):
            tag = f"mme/{category}/{key}"
            assert [s for s, _ in scalars[tag]] == [0, 2, 4], tag
            assert all(0 <= v <= 200 for _, v in scalars[tag])
    for tag in ("mme/total_score", "mme/mean_acc", "mme/yes_rate"):
        assert [s for s, _ in scalars[tag]] == [0, 2, 4], tag
    score, acc, acc_plus = (scalars[f"mme/existence/{k}"][0][1] for k in ("score", "acc", "acc_plus"))
    assert score == pytest.approx(acc + acc_plus)
    assert "general_capability/figure" in stream_run.images
    assert (stream_run.log_dir / "general_capability.png").stat().st_size > 0


def test_unknown_answer_word_names_the_setting(stream_run) -> None:
    tokenizer = stream_run.module.processor.tokenizer
    assert answer_token_ids(tokenizer, " ", "Yes", "No") != answer_token_ids(tokenizer, " ", "No", "Yes")
    with pytest.raises(ValueError, match="yes_answer"):
        answer_token_ids(tokenizer, " ", "Absolutely", "No")


def test_missing_suite_names_the_setting(tmp_path) -> None:
    from callbacks import GeneralCapability

    with pytest.raises(FileNotFoundError, match="mme_root"):
        GeneralCapability(mme_root=str(tmp_path / "nowhere"))._load_items()


def test_max_images_per_category_keeps_both_questions() -> None:
    from callbacks import GeneralCapability
    from tests.conftest import FIXTURES

    items = GeneralCapability(mme_root=str(FIXTURES / "mme"), max_images_per_category=1)._load_items()
    per_category = {}
    for item in items:
        per_category.setdefault(item.category, []).append(item.image_id)
    assert all(len(set(ids)) == 1 and len(ids) == 2 for ids in per_category.values())
