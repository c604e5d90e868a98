"""Rank-0 metrics: one JSON object per logged step in metrics.jsonl, the same in TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summaries


class MetricsLogger:
    """Writes `metrics.jsonl` and `tensorboard/` under the run directory (main rank only).

    TensorBoard tags are ``<prefix>/<name>`` (``train/loss``, ``train/lr``, ...), with a name's own
    ``<prefix>_`` dropped (``eval_loss`` under prefix ``eval`` is ``eval/loss``), unless the name
    carries its own group (``memory/host_rss_gib``); the JSON keys are the names plus ``step``.
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

    def log(self, step: int, scalars: dict[str, float], prefix: str = "train", jsonl: bool = True) -> None:
        if not self.enabled:
            return
        if jsonl:
            self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        for name, value in scalars.items():
            tag = name if "/" in name else f"{prefix}/{name.removeprefix(prefix + '_')}"
            self._tb.add_scalar(tag, value, step)

    def log_hparams(self, hparams: dict, metrics: dict[str, float]) -> None:
        """The run's settings in TensorBoard's HPARAMS tab, in this same event file."""
        if not self.enabled:
            return
        flat = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hparams.items()}
        for summary in hparams_summaries(flat, metrics):
            self._tb.file_writer.add_summary(summary)

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
