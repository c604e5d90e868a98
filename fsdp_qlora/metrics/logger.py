"""Rank-0 metrics: one JSON object per logged step in metrics.jsonl, the same in TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter


class MetricsLogger:
    """Writes `metrics.jsonl` and `tensorboard/` under the run directory (main rank only).

    TensorBoard tags are ``train/<name>`` (``train/loss``, ``train/lr``, ...); the JSON keys
    are the bare names plus ``step``.
    """

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int = 0):
        self.enabled = enabled
        if not enabled:
            return
        jsonl = run_dir / "metrics.jsonl"
        _drop_rows_after(jsonl, resume_step)
        self._jsonl = jsonl.open("a", buffering=1)
        # purge_step hides events a crashed run logged after its last checkpoint.
        self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)

    def log(self, step: int, scalars: dict[str, float], prefix: str = "train") -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        for name, value in scalars.items():
            self._tb.add_scalar(f"{prefix}/{name}", value, step)

    def log_text(self, tag: str, text: str) -> None:
        if self.enabled:
            self._tb.add_text(tag, text)

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


def _drop_rows_after(jsonl: Path, step: int) -> None:
    """A resumed run repeats the steps after its checkpoint: forget their first logging."""
    if not jsonl.exists():
        return
    rows = [line for line in jsonl.read_text().splitlines() if line.strip()]
    kept = [line for line in rows if json.loads(line)["step"] <= step]
    if len(kept) != len(rows):
        jsonl.write_text("".join(line + "\n" for line in kept))
