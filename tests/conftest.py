"""Shared fixtures: a tiny random LLaVA saved like a real checkpoint, a tiny random BERT saved like a real encoder
folder, and the MMEdit fixture files."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from types import ModuleType

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

FIXTURES = Path(__file__).parent / "fixtures"
MMEDIT = FIXTURES / "mmedit"


def networks_training_args(
    config: str | Path, checkpoint: Path, out: Path, train_files: list[str], save_dir: Path, *extra: str, steps: int = 2
) -> list[str]:
    """``fit`` arguments of an editor's networks training run (``<backbone>_{mend,serac}_train.yaml``) on the
    MMEdit fixture files ``train_files`` (names under ``MMEDIT``) for ``steps`` steps, writing ``out``; ``extra``
    are further overrides."""
    return [
        "fit", "--config", str(config),
        "--model.init_args.backbone.init_args.path", str(checkpoint),
        "--model.init_args.out_file", str(out),
        *extra,
        "--data.init_args.train_files", json.dumps([str(MMEDIT / f) for f in train_files]),
        "--data.init_args.image_root", str(MMEDIT / "coco"),
        "--data.init_args.rephrase_root", str(MMEDIT / "rephrase"),
        "--trainer.max_steps", str(steps),
        "--trainer.logger.init_args.save_dir", str(save_dir),
        "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip


def benchmark_script(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` loaded as a module (the scripts are not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


#: Words of the MMEdit fixture records, so the tiny tokenizer has few unknowns.
FIXTURE_WORDS = (
    "what color colour is the bus which does have who pictured on stamp whose portrait this a photo of "
    "red blue green einstein röntgen herman melville nq question wrote novel moby dick sport being played "
    "tennis soccer dog cat man woman riding horse sitting bench two three people standing street describe image"
).split()


# Tiny models gain nothing from threads, and contend for the cores with other processes.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny LLaVA (transformers classes) saved with ``save_pretrained``."""
    from more_lightning.world.tiny_llava import TinyLlavaSpec, build_model, build_processor, build_tokenizer

    folder = tmp_path_factory.mktemp("tiny_llava")
    spec = TinyLlavaSpec(
        image_size=32, patch_size=16, vision_hidden=32, text_hidden=64, text_layers=2, text_intermediate=96
    )
    tokenizer = build_tokenizer(FIXTURE_WORDS)
    build_model(tokenizer, spec, seed=0).save_pretrained(folder)
    build_processor(tokenizer, spec).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny ``BertModel`` (hidden 32, 2 layers, 2 heads, intermediate 64, 64 positions) and a WordPiece
    ``BertTokenizerFast`` of the fixture words (from a ``vocab.txt``), saved with ``save_pretrained`` like a
    downloaded bert-base-uncased: SERAC's sentence encoder."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_bert")
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = [*special, *dict.fromkeys([*FIXTURE_WORDS, "rontgen", "?", ".", ",", "'", ":"])]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
    lines = (folder / "vocab.txt").read_text(encoding="utf-8").splitlines()
    tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate(lines)})
    config = BertConfig(
        vocab_size=len(lines),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
