"""Optimizers on FSDP2-sharded adapters: AdamW on the local shards is torch's AdamW bit for bit;
bitsandbytes 8-bit AdamW trains like AdamW, and its 8-bit state goes through DCP checkpoints
(every rank's shard) and resumes exactly."""

import shutil
from pathlib import Path

import pytest
from torch.distributed.checkpoint import FileSystemReader

from tests.conftest import REPO, run_torchrun, train_metrics

# min-8bit-size 1: the tiny model's adapters (512-1024 elements per shard) get 8-bit state too.
COMMON = ["--max-steps", "8", "--context-length", "128", "--lora-dropout", "0.1", "--save-every", "4",
          "--keep-last", "2", "--min-8bit-size", "1"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _train(run_dir: Path, cache: Path, *extra: str, nproc: int = 2) -> list[dict]:
    return train_metrics(run_dir, cache, *COMMON, *extra, nproc=nproc)


@pytest.fixture(scope="module")
def adamw8bit_run(tmp_path_factory, cache):
    run_dir = tmp_path_factory.mktemp("a8") / "run"
    return run_dir, _train(run_dir, cache, "--optimizer", "adamw8bit")


def test_local_shard_adamw_equals_torch_adamw_on_dtensors():
    """`--optimizer adamw` runs torch's fused kernel on the local shards: parameters and state equal
    torch's AdamW on the same row-sharded DTensors after 20 steps (uneven splits included), and the
    state it hands DCP is still DTensors."""
    proc = run_torchrun(REPO / "tests/workers/local_adamw_worker.py", 2)
    assert "per step: local shards" in proc.stdout


def test_adamw8bit_follows_adamw(adamw8bit_run, tmp_path, cache):
    reference = _train(tmp_path / "adamw", cache, "--optimizer", "adamw")
    _, ours = adamw8bit_run
    # 8-bit blockwise moments carry ~1% relative error per element, so each update differs from
    # AdamW's by well under 1% of its size; over 8 steps at lr 1e-3 the loss moves by ~0.5 and the
    # runs stay within 1e-3 of each other (observed ~8e-4 relative at most). An optimizer that
    # failed to update, or updated only one rank's shard, is off by >1e-2 from step 3 on.
    for ref, got in zip(reference, ours, strict=True):
        assert got["loss"] == pytest.approx(ref["loss"], rel=1e-3)
    assert ours[-1]["loss"] < ours[0]["loss"] - 0.2


def test_8bit_state_is_saved_sharded_with_full_shapes(adamw8bit_run):
    run_dir, _ = adamw8bit_run
    metadata = FileSystemReader(str(run_dir / "checkpoints" / "step-00000008")).read_metadata()
    items = metadata.state_dict_metadata
    key = "optim.state.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert tuple(items[f"{key}.state1"].size) == (8, 128)  # the full parameter, not one rank's half
    assert str(items[f"{key}.state1"].properties.dtype) == "torch.uint8"
    assert tuple(items[f"{key}.absmax1"].size) == (4,)  # 1024 elements / 256 per block
    assert f"{key}.step" in items
    assert len(list((run_dir / "checkpoints" / "step-00000008").glob("__*_0.distcp"))) == 2  # both ranks wrote


@pytest.mark.parametrize("sharding", ["fsdp", "ddp"])
def test_adamw8bit_resume_continues_identically(adamw8bit_run, tmp_path, cache, sharding):
    """Resumed from step 4 of the fsdp run, under the same layout or under --sharding ddp (whole
    parameters and 8-bit state on every rank, no DTensors: the blocks fall alike), the run is the
    uninterrupted one exactly (the gradient norms up to float64 summation order under ddp: it sums
    the squares per tensor, fsdp from the reduced buffer)."""
    run_dir, uninterrupted = adamw8bit_run
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoints" / "step-00000008")
    shutil.rmtree(resumed_dir / "adapter")
    (resumed_dir / "checkpoints" / "latest").write_text("step-00000004\n")
    rows = _train(resumed_dir, cache, "--optimizer", "adamw8bit", "--sharding", sharding)
    key = lambda r: (r["step"], r["loss"], r["lr"])  # noqa: E731
    assert [key(r) for r in rows] == [key(r) for r in uninterrupted]
    norms = [r["grad_norm"] for r in rows]
    expected = [r["grad_norm"] for r in uninterrupted]
    assert norms == (expected if sharding == "fsdp" else pytest.approx(expected, rel=1e-12))


@pytest.mark.gpu
@pytest.mark.parametrize("optimizer", ["paged_adamw", "paged_adamw8bit"])
def test_paged_optimizers_train_and_resume_on_gpu(tmp_path, cache, optimizer):
    rows = _train(tmp_path / "run", cache, "--optimizer", optimizer, nproc=1)
    assert len(rows) == 8 and rows[-1]["loss"] < rows[0]["loss"]
