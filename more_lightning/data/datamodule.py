"""``EditStreamDataModule``: an MMEdit file as a seeded stream of edit tuples (DESIGN §2, §5).

Every record is validated up front (:func:`~more_lightning.data.schema.read_mmedit`); the stream
is the first ``num_edits`` records of a seeded permutation, one :class:`EditTuple` per step:

    edit   = (src,      alt,    image)            -> Reliability
    t_gen  = (rephrase, alt,    image)            -> T-Generality
    m_gen  = (src,      alt,    image_rephrase)   -> M-Generality
    t_loc  = (loc,      loc_ans)                  -> T-Locality
    m_loc  = (m_loc_q,  m_loc_a, m_loc image)     -> M-Locality
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from more_lightning.data.records import EditRecord, EditTuple, Query
from more_lightning.data.schema import load_image, read_mmedit

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
        records = read_mmedit(
            path, self.image_root, self.rephrase_root, m_loc_root=self.m_loc_root, check_images=self.check_images
        )
        order = list(range(len(records)))
        if self.shuffle:
            order = torch.randperm(len(records), generator=torch.Generator().manual_seed(self.seed)).tolist()
        n = len(records) if self.num_edits is None else self.num_edits
        if n > len(records):
            raise ValueError(f"data.num_edits={n} but {path.name} has only {len(records)} records")
        self.stream = EditStream([records[i] for i in order[:n]])
        log.info("edit stream: %d edits from %s (seed %d)", n, path, self.seed)

    def transfer_batch_to_device(self, batch: EditTuple, device: torch.device, dataloader_idx: int) -> EditTuple:
        return batch  # raw text and PIL images: the module encodes them and moves the tensors

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(self.stream, batch_size=None, shuffle=False, collate_fn=_single, num_workers=0)
