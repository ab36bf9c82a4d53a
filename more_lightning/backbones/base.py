"""What the engine needs from a model family: where to edit and how to build inputs.

A backbone is data plus a few small methods. The engine never asks which family it runs: edit
points come from module-path templates, image positions from the model's ``image_token_id``,
prompts from a template string. One file per family subclasses :class:`Backbone`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import ClassVar

import torch
from PIL import Image
from torch import Tensor, nn

from more_lightning.contract import EditPoint
from more_lightning.data.records import Query

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelInputs:
    """One tokenised query. ``labels`` follow the Hugging Face convention (-100 = unsupervised)."""

    input_ids: Tensor  # (B, T)
    attention_mask: Tensor  # (B, T)
    labels: Tensor  # (B, T) target tokens, -100 on prompt and image positions
    image_mask: Tensor  # (B, T) bool, True at image-token positions
    pixel_values: Tensor | None = None  # (B, 3, H, W)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> ModelInputs:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, Tensor):
                cast = dtype if (dtype is not None and value.is_floating_point()) else None
                moved[name] = value.to(device=device, dtype=cast)
        return type(self)(**moved)  # keep a backbone's subclass (e.g. BLIP-2's flat key rows)

    def append(self, token_ids: Tensor, supervised: bool = False) -> ModelInputs:
        """These inputs followed by the text tokens ``token_ids`` (B, n), labelled with themselves if ``supervised``."""
        ones = torch.ones_like(token_ids)
        labels = token_ids if supervised else torch.full_like(token_ids, -100)
        return replace(
            self,
            input_ids=torch.cat([self.input_ids, token_ids], dim=1),  # (B, T+n)
            attention_mask=torch.cat([self.attention_mask, ones.to(self.attention_mask.dtype)], dim=1),
            labels=torch.cat([self.labels, labels], dim=1),
            image_mask=torch.cat([self.image_mask, torch.zeros_like(token_ids, dtype=torch.bool)], dim=1),
        )

    def model_kwargs(self) -> dict[str, Tensor]:
        kwargs = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if self.pixel_values is not None:
            kwargs["pixel_values"] = self.pixel_values
        return kwargs

    @property
    def text_mask(self) -> Tensor:
        """(B, T) bool: attended positions that are not image tokens."""
        return self.attention_mask.bool() & ~self.image_mask

    @property
    def predict_mask(self) -> Tensor:
        """(B, T) bool: positions whose next token is a target token (where the target is predicted)."""
        mask = torch.zeros_like(self.image_mask)
        mask[:, :-1] = self.labels[:, 1:] != -100
        return mask

    def positions(self, which: str) -> Tensor:
        """Key-pooling positions for text modules: ``"text"``, ``"target"`` or ``"all"`` (text and image)."""
        if which == "text":
            return self.text_mask
        if which == "target":
            return self.predict_mask
        if which == "all":
            return self.attention_mask.bool()
        raise ValueError(f"key positions must be 'text', 'target' or 'all', got {which!r}")


class Backbone:
    """A model family: loading, edit points and input building.

    Args:
        path: local folder holding the checkpoint (``save_pretrained`` layout).
        dtype: ``float32`` | ``bfloat16`` | ``float16`` for the model's weights. Editor state is
            always float32.
        num_text_layers: edit the FFN output projection of the last this many language layers.
        text_module: module-path template of a language layer's FFN output, ``{i}`` = layer index.
        extra_text_modules: further per-layer templates to wrap (e.g. ``...mlp.up_proj``).
        projector_modules: module paths of the visual projector's linear layers.
        template: prompt template with an image, ``{prompt}`` = the question / caption prompt.
        text_template: prompt template for text-only queries.
        target_prefix: prepended to every target before tokenising (EasyEdit's leading space).
        template_source: which EasyEdit version / chat format ``template`` follows (documentation).
    """

    #: transformers class that loads this family (set by subclasses).
    model_class: ClassVar[type[nn.Module]]
    #: what a user must download for this family (used in the missing-path message).
    download_hint: ClassVar[str] = ""

    def __init__(
        self,
        path: str,
        dtype: str = "float32",
        num_text_layers: int = 7,
        text_module: str = "",
        extra_text_modules: list[str] | None = None,
        projector_modules: list[str] | None = None,
        template: str = "{prompt}",
        text_template: str = "{prompt}",
        target_prefix: str = " ",
        template_source: str = "",
    ) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"backbone dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if num_text_layers < 0:
            raise ValueError(f"num_text_layers must be >= 0, got {num_text_layers}")
        self.path = path
        self.dtype = dtype
        self.num_text_layers = num_text_layers
        self.text_module = text_module
        self.extra_text_modules = list(extra_text_modules or [])
        self.projector_modules = list(projector_modules or [])
        self.template = template
        self.text_template = text_template
        self.target_prefix = target_prefix
        self.template_source = template_source

    # --- loading -------------------------------------------------------------------------------
    def load(self) -> tuple[nn.Module, object]:
        """Model and processor from the local folder ``path`` (never from a hub)."""
        from transformers import AutoProcessor

        folder = Path(self.path).expanduser()
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"no checkpoint at {str(folder)!r} (config.json missing). {self.download_hint} "
                "Set the folder with `--model.backbone.init_args.path /path/to/checkpoint`."
            )
        model = self.model_class.from_pretrained(folder, dtype=DTYPES[self.dtype], local_files_only=True)
        processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
        model.eval()
        return model, processor

    def num_layers(self, model: nn.Module) -> int:
        return model.config.text_config.num_hidden_layers

    def edit_points(self, model: nn.Module) -> list[EditPoint]:
        """The modules to edit, checked to exist and to be ``nn.Linear``."""
        n = self.num_layers(model)
        if self.num_text_layers > n:
            raise ValueError(f"num_text_layers={self.num_text_layers} but the model has {n} language layers")
        templates = [self.text_module, *self.extra_text_modules] if self.num_text_layers else []
        points = [EditPoint(t.format(i=i), "text") for i in range(n - self.num_text_layers, n) for t in templates]
        points += [EditPoint(p, "image") for p in self.projector_modules]
        for point in points:
            try:
                module = model.get_submodule(point.path)
            except AttributeError as err:
                raise ValueError(
                    f"edit point {point.path!r} does not exist in {type(model).__name__}; check the backbone's "
                    "`text_module` / `projector_modules` settings"
                ) from err
            if not isinstance(module, nn.Linear):
                raise ValueError(f"edit point {point.path!r} is a {type(module).__name__}, not an nn.Linear")
        return points

    # --- inputs --------------------------------------------------------------------------------
    def image_token_id(self, processor: object, model: nn.Module) -> int:
        return int(model.config.image_token_id)

    def encode_prompt(
        self, processor: object, prompt: str, image: Image.Image | None, image_token_id: int
    ) -> ModelInputs:
        """The prompt alone, templated and tokenised (through the processor when there is an image), unsupervised.

        What a model answers from (:mod:`more_lightning.generate`); :meth:`encode` appends the target to it.
        """
        if image is not None:
            enc = processor(text=self.template.format(prompt=prompt), images=image, return_tensors="pt")
            pixel_values = enc["pixel_values"]
        else:
            enc = processor.tokenizer(self.text_template.format(prompt=prompt), return_tensors="pt")
            pixel_values = None
        input_ids = enc["input_ids"]  # (1, Tp)
        return ModelInputs(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            labels=torch.full_like(input_ids, -100),
            image_mask=input_ids == image_token_id,
            pixel_values=pixel_values,
        )

    def encode(self, processor: object, query: Query, image_token_id: int) -> ModelInputs:
        """:meth:`encode_prompt`, then the target appended: only target tokens are supervised.

        The prompt and image positions get -100.
        """
        prompt = self.encode_prompt(processor, query.prompt, query.image, image_token_id)
        target_ids = processor.tokenizer(
            self.target_prefix + query.target, add_special_tokens=False, return_tensors="pt"
        )["input_ids"]  # (1, Tt)
        if target_ids.numel() == 0:
            raise ValueError(f"target {query.target!r} tokenises to nothing")
        return prompt.append(target_ids, supervised=True)

    def logits(self, model: nn.Module, inputs: ModelInputs) -> Tensor:
        """(B, T, V) next-token logits."""
        return model(**inputs.model_kwargs()).logits
