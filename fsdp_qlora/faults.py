"""Fault injection for the test suite: crashes and bad numbers on demand, at exact steps.

Read from the environment variable FSDP_QLORA_FAULTS, e.g.
``nan_loss_at=3,4,5;kill_rank_during_save=1@10`` (SIGKILL rank 1 inside the save of step 10,
after its tensors are written and before the checkpoint is committed). Unset in normal runs.
"""

from __future__ import annotations

import os
import signal


def _parse() -> dict[str, str]:
    spec = os.environ.get("FSDP_QLORA_FAULTS", "")
    return dict(item.split("=", 1) for item in spec.split(";") if "=" in item)


def nan_loss_at(step: int) -> bool:
    steps = _parse().get("nan_loss_at", "")
    return str(step) in steps.split(",")


def maybe_kill_during_save(rank: int, step: int) -> None:
    target = _parse().get("kill_rank_during_save")
    if target and target == f"{rank}@{step}":
        os.kill(os.getpid(), signal.SIGKILL)
