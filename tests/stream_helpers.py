"""Callbacks that tests hand to ``cli.py`` subprocesses (``--trainer.callbacks+=...``)."""

from __future__ import annotations

import os
import signal

from lightning.pytorch import Callback


class KillAfterEdit(Callback):
    """SIGKILLs its own process right after edit ``edit`` (1-based), as ``kill -9`` would: no cleanup runs."""

    def __init__(self, edit: int) -> None:
        self.edit = edit

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx + 1 == self.edit:
            os.kill(os.getpid(), signal.SIGKILL)
