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

    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        if not enabled:
            return
        self._jsonl = (run_dir / "metrics.jsonl").open("a", buffering=1)
        self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

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
