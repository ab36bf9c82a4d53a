"""One edit stream through ``cli.py`` with retention off and a probe callback, for the scripts here."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from lightning.pytorch import Callback
from lightning.pytorch.cli import LightningCLI

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cli


def run_probed_stream(
    config: str, edits: int, probe: type[Callback], probe_args: dict | None = None, overrides: list[str] = ()
) -> tuple[LightningCLI, Callback]:
    """Run ``edits`` edits of ``config`` (run folder in a temporary directory) with ``probe`` attached.

    Returns the finished CLI and the probe instance.
    """
    arg = {"class_path": f"{probe.__module__}.{probe.__qualname__}", "init_args": probe_args or {}}
    with tempfile.TemporaryDirectory() as runs:
        run = cli.main(
            [
                "fit",
                "--config",
                config,
                "--data.init_args.num_edits",
                str(edits),
                "--model.init_args.retention",
                "false",
                "--trainer.enable_progress_bar",
                "false",
                "--trainer.logger.init_args.save_dir",
                runs,
                f"--trainer.callbacks+={json.dumps(arg)}",
                *overrides,
            ]
        )
    # by name: the CLI may import the probe's module a second time (a script loaded from its file path)
    return run, next(c for c in run.trainer.callbacks if type(c).__qualname__ == probe.__qualname__)
