"""LoRA-FT: naive low-rank fine-tuning through M-ORE's write interface (the paper's "naive finetuning")."""

from __future__ import annotations

from more_lightning.editors.more import MORE


class LoRAFT(MORE):
    """Naive low-rank fine-tuning: M-ORE's write interface with ``P = I`` (``B ← B - η G``).

    The paper's "naive finetuning" baseline; same arguments as :class:`~more_lightning.editors.more.MORE`
    (``lam``, ``prior`` and ``pool`` have no effect).
    """

    precondition = False
