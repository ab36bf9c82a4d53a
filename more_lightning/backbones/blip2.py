"""BLIP-2-OPT (transformers ``Blip2ForConditionalGeneration``).

Module paths verified on transformers 5.24 (a tiny random model from ``Blip2Config``): the language
model is an ``OPTForCausalLM`` at ``language_model``, so the FFN output projection of layer ``i`` is
``language_model.model.decoder.layers.{i}.fc2``; the visual projector is the single
``language_projection`` (Q-Former width -> OPT width). Image positions are the ``num_query_tokens``
``<image>`` tokens the processor puts before BOS; the model scatters the Q-Former outputs into them.

Two BLIP-2 quirks handled here:

* The model accepts *fewer* image tokens than ``num_query_tokens`` without a word (``masked_scatter``
  just uses the first few query outputs), so :meth:`Blip2Backbone.encode_prompt` checks the count.
* ``Blip2ForConditionalGeneration.forward`` requires ``pixel_values``; text-only queries (T-Loc) run
  the OPT language model directly, as EasyEdit's BLIP-2 wrapper does.

OPT flattens ``(B, T, d)`` to ``(B·T, d)`` inside each decoder layer before ``fc1`` / ``fc2``, so the
key-position masks of BLIP-2 inputs are flattened the same way (:class:`FlatRowInputs`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from PIL import Image
from torch import Tensor, nn
from transformers import Blip2ForConditionalGeneration

from more_lightning.backbones.base import Backbone, ModelInputs

log = logging.getLogger(__name__)

OPT_FFN_OUT = "language_model.model.decoder.layers.{i}.fc2"
BLIP2_PROJECTOR = ["language_projection"]
#: EasyEdit's VQADataset prompt (the target follows with a leading space, ``" " + alt``).
BLIP2_VQA_TEMPLATE = "Question: {prompt} Short answer:"
#: EasyEdit's CaptionDataset feeds BLIP-2 the raw caption prompt (``src``, e.g. "a photo of").
BLIP2_CAPTION_TEMPLATE = "{prompt}"
#: Text-only locality queries: EasyEdit concatenates ``loc`` and ``" " + loc_ans`` with no template.
BLIP2_TEXT_TEMPLATE = "{prompt}"


@dataclass
class FlatRowInputs(ModelInputs):
    """BLIP-2 inputs whose key-position masks match OPT's flattened FFN rows.

    Inside ``OPTDecoderLayer`` the hidden states are reshaped to ``(B·T, d)`` before ``fc1``/``fc2``, so
    a text module's key rows are flat; :meth:`positions` returns the (B·T,) mask in that row order.
    """

    def positions(self, which: str) -> Tensor:
        return super().positions(which).reshape(-1)  # (B, T) -> (B·T,)


class Blip2Backbone(Backbone):
    """BLIP-2-OPT, or any ``Blip2ForConditionalGeneration`` checkpoint with a decoder-only OPT, in a local folder.

    The default ``template`` is EasyEdit's E-VQA prompt ``"Question: {prompt} Short answer:"`` (EasyEdit
    ``easyeditor/dataset/vqa.py`` from the version that gives the target a leading space; the older version
    used ``"Question: {} Short answer: "`` with no space before the target, which tokenises differently).
    For E-IC use ``template: "{prompt}"`` (EasyEdit's ``coco_caption.py`` feeds the raw caption prompt).
    """

    model_class = Blip2ForConditionalGeneration
    download_hint = (
        "Download a BLIP-2 OPT checkpoint in transformers format with its processor files, e.g. "
        "`huggingface-cli download Salesforce/blip2-opt-2.7b --local-dir data/blip2-opt-2.7b`."
    )

    def __init__(
        self,
        path: str,
        dtype: str = "float32",
        num_text_layers: int = 7,
        text_module: str = OPT_FFN_OUT,
        extra_text_modules: list[str] | None = None,
        projector_modules: list[str] | None = None,
        template: str = BLIP2_VQA_TEMPLATE,
        text_template: str = BLIP2_TEXT_TEMPLATE,
        target_prefix: str = " ",
        template_source: str = "EasyEdit VQADataset: 'Question: {} Short answer:' + ' ' + target",
    ) -> None:
        super().__init__(
            path=path,
            dtype=dtype,
            num_text_layers=num_text_layers,
            text_module=text_module,
            extra_text_modules=extra_text_modules,
            projector_modules=BLIP2_PROJECTOR if projector_modules is None else projector_modules,
            template=template,
            text_template=text_template,
            target_prefix=target_prefix,
            template_source=template_source,
        )

    def load(self) -> tuple[nn.Module, object]:
        """Model and processor; the processor's ``num_query_tokens`` is checked against the model's."""
        model, processor = super().load()
        expected = int(model.config.num_query_tokens)
        found = getattr(processor, "num_query_tokens", None)
        if found is None:
            # Processors saved before transformers added image-token expansion have no num_query_tokens;
            # without it no <image> tokens are inserted and the model silently ignores the image.
            log.warning("%s: processor has no num_query_tokens; using the model's %d", self.path, expected)
            processor.num_query_tokens = expected
        elif int(found) != expected:
            raise ValueError(
                f"{self.path}: processor num_query_tokens={found} but the model has num_query_tokens={expected}; "
                "the processor and the model come from different checkpoints"
            )
        return model, processor

    def image_token_id(self, processor: object, model: nn.Module) -> int:
        token_id = model.config.image_token_id
        if token_id is None:
            raise ValueError(
                f"{self.path}/config.json has no image_token_index: this BLIP-2 snapshot predates transformers' "
                "query-token placeholders. Download a current Salesforce/blip2-opt-2.7b (config.json with "
                "image_token_index, processor_config.json with num_query_tokens)."
            )
        return int(token_id)

    def encode_prompt(
        self, processor: object, prompt: str, image: Image.Image | None, image_token_id: int
    ) -> FlatRowInputs:
        """The prompt as :class:`FlatRowInputs`; with an image, its ``num_query_tokens`` image tokens are checked."""
        inputs = super().encode_prompt(processor, prompt, image, image_token_id)
        if image is not None:
            expected = int(processor.num_query_tokens)
            counts = inputs.image_mask.sum(dim=1)  # (B,)
            if (counts != expected).any():
                raise ValueError(
                    f"BLIP-2 input for prompt {prompt!r} has {counts.tolist()} image tokens (id "
                    f"{image_token_id}) but the model needs exactly num_query_tokens={expected}: BLIP-2 silently "
                    "accepts fewer. Check that the tokenizer maps '<image>' to config.image_token_id and that the "
                    "backbone's `template` holds no '<image>' (the processor inserts the query tokens itself)."
                )
        return FlatRowInputs(**{name: getattr(inputs, name) for name in inputs.__dataclass_fields__})

    def logits(self, model: nn.Module, inputs: ModelInputs) -> Tensor:
        """(B, T, V); text-only inputs go straight to the OPT language model (BLIP-2 requires pixel_values)."""
        if inputs.pixel_values is None:
            return model.language_model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask).logits
        return super().logits(model, inputs)
