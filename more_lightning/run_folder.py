"""Run folders a failed run leaves behind empty, and removing them.

A logger creates its run folder (``<save_dir>/<name>/version_N``) when the trainer sets up, before the data
or the edit state is read; a run that then fails on a missing file would leave a folder holding only its
config. :func:`new_run_folders` names the folders a run is about to create, before it runs;
:func:`remove_unused` removes them after a failure, but only while they hold nothing a run produced.
"""

from __future__ import annotations

import shutil
from pathlib import Path

#: Files a run folder gets before the run produces anything: the saved config and the logger's hyperparameters.
SETUP_FILES = ("config.yaml", "hparams.yaml")


def new_run_folders(logger: object | None) -> list[Path]:
    """The folders ``logger`` will log this run to that do not exist yet, the run folder first, then its parents."""
    if logger is None:
        return []
    paths = [getattr(logger, name, None) for name in ("log_dir", "root_dir", "save_dir")]
    folders: list[Path] = []
    for path in paths:
        if path and Path(path) not in folders and not Path(path).exists():
            folders.append(Path(path))
    return folders


def _events_hold_data(path: Path) -> bool:
    """Whether a TensorBoard events file holds any summary (beyond the hyperparameter record)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    for event in EventFileLoader(str(path)).Load():
        if any(not value.tag.startswith("_hparams_/") for value in event.summary.value):
            return True
    return False


def holds_output(folder: Path) -> bool:
    """Whether ``folder`` holds anything a run produced: any file but the set-up files and empty events files."""
    for path in folder.rglob("*"):
        if path.is_dir() or path.name in SETUP_FILES:
            continue
        if path.name.startswith("events.out.tfevents.") and not _events_hold_data(path):
            continue
        return True
    return False


def remove_unused(folders: list[Path]) -> list[Path]:
    """Remove the run folder ``folders[0]`` if it holds no output, then each parent after it while empty.

    Returns what was removed. A folder holding output stops the removal (its parents stay).
    """
    removed = []
    for i, folder in enumerate(folders):
        if not folder.is_dir():
            continue
        if i == 0 and not holds_output(folder):
            shutil.rmtree(folder)
        elif i == 0 or any(folder.iterdir()):
            break
        else:
            folder.rmdir()
        removed.append(folder)
    return removed
