"""Where a training step's time goes: torch.profiler over a window of steps of a real train.py run.

    torchrun --standalone --nproc_per_node 2 tools/profile_step.py --steps 10:30 [--rank 0] [--rows 40] \
        -- --model tiny-llama --max-steps 32 --batch-size 4 --context-length 256 --output-dir /tmp/prof --lora-dropout 0

Everything after ``--`` is train.py's own flags: the run is train.py's, unchanged, with the profiler
switched on at the first step of the window and off after the last (steps count from 1). The chosen
rank prints the ops by self CPU time and writes a Chrome trace (``profile-rank<N>.json``) into the
run's output directory; the forward+backward, the gradient clipping and the optimizer step appear as
``train_step`` / ``clip_grad_norm`` / ``Optimizer.step`` ranges. docs/benchmarks.md quotes its tables.
Speed is measured by tools/bench_throughput.py; this tool says where the time goes.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, train_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(prog="profile_step.py", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", default="10:20", help="FIRST:LAST optimizer steps to profile (inclusive)")
    parser.add_argument("--rank", type=int, default=0, help="the rank that prints and writes the trace")
    parser.add_argument("--rows", type=int, default=40, help="ops listed")
    args = parser.parse_args(ours)
    first, last = (int(part) for part in args.steps.split(":"))
    if not 1 <= first <= last:
        parser.error(f"--steps {args.steps}: need 1 <= FIRST <= LAST")
    sys.path.insert(0, str(REPO))
    from fsdp_qlora.cli.train import main as train_main
    from fsdp_qlora.train import loop

    rank = int(os.environ.get("RANK", "0"))
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]
                                      + ([torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else []))
    train_step, clip = loop._train_step, loop.clip_grad_norm
    calls = 0

    def profiled_step(*step_args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == first:
            profiler.start()
        with torch.profiler.record_function("train_step"):
            return train_step(*step_args, **kwargs)

    def profiled_clip(*clip_args, **kwargs):
        nonlocal calls
        with torch.profiler.record_function("clip_grad_norm"):
            norm = clip(*clip_args, **kwargs)
        if calls == last:  # the optimizer step of the last window step is not in the window
            profiler.stop()
            if rank == args.rank:
                _report(profiler, args.rows, last - first + 1, _output_dir(train_args), rank)
        return norm

    loop._train_step, loop.clip_grad_norm = profiled_step, profiled_clip
    return train_main(train_args)


def _output_dir(train_args: list[str]) -> Path | None:
    if "--output-dir" in train_args:
        return Path(train_args[train_args.index("--output-dir") + 1])
    return None


def _report(profiler, rows: int, steps: int, out: Path | None, rank: int) -> None:
    table = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
    print(f"profile of {steps} steps (rank {rank}), per op over the whole window:\n{table}", flush=True)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        profiler.export_chrome_trace(str(out / f"profile-rank{rank}.json"))


if __name__ == "__main__":
    sys.exit(main())
