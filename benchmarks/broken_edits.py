"""Which later edit broke which earlier one, and what the two share (interference, capacity or drift?).

    python benchmarks/broken_edits.py --config configs/tiny_llava_evqa.yaml --edits 100 [--split train]

Runs one stream (retention off) and, after every edit j, re-scores every earlier edit i on its own
edit query (exact match of the target, teacher-forced). An edit i that held right after it was
written (or after any later edit) and fails after edit j counts as *broken by j*. For every break the
script asks what i and j share — the question text, the answer (target), the question type (from the
embedded world's truth file where one sits beside the data file), the image — and which modality's
module moved most in edit j's write (largest ‖ΔB‖ of the write diagnostics). The same shares over all
pairs i < j are printed beside them: a share far above its all-pairs rate is what breaks edits.
Costs T²/2 single-query forwards (T = 100: about 5,000). Train split by default: this is a study tool.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stream_run import run_probed_stream

from more_lightning.contract import shift_for_loss


class BreakTracker(Callback):
    """After each edit, re-scores every earlier edit's query; records which edit broke which."""

    def __init__(self) -> None:
        self.queries = []  # encoded edit query per stream position
        self.items = []  # the EditTuple per stream position
        self.held: list[bool] = []  # does edit i hold now?
        self.breaks: list[tuple[int, int]] = []  # (i, j): edit j broke edit i
        self.repairs: list[tuple[int, int]] = []  # (i, j): edit j made a failing edit i hold again
        self.moved: list[str] = []  # per edit j: modality of the module with the largest ‖ΔB‖

    @torch.no_grad()
    def _holds(self, pl_module, query) -> bool:
        logits, labels = shift_for_loss(pl_module.logits(query), query.labels)
        mask = labels != -100
        return bool((logits.argmax(-1)[mask] == labels[mask]).all())

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: object, batch: object, batch_idx: int
    ) -> None:
        j = len(self.items)
        self.items.append(batch)
        self.queries.append(pl_module.encode(batch)["edit"])
        modality = {p.path: p.modality for p in pl_module.edit_points}
        diag = pl_module.last_diagnostics
        top = max(diag, key=lambda m: diag[m].get("delta_norm", 0.0), default=None)
        self.moved.append(modality.get(top, "?"))
        self.held.append(self._holds(pl_module, self.queries[j]))
        for i in range(j):
            now = self._holds(pl_module, self.queries[i])
            if self.held[i] and not now:
                self.breaks.append((i, j))
            elif not self.held[i] and now:
                self.repairs.append((i, j))
            self.held[i] = now


def _truth_types(data_file: Path) -> list[str] | None:
    truth = data_file.parent / "truth" / data_file.name
    if not truth.is_file():
        return None
    return [t.get("qtype", "caption") for t in json.loads(truth.read_text())]


def _shares(pairs, tracker: BreakTracker, qtypes: list[str] | None) -> dict[str, float]:
    if not pairs:
        return {}
    items = tracker.items
    tests = {
        "same question text": lambda i, j: items[i].edit.prompt.strip().lower() == items[j].edit.prompt.strip().lower(),
        "same answer": lambda i, j: items[i].edit.target.strip().lower() == items[j].edit.target.strip().lower(),
        "same image": lambda i, j: (
            items[i].edit.image is not None
            and items[j].edit.image is not None
            and items[i].edit.image.tobytes() == items[j].edit.image.tobytes()
        ),
    }
    if qtypes is not None:
        tests["same question type"] = lambda i, j: qtypes[items[i].record] == qtypes[items[j].record]
    out = {name: 100 * sum(test(i, j) for i, j in pairs) / len(pairs) for name, test in tests.items()}
    out["edit j moved an image module most"] = 100 * sum(tracker.moved[j] == "image" for _, j in pairs) / len(pairs)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny_llava_evqa.yaml")
    parser.add_argument("--edits", type=int, default=100)
    parser.add_argument("--split", choices=("train", "eval"), default="train", help="embedded world split")
    parser.add_argument("overrides", nargs="*", help="extra LightningCLI arguments")
    args = parser.parse_args()
    extra = []
    if args.split == "train":
        import yaml

        data_file = Path(yaml.safe_load(Path(args.config).read_text())["data"]["init_args"]["data_file"])
        extra = ["--data.init_args.data_file", str(data_file).replace("_eval", "_train")]
    run, tracker = run_probed_stream(args.config, args.edits, BreakTracker, overrides=[*extra, *args.overrides])
    data_file = Path(run.datamodule.data_file)
    qtypes = _truth_types(data_file)
    n = len(tracker.items)
    all_pairs = [(i, j) for j in range(n) for i in range(j)]
    print(f"config: {args.config}  data: {data_file.name}  editor: {type(run.model.editor).__name__}  edits: {n}")
    print(f"edits that hold at the end: {sum(tracker.held)} of {n}")
    print(f"breaks (a holding edit i fails after edit j): {len(tracker.breaks)}; repairs: {len(tracker.repairs)}")
    broken = {i for i, _ in tracker.breaks}
    print(f"edits broken at least once: {len(broken)}")
    per_breaker = Counter(j for _, j in tracker.breaks)
    if per_breaker:
        worst = per_breaker.most_common(5)
        named = [f"edit {j + 1} ({tracker.items[j].source}): {c}" for j, c in worst]
        print("edits that broke the most: " + ", ".join(named))
    print(f"writes whose largest ‖ΔB‖ is in an image module: {100 * tracker.moved.count('image') / max(n, 1):.1f} %")
    breaks, everyone = _shares(tracker.breaks, tracker, qtypes), _shares(all_pairs, tracker, qtypes)
    print(f"\n{'share of pairs (i, j), %':42s}{'breaks':>10s}{'all pairs i < j':>18s}")
    for name in everyone:
        print(f"{name:42s}{breaks.get(name, float('nan')):10.1f}{everyone[name]:18.1f}")
    if qtypes is not None and tracker.breaks:
        by_type = Counter(qtypes[tracker.items[i].record] for i, _ in tracker.breaks)
        edits_by_type = Counter(qtypes[item.record] for item in tracker.items)
        print("\nbreaks per edited question type (breaks / edits of that type): ")
        for qtype, count in sorted(by_type.items()):
            print(f"  {qtype}: {count} / {edits_by_type[qtype]}")


if __name__ == "__main__":
    main()
