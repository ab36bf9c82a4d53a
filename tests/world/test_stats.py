"""Fidelity figures on hand-built record lists whose values are known exactly, and the CLI."""

import subprocess
import sys
from pathlib import Path

import pytest

from more_lightning.data.schema import write_mmedit
from more_lightning.world.stats import REAL_FIGURES, count_twins, fidelity, format_table, main


def _rec(src: str, pred: str = "yes", alt: str = "no") -> dict[str, str]:
    """A schema-valid MMEdit record; only src, pred and alt matter to the figures."""
    return {
        "src": src,
        "pred": pred,
        "rephrase": src,
        "alt": alt,
        "image": "val2014/a.jpg",
        "image_rephrase": "val2014_image_rephrase/a.png",
        "loc": "nq question: who wrote moby dick",
        "loc_ans": "herman melville",
        "m_loc": "val2014/b.jpg",
        "m_loc_q": "what sport is being played?",
        "m_loc_a": "tennis",
    }


def test_identical_questions_give_one_distinct_per_draw():
    figures = fidelity([_rec("describe the image", alt=f"caption {i}") for i in range(300)])
    assert figures["distinct_questions_per_100"] == 1.0
    assert figures["draw_size"] == 100


def test_all_different_questions_give_a_full_draw():
    figures = fidelity([_rec(f"question {i}") for i in range(300)])
    assert figures["distinct_questions_per_100"] == 100.0


def test_same_src_and_pred_with_different_alt_are_both_twins():
    records = [_rec("what color is the bus?", "red", "blue"), _rec("what color is the bus?", "red", "green")]
    assert count_twins(records) == 2
    assert fidelity(records)["textual_twins_per_100"] == 2.0


def test_same_src_with_different_pred_is_not_a_twin():
    records = [_rec("what color is the bus?", "red", "blue"), _rec("what color is the bus?", "green", "red")]
    assert fidelity(records)["textual_twins_per_100"] == 0.0


def test_exact_copies_are_not_twins_but_count_once_one_differs():
    same = _rec("what color is the bus?", "red", "blue")
    assert count_twins([same, dict(same)]) == 0
    # Two copies alt=blue + one alt=green: each of the three has a twin (the other alt), each counted once.
    assert count_twins([same, dict(same), _rec("what color is the bus?", "red", "green")]) == 3


def test_twins_in_a_mixed_file():
    records = [
        _rec("q1", "a", "x"),
        _rec("q1", "a", "y"),  # twin of the one above
        _rec("q1", "b", "z"),  # same question, other pred: no twin
        _rec("q2", "a", "x"),  # other question: no twin
    ]
    figures = fidelity(records)
    assert figures["textual_twins_per_100"] == 2.0
    assert figures["distinct_questions_per_100"] == 2.0


def test_target_words_and_distinct_targets():
    records = [_rec("q1", alt="red"), _rec("q2", alt="  dark   red "), _rec("q3", alt="a b c"), _rec("q4", alt="red")]
    figures = fidelity(records)
    assert figures["words_per_target"] == pytest.approx((1 + 2 + 3 + 1) / 4)
    assert (figures["target_words_min"], figures["target_words_max"]) == (1, 3)
    assert (figures["distinct_targets"], figures["num_records"]) == (3, 4)


def test_same_seed_same_figures_other_seed_other_draws():
    # 40 questions over 300 records: how many distinct questions a draw of 100 holds depends on the draw.
    records = [_rec(f"question {i % 40}", alt=f"a{i % 7}") for i in range(300)]
    assert fidelity(records, seed=3) == fidelity(records, seed=3)
    assert fidelity(records, seed=3) != fidelity(records, seed=4)


def test_fewer_records_than_per_draws_the_whole_file():
    records = [_rec(f"q{i % 3}", "a", f"t{i}") for i in range(7)]  # q0 x3, q1 x2, q2 x2, all alts differ
    figures = fidelity(records, draws=5, per=100)
    assert figures["draw_size"] == 7
    assert figures["distinct_questions_per_100"] == 3.0
    assert figures["textual_twins_per_100"] == 7.0


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="no records"):
        fidelity([])
    with pytest.raises(ValueError, match="draws"):
        fidelity([_rec("q")], draws=0)


def test_table_has_our_columns_and_the_real_ones():
    table = format_table({"vqa_eval.json": fidelity([_rec("q1", alt="red"), _rec("q2", alt="dark red")])})
    lines = table.splitlines()
    assert lines[0] == "| figure | vqa_eval.json | E-VQA (real) | E-IC (real) |"
    assert "| distinct targets | 2 of 2 | 1,051 of 2,093 | 1,000 of 1,000 |" in lines
    assert "| words per target | 1.5 | 1.3 | 10.3 |" in lines
    assert "| target words max | 2 | — | — |" in lines
    assert set(REAL_FIGURES) == {"E-VQA", "E-IC"}


def test_cli_reports_the_table(tmp_path, caplog):
    caplog.set_level("INFO")
    path = tmp_path / "vqa_eval.json"
    write_mmedit(path, [_rec("q1", "a", "x"), _rec("q1", "a", "y")])
    assert main([str(path)]) == 0
    out = caplog.text
    assert "| figure | vqa_eval.json | E-VQA (real) | E-IC (real) |" in out
    assert "| textual twins per 100 | 2.0 | 0.2 | 1.2 |" in out


def test_cli_missing_file_and_bad_record_name_the_file(tmp_path, caplog):
    missing = tmp_path / "nope.json"
    assert main([str(missing)]) == 2
    assert f"{missing}: file not found" in caplog.text
    caplog.clear()
    bad = tmp_path / "bad.json"
    bad.write_text('[{"src": "q"}]')
    assert main([str(bad)]) == 2
    assert "bad.json record 0" in caplog.text
    assert all(r.levelname == "ERROR" for r in caplog.records)


def test_cli_malformed_json_exits_2_without_traceback(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"src": "q",')
    done = subprocess.run(
        [sys.executable, "-m", "more_lightning.world.stats", str(path)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[2],
        timeout=120,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert str(path) in done.stderr and "malformed JSON" in done.stderr
    assert done.stdout == ""
