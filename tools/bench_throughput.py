"""Training throughput of our FSDP2 QLoRA run against Hugging Face transformers + PEFT, in one run.

    python tools/bench_throughput.py --steps 30 --warmup 5 --nproc 2 \
        [--model tiny-llama] [--batch-size 4] [--context-length 256] [--repeats 2] [--json out.json]

Ours (``--ours``): ``torchrun --standalone --nproc_per_node N train.py ...`` (N ranks, one thread
each, as torchrun sets it); its tokens/s is read from the run's metrics.jsonl. ``ours`` is the command
with ``--sharding fsdp`` (FSDP2 over the N ranks; the defaults on CPU, while on a GPU the whole model
fits ``--sharding auto`` replicates), ``ours-ddp`` with ``--sharding ddp`` (the model replicated
outside FSDP2, only the adapters' gradients all-reduced): our two layouts. ``-compile``
adds ``--compile``; ``ours-layer-units`` pins the schedule the defaults had before the planner chose
it (a unit per layer, dequantizing twice), for before/after comparisons.

Peers: ``get_peft_model`` on the same model directory with a plain training loop (the leanest
HF setup; the Trainer only adds overhead), the same data pipeline and tokenization
(``fsdp_qlora.data.sft``), the same global batch of N x B sequences per optimizer step, LoRA with
the run's rank / alpha / target modules, torch AdamW with the run's LR schedule and gradient
clipping, and our run's compute dtype (bf16 here; fp32 where `--compute-dtype auto` resolves to it). Variants (``--peers``):

* ``bf16``     one process, N threads, batch N x B, bf16 base (plain LoRA)
* ``nf4``      the same on a bitsandbytes 4-bit NF4 base with double quantization (QLoRA)
* ``bf16-ddp`` / ``nf4-ddp``   N processes x 1 thread under torchrun + DDP (gloo), batch B each:
  the same process layout as ours
* ``bf16-ddp-compile`` / ``nf4-ddp-compile``   the same under ``torch.compile(DDP(model))``; a peer
  that cannot compile (bitsandbytes' 4-bit layers fail in inductor on CPU) shows as skipped, with why

On a CUDA machine ours and the ``-ddp`` peers run one rank per GPU (NCCL) and the single-process
peers are skipped (one process would get one GPU where ours gets N); that path is untested so far.

Every variant runs in its own subprocess, so its thread setting is clean. Throughput is counted
the same way everywhere: global input tokens (attention_mask sum) per optimizer-step wall time
(data fetch to scheduler step), median over the steps after ``--warmup``. ``--repeats R`` runs the
whole set R times in turn (ours first each time) and reports the median of the per-repeat
medians, which evens out drift on a shared machine.

CPU figures are context only: the project quotes absolute throughput from GPUs; on CPU the
ratio against the peer measured in the same run is the figure that means something.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fsdp_qlora.peft.targets import peft_target_modules

REPO = Path(__file__).resolve().parents[1]

PEERS = {
    # name: (base, layout, description); a "-compile" peer is the same under torch.compile
    "bf16": ("bf16", "single", "HF PEFT LoRA, bf16 base"),
    "nf4": ("nf4", "single", "HF PEFT QLoRA, bnb NF4 base"),
    "bf16-ddp": ("bf16", "ddp", "HF PEFT LoRA, bf16 base, DDP"),
    "nf4-ddp": ("nf4", "ddp", "HF PEFT QLoRA, bnb NF4 base, DDP"),
    "bf16-ddp-compile": ("bf16", "ddp", "HF PEFT LoRA, bf16 base, DDP, torch.compile"),
    "nf4-ddp-compile": ("nf4", "ddp", "HF PEFT QLoRA, bnb NF4 base, DDP, torch.compile"),
}
DEFAULT_PEERS = "bf16,nf4,bf16-ddp,nf4-ddp"


# ---- statistics --------------------------------------------------------------------------------
def summarize(tokens_per_sec: list[float]) -> dict[str, float]:
    """Median and quartiles of per-step tokens/s (the steps after warmup)."""
    if not tokens_per_sec:
        raise ValueError("no steps after warmup: raise --steps or lower --warmup")
    ordered = sorted(tokens_per_sec)
    quartiles = statistics.quantiles(ordered, n=4) if len(ordered) > 1 else [ordered[0]] * 3
    return {"median": statistics.median(ordered), "p25": quartiles[0], "p75": quartiles[2], "steps": len(ordered)}


def read_ours_metrics(metrics_path: Path, warmup: int) -> dict:
    """Per-step tokens/s of our run after warmup, plus the first and last logged loss."""
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    rows = [row for row in rows if "tokens_per_sec" in row]
    if not rows:
        raise ValueError(f"{metrics_path} holds no tokens_per_sec rows")
    return {"tokens_per_sec": [row["tokens_per_sec"] for row in rows if row["step"] > warmup],
            "first_loss": rows[0]["loss"], "last_loss": rows[-1]["loss"], "logged_steps": len(rows)}


# ---- ours --------------------------------------------------------------------------------------
def _env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")])))
    return env


OURS = {
    # name: (extra train.py flags, description)
    # --sharding fsdp, not auto's choice: on a GPU the whole model fits, auto would replicate (ours-ddp)
    "ours": (("--sharding", "fsdp"), "ours: FSDP2 QLoRA, NF4Tensor base"),
    "ours-ddp": (("--sharding", "ddp"), "ours --sharding ddp"),
    "ours-compile": (("--sharding", "fsdp", "--compile"), "ours --compile"),
    "ours-ddp-compile": (("--sharding", "ddp", "--compile"), "ours --sharding ddp --compile"),
    # the schedule the defaults had before the planner chose it (issue 16): a unit per layer,
    # every NF4 weight dequantized in forward and again in backward
    "ours-layer-units": (("--sharding", "fsdp", "--fsdp-units", "layer", "--no-dequantize-once"),
                         "ours, per-layer units, dequantizing twice"),
}


def ours_command(args, output_dir: Path | str, extra: tuple[str, ...] = ()) -> list[str]:
    return ["torchrun", "--standalone", "--nproc_per_node", str(args.nproc), "train.py",
            "--model", args.model, "--max-steps", str(args.steps), "--batch-size", str(args.batch_size),
            "--context-length", str(args.context_length), "--output-dir", str(output_dir),
            "--log-every", "1", "--lora-dropout", "0", *extra]


def run_ours(name: str, args, workdir: Path) -> tuple[dict, dict]:
    """Run train.py under torchrun (N ranks x 1 thread); returns (result, the run's resolved config)."""
    import yaml

    output_dir = workdir / name
    shutil.rmtree(output_dir, ignore_errors=True)
    cmd = ours_command(args, output_dir, OURS[name][0])
    cmd[0:1] = [sys.executable, "-m", "torch.distributed.run"]  # the torchrun of this interpreter
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=_env(1), capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    result = read_ours_metrics(output_dir / "metrics.jsonl", args.warmup)
    result["wall_s"] = time.perf_counter() - started
    result["loadavg_1min_after"] = os.getloadavg()[0]
    config = yaml.safe_load((output_dir / "config.yaml").read_text())
    return result, config


# ---- peers (parent side) -----------------------------------------------------------------------
def run_peer(name: str, args, config: dict, model_dir: Path, workdir: Path) -> dict:
    base, layout, _ = PEERS[name]
    out = workdir / f"peer-{name}.json"
    out.unlink(missing_ok=True)
    threads = args.nproc if layout == "single" else 1
    # One JSON argument: torchrun's own parser would take e.g. --nproc as an abbreviation of its flags.
    spec = {"base": base, "out": str(out), "model_dir": str(model_dir), "config": config, "threads": threads,
            "compile": name.endswith("-compile"),
            "steps": args.steps, "batch_size": args.batch_size, "nproc": args.nproc,
            "context_length": args.context_length}
    worker = [str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    if layout == "single":
        cmd = [sys.executable, *worker]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
               *worker]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=_env(threads), capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0 or not out.is_file():
        tail = (proc.stdout[-1500:] + proc.stderr[-3000:]).strip()
        return {"error": f"exit {proc.returncode}: {tail.splitlines()[-1] if tail else ''}", "log_tail": tail}
    result = json.loads(out.read_text())
    if "skipped" not in result:
        per_step = [t / s for t, s in zip(result["tokens_per_step"], result["step_seconds"])]
        result["tokens_per_sec"] = per_step[args.warmup:]
        result["wall_s"] = time.perf_counter() - started
        result["loadavg_1min_after"] = os.getloadavg()[0]
    return result


# ---- peers (worker side: runs in its own process) ----------------------------------------------
def worker_main(spec: dict) -> int:
    import torch

    torch.set_num_threads(spec["threads"])
    import torch.distributed as dist
    from transformers import AutoTokenizer, get_cosine_schedule_with_warmup

    from fsdp_qlora.data.sft import build_dataloader, load_instruction_dataset

    cfg = spec["config"]
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    use_cuda = torch.cuda.is_available()
    if use_cuda and not distributed:  # one process would get one GPU where ours gets N
        Path(spec["out"]).write_text(json.dumps({"skipped": "single-process peers are CPU-only: use the -ddp peers"}))
        return 0
    if distributed:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if use_cuda else "gloo")
        rank, world_size = dist.get_rank(), dist.get_world_size()
        batch_size = spec["batch_size"]  # N processes x B: the same layout as ours
    else:
        device, rank, world_size = torch.device("cpu"), 0, 1
        batch_size = spec["batch_size"] * spec["nproc"]  # one process, the whole global batch
    result = {"threads": torch.get_num_threads(), "processes": world_size, "micro_batch": batch_size}
    try:
        model = _load_peer_model(spec["base"], Path(spec["model_dir"]), cfg, device)
    except Exception as err:  # e.g. bitsandbytes 4-bit loading unsupported on this machine
        if rank == 0:
            Path(spec["out"]).write_text(json.dumps({"skipped": f"{type(err).__name__}: {err}"}))
        return 0
    result["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result["linear_type"] = type(model.base_model.model.model.layers[0].mlp.up_proj.base_layer).__name__
    if distributed:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[device.index] if use_cuda else None)
    if spec["compile"]:  # compile(DDP(model)): DDP's documented order (graphs split at its buckets)
        model = torch.compile(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"], betas=(0.9, 0.999))
    scheduler = get_cosine_schedule_with_warmup(optimizer, cfg["warmup_steps"], spec["steps"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    dataset = load_instruction_dataset(cfg["dataset"])

    def batches():
        epoch = 0
        while True:
            yield from build_dataloader(dataset, tokenizer, spec["context_length"], batch_size, rank, world_size,
                                        cfg["seed"], epoch=epoch)
            epoch += 1

    stream = batches()
    step_seconds, tokens, positions, losses = [], [], [], []
    model.train()
    for step in range(spec["steps"]):
        started = time.perf_counter()
        batch = {k: v.to(device) for k, v in next(stream).items()}
        try:
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                        use_cache=False)
        except Exception as err:  # e.g. torch.compile of bitsandbytes' 4-bit layers (docs/benchmarks.md)
            if step or not spec["compile"]:
                raise
            if rank == 0:
                first_line = str(err).strip().splitlines()[-1] if str(err).strip() else ""
                Path(spec["out"]).write_text(json.dumps({"skipped": f"torch.compile fails: {type(err).__name__}: "
                                                                    f"{first_line[:160]}"}))
            return 0
        out.loss.backward()
        if cfg["max_grad_norm"] > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg["max_grad_norm"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        loss = out.loss.item()  # waits for the device, as ours does
        step_seconds.append(time.perf_counter() - started)
        # outside the timed region: global input tokens and padded positions of this step
        counts = torch.tensor([float(batch["attention_mask"].sum()), float(batch["input_ids"].numel()), loss],
                              device=device)
        if distributed:
            dist.all_reduce(counts)
        tokens.append(counts[0].item())
        positions.append(counts[1].item())
        losses.append(counts[2].item() / world_size)  # mean of the ranks' mean losses
    result.update(step_seconds=step_seconds, tokens_per_step=tokens, positions_per_step=positions,
                  first_loss=losses[0], last_loss=losses[-1])
    if rank == 0:
        Path(spec["out"]).write_text(json.dumps(result))
    if distributed:
        dist.barrier()
        # Not destroy_process_group() and an interpreter exit: gloo's teardown now and then hangs a
        # rank after its result is written (2026-12-05: rank 0 stuck in a futex for minutes, the
        # repeat lost; the gloo teardown race of pytorch#179291). Nothing is left to flush.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def _load_peer_model(base: str, model_dir: Path, cfg: dict, device):
    import logging

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from fsdp_qlora.train.precision import resolve_compute_dtype

    # The compute dtype our run resolved (--compute-dtype, auto by default): both sides compute alike.
    dtype = resolve_compute_dtype(cfg.get("compute_dtype", "bf16"), device)
    kwargs = {"dtype": dtype}
    if base == "nf4":
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
        kwargs["device_map"] = {"": str(device)}  # bitsandbytes quantizes as the weights land there
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if base != "nf4":
        model = model.to(device)
    # No prepare_model_for_kbit_training: it would upcast norms, embeddings and lm_head to fp32,
    # while ours keeps everything but the adapters in bf16. PEFT keeps the adapters in fp32
    # (autocast_adapter_dtype), as ours does.
    lora = LoraConfig(r=cfg["lora_rank"], lora_alpha=cfg["lora_alpha"], lora_dropout=0.0,
                      target_modules=peft_target_modules(list(cfg["lora_target_modules"])), bias="none",
                      task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


# ---- padding of ours (for the report) ----------------------------------------------------------
def ours_positions(args, config: dict, model_dir: Path) -> list[float]:
    """Padded positions per step of our run (each rank pads its own B rows), first --steps steps."""
    from transformers import AutoTokenizer

    from fsdp_qlora.data.sft import build_dataloader, load_instruction_dataset

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dataset = load_instruction_dataset(config["dataset"])
    per_rank = []
    for rank in range(args.nproc):
        loader = build_dataloader(dataset, tokenizer, args.context_length, args.batch_size, rank, args.nproc,
                                  config["seed"])
        per_rank.append([float(b["input_ids"].numel()) for _, b in zip(range(args.steps), loader)])
    return [sum(step) for step in zip(*per_rank)]


# ---- report ------------------------------------------------------------------------------------
def combine(repeats: list[dict], ours_names: list[str]) -> dict:
    """Median over repeats of each variant's per-repeat median, and of each ours/peer ratio per repeat."""
    combined = {}
    for name in repeats[0]:
        runs = [r[name] for r in repeats]
        bad = next((run for run in runs if "summary" not in run), None)
        if bad is not None:
            combined[name] = {"skipped": bad["skipped"]} if "skipped" in bad else {"error": bad.get("error", "failed")}
            continue
        entry = {"median": statistics.median(run["summary"]["median"] for run in runs),
                 "per_repeat": [run["summary"] for run in runs], "ratios": {}}
        for ours in ours_names:
            ratios = [r[ours]["summary"]["median"] / run["summary"]["median"]
                      for r, run in zip(repeats, runs) if "summary" in r[ours]]
            if ratios:
                entry["ratios"][ours] = {"median": statistics.median(ratios), "per_repeat": ratios}
        combined[name] = entry
    return combined


def layouts(args) -> dict[str, str]:
    out = {name: (f"{args.nproc} ranks x 1 thread, replicated (DDP-like), batch {args.batch_size}/rank"
                  if "ddp" in flags else f"{args.nproc} ranks x 1 thread, FSDP2 full shard, batch {args.batch_size}/rank")
           for name, (flags, _) in OURS.items()}
    for name, (_, kind, _) in PEERS.items():
        out[name] = (f"1 process x {args.nproc} threads, batch {args.batch_size * args.nproc}" if kind == "single"
                     else f"{args.nproc} processes x 1 thread, DDP, batch {args.batch_size}/process")
    return out


def format_table(combined: dict, repeats: list[dict], args, ours_names: list[str]) -> str:
    label = {**{n: d for n, (_, d) in OURS.items()}, **{n: f"peer {n}: {d}" for n, (_, _, d) in PEERS.items()}}
    layout = layouts(args)
    ratio_heads = " | ".join(f"{o}/peer" for o in ours_names)
    spread_head = "tokens/s median [p25-p75]" if len(repeats) == 1 else "tokens/s median (per repeat)"
    lines = [f"| variant | layout | {spread_head} | {ratio_heads} | padding "
             f"| loss step 1 -> {args.steps} |",
             "| --- | --- | ---: | " + " | ".join("---:" for _ in ours_names) + " | ---: | --- |"]
    for name, entry in combined.items():
        if "median" not in entry:
            why = f"skipped: {entry['skipped']}" if "skipped" in entry else f"failed: {entry['error']}"
            lines.append(f"| {label[name]} | {layout[name]} | {why[:200]} | " + " | " * len(ours_names) + " |")
            continue
        last = repeats[-1][name]
        if len(repeats) == 1:  # the quartiles of the per-step figures
            quart = entry["per_repeat"][0]
            spread = f"{entry['median']:,.0f} [{quart['p25']:,.0f}-{quart['p75']:,.0f}]"
        else:  # the median of the per-repeat medians, then each of them
            each = " / ".join(f"{r['median']:,.0f}" for r in entry["per_repeat"])
            spread = f"{entry['median']:,.0f} ({each})"
        ratios = " | ".join("-" if name in ours_names else
                            (f"{entry['ratios'][o]['median']:.2f}" if o in entry["ratios"] else "n/a")
                            for o in ours_names)
        pad = last.get("pad_overhead")
        pad_text = f"{pad:+.0%}" if pad is not None else "n/a"
        lines.append(f"| {label[name]} | {layout[name]} | {spread} | {ratios} | {pad_text} | "
                     f"{last['first_loss']:.3f} -> {last['last_loss']:.3f} |")
    return "\n".join(lines)


def _split(value: str, known: dict, flag: str, parser) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(f"{flag}: unknown {', '.join(unknown)} (known: {', '.join(known)})")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_throughput.py", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per variant")
    parser.add_argument("--warmup", type=int, default=5, help="leading steps left out of the median")
    parser.add_argument("--nproc", type=int, default=2, help="our ranks (= the peers' threads or processes)")
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per rank per step (global: x nproc)")
    parser.add_argument("--context-length", type=int, default=256)
    parser.add_argument("--peers", default=DEFAULT_PEERS, help=f"comma-separated subset of {', '.join(PEERS)}")
    parser.add_argument("--ours", default="ours,ours-ddp",
                        help=f"comma-separated subset of {', '.join(OURS)}")
    parser.add_argument("--repeats", type=int, default=1, help="run the whole set this many times in turn")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per subprocess")
    parser.add_argument("--json", default="", help="also write the results here")
    parser.add_argument("--keep", default="", help="keep run directories under this folder (default: a temp dir)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one peer run (a JSON spec)
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(json.loads(args.worker))
    peers = _split(args.peers, PEERS, "--peers", parser)
    ours_names = _split(args.ours, OURS, "--ours", parser)
    if not ours_names or args.steps <= args.warmup or args.nproc < 1 or args.repeats < 1:
        parser.error("need at least one --ours variant, --steps > --warmup, --nproc >= 1, --repeats >= 1")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from fsdp_qlora.model.sources import resolve_model

    model_dir = resolve_model(args.model)  # generate / download once, before any timed run
    workdir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_throughput-"))
    workdir.mkdir(parents=True, exist_ok=True)
    repeats, ours_pos = [], None
    load_before = os.getloadavg()
    try:
        for repeat in range(args.repeats):
            results: dict[str, dict] = {}
            config = None
            for name in ours_names:
                print(f"[repeat {repeat + 1}/{args.repeats}] {name} ...", file=sys.stderr, flush=True)
                results[name], config = run_ours(name, args, workdir)
                results[name]["summary"] = summarize(results[name]["tokens_per_sec"])
            if ours_pos is None:
                ours_pos = ours_positions(args, config, model_dir)
            for name in peers:
                print(f"[repeat {repeat + 1}/{args.repeats}] peer {name} ...", file=sys.stderr, flush=True)
                peer = run_peer(name, args, config, model_dir, workdir)
                if "tokens_per_sec" in peer:
                    peer["summary"] = summarize(peer["tokens_per_sec"])
                    peer["pad_overhead"] = sum(peer["positions_per_step"]) / sum(peer["tokens_per_step"]) - 1
                results[name] = peer
            # ours sees the same sequences per step as every peer (same sampler, seed and global batch)
            peer_tokens = next((r["tokens_per_step"] for r in results.values() if r.get("tokens_per_step")), None)
            if peer_tokens:
                for name in ours_names:
                    results[name]["pad_overhead"] = sum(ours_pos) / sum(peer_tokens[: len(ours_pos)]) - 1
            repeats.append(results)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    combined = combine(repeats, ours_names)
    command = "python tools/bench_throughput.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"\nmodel {args.model}, global batch {args.nproc * args.batch_size} sequences/step, {args.steps} steps, "
          f"median of steps {args.warmup + 1}..{args.steps}, {args.repeats} repeat(s); "
          f"load average (1 min) {load_before[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end")
    for name in ours_names:
        print(f"{name}: {' '.join(ours_command(args, '<tmp>', OURS[name][0]))}")
    print(format_table(combined, repeats, args, ours_names))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "command": command, "model": args.model, "model_dir": str(model_dir), "nproc": args.nproc,
            "batch_size": args.batch_size, "context_length": args.context_length, "steps": args.steps,
            "warmup": args.warmup, "layouts": layouts(args), "loadavg_start": load_before[0],
            "loadavg_end": os.getloadavg()[0], "combined": combined,
            "repeats": [{name: {k: v for k, v in run.items() if k != "log_tail"} for name, run in r.items()}
                        for r in repeats]}, indent=1))
    return 1 if any("error" in entry for entry in combined.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
