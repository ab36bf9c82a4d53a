"""Per-edit cost and memory over a long stream on the embedded model (constant cost per edit?).

    python benchmarks/edit_latency.py [--config configs/tiny_llava_evqa.yaml] [--edits 1000]
    python benchmarks/edit_latency.py --config configs/tiny_llava_evqa_long.yaml --edits 10000

Prints, from one run: median per-edit seconds for edits 1-100 and for the last 100, their ratio,
the editor's own share of per-edit time (statistics + write, vs encoding, forwards and
backwards), the editor's state bytes, and the process's resident set size right after edit
``--rss-at`` (1,000) and after the last edit, with their ratio (RSS from /proc/self/statm, Linux).
Retention is switched off: this measures the stream, not the final re-evaluation.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stream_run import run_probed_stream


def rss_bytes() -> int:
    """The resident set size of this process in bytes (second field of /proc/self/statm, in pages)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssProbe(Callback):
    """Records the process RSS right after edit ``at`` (1-based) and after every edit, so after the last one too."""

    def __init__(self, at: int = 1000) -> None:
        self.at = at
        self.at_rss: int | None = None  # None: the stream ended before edit ``at``
        self.last: tuple[int, int] | None = None  # (edit number, RSS bytes) after the latest edit

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: object, batch: object, batch_idx: int
    ) -> None:
        rss = rss_bytes()
        edit = batch_idx + 1  # one edit per batch
        if edit == self.at:
            self.at_rss = rss
        self.last = (edit, rss)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny_llava_evqa.yaml")
    parser.add_argument("--edits", type=int, default=1000)
    parser.add_argument("--rss-at", type=int, default=1000, help="edit after which RSS is first measured")
    parser.add_argument("overrides", nargs="*", help="extra LightningCLI arguments, e.g. --model.init_args.editor...")
    args = parser.parse_args()
    run, probe = run_probed_stream(args.config, args.edits, RssProbe, {"at": args.rss_at}, args.overrides)
    timings = run.model.timings
    window = min(100, len(timings) // 2)
    first = [t["edit_seconds"] for t in timings[:window]]
    last = [t["edit_seconds"] for t in timings[-window:]]
    editor = sum(t["editor_seconds"] for t in timings)
    total = sum(t["edit_seconds"] for t in timings)
    n = len(timings)
    print(f"config: {args.config}  editor: {type(run.model.editor).__name__}  edits: {n}")
    print(f"median s/edit, edits 1-{window}: {statistics.median(first):.4f}")
    print(f"median s/edit, edits {n - window + 1}-{n}: {statistics.median(last):.4f}")
    print(f"ratio last/first: {statistics.median(last) / statistics.median(first):.3f}")
    step = max(n // 10, 1)
    windows = [statistics.median(t["edit_seconds"] for t in timings[i : i + step]) for i in range(0, n, step)]
    print(f"median s/edit per {step} edits: " + " ".join(f"{w:.4f}" for w in windows))
    print(
        f"editor share (statistics + write): {100 * editor / total:.1f}% of per-edit time "
        f"({1000 * editor / n:.2f} ms of {1000 * total / n:.2f} ms per edit); "
        f"the rest is encoding, forwards and backwards"
    )
    print(f"editor state: {run.model.editor.state_bytes(run.model.optimizers().optimizer)} bytes")
    last_edit, last_rss = probe.last
    if probe.at_rss is None:
        print(f"RSS after edit {last_edit} (last): {_mib(last_rss)}; edit {args.rss_at} not reached")
    else:
        print(
            f"RSS after edit {args.rss_at}: {_mib(probe.at_rss)}; after edit {last_edit} (last): {_mib(last_rss)}; "
            f"ratio last/{args.rss_at}: {last_rss / probe.at_rss:.3f}"
        )


if __name__ == "__main__":
    main()
