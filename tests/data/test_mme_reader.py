"""MME reader (more_lightning.data.mme) against the miniature release in tests/fixtures/mme/."""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from pathlib import Path

import pytest

from more_lightning.data.mme import MME_CATEGORIES, MMEFormatError, read_mme

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "mme"
FLAT = ("existence", "count", "code_reasoning")
SPLIT = ("artwork", "celebrity", "landmark")


@pytest.fixture
def mme(tmp_path: Path) -> Path:
    """A private copy of the MME fixture, free to break."""
    return Path(shutil.copytree(FIXTURES, tmp_path / "MME_Benchmark_release_version"))


def test_reads_both_layouts_in_official_order() -> None:
    items = read_mme(FIXTURES)
    categories = list(dict.fromkeys(item.category for item in items))
    assert categories == [c for c in MME_CATEGORIES if c in FLAT + SPLIT]
    assert Counter(item.category for item in items) == dict.fromkeys(FLAT + SPLIT, 4)
    per_image = Counter(item.image_id for item in items)
    assert len(per_image) == 12 and set(per_image.values()) == {2}
    for item in items:
        assert item.image.is_file()
        assert item.image_id == item.image.relative_to(FIXTURES).as_posix()


def test_flat_layout() -> None:
    items = read_mme(FIXTURES, categories=["code_reasoning"])
    assert [i.image_id for i in items] == ["code_reasoning/0001.png"] * 2 + ["code_reasoning/0002.png"] * 2
    assert [i.answer for i in items] == [True, False, True, False]
    assert items[0].question.startswith("The image shows a python code.")


def test_split_layout() -> None:
    items = read_mme(FIXTURES, categories=["artwork"])
    assert items[0].image_id == "artwork/images/10002.jpg"
    assert items[2].question == "Is this artwork displayed in musée toulouse-lautrec, albi? Please answer yes or no."
    assert [i.answer for i in items] == [True, False, True, False]


def test_question_kept_verbatim_and_trailing_blank_line_ignored() -> None:
    items = read_mme(FIXTURES, categories=["existence", "landmark"])
    assert "image?  Please answer" in items[3].question  # the release's double space survives
    assert len(items) == 8  # landmark/0001.txt ends in a blank line


def test_nested_mme_benchmark_folder(tmp_path: Path) -> None:
    shutil.copytree(FIXTURES, tmp_path / "MME_Benchmark")
    assert len(read_mme(tmp_path, categories=["count"])) == 4


def test_answers_case_insensitive_and_crlf(mme: Path) -> None:
    (mme / "count" / "000000027620.txt").write_bytes(b"Two dogs?\tyes\r\nThree dogs?\tNO\r\n")
    items = read_mme(mme, categories=["count"])
    assert [(i.question, i.answer) for i in items[:2]] == [("Two dogs?", True), ("Three dogs?", False)]


def test_line_without_tab_names_file_and_line(mme: Path) -> None:
    path = mme / "artwork" / "questions_answers_YN" / "38740.txt"
    path.write_text("Is this a painting?\tYes\n\nIs this a sculpture? No\n", encoding="utf-8")
    with pytest.raises(MMEFormatError, match=r"38740\.txt, line 3: expected 'question<TAB>Yes\|No', found no tab"):
        read_mme(mme, categories=["artwork"])


def test_answer_not_yes_no_names_file_and_line(mme: Path) -> None:
    (mme / "existence" / "000000018150.txt").write_text("Is there a cat?\tMaybe\n", encoding="utf-8")
    with pytest.raises(MMEFormatError, match=r"000000018150\.txt, line 1: answer 'Maybe' is not yes/no"):
        read_mme(mme, categories=["existence"])


def test_missing_image_for_question_file(mme: Path) -> None:
    (mme / "celebrity" / "images" / "tt0080339_shot_0711_img_0.jpg").unlink()
    with pytest.raises(MMEFormatError, match=r"tt0080339_shot_0711_img_0\.txt: no image"):
        read_mme(mme, categories=["celebrity"])


def test_missing_category_folder(mme: Path) -> None:
    with pytest.raises(MMEFormatError, match=r"OCR: category folder missing \(folders present: .*artwork"):
        read_mme(mme, categories=["OCR"])


def test_split_layout_without_images_folder(mme: Path) -> None:
    shutil.rmtree(mme / "landmark" / "images")
    with pytest.raises(MMEFormatError, match=r"landmark: has questions_answers_YN/ but no images/"):
        read_mme(mme, categories=["landmark"])


def test_empty_root(tmp_path: Path) -> None:
    with pytest.raises(MMEFormatError, match="no MME category folders"):
        read_mme(tmp_path)


def test_odd_question_count_warns(mme: Path, caplog: pytest.LogCaptureFixture) -> None:
    (mme / "count" / "000000040990.txt").write_text("Is there a bus?\tYes\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="more_lightning.data.mme"):
        items = read_mme(mme, categories=["count"])
    assert len(items) == 3
    assert "do not hold exactly 2 questions" in caplog.text and "000000040990.txt" in caplog.text
