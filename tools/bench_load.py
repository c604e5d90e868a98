"""Load time and host memory of the streaming NF4 load, on Llama-2-70B-shaped layers.

    python tools/bench_load.py                          # 2 layers of Llama-2-70B's shape, 2 ranks, workers 1 and 4
    python tools/bench_load.py --layers 4 --ranks 8 --workers 1 4 8
    python tools/bench_load.py --model /path/to/Llama-2-70b-hf --ranks 2   # a real checkpoint

No 70B checkpoint is needed: unless --model is given, a random model with Llama-2-70B's layer
shapes (hidden 8192, MLP 28672, 64/8 heads, vocab 32000) and --layers decoder layers is generated
once into the model cache (about 2.1 GB of bf16 safetensors per layer, plus 1 GB).

For each --workers value (`--load-workers` of train.py), --ranks ranks are started under
torchrun and, twice, the page cache of the shard files is dropped first (fsync +
posix_fadvise DONTNEED, so reads come from the disk as on a fresh node):
  * read: each rank reads its FSDP rows of every tensor and discards them: the I/O alone;
  * load: `build_qlora_model`, exactly as train.py does: read, quantize to NF4, install.
Reported per run: seconds (slowest rank), the node's read rate (bf16 bytes all ranks read /
seconds), each rank's peak host-RSS growth during the load and what it keeps afterwards (its
NF4 shard; on a GPU that lives on the device, so host RAM needs only the transient part), and an
extrapolation to Llama-2-70B's 80 layers (137.9 GB of bf16) at the measured rates.
On a CPU-only machine NF4 quantization runs on the CPU (~20 M weights/s per core) and dominates
the load; on a GPU it is negligible and the read rate bounds the load.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from fsdp_qlora.config import TrainConfig
from fsdp_qlora.model.cache import default_cache_dir
from fsdp_qlora.model.sources import safetensors_files
from fsdp_qlora.train.planner import KNOWN_CONFIGS

LLAMA2_70B = KNOWN_CONFIGS["llama-70b"]
LLAMA2_70B_BF16_BYTES = 68_976_648_192 * 2  # parameters of Llama-2-70B (HF config) in bf16
SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "vocab_size",
              "tie_word_embeddings")


def ensure_model(layers: int) -> Path:
    from fsdp_qlora.model.tiny_llama import generate_llama

    model_dir = default_cache_dir() / f"bench-load-llama2-70b-shape-{layers}-layers"
    if not model_dir.is_dir():
        print(f"generating {model_dir} (once) ...", flush=True)
        overrides = {key: LLAMA2_70B[key] for key in SHAPE_KEYS}
        generate_llama(model_dir, {**overrides, "num_hidden_layers": layers}, max_shard_bytes=2 << 30)
    return model_dir


def drop_page_cache(files: list[Path]) -> None:
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# ---- one rank (under torchrun) -----------------------------------------------------------------
def _slowest(seconds: float) -> float:
    value = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return float(value)


def _timed_phase(files: list[Path], rank: int, work) -> float:
    if rank == 0:
        drop_page_cache(files)
    dist.barrier()
    started = time.perf_counter()
    work()
    return _slowest(time.perf_counter() - started)


def read_only(files: list[Path], mesh, workers: int) -> int:
    """Read this rank's rows (as the loader splits them over the mesh) of every tensor; bytes read."""
    from fsdp_qlora.model.loader import READ_AHEAD_BYTES, local_row_range
    from fsdp_qlora.model.shard_reader import RowRange, RowReader, read_ahead, read_index

    ranges = [RowRange(entry, *local_row_range(entry.rows, mesh))
              for file in files for entry in read_index(file).values()]
    with RowReader(workers) as reader:
        for _ in read_ahead(ranges, reader, READ_AHEAD_BYTES):
            pass
    return sum(r.nbytes for r in ranges)


def worker(model_dir: Path, workers: int, result: Path) -> None:
    from fsdp_qlora.distributed.env import init_distributed, shutdown
    from fsdp_qlora.distributed.sharding import build_mesh
    from fsdp_qlora.metrics.system import peak_rss, reset_peak_rss
    from fsdp_qlora.model.loader import local_weight_bytes
    from fsdp_qlora.train.build import build_qlora_model

    env = init_distributed()
    mesh = build_mesh(env)
    files = safetensors_files(model_dir)
    read_bytes = torch.tensor([0], dtype=torch.int64)
    read_s = _timed_phase(files, env.rank, lambda: read_bytes.add_(read_only(files, mesh, workers)))
    dist.all_reduce(read_bytes)
    # per-layer units: each rank keeps its shard (the model unit would gather the whole base after the load)
    cfg = TrainConfig(model=str(model_dir), load_workers=workers, fsdp_units="layer")
    model = []
    baseline = reset_peak_rss()
    load_s = _timed_phase(files, env.rank, lambda: model.append(build_qlora_model(model_dir, cfg, env, mesh)))
    figures = {"peak_growth": peak_rss() - baseline, "held": local_weight_bytes(model[0])}
    gathered = [None] * env.world_size
    dist.all_gather_object(gathered, figures)
    if env.rank == 0:
        result.write_text(json.dumps({"read_s": read_s, "read_bytes": int(read_bytes), "load_s": load_s,
                                      "ranks": gathered}))
    shutdown()


# ---- driver ------------------------------------------------------------------------------------
def run(model_dir: Path, ranks: int, workers: int, result: Path) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
           __file__, "--worker", str(result), "--model", str(model_dir), "--workers", str(workers)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"bench_load: the {ranks}-rank load failed:\n{proc.stderr[-4000:]}")
    return json.loads(result.read_text())


def report(model_dir: Path, ranks: int, runs: dict[int, dict]) -> str:
    config = json.loads((model_dir / "config.json").read_text())
    layers = config["num_hidden_layers"]
    gib, gb = 2**30, 1e9
    lines = [f"model: {model_dir.name} ({layers} layers), {ranks} ranks, device: "
             f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}", "",
             "| workers | read s | read GB/s (node) | load s | load s / layer | peak RSS growth / rank GiB "
             "| kept / rank GiB | transient / rank GiB | 70B read-bound s | 70B load s (this machine) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for workers, r in runs.items():
        rate = r["read_bytes"] / r["read_s"]
        growth = max(x["peak_growth"] for x in r["ranks"])
        kept = max(x["held"] for x in r["ranks"])
        transient = max(x["peak_growth"] - x["held"] for x in r["ranks"])
        per_layer = r["load_s"] / layers  # embeddings/lm_head included: an over-estimate per layer
        lines.append(f"| {workers} | {r['read_s']:.1f} | {rate / gb:.2f} | {r['load_s']:.1f} | {per_layer:.1f} "
                     f"| {growth / gib:.2f} | {kept / gib:.2f} | {transient / gib:.2f} "
                     f"| {LLAMA2_70B_BF16_BYTES / rate:.0f} | {per_layer * LLAMA2_70B['num_hidden_layers']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="", help="a model directory (default: generate 70B-shaped layers)")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of the generated model")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 4], help="--load-workers values to compare")
    parser.add_argument("--json", default="", help="also write the raw figures to this file")
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(Path(args.model), args.workers[0], Path(args.worker))
        return
    model_dir = Path(args.model) if args.model else ensure_model(args.layers)
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_load-{os.getpid()}.json"
    runs = {workers: run(model_dir, args.ranks, workers, out) for workers in args.workers}
    out.unlink(missing_ok=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"model": str(model_dir), "ranks": args.ranks, "runs": runs}, indent=1))
    print(report(model_dir, args.ranks, runs))


if __name__ == "__main__":
    main()
