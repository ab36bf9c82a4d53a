"""Build the embedded world's tiny LLaVA: a word-level tokenizer, a PIL image processor, and a
``LlavaForConditionalGeneration`` (small CLIP vision tower + small Llama) from explicit configs.

Everything here is saved with ``save_pretrained`` so the model, tokenizer and processor load
offline through the very code path a real LLaVA-1.5 checkpoint uses (``from_pretrained`` of a
local folder).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from more_lightning.backbones.llava import LLAVA_TEMPLATE, LLAVA_TEXT_TEMPLATE  # noqa: F401  (re-export)

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<unk>", "<s>", "</s>", "<image>")

TEMPLATE_WORDS: tuple[str, ...] = ("USER", "ASSISTANT", ":")


@dataclass(frozen=True)
class TinyLlavaSpec:
    """Sizes of the tiny LLaVA. Defaults are the embedded world's model."""

    image_size: int = 96
    patch_size: int = 16
    vision_hidden: int = 96
    vision_intermediate: int = 384
    vision_layers: int = 2
    vision_heads: int = 4
    text_hidden: int = 128
    text_layers: int = 4
    text_heads: int = 4
    text_intermediate: int = 1024
    max_positions: int = 128


def build_tokenizer(words: Iterable[str]) -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer over ``words`` (plus the template words and specials).

    Punctuation is split off (``"colour?"`` -> ``colour``, ``?``); ``<image>`` is an added special
    token so ``LlavaProcessor`` can expand it.
    """
    vocab_words = sorted({w.lower() for w in words} | {w.lower() for w in TEMPLATE_WORDS} | set("?.,:;!'"))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for w in vocab_words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return fast


def build_processor(tokenizer: PreTrainedTokenizerFast, spec: TinyLlavaSpec) -> LlavaProcessor:
    """A ``LlavaProcessor`` that expands one ``<image>`` into (image_size / patch_size)² tokens."""
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
        do_center_crop=True,
        do_resize=True,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def build_model(
    tokenizer: PreTrainedTokenizerFast, spec: TinyLlavaSpec, seed: int = 0
) -> LlavaForConditionalGeneration:
    """A randomly initialised tiny ``LlavaForConditionalGeneration`` sized by ``spec``."""

    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_intermediate,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_heads,
        max_position_embeddings=spec.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config)
