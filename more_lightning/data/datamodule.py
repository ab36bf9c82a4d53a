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
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from more_lightning.data.records import EditRecord, EditTuple, HeldOutQueries, Query
from more_lightning.data.schema import DataFileError, heldout_path, load_image, read_mmedit

log = logging.getLogger(__name__)


class EditStream(Dataset):
    """Map-style view of the stream: item i is the i-th edit tuple (images loaded on access)."""

    def __init__(self, records: list[EditRecord]) -> None:
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> EditTuple:
        r = self.records[index]
        image = load_image(r.image)
        return EditTuple(
            index=index,
            edit=Query(r.src, r.alt, image),
            t_gen=Query(r.rephrase, r.alt, image),
            m_gen=Query(r.src, r.alt, load_image(r.image_rephrase)),
            t_loc=Query(r.loc, r.loc_ans, None),
            m_loc=Query(r.m_loc_q, r.m_loc_a, load_image(r.m_loc)),
            source=r.source,
            held_out=_held_out_queries(r, image),
        )


def _held_out_queries(r: EditRecord, image: Image.Image) -> HeldOutQueries | None:
    h = r.held_out
    if h is None:
        return None
    return HeldOutQueries(
        t_gen=Query(h.rephrase, r.alt, image),
        m_gen=Query(r.src, r.alt, load_image(h.image_rephrase)),
        t_loc=Query(h.loc, h.loc_ans, None),
        m_loc=Query(h.m_loc_q, h.m_loc_a, load_image(h.m_loc)),
    )


def _single(item: EditTuple) -> EditTuple:
    return item


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
    ) -> None:
        super().__init__()
        if num_edits is not None and num_edits < 1:
            raise ValueError(f"data.num_edits must be >= 1 or null, got {num_edits}")
        self.data_file = data_file
        self.image_root = image_root
        self.rephrase_root = rephrase_root
        self.m_loc_root = m_loc_root
        self.num_edits = num_edits
        self.seed = seed
        self.shuffle = shuffle
        self.check_images = check_images
        self.heldout_file = heldout_file
        self.stream: EditStream | None = None

    def setup(self, stage: str | None = None) -> None:
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
        )
        order = list(range(len(records)))
        if self.shuffle:
            order = torch.randperm(len(records), generator=torch.Generator().manual_seed(self.seed)).tolist()
        n = len(records) if self.num_edits is None else self.num_edits
        if n > len(records):
            raise ValueError(f"data.num_edits={n} but {path.name} has only {len(records)} records")
        self.stream = EditStream([records[i] for i in order[:n]])
        log.info(
            "edit stream: %d edits from %s (seed %d), %s",
            n,
            path,
            self.seed,
            f"held-out variants from {heldout.name}" if heldout else "no held-out variants",
        )

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

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(self.stream, batch_size=None, shuffle=False, collate_fn=_single, num_workers=0)
