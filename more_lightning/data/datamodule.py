"""``EditStreamDataModule``: an MMEdit file as a seeded stream of edit tuples (DESIGN §2, §5).

Every record is validated up front (:func:`~more_lightning.data.schema.read_mmedit`); the stream
is the first ``num_edits`` records of a seeded permutation, one :class:`EditTuple` per step:

    edit   = (src,      alt,    image)            -> Reliability
    t_gen  = (rephrase, alt,    image)            -> T-Generality
    m_gen  = (src,      alt,    image_rephrase)   -> M-Generality
    t_loc  = (loc,      loc_ans)                  -> T-Locality
    m_loc  = (m_loc_q,  m_loc_a, m_loc image)     -> M-Locality

With a held-out companion (``<stem>.heldout.json`` beside the data file, see
:func:`~more_lightning.data.schema.read_heldout`) each tuple also carries ``held_out``, built the same way
from the companion record ``h`` — the composite loss never sees these, they are only scored:

    t_gen  = (h.rephrase, alt,     image)            -> held-out T-Generality
    m_gen  = (src,        alt,     h.image_rephrase) -> held-out M-Generality
    t_loc  = (h.loc,      h.loc_ans)                 -> held-out T-Locality
    m_loc  = (h.m_loc_q,  h.m_loc_a, h.m_loc image)  -> held-out M-Locality

For ``predict`` the module answers the questions of ``predict_file`` (see :mod:`more_lightning.data.queries`)
instead, one per step; the data file is not read then.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule
from PIL import Image
from torch.utils.data import Dataset

from more_lightning.data.queries import QueryStream, read_queries
from more_lightning.data.records import EditRecord, EditTuple, HeldOutQueries, Query
from more_lightning.data.schema import DataFileError, heldout_path, load_image, read_mmedit
from more_lightning.errors import SettingError
from more_lightning.journal import applied_edits

log = logging.getLogger(__name__)


class EditStream(Dataset):
    """Map-style view of the stream: item i is the i-th edit tuple (images loaded on access).

    ``expected_state_sha256`` (replaying a journal): stream position -> the editor-state hash the journal
    recorded after that edit.
    """

    def __init__(self, records: list[EditRecord], expected_state_sha256: dict[int, str] | None = None) -> None:
        self.records = records
        self.expected_state_sha256 = expected_state_sha256 or {}

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> EditTuple:
        r = self.records[index]
        image = _image(r, "image", r.image)
        return EditTuple(
            index=index,
            edit=Query(r.src, r.alt, image),
            t_gen=Query(r.rephrase, r.alt, image),
            m_gen=Query(r.src, r.alt, _image(r, "image_rephrase", r.image_rephrase)),
            t_loc=Query(r.loc, r.loc_ans, None),
            m_loc=Query(r.m_loc_q, r.m_loc_a, _image(r, "m_loc", r.m_loc)),
            source=r.source,
            held_out=_held_out_queries(r, image),
            record=r.index,
            record_sha256=r.sha256,
            expected_state_sha256=self.expected_state_sha256.get(index),
            skip_locality=r.skip_locality,
        )


def _image(r: EditRecord, field: str, path: Path) -> Image.Image:
    """``load_image`` whose error names the record and field (an image changed after the set-up check)."""
    try:
        return load_image(path)
    except DataFileError as exc:
        raise DataFileError(f"{r.source or 'record'}, field {field!r}: {exc}") from exc


def _held_out_queries(r: EditRecord, image: Image.Image) -> HeldOutQueries | None:
    h = r.held_out
    if h is None:
        return None
    return HeldOutQueries(
        t_gen=Query(h.rephrase, r.alt, image),
        m_gen=Query(r.src, r.alt, _image(r, "held-out image_rephrase", h.image_rephrase)),
        t_loc=Query(h.loc, h.loc_ans, None),
        m_loc=Query(h.m_loc_q, h.m_loc_a, _image(r, "held-out m_loc", h.m_loc)),
    )


class EditStreamLoader:
    """The stream as Lightning iterates it, one edit tuple per step, resumable mid-stream.

    Lightning saves :meth:`state_dict` in every checkpoint and hands it back to :meth:`load_state_dict`
    on ``--ckpt_path``, before iterating: the stream then goes on after the last edit the checkpoint
    holds. ``position`` tells how many edits of the stream have been applied when a checkpoint is taken.
    """

    def __init__(self, dataset: EditStream, position: Callable[[], int]) -> None:
        self.dataset = dataset
        self._position = position
        self._start = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[EditTuple]:
        start, self._start = self._start, 0
        return (self.dataset[i] for i in range(start, len(self.dataset)))

    def state_dict(self) -> dict[str, int]:
        return {"next_edit": int(self._position())}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._start = int(state["next_edit"])


class EditStreamDataModule(LightningDataModule):
    """Streams edit tuples from an MMEdit-schema JSON file.

    Args:
        data_file: the MMEdit JSON (``vqa_eval.json``, ``caption_eval_edit.json``, ...).
        image_root: root of ``image`` (and, by default, ``m_loc``) paths — COCO for the real data.
        rephrase_root: root of ``image_rephrase`` paths.
        m_loc_root: root of ``m_loc`` paths; default ``image_root``.
        num_edits: stream length (horizon); ``None`` = every record.
        seed: seeds the stream order.
        shuffle: ``False`` keeps file order.
        check_images: open every image during validation (slower start, no surprise mid-stream).
        heldout_file: held-out variants of the generality / locality samples, scored but never trained on
            (DESIGN §3). ``"auto"``: ``<stem>.heldout.json`` beside ``data_file`` if it exists, else none;
            ``None`` or ``"none"``: never; a path: that companion, which must exist. It is validated like the
            main file (one object per record, same order; images under ``rephrase_root`` / ``m_loc_root``).
        replay_journal: a run's ``journal.jsonl``: stream exactly the edits it records as applied, in its order
            (``num_edits``, ``seed`` and ``shuffle`` are then not used). Every record must still hash as the
            journal says, and the module checks the editor-state hashes the journal recorded.
        empty_locality: ``"error"`` (default): a record with an empty ``loc_ans``, ``m_loc_q`` or ``m_loc_a`` is an
            error naming file, record and field; ``"skip"``: keep the record, leave that locality sample out of
            the loss and the scores, and count it (``metrics.json``: ``locality_skipped``).
        predict_file: ``predict`` only: a JSONL file of questions, one object a line, ``{"question": ...,
            "image": ...}`` (``"prompt"`` may stand for ``"question"``; ``image`` relative to ``image_root`` or
            absolute; no image: a text-only query).
        predict_out: ``predict`` only: where the answers go (JSONL); default ``predictions.jsonl`` in the run folder.
    """

    def __init__(
        self,
        data_file: str,
        image_root: str,
        rephrase_root: str,
        m_loc_root: str | None = None,
        num_edits: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        check_images: bool = True,
        heldout_file: str | None = "auto",
        replay_journal: str | None = None,
        empty_locality: str = "error",
        predict_file: str | None = None,
        predict_out: str | None = None,
    ) -> None:
        super().__init__()
        if num_edits is not None and num_edits < 1:
            raise ValueError(f"num_edits must be >= 1 or null, got {num_edits}")
        self.data_file = data_file
        self.image_root = image_root
        self.rephrase_root = rephrase_root
        self.m_loc_root = m_loc_root
        self.num_edits = num_edits
        self.seed = seed
        self.shuffle = shuffle
        self.check_images = check_images
        self.heldout_file = heldout_file
        self.replay_journal = replay_journal
        if empty_locality not in ("error", "skip"):
            raise ValueError(f"empty_locality must be 'error' or 'skip', got {empty_locality!r}")
        self.empty_locality = empty_locality
        self.predict_file = predict_file
        self.predict_out = predict_out
        self.stream: EditStream | None = None
        self.queries: QueryStream | None = None

    def setup(self, stage: str | None = None) -> None:
        if stage == "predict":
            self._setup_queries()
            return
        if self.stream is not None:
            return
        path = Path(self.data_file)
        if not path.is_file():
            raise FileNotFoundError(
                f"data file {str(path)!r} not found. For the embedded world run "
                "`python -m more_lightning.world.benchmark --out data/embedded`; for MMEdit set `--data.data_file`."
            )
        heldout = self.resolve_heldout_file()
        records = read_mmedit(
            path,
            self.image_root,
            self.rephrase_root,
            m_loc_root=self.m_loc_root,
            check_images=self.check_images,
            heldout_file=heldout,
            empty_locality=self.empty_locality,
        )
        if self.replay_journal:
            self.stream = self._replay_stream(records, path)
            n = len(self.stream)
        else:
            order = list(range(len(records)))
            if self.shuffle:
                order = torch.randperm(len(records), generator=torch.Generator().manual_seed(self.seed)).tolist()
            n = len(records) if self.num_edits is None else self.num_edits
            if n > len(records):
                raise SettingError(
                    f"data.init_args.num_edits is {n} but {path} has only {len(records)} records: "
                    f"set it to at most {len(records)}, or null for all"
                )
            self.stream = EditStream([records[i] for i in order[:n]])
        log.info(
            "edit stream: %d edits from %s (%s), %s",
            n,
            path,
            f"replaying {self.replay_journal}" if self.replay_journal else f"seed {self.seed}",
            f"held-out variants from {heldout.name}" if heldout else "no held-out variants",
        )

    def _setup_queries(self) -> None:
        if self.queries is not None:
            return
        if not self.predict_file:
            raise SettingError(
                "predict needs questions: set --data.init_args.predict_file to a JSONL file, one query a line, "
                '{"question": "...", "image": "<path relative to the image root>"} (no image: text only)'
            )
        self.queries = QueryStream(read_queries(self.predict_file, self.image_root))
        log.info("predict: %d queries from %s", len(self.queries), self.predict_file)

    def _replay_stream(self, records: list[EditRecord], path: Path) -> EditStream:
        """The journal's applied edits as a stream; each record must still hash as the journal recorded."""
        journal = Path(self.replay_journal)
        stream, expected = [], {}
        for position, edit in enumerate(applied_edits(journal)):
            if not 0 <= edit.record < len(records):
                raise DataFileError(
                    f"{journal} line {edit.line}, field 'record': record {edit.record} is not in {path} "
                    f"({len(records)} records) — replay against the data file the journal was written from"
                )
            record = records[edit.record]
            if record.sha256 != edit.record_sha256:
                raise DataFileError(
                    f"{journal} line {edit.line}, field 'record_sha256': {path} record {edit.record} is not the "
                    "record the journal applied (its content changed) — replay against the original data file"
                )
            stream.append(record)
            if edit.state_sha256:
                expected[position] = edit.state_sha256
        return EditStream(stream, expected)

    def resolve_heldout_file(self) -> Path | None:
        """The held-out companion this stream uses (see ``heldout_file``), or ``None``.

        Raises:
            DataFileError: ``heldout_file`` names a file that does not exist.
        """
        setting = self.heldout_file
        if setting is None or str(setting).strip().lower() == "none":
            return None
        if setting == "auto":
            candidate = heldout_path(self.data_file)
            return candidate if candidate.is_file() else None
        path = Path(setting)
        if not path.is_file():
            raise DataFileError(
                f"{path}: held-out companion not found — fix data.heldout_file (a path, 'auto' to use "
                f"{heldout_path(self.data_file).name} when it exists, or 'none')"
            )
        return path

    def transfer_batch_to_device(self, batch: EditTuple, device: torch.device, dataloader_idx: int) -> EditTuple:
        return batch  # raw text and PIL images: the module encodes them and moves the tensors

    def train_dataloader(self) -> EditStreamLoader:
        self.setup()
        return EditStreamLoader(self.stream, self._edits_applied)

    def predict_dataloader(self) -> QueryStream:
        self._setup_queries()
        return self.queries

    def _edits_applied(self) -> int:
        """Edits of this stream applied so far: the training loop's processed steps (one step = one edit)."""
        if self.trainer is None:
            return 0
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
