"""A small benchmark run: deterministic bytes, schema-valid records, MME layout."""

import json
from pathlib import Path

import pytest

from more_lightning.data.mme import read_mme
from more_lightning.data.records import HELDOUT_KEYS, MMEDIT_KEYS
from more_lightning.data.schema import heldout_path, read_mmedit, validate_record
from more_lightning.world.benchmark import FILES, build_benchmark, fidelity_report, main
from more_lightning.world.questions import QTYPES
from tests.conftest import benchmark_script


def _build(root: Path, **kwargs) -> dict[str, int]:
    return build_benchmark(root, seed=0, num_train=12, num_eval=15, mme_images=4, **kwargs)


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("embedded")
    _build(root)
    return root


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes(bench, tmp_path):
    _build(tmp_path)
    assert _snapshot(bench) == _snapshot(tmp_path)


def test_every_record_passes_the_schema(bench):
    for name in FILES.values():
        raw = json.loads((bench / f"{name}.json").read_text())
        assert len(raw) == (12 if "train" in name else 15)
        for i, record in enumerate(raw):
            validate_record(record, f"{name}.json record {i}")
            assert tuple(record) == MMEDIT_KEYS
            assert record["alt"] != record["pred"]
            assert record["src"] != record["rephrase"]
        records = read_mmedit(bench / f"{name}.json", bench / "images", bench / "images_rephrase")
        assert all(r.image.is_file() and r.image_rephrase.is_file() and r.m_loc.is_file() for r in records)


def test_without_a_model_pred_is_the_truth(bench):
    records = json.loads((bench / "vqa_eval.json").read_text())
    truth = json.loads((bench / "truth" / "vqa_eval.json").read_text())
    assert [r["pred"] for r in records] == [t["answer"] for t in truth]
    assert {t["qtype"] for t in truth} == set(QTYPES)


def test_companion_holds_other_variants_than_the_record(bench):
    for name in FILES.values():
        raw = json.loads((bench / f"{name}.json").read_text())
        held = json.loads(heldout_path(bench / f"{name}.json").read_text())
        assert len(held) == len(raw)
        for record, variant in zip(raw, held, strict=True):
            assert tuple(variant) == HELDOUT_KEYS
            assert variant["rephrase"] not in (record["src"], record["rephrase"])
            assert variant["loc"] != record["loc"] and variant["m_loc"] != record["m_loc"]
            held_image = (bench / "images_rephrase" / variant["image_rephrase"]).read_bytes()
            assert held_image != (bench / "images_rephrase" / record["image_rephrase"]).read_bytes()
        records = read_mmedit(
            bench / f"{name}.json",
            bench / "images",
            bench / "images_rephrase",
            heldout_file=heldout_path(bench / f"{name}.json"),
        )
        assert all(r.held_out is not None and r.held_out.m_loc.is_file() for r in records)


def test_stats_report_every_file_beside_the_real_ones(bench, caplog):
    report = fidelity_report(bench)
    assert all(f"{name}.json" in report for name in FILES.values())
    assert "E-VQA (real)" in report and "distinct questions per 100" in report
    caplog.set_level("INFO")
    main(["--out", str(bench), "--if-missing", "--stats"])
    assert "textual twins per 100" in caplog.text


def test_mme_suite_has_one_yes_and_one_no_per_image(bench):
    items = read_mme(bench / "mme")
    assert {it.category for it in items} == {"existence", "count", "position", "color"}
    by_image: dict[str, list[bool]] = {}
    for it in items:
        by_image.setdefault(it.image_id, []).append(it.answer)
    assert len(by_image) == 16
    assert all(sorted(answers) == [False, True] for answers in by_image.values())


def test_evaluate_reports_on_the_chosen_split(bench, tmp_path):
    import shutil

    from more_lightning.world.evaluate import evaluate

    model = Path(__file__).parents[2] / "models" / "tiny_llava"
    copy = tmp_path / "bench"
    shutil.copytree(bench, copy)
    for name in ("vqa_eval", "caption_eval_edit"):  # only the train split's records are left
        (copy / f"{name}.json").unlink()
    report = evaluate(str(model), str(copy), split="train")
    assert report["vqa/alt_eq_pred"] == 0
    assert 0 <= report["vqa/all"] <= 100 and 0 <= report["caption/token_acc"] <= 100
    with pytest.raises(FileNotFoundError, match="vqa_eval"):
        evaluate(str(model), str(copy), split="eval")
    with pytest.raises(ValueError, match="split"):
        evaluate(str(model), str(copy), split="test")


def _world_attention():
    return benchmark_script("world_attention")


def test_attention_split_adds_up_to_the_image_mass(bench):
    module = _world_attention()
    model = Path(__file__).parents[2] / "models" / "tiny_llava"
    result = module.attention_split(str(model), str(bench), "train", ["colour", "describe", "position"], limit=3)
    assert result, "no multi-object question in the small benchmark"
    for heads in result.values():
        assert len(heads) == 16  # 4 layers x 4 heads
        for total, ref, others, empty in heads.values():
            assert 0 <= total <= 1 + 1e-5
            assert abs(ref + others + empty - total) < 1e-5


def test_if_missing_rewrites_a_benchmark_drawn_by_another_world_or_model(bench, tmp_path, caplog):
    import shutil

    from more_lightning.world.benchmark import MAIN_STAMP

    root = tmp_path / "embedded"
    shutil.copytree(bench, root)
    caplog.set_level("INFO")
    args = ["--out", str(root), "--if-missing", "--num-train", "12", "--num-eval", "15", "--mme-images", "4"]
    main(args)
    assert "already holds the benchmark" in caplog.text
    stamp = json.loads((root / MAIN_STAMP).read_text())
    stamp["settings"]["world"] = 1  # as if an older generator (or another model) had drawn it
    (root / MAIN_STAMP).write_text(json.dumps(stamp))
    (root / "vqa_eval.json").write_text("[]")
    caplog.clear()
    main(args)
    assert "already holds the benchmark" not in caplog.text
    assert _snapshot(root) == _snapshot(bench)
