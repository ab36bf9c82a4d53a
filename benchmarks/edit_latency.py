"""Per-edit cost over a long stream on the embedded model (constant cost per edit?).

    python benchmarks/edit_latency.py [--config configs/tiny_llava_evqa.yaml] [--edits 1000]

Prints, from one run: median per-edit seconds for edits 1-100 and for the last 100, their ratio,
and the editor's own share of per-edit time (statistics + write, vs encoding, forwards and
backwards). Retention is switched off: this measures the stream, not the final re-evaluation.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cli


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny_llava_evqa.yaml")
    parser.add_argument("--edits", type=int, default=1000)
    parser.add_argument("overrides", nargs="*", help="extra LightningCLI arguments, e.g. --model.init_args.editor...")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as runs:
        run = cli.main(
            [
                "fit",
                "--config",
                args.config,
                "--data.init_args.num_edits",
                str(args.edits),
                "--model.init_args.retention",
                "false",
                "--trainer.enable_progress_bar",
                "false",
                "--trainer.logger.init_args.save_dir",
                runs,
                *args.overrides,
            ]
        )
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
    print(
        f"editor share (statistics + write): {100 * editor / total:.1f}% of per-edit time "
        f"({1000 * editor / n:.2f} ms of {1000 * total / n:.2f} ms per edit); "
        f"the rest is encoding, forwards and backwards"
    )
    print(f"editor state: {run.model.editor.state_bytes(run.model.optimizers().optimizer)} bytes")


if __name__ == "__main__":
    main()
