"""Resuming: one path for the data position, refusals before data or weights load, a full disk.

The data position is a count of examples of the epoch's seeded order (data/pipeline.py), so a
resume with another batch size, accumulation or world size continues after exactly the examples
the checkpoint had consumed; a changed dataset, seed, context length or packing would make that
count mean other examples and is refused in one line.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.conftest import REPO, subprocess_env

STEPS, SAVED = 8, 4
# Global batch 8 (2 ranks x 2 sequences x 2 micro-steps); no dropout, so the only difference a
# resumed layout can make is the grouping of the same examples.
COMMON = ["--max-steps", str(STEPS), "--save-every", str(SAVED), "--context-length", "128", "--lora-dropout", "0",
          "--warmup-steps", "2"]
LAYOUT = ["--batch-size", "2", "--grad-accum-steps", "2"]


def _run(nproc: int, run_dir: Path, cache: Path, *flags: str, timeout: float = 300) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [*(launcher if nproc > 1 else [sys.executable]), str(REPO / "train.py"), "--output-dir", str(run_dir),
           *COMMON, *flags]
    return subprocess.run(cmd, cwd=REPO, env=subprocess_env(cache), capture_output=True, text=True, timeout=timeout)


def _metrics(run_dir: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, cache) -> Path:
    run_dir = tmp_path_factory.mktemp("baseline") / "run"
    proc = _run(2, run_dir, cache, *LAYOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def _resumable_copy(baseline: Path, target: Path) -> Path:
    """A run directory holding only the baseline's step-4 checkpoint (as if it had stopped there)."""
    step = f"step-{SAVED:08d}"
    shutil.copytree(baseline / "checkpoints" / step, target / "checkpoints" / step)
    (target / "checkpoints" / "latest").write_text(step + "\n")
    return target


@pytest.mark.parametrize("nproc, layout", [(2, ["--batch-size", "4", "--grad-accum-steps", "1"]),
                                           (1, ["--batch-size", "4", "--grad-accum-steps", "2"]),
                                           (1, ["--batch-size", "1", "--grad-accum-steps", "8"])])
def test_another_batch_size_accumulation_or_world_size_continues_with_the_same_examples(
        baseline, tmp_path, cache, nproc, layout):
    """Each resumed step takes the same 8 examples as the uninterrupted step (only grouped otherwise:
    test_the_resumed_steps_hold_exactly_the_uninterrupted_steps_examples checks the sets), on the
    same NF4 base (world-size independent) from the same adapter: the losses agree to bf16 rounding
    of differently padded micro-batches and fp32 summation order (measured <= 3.1e-4 relative)."""
    run_dir = _resumable_copy(baseline, tmp_path / "run")
    proc = _run(nproc, run_dir, cache, *layout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / f'step-{SAVED:08d}'}" in proc.stdout
    resumed, reference = _metrics(run_dir), _metrics(baseline)
    assert sorted(resumed) == list(range(SAVED + 1, STEPS + 1))
    for step in resumed:
        assert resumed[step] == pytest.approx(reference[step], rel=1e-3), (step, resumed, reference)


def _global_steps(cfg, tokenizer, world: int, accum: int, steps: int, state=None) -> list[list[tuple]]:
    """The examples (token ids) of each of `steps` optimizer steps over all ranks, in a multiset
    form (sorted), and the data state after them."""
    from fsdp_qlora.data.pipeline import build_train_data

    ranks = [build_train_data(cfg, tokenizer, rank=r, world_size=world) for r in range(world)]
    if state is not None:
        for data in ranks:
            data.load_state_dict(state)
    streams = [data.batches() for data in ranks]
    result = []
    for _ in range(steps):
        batches = [next(stream) for stream in streams for _ in range(accum)]
        rows = [tuple(ids[mask.bool()].tolist()) for batch in batches
                for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]  # padding depends on the grouping
        result.append(sorted(rows))
    return result, ranks[0].state_dict()


@pytest.mark.parametrize("before, after", [((2, 2, 2), (2, 4, 1)), ((2, 2, 2), (1, 4, 2)), ((2, 2, 2), (1, 1, 8)),
                                           ((1, 8, 1), (2, 2, 2)), ((4, 1, 2), (2, 2, 2))])
def test_the_resumed_steps_hold_exactly_the_uninterrupted_steps_examples(before, after):
    """(world, batch, accumulation) before and after: the same global batch, so every resumed step
    is the uninterrupted step's examples, across an epoch boundary too. (400 examples: every world
    size here divides them. Otherwise each layout drops its own tail of fewer than world-size
    examples at the end of an epoch, and the epoch's last step differs by those.)"""
    import dataclasses

    from transformers import AutoTokenizer

    from fsdp_qlora.config import TrainConfig
    from fsdp_qlora.model.tiny_llama import ensure_tiny_llama

    tokenizer = AutoTokenizer.from_pretrained(ensure_tiny_llama())
    (w0, b0, a0), (w1, b1, a1) = before, after
    assert w0 * b0 * a0 == w1 * b1 * a1
    base = TrainConfig(context_length=64)
    steps_per_epoch = 400 // (w0 * b0 * a0)
    total, stop = steps_per_epoch + 5, steps_per_epoch - 3  # resume 3 steps before the epoch ends
    reference, _ = _global_steps(dataclasses.replace(base, batch_size=b0), tokenizer, w0, a0, total)
    _, state = _global_steps(dataclasses.replace(base, batch_size=b0), tokenizer, w0, a0, stop)
    state = json.loads(json.dumps(state))  # as a checkpoint stores it
    resumed, _ = _global_steps(dataclasses.replace(base, batch_size=b1), tokenizer, w1, a1, total - stop, state)
    assert resumed == reference[stop:]


@pytest.mark.parametrize("flags, needle", [
    (["--dataset", "OTHER"], "dataset="),
    (["--seed", "7"], "seed=42"),
    (["--context-length", "64"], "context_length=128"),
    (["--packing"], "packing=False"),
])
def test_another_dataset_seed_context_or_packing_is_refused_before_data_and_weights(
        baseline, tmp_path, cache, flags, needle):
    run_dir = _resumable_copy(baseline, tmp_path / "run")
    if flags[0] == "--dataset":
        other = tmp_path / "other.jsonl"
        other.write_text(json.dumps({"instruction": "Say hi.", "input": "", "output": "hi"}) + "\n")
        flags = ["--dataset", str(other)]
    proc = _run(1, run_dir, cache, *LAYOUT, *flags, timeout=120)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("train.py:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert f"was saved with {needle}" in errors[0] and "start fresh in a new --output-dir" in errors[0]
    flag = flags[0]
    assert f"resume with {flag} " in errors[0]
    assert "data:" not in proc.stdout and "adapters on" not in proc.stdout  # refused before data and weights
    assert not (run_dir / "metrics.jsonl").exists()


def test_changed_data_content_under_the_same_name_is_refused_before_weights(tmp_path, cache):
    data = tmp_path / "data.jsonl"
    rows = [{"instruction": f"Repeat {i}.", "input": "", "output": f"{i} " * 3} for i in range(40)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_dir = tmp_path / "run"
    first = _run(1, run_dir, cache, "--dataset", str(data), "--batch-size", "4", "--max-steps", "2",
                 "--save-every", "1", timeout=120)
    assert first.returncode == 0, first.stderr[-3000:]
    shutil.rmtree(run_dir / "adapter")  # as if it had stopped after its checkpoint
    rows[0]["output"] = "something else entirely"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = _run(1, run_dir, cache, "--dataset", str(data), "--batch-size", "4", "--max-steps", "4",
                "--save-every", "1", timeout=120)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("train.py:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert "the data is not the checkpoint's" in errors[0] and "adapters on" not in proc.stdout


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs, where the machine lets this test mount one (root in a sandbox or container)."""
    mount_point = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mount_point.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command to make a small tmpfs")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode}): needs root")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_a_full_disk_during_a_save_is_one_line_and_the_previous_checkpoint_resumes(small_disk, cache):
    from fsdp_qlora.errors import EXIT_CHECKPOINT_WRITE

    run_dir = small_disk / "run"
    flags = ["--batch-size", "2", "--max-steps", "4", "--save-every", "2", "--keep-last", "1"]
    first = _run(2, run_dir, cache, *flags, "--max-steps", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    shutil.rmtree(run_dir / "adapter")  # a run that stopped after its step-2 checkpoint
    checkpoint = run_dir / "checkpoints" / "step-00000002"
    size = sum(p.stat().st_size for p in checkpoint.iterdir())
    free = shutil.disk_usage(small_disk).free
    # Fill the disk so that the logs still fit but another checkpoint does not.
    (small_disk / "filler").write_bytes(b"\0" * max(0, free - size // 3))
    proc = _run(2, run_dir, cache, *flags, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("train.py:")]
    # torchrun exits 1 and reports each rank's code; a single process exits with it (docs/troubleshooting.md)
    assert proc.returncode != 0 and f"exitcode  : {EXIT_CHECKPOINT_WRITE}" in proc.stderr, proc.stderr[-3000:]
    assert len(errors) == 1 and "fsdp_qlora/" not in proc.stderr, proc.stderr[-3000:]  # no traceback of ours
    assert "cannot save the checkpoint of step 4" in errors[0] and "no space left on the device" in errors[0]
    assert f"the previous checkpoint {checkpoint} is intact" in errors[0] and "a checkpoint needs about" in errors[0]
    assert not list((run_dir / "checkpoints").glob(".tmp-step-*"))  # nothing partial left
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-00000002"
    (small_disk / "filler").unlink()
    resumed = _run(2, run_dir, cache, *flags)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {checkpoint}" in resumed.stdout
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-00000004"
