"""LLaVA-1.5 (transformers ``LlavaForConditionalGeneration``) and the embedded tiny LLaVA.

Module paths verified for transformers 5.x: ``model.language_model`` is a ``LlamaModel``, so the
FFN output projection of layer ``i`` is ``model.language_model.layers.{i}.mlp.down_proj``; the
visual projector is ``model.multi_modal_projector.linear_1`` / ``linear_2``. Image positions are
the ``<image>`` tokens the processor expands to (image_size / patch)² per image.
"""

from __future__ import annotations

from transformers import LlavaForConditionalGeneration

from more_lightning.backbones.base import Backbone

LLAVA_FFN_OUT = "model.language_model.layers.{i}.mlp.down_proj"
LLAVA_FFN_UP = "model.language_model.layers.{i}.mlp.up_proj"
LLAVA_PROJECTOR = ["model.multi_modal_projector.linear_1", "model.multi_modal_projector.linear_2"]
#: LLaVA-1.5's conversation format (USER / ASSISTANT), as used by EasyEdit's LLaVA trainer.
LLAVA_TEMPLATE = "USER: <image>\n{prompt} ASSISTANT:"
LLAVA_TEXT_TEMPLATE = "USER: {prompt} ASSISTANT:"


class LlavaBackbone(Backbone):
    """LLaVA-1.5 or any ``LlavaForConditionalGeneration`` checkpoint in a local folder."""

    model_class = LlavaForConditionalGeneration
    download_hint = (
        "Download a LLaVA-1.5 checkpoint in transformers format with its processor files, e.g. "
        "`huggingface-cli download llava-hf/llava-1.5-7b-hf --local-dir data/llava-1.5-7b-hf` "
        "(not the original liuhaotian/llava-v1.5-7b layout)."
    )

    def __init__(
        self,
        path: str,
        dtype: str = "float32",
        num_text_layers: int = 7,
        text_module: str = LLAVA_FFN_OUT,
        extra_text_modules: list[str] | None = None,
        projector_modules: list[str] | None = None,
        template: str = LLAVA_TEMPLATE,
        text_template: str = LLAVA_TEXT_TEMPLATE,
        target_prefix: str = " ",
        template_source: str = "LLaVA-1.5 conversation format (USER/ASSISTANT)",
    ) -> None:
        super().__init__(
            path=path,
            dtype=dtype,
            num_text_layers=num_text_layers,
            text_module=text_module,
            extra_text_modules=extra_text_modules,
            projector_modules=LLAVA_PROJECTOR if projector_modules is None else projector_modules,
            template=template,
            text_template=text_template,
            target_prefix=target_prefix,
            template_source=template_source,
        )
