"""General capability during editing: MME-style yes/no accuracy per category (paper figs. 5 / 10).

Before the first edit and every k edits, every question of an MME-layout suite (the embedded world's
MME-like suite by default, the real MME release when ``mme_root`` points at it) is asked through
the backbone's own prompt template, and the answer is read off one forward: the model says "yes"
iff the logit of the first token of ``target_prefix + yes_answer`` beats that of ``no_answer`` at the
position that predicts the answer (:func:`~more_lightning.metrics.mme.yes_no_correct`). Per category
MME's acc, acc+ (both questions of an image right) and score = acc + acc+ are logged, plus the sum
of category scores (MME's total) and the fraction of "yes" answers (a model collapsing to one answer
shows up there first).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from typing_extensions import override

from callbacks.base import AnalysisCallback, integer_ticks, new_figure, observing
from more_lightning.contract import EditEngine

log = logging.getLogger(__name__)


def answer_token_ids(tokenizer, prefix: str, yes_answer: str, no_answer: str) -> tuple[int, int]:
    """First token ids of ``prefix + yes_answer`` and ``prefix + no_answer``; they must be distinct and known."""
    ids = []
    for answer in (yes_answer, no_answer):
        tokens = tokenizer(prefix + answer, add_special_tokens=False)["input_ids"]
        if not tokens or tokens[0] == tokenizer.unk_token_id:
            raise ValueError(
                f"GeneralCapability: the tokenizer does not know the answer {answer!r} (it maps to the unknown "
                "token); set `yes_answer` / `no_answer` to words in its vocabulary"
            )
        ids.append(tokens[0])
    if ids[0] == ids[1]:
        raise ValueError(f"GeneralCapability: {yes_answer!r} and {no_answer!r} start with the same token {ids[0]}")
    return ids[0], ids[1]


class GeneralCapability(AnalysisCallback):
    """MME acc / acc+ / score per category before the stream and every k edits.

    Args:
        every_k_edits: evaluate after every k-th edit (and after the last).
        mme_root: an MME release folder (official layout); default: the embedded world's suite.
        categories: categories to evaluate, in order; None = every category folder found.
        max_images_per_category: evaluate only the first this many images (2 questions each) of a category.
        yes_answer: the answer text read as "yes" (its first token, after the backbone's ``target_prefix``).
        no_answer: the answer text read as "no".
        cache_inputs: keep the encoded questions in memory between evaluations (off for the full real MME
            at 336 px: ~1.3 MB of pixels per question).
    """

    def __init__(
        self,
        every_k_edits: int = 50,
        mme_root: str = "data/embedded/mme",
        categories: list[str] | None = None,
        max_images_per_category: int | None = None,
        yes_answer: str = "Yes",
        no_answer: str = "No",
        cache_inputs: bool = True,
    ) -> None:
        super().__init__(every_k_edits, "general_capability")
        if max_images_per_category is not None and max_images_per_category < 1:
            raise ValueError(f"GeneralCapability: max_images_per_category must be >= 1, got {max_images_per_category}")
        self.mme_root, self.categories = mme_root, categories
        self.max_images_per_category = max_images_per_category
        self.yes_answer, self.no_answer, self.cache_inputs = yes_answer, no_answer, cache_inputs
        self.items: list = []
        self._cache: dict[int, object] = {}
        self.history: list[tuple[int, dict[str, float]]] = []

    def _load_items(self) -> list:
        from more_lightning.data.mme import read_mme

        if not Path(self.mme_root).exists():
            raise FileNotFoundError(
                f"GeneralCapability: no MME suite at {self.mme_root!r}. Build the embedded world "
                "(`python -m more_lightning.world.benchmark --out data/embedded`) or set the callback's `mme_root`."
            )
        items = read_mme(self.mme_root, self.categories)
        if self.max_images_per_category is None:
            return items
        kept, seen = [], {}
        for item in items:
            images = seen.setdefault(item.category, set())
            if item.image_id in images or len(images) < self.max_images_per_category:
                images.add(item.image_id)
                kept.append(item)
        return kept

    def _encode(self, pl_module: EditEngine, i: int):
        if i in self._cache:
            return self._cache[i]
        from more_lightning.data.records import Query
        from more_lightning.data.schema import load_image

        item = self.items[i]
        query = Query(item.question, self.yes_answer, load_image(item.image))
        inputs = pl_module.encode_query(query)
        if self.cache_inputs:
            self._cache[i] = inputs
        return inputs

    def evaluate(self, pl_module: EditEngine) -> dict[str, float]:
        """Scalars ``mme/<category>/{acc,acc_plus,score}``, ``mme/total_score``, ``mme/mean_acc``, ``mme/yes_rate``."""
        from more_lightning.metrics.mme import mme_scores, yes_no_correct

        tokenizer = pl_module.processor.tokenizer
        yes_id, no_id = answer_token_ids(tokenizer, pl_module.backbone.target_prefix, self.yes_answer, self.no_answer)
        correct, said_yes = [], []
        with observing(pl_module.model):
            for i, item in enumerate(self.items):
                inputs = self._encode(pl_module, i)
                position = int(inputs.predict_mask[0].nonzero()[0])  # predicts the first answer token
                logits = pl_module.logits(inputs)[:, position].float()  # (1, V)
                answer = torch.tensor([item.answer])
                correct.append(yes_no_correct(logits, yes_id, no_id, answer))
                said_yes.append(bool(logits[0, yes_id] > logits[0, no_id]))
        correct = torch.cat(correct)  # (N,)
        scalars: dict[str, float] = {}
        categories = list(dict.fromkeys(item.category for item in self.items))
        for category in categories:
            keep = torch.tensor([item.category == category for item in self.items])
            ids = [item.image_id for item in self.items if item.category == category]
            for key, value in mme_scores(ids, correct[keep]).items():
                scalars[f"mme/{category}/{key}"] = float(value)
        scalars["mme/total_score"] = sum(scalars[f"mme/{c}/score"] for c in categories)
        scalars["mme/mean_acc"] = sum(scalars[f"mme/{c}/acc"] for c in categories) / len(categories)
        scalars["mme/yes_rate"] = 100.0 * sum(said_yes) / len(said_yes)
        return scalars

    # --- hooks -----------------------------------------------------------------------------------
    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.items = self._load_items()
        self._cache = {}
        scalars = self.evaluate(pl_module)
        self.history = [(0, scalars)]
        self.log_scalars(pl_module, scalars, 0)
        log.info(
            "GeneralCapability: %d MME questions, total score before the stream %.1f",
            len(self.items),
            scalars["mme/total_score"],
        )

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        index = self.mark(batch, batch_idx)
        if not self.due(trainer, index):
            return
        scalars = self.evaluate(pl_module)
        self.history.append((index, scalars))
        self.log_scalars(pl_module, scalars, index)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.history or not self.last_edit:
            return
        summary = {
            "mme_root": str(self.mme_root),
            "before": self.history[0][1],
            "final": self.history[-1][1],
            "edit": self.history[-1][0],
        }
        self.publish(trainer, self.draw(), summary)

    def draw(self):
        """Score per category over the edit index, and acc / acc+ per category before vs after."""
        figure, (ax_line, ax_bar) = new_figure(2, 1, width=5.0, height=3.6)
        first, last = self.history[0][1], self.history[-1][1]
        categories = [k.split("/")[1] for k in first if k.endswith("/score") and k.count("/") == 2]
        edits = [t for t, _ in self.history]
        for category in categories:
            ax_line.plot(edits, [s[f"mme/{category}/score"] for _, s in self.history], marker=".", label=category)
        ax_line.set(title="MME score per category (acc + acc+)", xlabel="edit index", ylabel="score", ylim=(0, 205))
        ax_line.legend(fontsize=7)
        integer_ticks(ax_line)
        x = list(range(len(categories)))
        width = 0.2
        for offset, (key, label) in enumerate((("acc", "acc"), ("acc_plus", "acc+"))):
            for shift, (scores, when, alpha) in enumerate(((first, "before", 0.45), (last, f"edit {edits[-1]}", 1.0))):
                pos = [i + (2 * offset + shift - 1.5) * width for i in x]
                ax_bar.bar(
                    pos,
                    [scores[f"mme/{c}/{key}"] for c in categories],
                    width,
                    color="tab:blue" if key == "acc" else "tab:purple",
                    alpha=alpha,
                    label=f"{label}, {when}",
                )
        ax_bar.set_xticks(x, categories, rotation=30, ha="right", fontsize=7)
        ax_bar.set(title="before vs after the stream", ylabel="%", ylim=(0, 105))
        ax_bar.legend(fontsize=7)
        return figure
