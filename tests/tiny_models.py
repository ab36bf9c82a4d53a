"""Tiny random checkpoints of the real transformers classes, saved like a downloaded model.

``save_tiny_llava`` and ``save_tiny_blip2`` write ``config.json`` + safetensors + processor files with
``save_pretrained`` so the backbones load them through the same ``from_pretrained(local_files_only=True)``
path a real LLaVA-1.5 / BLIP-2-OPT checkpoint takes. They have 12 and 8 language layers so the shipped
configs (last 7 layers; the public-code variant's last 12) run unchanged.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    BlipImageProcessorPil,
    OPTConfig,
)

from more_lightning.world.tiny_llava import TinyLlavaSpec, build_model, build_processor, build_tokenizer
from tests.conftest import FIXTURE_WORDS

#: Words of the BLIP-2 E-VQA template, so the tiny tokenizer knows them.
TEMPLATE_WORDS = ("question", "short", "answer")
LLAVA_SPEC = TinyLlavaSpec(
    image_size=32, patch_size=16, vision_hidden=32, vision_layers=1, vision_heads=2,
    text_hidden=32, text_layers=12, text_heads=2, text_intermediate=48,
)  # fmt: skip
BLIP2_QUERY_TOKENS = 4
BLIP2_TEXT_LAYERS = 8


def save_tiny_llava(folder: Path, seed: int = 0) -> Path:
    """A random ``LlavaForConditionalGeneration`` (12 Llama layers, width 32) + ``LlavaProcessor`` in ``folder``."""
    tokenizer = build_tokenizer((*FIXTURE_WORDS, *TEMPLATE_WORDS))
    build_model(tokenizer, LLAVA_SPEC, seed=seed).save_pretrained(folder)
    build_processor(tokenizer, LLAVA_SPEC).save_pretrained(folder)
    return folder


def build_tiny_blip2(
    vocab_size: int, image_token_id: int, special_ids: dict[str, int]
) -> Blip2ForConditionalGeneration:
    """A random BLIP-2 with an 8-layer OPT (width 32), a 1-layer Q-Former and 4 query tokens."""
    vision = Blip2VisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=16
    )
    qformer = Blip2QFormerConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, encoder_hidden_size=32
    )
    text = OPTConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        ffn_dim=48,
        num_hidden_layers=BLIP2_TEXT_LAYERS,
        num_attention_heads=2,
        word_embed_proj_dim=32,
        max_position_embeddings=128,
        **special_ids,
    )
    config = Blip2Config(
        vision_config=vision.to_dict(),
        qformer_config=qformer.to_dict(),
        text_config=text.to_dict(),
        num_query_tokens=BLIP2_QUERY_TOKENS,
        image_token_id=image_token_id,
    )
    return Blip2ForConditionalGeneration(config)


def save_tiny_blip2(folder: Path, seed: int = 0, processor_query_tokens: int | None = BLIP2_QUERY_TOKENS) -> Path:
    """A random ``Blip2ForConditionalGeneration`` + ``Blip2Processor`` (word-level tokenizer) in ``folder``."""
    tokenizer = build_tokenizer((*FIXTURE_WORDS, *TEMPLATE_WORDS))
    special_ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    torch.manual_seed(seed)
    build_tiny_blip2(len(tokenizer), tokenizer.convert_tokens_to_ids("<image>"), special_ids).save_pretrained(folder)
    image_processor = BlipImageProcessorPil(
        size={"height": 32, "width": 32}, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]
    )
    Blip2Processor(image_processor, tokenizer, num_query_tokens=processor_query_tokens).save_pretrained(folder)
    return folder
