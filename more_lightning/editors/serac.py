"""SERAC: a memory of edits, a scope classifier and a counterfactual model (Mitchell et al. 2022c; paper A.5).

The base model is never written. Every edit ``(x_e, y_e)`` goes into a memory; every query ``x`` the engine encodes
is first scored against it by the **scope classifier**:

    f(x) = [h_last; mean_text h; mean_image h] / per-part norms          (3 d_in), h = one layer's input
    z(x) = normalise(W f(x) + b)                                         (dim)
    p_i(x) = σ(s · z(x)ᵀ z(x_e,i) + c)                                   learned scale s and offset c
    in scope  ⇔  max_i p_i(x) > threshold      (SERAC: 0.5)

``h`` is the input of one text edit point's FFN output projection of the *unedited* model (``feature_path``), read
at the query's prompt positions: the last prompt position (GRACE's key), the mean over its text positions and the
mean over its image positions (zeros without an image). An out-of-scope query goes to the base model untouched
(its logits are the base model's, bit for bit). An in-scope query is answered by the **counterfactual model**: the
edit ``j = argmax_i p_i`` (the newest on a tie) is prepended to the prompt as ``context_template`` ("{prompt}
{target}\\n") through :meth:`SERAC.rewrite_query`, and low-rank adapters ``W x + s B A x`` on the base model's
linear layers are switched on for that forward only, through :meth:`SERAC.forward_context` (they recognise the
rewritten prompt's token ids). Both parts are trained first, on the **train** split, by their own ``fit``
(:mod:`more_lightning.editors.serac_train`) and loaded from one safetensors file.

With ``encoder`` set (:class:`SentenceEncoder`), ``f(x)`` is instead a frozen pretrained BERT-class encoder's
unit-normalised mean of its last hidden state over the query's prompt text (text only: it cannot see the image),
loaded from a local folder the networks file records (its weights are not in the file).

Simplified versus the paper: the classifier is a linear head on the backbone's own features or on a frozen BERT's
mean-pooled features (SERAC: a fine-tuned BERT or DistilBERT embedding model; the paper: BERT), scored by cosine
similarity as SERAC's embedding classifier; the counterfactual is the base model plus LoRA adapters (SERAC / the
paper: a separate OPT-125M fine-tuned to read the edit), so it sees the query's image, which OPT-125M cannot; the
context holds the edit's text, not its image.

State: the memory (per edit its prompt and answer as UTF-8 bytes, its ``z`` as ``dim`` float32) is tensors in the
optimizer's ``state``, so the edit state file, checkpoints and ``single_edits`` carry it; it grows by
``dim · 4`` bytes plus the texts per edit. The networks are fixed. Cost per query: one base forward for ``f(x)``
(cached per prompt and image; with a sentence encoder one encoder forward, cached per prompt) and an O(N · dim)
score over the N edits; an edit costs one such forward.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from more_lightning.contract import EditPoint
from more_lightning.editors.memory import MemoryEditor
from more_lightning.editors.state import networks_file_metadata, save_networks_file
from more_lightning.errors import SettingError

if TYPE_CHECKING:
    from more_lightning.backbones.base import ModelInputs
    from more_lightning.contract import EditEngine
    from more_lightning.data.records import Query

log = logging.getLogger(__name__)

#: ``format`` metadata of a SERAC networks file.
NETWORKS_FORMAT = "more-lightning SERAC networks v1"
#: how to make the file a stream config names
TRAIN_HINT = "train them with `python cli.py fit --config configs/<backbone>_serac_train.yaml`"
#: the config keys that set the sentence encoder's folder, in a training config and in a stream config
TRAIN_ENCODER_KEY, STREAM_ENCODER_KEY = "model.init_args.encoder", "model.init_args.editor.init_args.encoder"
#: how to get the sentence encoder the real training configs name
ENCODER_HINT = "download it with `huggingface-cli download bert-base-uncased --local-dir data/bert-base-uncased`"


def prompt_lengths(inputs: ModelInputs) -> Tensor:
    """(B,) long: per row, the number of prompt positions (those before the first supervised label; without labels
    every attended position)."""
    supervised = inputs.labels != -100  # (B, T)
    first = supervised.long().argmax(dim=1)  # (B,)
    return torch.where(supervised.any(dim=1), first, inputs.attention_mask.long().sum(dim=1))


def _mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` (B, T, d) over the positions ``mask`` (B, T) marks; zeros for a row with none."""
    weights = mask.to(x.dtype)[..., None]  # (B, T, 1)
    return (x * weights).sum(1) / weights.sum(1).clamp(min=1.0)  # (B, d)


def query_features(x: Tensor, inputs: ModelInputs) -> Tensor:
    """(B, 3 d): a layer's input ``x`` (B, T, d) at the last prompt position, its mean over the prompt's text positions
    and its mean over the image positions, each scaled to unit norm (zeros stay zeros)."""
    lengths = prompt_lengths(inputs)  # (B,)
    steps = torch.arange(x.shape[1], device=x.device)[None]  # (1, T)
    in_prompt = steps < lengths[:, None]  # (B, T)
    rows = torch.arange(x.shape[0], device=x.device)
    parts = [
        x[rows, lengths - 1],
        _mean(x, in_prompt & inputs.text_mask),
        _mean(x, in_prompt & inputs.image_mask),
    ]  # 3 × (B, d)
    return torch.cat([F.normalize(p.float(), dim=-1, eps=1e-6) for p in parts], dim=-1)  # (B, 3d)


def check_encoder_folder(folder: str, key: str = TRAIN_ENCODER_KEY) -> Path:
    """``folder`` as a path, checked to hold a ``config.json`` (before anything heavy loads).

    Raises:
        FileNotFoundError: it does not; the message names the folder, the config ``key`` and how to get the encoder.
    """
    path = Path(folder).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"SERAC sentence encoder {str(folder)!r} not found (no config.json there): {ENCODER_HINT}, or set "
            f"--{key} to its folder"
        )
    return path


class SentenceEncoder:
    """A frozen pretrained BERT-class text encoder (transformers ``AutoModel`` + ``AutoTokenizer``) loaded from a
    local folder, never from a hub; a text's features are the mean of its last hidden state over the text's tokens
    (padding excluded), scaled to unit norm. Not an ``nn.Module`` of the networks, so its weights stay out of the
    networks file; :class:`SERACNetworks` moves it with itself.

    Args:
        folder: the encoder's folder (``config.json``, weights and tokenizer files, e.g. ``data/bert-base-uncased``).
        key: the config key that sets ``folder``, named in the errors.

    Raises:
        FileNotFoundError: there is no ``config.json`` in ``folder`` (the message says how to get the encoder).
        SettingError: the folder holds no encoder and tokenizer transformers can load (a ``ValueError``).
    """

    def __init__(self, folder: str, key: str = TRAIN_ENCODER_KEY) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.folder = str(folder)
        path = check_encoder_folder(folder, key)
        where = f"{ENCODER_HINT}, or set --{key} to its folder"
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = AutoModel.from_pretrained(path, dtype=torch.float32, local_files_only=True)
        except Exception as exc:  # whatever transformers raises for a folder it cannot read: one line, not its trace
            reason = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
            raise SettingError(
                f"SERAC sentence encoder {self.folder!r} cannot be loaded as a BERT-class encoder with its tokenizer "
                f"({reason}): {where}"
            ) from exc
        hidden = getattr(model.config, "hidden_size", None)
        if not isinstance(hidden, int) or getattr(model.config, "is_encoder_decoder", False):
            raise SettingError(
                f"SERAC sentence encoder {self.folder!r} holds a {type(model).__name__}, not a BERT-class encoder with "
                f"a hidden_size: {where}"
            )
        self.model, self.tokenizer, self.hidden_size = model.requires_grad_(False).eval(), tokenizer, hidden
        limits = (tokenizer.model_max_length, getattr(model.config, "max_position_embeddings", None))
        self.max_length = min([n for n in limits if isinstance(n, int) and n > 0] or [512])

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def features(self, texts: list[str]) -> Tensor:
        """(n, hidden) float32 unit vectors on the encoder's device: per text, the mean of the last hidden state over
        its tokens ([CLS] and [SEP] included, padding not), the text truncated to the encoder's maximum length."""
        batch = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        hidden = self.model(**batch).last_hidden_state  # (n, T, hidden)
        pooled = _mean(hidden.float(), batch["attention_mask"].bool())  # (n, hidden)
        return F.normalize(pooled, dim=-1, eps=1e-6)


class ScopeClassifier(nn.Module):
    """``p(x in scope of e) = σ(s · z(x)ᵀ z(e) + c)``, ``z = normalise(W f + b)`` (SERAC's embedding classifier).

    Args:
        in_dim: width of the features ``f`` (3 × the feature layer's input width, or the sentence encoder's hidden
            size).
        dim: width of the embedding ``z``.
    """

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, dim)
        self.scale = nn.Parameter(torch.tensor(10.0))
        self.offset = nn.Parameter(torch.tensor(-5.0))  # p = 0.5 at cosine 0.5 before training

    def embed(self, features: Tensor) -> Tensor:
        """(n, dim) unit vectors from features (n, in_dim)."""
        return F.normalize(self.proj(features.float()), dim=-1)

    def logits(self, queries: Tensor, edits: Tensor) -> Tensor:
        """(n, N) in-scope logits of embedded queries (n, dim) against embedded edits (N, dim)."""
        return self.scale * queries @ edits.T + self.offset


def _key(path: str) -> str:
    return path.replace(".", "__")  # module paths as parameter names


class CounterfactualAdapters(nn.Module):
    """LoRA adapters ``Δy = (alpha / r) · B A x`` (peft's ``lora_A`` (r, d_in), ``lora_B`` (d_out, r) = 0 at init).

    Args:
        shapes: module path -> ``(d_out, d_in)`` of each adapted ``nn.Linear``.
        rank: ``r``.
        alpha: scaling numerator.
        seed: seeds ``lora_A``.
    """

    def __init__(self, shapes: dict[str, tuple[int, int]], rank: int, alpha: float, seed: int = 0) -> None:
        super().__init__()
        self.shapes, self.rank, self.alpha = dict(shapes), rank, alpha
        self.scaling = alpha / rank
        generator = torch.Generator().manual_seed(seed)
        a = {_key(p): torch.randn(rank, d_in, generator=generator) / d_in**0.5 for p, (_, d_in) in shapes.items()}
        self.lora_A = nn.ParameterDict({k: nn.Parameter(v) for k, v in a.items()})  # (r, d_in) each
        b = {_key(p): torch.zeros(d_out, rank) for p, (d_out, _) in shapes.items()}
        self.lora_B = nn.ParameterDict({k: nn.Parameter(v) for k, v in b.items()})  # (d_out, r) each

    def delta(self, path: str, x: Tensor) -> Tensor:
        """(…, d_out) float32: the adapter's output for inputs ``x`` (…, d_in)."""
        a, b = self.lora_A[_key(path)], self.lora_B[_key(path)]
        return self.scaling * (x.to(a.dtype) @ a.T) @ b.T


class SERACNetworks(nn.Module):
    """The scope classifier and the counterfactual adapters of one backbone, saved together.

    Args:
        feature_path: the ``nn.Linear`` whose input gives the classifier's features.
        feature_width: that module's input width.
        adapter_shapes: adapted module path -> ``(d_out, d_in)``.
        dim: classifier embedding width.
        rank, alpha: the adapters' rank and scaling numerator.
        context_template: how an in-scope query's edit is prepended (``{prompt}``, ``{target}``).
        seed: seeds the initial weights.
        encoder: folder of a pretrained BERT-class sentence encoder whose features of the query's prompt text the
            classifier reads (:class:`SentenceEncoder`, loaded here, frozen; not saved in the networks file, only
            its folder); ``None``: the backbone's features at ``feature_path``. With an encoder, ``feature_path``
            and ``feature_width`` are recorded but unused (never hooked nor checked).
        encoder_key: the config key that sets ``encoder``, named in the encoder's errors.

    Raises:
        FileNotFoundError, SettingError: the encoder folder is missing or holds no encoder (:class:`SentenceEncoder`).
    """

    def __init__(
        self,
        feature_path: str,
        feature_width: int,
        adapter_shapes: dict[str, tuple[int, int]],
        dim: int = 64,
        rank: int = 8,
        alpha: float = 16.0,
        context_template: str = "{prompt} {target}\n",
        seed: int = 0,
        encoder: str | None = None,
        encoder_key: str = TRAIN_ENCODER_KEY,
    ) -> None:
        super().__init__()
        if dim < 1 or rank < 1:
            raise ValueError(f"SERAC: dim and rank must be >= 1, got {dim} and {rank}")
        if "{prompt}" not in context_template or "{target}" not in context_template:
            raise ValueError(f"SERAC: context_template must hold {{prompt}} and {{target}}, got {context_template!r}")
        self.feature_path, self.feature_width = feature_path, int(feature_width)
        self.dim, self.context_template = dim, context_template
        self.encoder = SentenceEncoder(encoder, encoder_key) if encoder is not None else None  # before the seeding
        in_dim = self.encoder.hidden_size if self.encoder is not None else 3 * self.feature_width
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        self.classifier = ScopeClassifier(in_dim, dim)
        torch.random.set_rng_state(generator_state)
        shapes = {p: (int(d_out), int(d_in)) for p, (d_out, d_in) in adapter_shapes.items()}
        self.adapters = CounterfactualAdapters(shapes, rank, alpha, seed)

    def _apply(self, fn, recurse: bool = True) -> SERACNetworks:
        """``to`` / ``cuda`` / ``float`` also reach the sentence encoder, which is no submodule (so that its weights
        stay out of ``state_dict`` and the networks file)."""
        super()._apply(fn, recurse)
        if self.encoder is not None:
            self.encoder.model._apply(fn, recurse)
        return self

    def context(self, prompt: str, target: str) -> str:
        return self.context_template.format(prompt=prompt, target=target)

    def metadata(self) -> dict[str, str]:
        settings = {
            "feature_path": self.feature_path,
            "feature_width": self.feature_width,
            "adapter_shapes": self.adapters.shapes,
            "dim": self.dim,
            "rank": self.adapters.rank,
            "alpha": self.adapters.alpha,
            "context_template": self.context_template,
        }
        if self.encoder is not None:  # only then: a file without an encoder is written as before it existed
            settings["encoder"] = self.encoder.folder
        return {"format": NETWORKS_FORMAT, "settings": json.dumps(settings)}

    def save(self, path: str | Path, metadata: dict[str, str] | None = None) -> None:
        """Write the networks (and ``metadata``, e.g. what they were trained on) to a safetensors file atomically."""
        save_networks_file(self, path, {**(metadata or {}), **self.metadata()})

    @classmethod
    def load(cls, path: str | Path, encoder: str | None = None) -> SERACNetworks:
        """Networks written by :meth:`save`, with the sentence encoder from the folder the file records, or from
        ``encoder`` when given (the folder moved; the stream's ``model.init_args.editor.init_args.encoder``).

        Raises:
            FileNotFoundError: there is no such file (the message says how to make it), or no such encoder folder.
            ValueError: the file is not a SERAC networks file, or its tensors do not fit its settings; ``encoder``
                given for networks trained without one, or an encoder of another hidden size.
        """
        path = Path(path)
        metadata = networks_file_metadata(path, "SERAC networks", NETWORKS_FORMAT, TRAIN_HINT)
        settings = json.loads(metadata["settings"])
        recorded = settings.get("encoder")
        if encoder is not None:
            if recorded is None:
                raise SettingError(
                    f"SERAC networks {path} were trained on the backbone's own features, without a sentence "
                    f"encoder: drop {STREAM_ENCODER_KEY} ({encoder!r})"
                )
            settings["encoder"] = encoder
        networks = cls(**settings, encoder_key=STREAM_ENCODER_KEY)
        tensors = load_file(path)
        weight = tensors.get("classifier.proj.weight")  # (dim, in_dim)
        if networks.encoder is not None and weight is not None and weight.shape[-1] != networks.encoder.hidden_size:
            raise SettingError(
                f"SERAC networks {path} were trained on a sentence encoder of hidden size {weight.shape[-1]} "
                f"({recorded!r}), {networks.encoder.folder!r} has {networks.encoder.hidden_size}: set "
                f"{STREAM_ENCODER_KEY} to the encoder they were trained with"
            )
        expected = {k: tuple(v.shape) for k, v in networks.state_dict().items()}
        given = {k: tuple(v.shape) for k, v in tensors.items()}
        if expected != given:
            wrong = sorted(k for k in expected.keys() | given.keys() if expected.get(k) != given.get(k))
            raise ValueError(
                f"SERAC networks {path}: tensors {', '.join(wrong[:3])} are missing or have other shapes than its "
                f"settings say (a damaged or edited file); {TRAIN_HINT}"
            )
        networks.load_state_dict(tensors)
        return networks


class CounterfactualHooks:
    """Forward hooks on a model: the adapters add their output on the rows a forward marks as routed, and the
    feature module's input is turned into :func:`query_features` when asked (not hooked when the networks read a
    sentence encoder instead). Outside :meth:`forward` they do nothing.

    Args:
        model: the base model.
        networks: whose adapters and feature module are hooked.
    """

    def __init__(self, model: nn.Module, networks: SERACNetworks) -> None:
        self.networks = networks
        self._inputs: ModelInputs | None = None
        self._routed: Tensor | None = None  # (B,) bool
        self._capture = False
        self.features: Tensor | None = None
        self._handles = []
        if networks.encoder is None:
            self._handles.append(model.get_submodule(networks.feature_path).register_forward_hook(self._feature_hook))
        for path in networks.adapters.shapes:
            self._handles.append(model.get_submodule(path).register_forward_hook(self._adapter_hook(path)))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    @contextmanager
    def forward(self, inputs: ModelInputs, routed: Tensor | None = None, capture: bool = False) -> Iterator[None]:
        """Around one forward of ``inputs``: adapters on for the rows ``routed`` (B,) marks (``None``: none);
        ``capture``: keep the features (B, 3 d) in :attr:`features`."""
        self._inputs, self._capture, self.features = inputs, capture, None
        self._routed = routed if routed is not None and bool(routed.any()) else None
        try:
            yield
        finally:
            self._inputs, self._routed, self._capture = None, None, False

    def _rows(self, x: Tensor) -> Tensor:
        """``x`` as (B, T, d) (OPT runs its FFN on flat (B·T, d) rows)."""
        return x.view(*self._inputs.input_ids.shape, -1) if x.dim() == 2 else x

    def _feature_hook(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        if self._capture and self._inputs is not None:
            self.features = query_features(self._rows(args[0]).detach(), self._inputs)

    def _adapter_hook(self, path: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
            if self._routed is None:
                return None  # out of scope: the base layer's output, untouched
            x = args[0]
            delta = self.networks.adapters.delta(path, x)  # like output
            if not bool(self._routed.all()):
                mask = self._routed.to(delta.dtype)  # (B,)
                T = self._inputs.input_ids.shape[1]
                mask = mask.repeat_interleave(T)[:, None] if x.dim() == 2 else mask[:, None, None]
                delta = delta * mask
            return output + delta.to(output.dtype)

        return hook


def _image_digest(image: object) -> bytes:
    if image is None:
        return b""
    return hashlib.sha1(image.tobytes() + f"{image.size}{image.mode}".encode()).digest()


class _LRU(OrderedDict):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def put(self, key, value) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)


class SERAC(MemoryEditor):
    """SERAC with networks trained on the train split (``configs/<backbone>_serac_train.yaml``).

    Args:
        networks: the scope classifier and counterfactual adapters (safetensors), written by
            ``python cli.py fit --config configs/<backbone>_serac_train.yaml``.
        threshold: a query is in scope of the memory when its largest in-scope probability exceeds this (SERAC: 0.5).
        cache_size: queries whose features (and routed prompts whose token ids) are remembered; features depend only
            on the unedited model (or the frozen sentence encoder), so the cache never goes stale.
        encoder: folder of the sentence encoder the networks were trained with, when it is no longer at the folder
            the networks file records (``None``: the recorded one); refused for networks trained without one.
    """

    def __init__(
        self, networks: str, threshold: float = 0.5, cache_size: int = 4096, encoder: str | None = None
    ) -> None:
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"SERAC: threshold must be in [0, 1), got {threshold}")
        if cache_size < 1:
            raise ValueError(f"SERAC: cache_size must be >= 1, got {cache_size}")
        if encoder is not None:
            check_encoder_folder(encoder, STREAM_ENCODER_KEY)  # before the backbone loads
        self.networks_file, self.threshold, self.encoder = networks, threshold, encoder
        self.networks: SERACNetworks | None = None
        self.hooks: CounterfactualHooks | None = None
        self._embeddings = _LRU(cache_size)  # (prompt, image digest) -> z (dim,)
        self._routed = _LRU(cache_size)  # token ids of a rewritten prompt -> True
        self._last_scores: list[float] = []

    def attach(self, model: nn.Module, edit_points: Sequence[EditPoint]) -> None:
        networks = SERACNetworks.load(self.networks_file, self.encoder)
        check_fits(model, networks, self.networks_file)
        super().attach(model, edit_points)  # the model frozen, the memory's anchor
        self.networks = networks.requires_grad_(False).eval().to(self.anchor.device)
        self.hooks = CounterfactualHooks(model, self.networks)
        adapted, source = len(networks.adapters.shapes), self.networks_file
        reads = networks.feature_path if networks.encoder is None else f"sentence encoder {networks.encoder.folder}"
        log.info("SERAC: classifier on %s, adapters on %d modules (%s)", reads, adapted, source)

    @torch.no_grad()
    def embed(self, query: Query, engine: EditEngine) -> Tensor:
        """(dim,) float32: the classifier's embedding of ``query``'s prompt and image, from the unedited model; with
        a sentence encoder, of its prompt text alone (the encoder cannot see the image)."""
        encoder = self.networks.encoder
        key = (query.prompt, _image_digest(query.image) if encoder is None else b"")
        if key in self._embeddings:
            return self._embeddings[key]
        if encoder is not None:
            features = encoder.features([query.prompt])  # (1, hidden)
        else:
            backbone = engine.backbone
            token_id = backbone.image_token_id(engine.processor, engine.model)
            inputs = backbone.encode_prompt(engine.processor, query.prompt, query.image, token_id)
            inputs = inputs.to(engine.device, engine.model.dtype)
            with self.hooks.forward(inputs, capture=True):
                backbone.logits(engine.model, inputs)
            features = self.hooks.features  # (1, 3d)
        z = self.networks.classifier.embed(features.to(self.networks.classifier.proj.weight.device))[0]  # (dim,)
        self._embeddings.put(key, z)
        return z

    def begin_edit(
        self,
        optimizer: torch.optim.Optimizer,
        engine: EditEngine,
        queries: dict[str, Query],
        inputs: dict[str, ModelInputs],
    ) -> None:
        edit = queries["edit"]
        self.optimizer.append(edit.prompt, edit.target, self.embed(edit, engine))

    @torch.no_grad()
    def scope(self, query: Query, engine: EditEngine) -> tuple[int, float]:
        """The memory entry ``query`` is closest to in scope of, and its in-scope probability (``(-1, 0.0)``: empty)."""
        memory = self.optimizer.memory if self.optimizer is not None else {}
        if "embeddings" not in memory:
            return -1, 0.0
        z = self.embed(query, engine)[None]  # (1, dim)
        probs = torch.sigmoid(self.networks.classifier.logits(z, memory["embeddings"]))[0]  # (N,)
        newest_first = probs.flip(0)
        j = len(probs) - 1 - int(newest_first.argmax())  # the newest edit on a tie
        return j, float(probs[j])

    def rewrite_query(self, query: Query, engine: EditEngine) -> Query:
        j, prob = self.scope(query, engine)
        if j < 0 or prob <= self.threshold:
            return query
        prompt, target = self.entries()[j]
        routed = replace(query, prompt=self.networks.context(prompt, target) + query.prompt)
        token_id = engine.backbone.image_token_id(engine.processor, engine.model)
        ids = engine.backbone.encode_prompt(engine.processor, routed.prompt, routed.image, token_id).input_ids[0]
        self._routed.put(tuple(ids.tolist()), True)
        return routed

    def is_routed(self, inputs: ModelInputs) -> Tensor:
        """(B,) bool: rows whose prompt is one :meth:`rewrite_query` routed to the counterfactual model."""
        lengths = prompt_lengths(inputs).tolist()
        rows = [tuple(inputs.input_ids[b, :n].tolist()) in self._routed for b, n in enumerate(lengths)]
        return torch.tensor(rows, dtype=torch.bool, device=inputs.input_ids.device)

    @contextmanager
    def forward_context(self, inputs: ModelInputs) -> Iterator[None]:
        routed = self.is_routed(inputs) if self._routed else None
        with self.hooks.forward(inputs, routed):
            yield

    def diagnostics(self, optimizer: torch.optim.Optimizer) -> dict[str, dict[str, float]]:
        return {"serac": {"entries": float(len(self.entries()))}}

    def state_bytes(self, optimizer: torch.optim.Optimizer) -> int:
        """The memory, plus the networks (and the sentence encoder) the editor keeps beside it."""
        tensors = list(self.networks.state_dict().values())
        if self.networks.encoder is not None:
            tensors += list(self.networks.encoder.model.state_dict().values())
        return super().state_bytes(optimizer) + sum(t.numel() * t.element_size() for t in tensors)


def check_fits(model: nn.Module, networks: SERACNetworks, source: str) -> None:
    """Raise ``ValueError`` unless every module ``networks`` hooks exists in ``model`` as an ``nn.Linear`` of the
    width it was trained for: the adapted modules, and the feature module unless the classifier reads a sentence
    encoder (then the feature module is recorded but never hooked, so a model without it still fits)."""
    feature = [] if networks.encoder is not None else [(networks.feature_path, (None, networks.feature_width))]
    wanted = [*feature, *networks.adapters.shapes.items()]
    for path, (d_out, d_in) in wanted:
        try:
            module = model.get_submodule(path)
        except AttributeError:
            module = None
        if not isinstance(module, nn.Linear) or module.in_features != d_in or d_out not in (None, module.out_features):
            raise ValueError(
                f"SERAC networks {source} were trained for a module {path} of shape {[d_out, d_in]}, which this model "
                f"lacks or has another shape: use the networks of this backbone, or {TRAIN_HINT}"
            )
