"""A run that fails before producing anything leaves no run folder (more_lightning.run_folder)."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.loggers import TensorBoardLogger

from more_lightning.run_folder import holds_output, new_run_folders, remove_unused


def _started(tmp_path: Path) -> tuple[TensorBoardLogger, list[Path]]:
    """A logger whose folders do not exist yet, then created as a run's set-up does (events file, config)."""
    logger = TensorBoardLogger(save_dir=tmp_path / "runs", name="stream")
    folders = new_run_folders(logger)
    assert folders == [tmp_path / "runs" / "stream" / "version_0", tmp_path / "runs" / "stream", tmp_path / "runs"]
    logger.experiment.flush()  # the events file, as Lightning's set-up creates it
    (Path(logger.log_dir) / "config.yaml").write_text("seed_everything: 0\n")
    return logger, folders


def test_a_folder_of_set_up_files_is_removed_with_its_new_parents(tmp_path):
    _, folders = _started(tmp_path)
    assert not holds_output(folders[0])
    assert remove_unused(folders) == folders
    assert not (tmp_path / "runs").exists()


def test_anything_a_run_produced_keeps_the_folder(tmp_path):
    logger, folders = _started(tmp_path)
    logger.log_metrics({"immediate/rel": 50.0}, step=1)
    logger.experiment.flush()
    assert holds_output(folders[0]) and remove_unused(folders) == [] and folders[0].is_dir()

    other = tmp_path / "other"
    _, folders = _started(other)
    (folders[0] / "checkpoints").mkdir()
    (folders[0] / "checkpoints" / "last.ckpt").write_bytes(b"x")
    assert remove_unused(folders) == [] and (folders[0] / "checkpoints" / "last.ckpt").is_file()


def test_existing_folders_are_never_touched(tmp_path):
    (tmp_path / "runs" / "stream" / "version_0").mkdir(parents=True)
    logger = TensorBoardLogger(save_dir=tmp_path / "runs", name="stream")
    assert new_run_folders(logger) == [tmp_path / "runs" / "stream" / "version_1"]
    (tmp_path / "runs" / "stream" / "version_1").mkdir()
    assert remove_unused(new_run_folders(logger)) == []  # it exists now: not this run's to remove
    assert new_run_folders(None) == []
