"""Greedy answers (``more_lightning.generate``) and ``cli.py predict`` on the committed tiny LLaVA.

The reference is a plain argmax loop written against transformers alone: the processor builds the prompt,
``model(...)`` gives logits, the argmax token is appended until ``</s>``.
"""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import cli
from more_lightning.backbones.llava import LLAVA_TEMPLATE, LLAVA_TEXT_TEMPLATE, LlavaBackbone
from more_lightning.data.records import Query
from more_lightning.editors.more import MORE
from more_lightning.editors.state import save_edit_state
from more_lightning.generate import greedy_answer, greedy_tokens
from more_lightning.module import OnlineEditModule
from more_lightning.world.benchmark import _draft
from more_lightning.world.knowledge import build_knowledge
from more_lightning.world.scenes import render

from .conftest import MMEDIT
from .stream_helpers import stream_config

MODEL = Path(__file__).parent.parent / "models" / "tiny_llava"
EDITOR = "{r: 16, alpha: 32, eta: 1.0, lam: 1.0, prior: public}"


@torch.no_grad()
def argmax_loop(model, processor, prompt: str, image, max_new_tokens: int = 32) -> list[int]:
    """The reference: greedy decoding with nothing but the processor and the model's forward."""
    if image is not None:
        enc = processor(text=LLAVA_TEMPLATE.format(prompt=prompt), images=image, return_tensors="pt")
    else:
        enc = processor.tokenizer(LLAVA_TEXT_TEMPLATE.format(prompt=prompt), return_tensors="pt")
    ids, extra = enc["input_ids"], ({"pixel_values": enc["pixel_values"]} if image is not None else {})
    out = []
    for _ in range(max_new_tokens):
        token = int(model(input_ids=ids, attention_mask=torch.ones_like(ids), **extra).logits[0, -1].argmax())
        if token == processor.tokenizer.eos_token_id:
            break
        out.append(token)
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return out


@pytest.fixture(scope="module")
def questions(tmp_path_factory):
    """Four VQA questions about rendered scenes (PNG files) and one knowledge question without an image."""
    root = tmp_path_factory.mktemp("predict_images")
    facts = build_knowledge()
    rows = []
    for i in range(4):
        draft = _draft("vqa", "eval", i, 0, facts)
        render(draft.scene).save(root / f"scene{i}.png")
        rows.append({"question": draft.record["src"], "image": f"scene{i}.png", "truth": draft.truth["answer"]})
    rows.append({"question": facts[0].question(0), "truth": facts[0].answer})
    return root, rows


def render_file(root: Path, row: dict):
    """The row's image as the queries file names it, or None."""
    return Image.open(root / row["image"]).convert("RGB") if row.get("image") else None


@pytest.fixture(scope="module")
def unedited():
    return LlavaBackbone(path=str(MODEL)).load()


def test_greedy_tokens_equal_a_plain_argmax_loop(questions, unedited):
    root, rows = questions
    model, processor = unedited
    backbone = LlavaBackbone(path=str(MODEL))
    answers = []
    for row in rows:
        image = render_file(root, row)
        ours = greedy_tokens(backbone, model, processor, Query(row["question"], "", image))
        assert ours == argmax_loop(model, processor, row["question"], image)
        answers.append(greedy_answer(backbone, model, processor, Query(row["question"], "", image)))
    # the committed model knows its world: most answers are right
    assert sum(a == row["truth"] for a, row in zip(answers, rows, strict=True)) >= 3, answers
    assert len(greedy_tokens(backbone, model, processor, Query(rows[0]["question"], ""), max_new_tokens=1)) <= 1
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_tokens(backbone, model, processor, Query("x", ""), max_new_tokens=0)


def _predict_config(tmp_path: Path, root: Path, rows: list[dict]) -> tuple[Path, Path]:
    queries = tmp_path / "queries.jsonl"
    queries.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "truth"}) + "\n" for r in rows))
    config = stream_config(tmp_path / "predict.yaml", MODEL, MMEDIT, editor=EDITOR, name="predict")
    text = config.read_text().replace(f"image_root: {MMEDIT / 'coco'}", f"image_root: {root}")
    config.write_text(text.replace("num_edits: 3", f"num_edits: 3\n    predict_file: {queries}"))
    return config, queries


def _edit_state(path: Path) -> Path:
    """An edit state with large random writes: it changes what the model answers."""
    module = OnlineEditModule(LlavaBackbone(path=str(MODEL), num_text_layers=2), MORE(r=16, alpha=32))
    optimizer = module.configure_optimizers()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in module.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    save_edit_state(module.model, optimizer, path)
    return path


def test_predict_writes_greedy_answers_with_and_without_an_edit_state(questions, unedited, tmp_path, caplog):
    root, rows = questions
    config, _ = _predict_config(tmp_path, root, rows)
    assert cli.run(["predict", "--config", str(config)]) == 0
    out = next((tmp_path / "runs" / "predict").glob("version_*/predictions.jsonl"))
    assert f"predict: 5 answers written to {out}" in caplog.text
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    model, processor = unedited
    assert [(x["index"], x["question"], x["image"]) for x in lines] == [
        (i, r["question"], r.get("image")) for i, r in enumerate(rows)
    ]
    plain = [
        processor.tokenizer.decode(argmax_loop(model, processor, r["question"], render_file(root, r))) for r in rows
    ]
    assert [x["answer"] for x in lines] == plain

    # with a saved edit state, to a file of one's choosing: the edited model's own greedy answers
    state = _edit_state(tmp_path / "state.safetensors")
    target = tmp_path / "answers" / "edited.jsonl"
    args = ["--model.init_args.load_edit_state", str(state), "--data.init_args.predict_out", str(target)]
    assert cli.run(["predict", "--config", str(config), *args]) == 0
    edited = OnlineEditModule(LlavaBackbone(path=str(MODEL), num_text_layers=2), MORE(r=16, alpha=32))
    from more_lightning.editors.state import load_edit_state

    load_edit_state(edited.model, edited.configure_optimizers(), state)
    expected = [
        edited.processor.tokenizer.decode(
            argmax_loop(edited.model, edited.processor, r["question"], render_file(root, r))
        )
        for r in rows
    ]
    answers = [json.loads(line)["answer"] for line in target.read_text().splitlines()]
    assert answers == expected and answers != plain
    assert len(list((tmp_path / "runs" / "predict").glob("version_*"))) == 1  # no folder of a config alone


def test_predict_errors_are_one_line(questions, tmp_path, capsys):
    root, rows = questions
    config, queries = _predict_config(tmp_path, root, rows)
    queries.write_text(
        '{"question": "what colour is it?", "image": "scene0.png"}\n\n{"question": "where?", "image": 7}\n'
    )
    assert cli.run(["predict", "--config", str(config)]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and f"{queries} line 3, field 'image'" in err[0]
    no_file = ["--data.init_args.predict_file", "null"]
    assert cli.run(["predict", "--config", str(config), *no_file]) == 1
    assert "set --data.init_args.predict_file" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "predict").exists()  # nothing produced, no run folder
