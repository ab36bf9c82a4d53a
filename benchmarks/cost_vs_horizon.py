"""Per-edit time and editor state against the edit index t, several editors side by side (paper Table 2 / Fig. 7).

    python benchmarks/cost_vs_horizon.py [--edits 1000] [--every 10] [--out docs/cost_vs_horizon]
    python benchmarks/cost_vs_horizon.py --configs configs/tiny_llava_evqa.yaml configs/tiny_llava_evqa_grace.yaml

Runs each config's stream for ``--edits`` edits, one after the other in this process (retention off: this
measures the stream), recording every edit's seconds and, every ``--every`` edits, the editor's state bytes
(``editor.state_bytes(optimizer)``: written weights, optimizer statistics and any edit memory). Prints per editor
the median seconds per edit over the first and the last 100 edits with their ratio, the state bytes after the
first and the last edit with their ratio, and a least-squares slope of the state per 100 edits. ``--out STEM``
writes ``STEM.json`` (every series) and ``STEM.png`` (two panels: rolling-median seconds per edit and state bytes,
both against t). Any other argument is a LightningCLI override for every run. Editors that keep a memory of
edits should grow with t; M-ORE's state should not.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))

from stream_run import run_probed_stream

DEFAULT_CONFIGS = (
    "configs/tiny_llava_evqa.yaml",
    "configs/tiny_llava_evqa_grace.yaml",
    "configs/tiny_llava_evqa_ike.yaml",
    "configs/tiny_llava_evqa_liveedit.yaml",
    "configs/tiny_llava_evqa_serac.yaml",
)


class StateProbe(Callback):
    """The editor's state bytes after edit 1 and every ``every`` edits: ``points`` = [(t, bytes), ...]."""

    def __init__(self, every: int = 10) -> None:
        self.every = every
        self.points: list[tuple[int, int]] = []

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: object, batch: object, batch_idx: int
    ) -> None:
        edit = batch_idx + 1  # one edit per batch
        if edit == 1 or edit % self.every == 0:
            optimizer = pl_module.optimizers().optimizer
            self.points.append((edit, int(pl_module.editor.state_bytes(optimizer))))


def slope_per_100(points: list[tuple[int, int]]) -> float:
    """Least-squares slope of state bytes per 100 edits."""
    if len(points) < 2:
        return 0.0
    ts, ys = zip(*points, strict=True)
    mt, my = statistics.fmean(ts), statistics.fmean(ys)
    var = sum((t - mt) ** 2 for t in ts)
    return 100 * sum((t - mt) * (y - my) for t, y in zip(ts, ys, strict=True)) / var if var else 0.0


def rolling_median(values: list[float], window: int) -> list[float]:
    return [statistics.median(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]


def measure(config: str, edits: int, every: int, overrides: list[str]) -> dict:
    run, probe = run_probed_stream(config, edits, StateProbe, {"every": every}, overrides)
    seconds = [t["edit_seconds"] for t in run.model.timings]
    window = min(100, max(len(seconds) // 2, 1))
    first, last = statistics.median(seconds[:window]), statistics.median(seconds[-window:])
    return {
        "config": config,
        "editor": type(run.model.editor).__name__,
        "edits": len(seconds),
        "seconds": seconds,
        "state": probe.points,
        "median_seconds_first": first,
        "median_seconds_last": last,
        "seconds_ratio": last / first,
        "state_first": probe.points[0][1],
        "state_last": probe.points[-1][1],
        "state_ratio": probe.points[-1][1] / probe.points[0][1],
        "state_slope_per_100": slope_per_100(probe.points),
    }


def plot(results: list[dict], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4))
    FigureCanvasAgg(figure)
    time_ax, state_ax = figure.subplots(1, 2)
    for result in results:
        t = range(1, result["edits"] + 1)
        time_ax.plot(t, rolling_median(result["seconds"], 25), label=result["editor"], linewidth=1)
        ts, ys = zip(*result["state"], strict=True)
        state_ax.plot(ts, ys, label=result["editor"], linewidth=1.2)
    time_ax.set(xlabel="edit t", ylabel="seconds per edit (rolling median, 25)", title="Time per edit")
    state_ax.set(xlabel="edit t", ylabel="editor state (bytes)", title="Editor state", yscale="log")
    for ax in (time_ax, state_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS))
    parser.add_argument("--edits", type=int, default=1000)
    parser.add_argument("--every", type=int, default=10, help="state bytes are read every this many edits")
    parser.add_argument("--out", help="STEM: write STEM.json and STEM.png")
    args, overrides = parser.parse_known_args(argv)  # the rest: LightningCLI arguments for every run
    results = []
    head = "| editor | edits | s/edit first 100 | s/edit last 100 | ratio | state t=1 | state t=T | ratio | state/100 |"
    print(head)
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for config in args.configs:
        r = measure(config, args.edits, args.every, overrides)
        results.append(r)
        print(
            f"| {r['editor']} | {r['edits']} | {r['median_seconds_first']:.3f} | {r['median_seconds_last']:.3f} "
            f"| {r['seconds_ratio']:.2f} | {r['state_first']:,} | {r['state_last']:,} | {r['state_ratio']:.2f} "
            f"| {r['state_slope_per_100']:+,.0f} |",
            flush=True,
        )
    if args.out:
        stem = Path(args.out)
        stem.parent.mkdir(parents=True, exist_ok=True)
        Path(f"{stem}.json").write_text(json.dumps(results, indent=1))
        plot(results, Path(f"{stem}.png"))
        print(f"wrote {stem}.json and {stem}.png")
    return results


if __name__ == "__main__":
    main()
