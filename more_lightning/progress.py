"""The command line's progress bar: an edit stream counts edits, ``edit 37/100``, and no run shows ``v_num``.

Other runs (the embedded world's pretraining, ``predict``) keep Lightning's tqdm bar, less the logger version.
"""

from __future__ import annotations

import sys
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm, convert_inf
from typing_extensions import override


class EditProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar; for an edit stream (``OnlineEditModule``) it counts edits by their stream position.

    ``edit 37/100  37%|███▋      | [00:06<00:11, 5.81edit/s, rel=97.3, loc=99.1]``: ``rel`` and ``loc`` are the
    stream means so far. A resumed stream starts the count after the checkpoint's last edit.
    """

    EDIT_FORMAT = "{desc} {n_fmt}/{total_fmt} {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}, {rate_fmt}{postfix}]"

    def __init__(self, refresh_rate: int = 1, process_position: int = 0, leave: bool = False) -> None:
        super().__init__(refresh_rate=refresh_rate, process_position=process_position, leave=leave)
        self._edits = False

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from more_lightning.module import OnlineEditModule  # the bar is also used for runs that are not streams

        self._edits = isinstance(pl_module, OnlineEditModule)
        super().on_train_start(trainer, pl_module)

    @override
    def init_train_tqdm(self) -> Tqdm:
        if not self._edits:
            return super().init_train_tqdm()
        return Tqdm(
            desc="edit",
            unit="edit",
            position=2 * self.process_position,
            disable=self.is_disabled,
            leave=True,
            dynamic_ncols=True,
            file=sys.stdout,
            smoothing=0,
            bar_format=self.EDIT_FORMAT,
        )

    @override
    def on_train_epoch_start(self, trainer: Trainer, *args: Any) -> None:
        if not self._edits:
            super().on_train_epoch_start(trainer, *args)
            return
        if self._leave:
            self.train_progress_bar = self.init_train_tqdm()
        self.train_progress_bar.initial = 0
        self.train_progress_bar.reset(total=convert_inf(self.total_train_batches))

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._edits:  # the stream is done: end the bar's line before the retention pass and the summary
            self.train_progress_bar.close()

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        bar = self.train_progress_bar
        if not self._edits or bar.disable or bar.n:
            return
        bar.total = convert_inf(self.total_train_batches)  # a resumed epoch does not start again: set it here
        done = getattr(batch, "index", 0)
        if done:  # resumed: count on from the checkpoint's last edit
            bar.initial = bar.n = done
        bar.refresh()

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        index = getattr(batch, "index", None) if self._edits else None
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx if index is None else index)

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        for bar in (self._train_progress_bar, self._predict_progress_bar):
            if bar is not None and not bar.disable:
                bar.close()  # end the bar's line: the error message goes on a line of its own

    @override
    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics
