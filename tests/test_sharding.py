"""--sharding fsdp | hsdp | ddp: layouts, placements, and the same training under each (real torchrun)."""

import json
import os
import socket
import subprocess
import sys

import pytest
from torch.distributed.tensor import Replicate, Shard

from fsdp_qlora.distributed.sharding import ShardingError, detect_nodes, resolve_layout
from fsdp_qlora.model.loader import local_row_range
from tests.conftest import REPO, run_torchrun, subprocess_env

STEPS = 6
COMMON = ["--max-steps", str(STEPS), "--context-length", "128", "--lora-dropout", "0", "--save-every", "0",
          "--log-every", "1"]


# ---- layouts --------------------------------------------------------------------------------
def test_resolve_layout():
    assert resolve_layout("fsdp", 4, environ={}).mesh_shape == (4,)
    hsdp = resolve_layout("hsdp", 4, 2, environ={})
    assert hsdp.mesh_shape == (2, 2) and hsdp.mesh_dim_names == ("dp_replicate", "dp_shard")
    ddp = resolve_layout("ddp", 4, environ={})
    assert ddp.mesh_shape == (4, 1) and ddp.shard == 1
    # auto: hsdp across nodes (from torchrun's LOCAL_WORLD_SIZE), fsdp on one node
    assert resolve_layout("auto", 8, environ={"LOCAL_WORLD_SIZE": "4"}).mesh_shape == (2, 4)
    assert resolve_layout("auto", 4, environ={"LOCAL_WORLD_SIZE": "4"}).strategy == "fsdp"
    assert resolve_layout("auto", 4, environ={"SLURM_JOB_ID": "7", "SLURM_NNODES": "2"}).mesh_shape == (2, 2)
    # auto with the whole model fitting each GPU: replicated, on one node or several, unless replica
    # groups are asked for; one rank has nothing to replicate
    assert resolve_layout("auto", 4, environ={}, replication_fits=True).mesh_shape == (4, 1)
    assert resolve_layout("auto", 8, environ={"LOCAL_WORLD_SIZE": "4"}, replication_fits=True).strategy == "ddp"
    assert resolve_layout("auto", 4, 2, environ={}, replication_fits=True).strategy == "hsdp"
    assert resolve_layout("auto", 1, environ={}, replication_fits=True).strategy == "fsdp"
    assert resolve_layout("fsdp", 4, environ={}, replication_fits=True).strategy == "fsdp"
    with pytest.raises(ShardingError, match="3 equal replica groups"):
        resolve_layout("hsdp", 4, 3, environ={})


def test_node_count_mismatch_is_one_clear_line():
    with pytest.raises(ShardingError, match="node-count mismatch.*2 nodes.*SLURM allocated 3"):
        detect_nodes(4, {"LOCAL_WORLD_SIZE": "2", "SLURM_JOB_ID": "1", "SLURM_NNODES": "3"})
    with pytest.raises(ShardingError, match="not a multiple of LOCAL_WORLD_SIZE"):
        detect_nodes(5, {"LOCAL_WORLD_SIZE": "2"})


class _Mesh:
    """Just what local_row_range reads of a DeviceMesh."""

    def __init__(self, sizes, coords):
        self.sizes, self.coords, self.ndim = sizes, coords, len(sizes)

    def size(self, dim=None):
        return self.sizes[dim] if dim is not None else int(torch_prod(self.sizes))

    def get_local_rank(self, dim=None):
        return self.coords[dim or 0]


def torch_prod(values):
    out = 1
    for v in values:
        out *= v
    return out


def test_local_row_range_follows_the_placements():
    # FSDP over 4: rank 3 owns the last quarter
    assert local_row_range(64, _Mesh([4], [3])) == (48, 64)
    # HSDP 2 x 2, [Replicate(), Shard(0)]: the dp_shard coordinate alone picks the rows
    assert local_row_range(64, _Mesh([2, 2], [1, 0]), [Replicate(), Shard(0)]) == (0, 32)
    assert local_row_range(64, _Mesh([2, 2], [0, 1]), [Replicate(), Shard(0)]) == (32, 64)
    # ddp = HSDP with a dp_shard dim of one: every row
    assert local_row_range(64, _Mesh([4, 1], [2, 0]), [Replicate(), Shard(0)]) == (0, 64)


def test_rendezvous_timeout_is_one_clear_line(tmp_path):
    """Rank 1 of 2 started without torchrun and without a rank 0: a one-line error, exit 2."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = subprocess_env(tmp_path / "cache")
    env.update(RANK="1", WORLD_SIZE="2", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port))
    env.pop("TORCHELASTIC_RUN_ID", None)
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "--rdzv-timeout-s", "3", "--output-dir",
                           str(tmp_path / "run"), *COMMON], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "rendezvous timeout after 3s" in proc.stderr and f"127.0.0.1:{port}" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_master_addr_is_one_clear_line(tmp_path):
    env = subprocess_env(tmp_path / "cache")
    env.update(RANK="0", WORLD_SIZE="2")
    for name in ("MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        env.pop(name, None)
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "--output-dir", str(tmp_path / "run"), *COMMON],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "MASTER_ADDR and MASTER_PORT not" in proc.stderr, proc.stderr[-2000:]


def test_unknown_sharding_is_rejected():
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "--sharding", "zero3"], cwd=REPO,
                          env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--sharding" in proc.stderr and "hsdp" in proc.stderr


# ---- the same training under each layout ----------------------------------------------------
@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _train(tmp_path_factory, cache, name: str, nproc: int, *flags: str) -> list[dict]:
    run_dir = tmp_path_factory.mktemp(name) / "run"
    proc = run_torchrun(REPO / "train.py", nproc, "--output-dir", str(run_dir), *COMMON, *flags,
                        env=subprocess_env(cache))
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    return rows, proc


def _close(a: list[dict], b: list[dict]) -> None:
    # Same data, same adapter init, same math; what differs: the NF4 second-level statistics
    # (one quantization slice per shard: 4 vs 2 vs 1 slices per weight), the reduction order
    # and bf16 rounding. Measured: |dloss| <= 4e-3 over these steps, grad norms within 0.5%.
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], abs=2e-2), (x, y)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=3e-2), (x, y)
    assert a[-1]["loss"] < a[0]["loss"] - 0.2 and b[-1]["loss"] < b[0]["loss"] - 0.2  # both learn


@pytest.mark.slow
def test_hsdp_2x2_matches_fsdp_4(tmp_path_factory, cache):
    hsdp, proc = _train(tmp_path_factory, cache, "hsdp", 4, "--sharding", "hsdp", "--replicate-groups", "2")
    assert "hsdp (dp_replicate=2 x dp_shard=2)" in proc.stdout + proc.stderr
    fsdp, _ = _train(tmp_path_factory, cache, "fsdp4", 4, "--sharding", "fsdp")
    _close(hsdp, fsdp)


@pytest.mark.slow
def test_auto_replicates_when_the_whole_model_fits_each_gpu(tmp_path, cache):
    """--sharding auto: the memory plan decides (train/plan_advice.py `auto_replicates`). A CPU run
    plans for no GPU and keeps FSDP2; given a GPU size the tiny model fits, the run replicates."""
    for flags, expected in ((["--gpu-memory-gib", "24"], "sharding: ddp (dp_replicate=2 x dp_shard=1) (auto: "
                                                          "the whole model fits each GPU)"),
                            ([], "sharding: fsdp (dp_shard=2)")):
        run_dir = tmp_path / ("gpu" if flags else "cpu") / "run"
        proc = run_torchrun(REPO / "train.py", 2, "--output-dir", str(run_dir), "--max-steps", "1",
                            "--context-length", "64", "--save-every", "0", *flags, env=subprocess_env(cache))
        assert expected in proc.stdout, proc.stdout[-2000:]


@pytest.mark.slow
def test_ddp_2_matches_fsdp_2(tmp_path_factory, cache):
    ddp, proc = _train(tmp_path_factory, cache, "ddp", 2, "--sharding", "ddp")
    assert "ddp (dp_replicate=2 x dp_shard=1)" in proc.stdout + proc.stderr
    fsdp, _ = _train(tmp_path_factory, cache, "fsdp2", 2, "--sharding", "fsdp")
    _close(ddp, fsdp)


# ---- FSDP units: the embeddings are freed after the lookup ----------------------------------
def test_embeddings_are_resharded_after_the_lookup(tmp_path):
    """Untied: the embeddings are their own unit, sharded again while the layers run and in
    backward, while lm_head (root) stays gathered. Tied: one weight, kept in the root."""
    from fsdp_qlora.model.tiny_llama import generate_llama

    models = {tied: generate_llama(tmp_path / f"tied-{tied}", {"tie_word_embeddings": tied}) for tied in (False, True)}
    run_torchrun(REPO / "tests/workers/unit_gather_worker.py", 2, str(tmp_path / "seen.json"),
                 *map(str, models.values()))
    seen = json.loads((tmp_path / "seen.json").read_text())
    for tied, model in models.items():
        for moment in ("forward", "backward"):
            expected = {"embeddings_sharded": not tied, "lm_head_sharded": False}
            assert seen[str(model)][moment] == expected, (tied, moment, seen)
        # ~ln(1024) for a random model: a real loss, and the adapters got gradients
        assert seen[str(model)]["loss"] == pytest.approx(7.0, abs=0.5) and seen[str(model)]["adapter_grads"] > 0


def test_gradient_norm_from_the_reduction_equals_the_gathered_gradients(tmp_path):
    """CPU --sharding fsdp: the clipping norm comes from the squares summed while FSDP2 reduces the
    gradients (no collective of its own), per-layer units and the model unit alike; it equals the
    norm of the all-gathered gradients and the collective path's; `take` resets it. ddp (nothing
    split, no reduce-scatter) has none: it keeps the model out of FSDP2 (distributed/replicate.py),
    with plain fp32 adapters that compute in the compute dtype and a gradient reducer of its own."""
    from fsdp_qlora.model.tiny_llama import generate_llama

    model = generate_llama(tmp_path / "tiny", {})
    run_torchrun(REPO / "tests/workers/reduced_squares_worker.py", 2, str(tmp_path / "norms.json"), str(model))
    seen = json.loads((tmp_path / "norms.json").read_text())
    assert seen.pop("ddp_has_reduced_squares") is False
    assert seen.pop("ddp_layout") == {"fsdp_modules": 0, "dtensor_adapters": 0, "adapter_dtypes": ["torch.float32"],
                                      "compute_dtypes": ["torch.bfloat16"], "gradient_all_reduce": True}
    for units, got in seen.items():
        # float64 sums of the same fp32 gradients' squares, in other orders: ~1e-16 relative
        assert got["from_reduction"] == pytest.approx(got["full"], rel=1e-12), (units, got)
        assert got["collective"] == pytest.approx(got["full"], rel=1e-12), (units, got)
        assert got["full"] > 0 and not got["taken_twice"], (units, got)



# ---- --sharding ddp: replicated adapters, their gradients all-reduced in buckets ---------------
def test_bucket_params_in_backward_order():
    """Reverse registration order (backward's), the first bucket small, the others larger."""
    import torch

    from fsdp_qlora.distributed.replicate import bucket_params

    params = [torch.nn.Parameter(torch.zeros(n)) for n in (8, 8, 8, 8, 8, 2)]  # 32 B each, the last 8 B
    buckets = bucket_params(params, first_bytes=32, bytes_per_bucket=64)
    assert [[next(i for i, q in enumerate(params) if q is p) for p in b] for b in buckets] == [[5, 4], [3, 2], [1, 0]]
    assert bucket_params(params, first_bytes=1 << 20, bytes_per_bucket=1 << 20) == [params[::-1]]


def test_replicated_gradients_are_the_mean_over_ranks_in_bucket_order(tmp_path):
    """2 gloo ranks: after an unsynced and a synced backward every gradient is the mean over the ranks
    of the accumulated sums; the all-reduces start in bucket order on both ranks although their
    gradients become ready in opposite orders (started in readiness order, gloo pairs mismatched
    buckets and the run fails); a parameter one rank did not use counts as zeros there; the reducer
    works again in the next backward."""
    run_torchrun(REPO / "tests/workers/gradient_all_reduce_worker.py", 2, str(tmp_path / "grads.json"), timeout=120)
    for rank in json.loads((tmp_path / "grads.json").read_text()):
        assert rank["buckets"] == [[5], [4, 3], [2, 1, 0]]
        assert rank["first_backward_local"] and all(rank["mean"]) and all(rank["again"]), rank



def test_pair_collectives_give_gloos_bits(tmp_path):
    """2 gloo ranks: the one-exchange sum (sync, async with several in flight, 0-d) and all-gather of
    distributed/pair.py equal gloo's all_reduce and all_gather_into_tensor bit for bit, with the
    synchronous exchanges through shared memory (one host: these two ranks) and through gloo; buffers
    larger than a shared-memory slot included. No mapping file is left in /dev/shm."""
    before = set(os.listdir("/dev/shm"))
    run_torchrun(REPO / "tests/workers/pair_worker.py", 2, str(tmp_path / "pair.json"), timeout=120)
    seen = json.loads((tmp_path / "pair.json").read_text())
    assert seen["is_pair"] is True
    for transport in ("shared memory", "gloo"):
        result = seen[transport]
        assert result["shared memory channel"] is (transport == "shared memory"), seen
        assert all(result["sums"].values()) and len(result["sums"]) == 6, seen
        assert all(result["gathers"].values()) and len(result["gathers"]) == 3, seen
    assert not [name for name in set(os.listdir("/dev/shm")) - before if name.startswith("fsdp_qlora-pair-")]


def test_shared_pair_exchanges_and_fails_fast_when_the_other_rank_exits(tmp_path):
    """distributed/shared_pair.py between this process and a child that maps the same file: one exchange
    (three slots' worth, so in chunks) gives each side the other's bytes; the child then exits, and the
    next exchange raises at once, as a closed gloo socket would, instead of spinning to the timeout."""
    from fsdp_qlora.distributed.shared_pair import SLOT_BYTES, SharedPair, _map, _mapping_bytes

    path = tmp_path / "pair-mapping"
    path.write_bytes(bytes(_mapping_bytes()))
    numel = (3 * SLOT_BYTES) // 4 + 5  # float32 elements: three chunks and a bit
    child = subprocess.Popen([sys.executable, "-c", f"""
import torch
from fsdp_qlora.distributed.shared_pair import SharedPair, _map
received = torch.empty({numel})
SharedPair(_map({str(path)!r}), 1, {os.getpid()}).exchange(torch.arange({numel}, dtype=torch.float32) * -1, received)
assert torch.equal(received, torch.arange({numel}, dtype=torch.float32)), "the child got other bytes"
"""], cwd=REPO, env=subprocess_env())
    import torch

    channel = SharedPair(_map(str(path)), 0, child.pid)
    received = torch.empty(numel)
    channel.exchange(torch.arange(numel, dtype=torch.float32), received)
    assert torch.equal(received, torch.arange(numel, dtype=torch.float32) * -1)
    assert child.wait(timeout=60) == 0
    with pytest.raises(RuntimeError, match=rf"the other rank of the pair \(pid {child.pid}\) exited"):
        channel.exchange(torch.zeros(4), torch.empty(4))
