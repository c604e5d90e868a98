"""What rank 0 shows on the console: a tqdm bar on a terminal, plain lines in log files."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm


class Progress:
    """Step/total, loss, tokens/s and ETA. On a terminal a live bar (tqdm); otherwise (SLURM
    logs, pipes) one plain line per logged step, which greps and tails well."""

    def __init__(self, total_steps: int, start_step: int, enabled: bool):
        self.enabled = enabled
        self.total = total_steps
        self._interactive = enabled and sys.stdout.isatty()
        self._started = time.perf_counter()
        self._start_step = start_step
        self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True) \
            if self._interactive else None

    def update(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix(loss=f"{scalars['loss']:.4f}", tok_s=f"{scalars['tokens_per_sec']:.0f}")
            return
        print(f"step {step}/{self.total} loss {scalars['loss']:.4f} lr {scalars['lr']:.2e} "
              f"grad_norm {scalars['grad_norm']:.3f} tokens/s {scalars['tokens_per_sec']:.0f} "
              f"eta {self._eta(step)}", flush=True)

    def _eta(self, step: int) -> str:
        done = step - self._start_step
        if done <= 0:
            return "?"
        seconds = int((time.perf_counter() - self._started) / done * (self.total - step))
        return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"

    def message(self, text: str) -> None:
        """A line that must not be garbled by the bar (warnings, checkpoint notices)."""
        if self.enabled:
            (self._bar.write if self._bar is not None else print)(text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
