"""GPU truth in one prepared command (issue 17): every figure the project's GPU claims rest on.

    python tools/gpu_check.py --output-dir OUT               # on one GPU: real sizes, ~6 min, no download
    python tools/gpu_check.py --output-dir OUT --dry-run     # every step at toy size on CPU (CI, ~1 min)
    python tools/gpu_check.py --output-dir OUT --steps claim,planner --budget-s 300

Each step runs in subprocesses, each with its own time limit (and all within --budget-s), and its
results go to OUT/gpu_check.md (a section appended per step) and OUT/gpu_check.json (rewritten after
every step, the step in flight marked "running"), the processes' output to OUT/gpu_check.log. A
worker writes each figure the moment it has it, so a step stopped at its limit still leaves what it
measured. Every model is built with --synthetic-weights (fsdp_qlora/model/synthetic.py): no checkpoint,
no download; the bitsandbytes peer likewise starts from transformers' random init. It needs the project's
dependencies (bitsandbytes and datasets among them) and peft; a machine without them takes wheels
(docs/benchmarks.md, GPU figures).

Steps (status pass / fail (a check failed) / error / timeout / skipped, and seconds, for each):

* ``claim``: Llama-2-70B QLoRA on 2 x 24 GB, on one GPU. What one of two FSDP ranks holds is emulated by
  one process training a model with Llama-2-70B's layer shapes and half its layers (40): under FSDP2 a
  rank holds half of each of the 80 layers' NF4 weights, adapters, gradients and AdamW state, exactly
  the bytes of 40 whole layers, and gathers the same whole layers (the current and the prefetched one;
  FSDP2 allocates the gathered copy at one rank too). What differs, and is corrected: the emulation holds
  the whole embeddings and lm_head where a rank holds half (+0.49 GiB, exact), and keeps 40 layers' saved
  activations where a rank keeps 80 (with activation offload only two layers' are on the GPU either way).
  The planner's difference Δ = plan(80 layers, 2 ranks) - plan(40 layers, 1 rank) is allocated as ballast
  from the second step on (the steady state) when positive, or added to the allocator's limit when
  negative, so the run is held to what a rank would hold. Its error: Δ's static parts are exact
  (tests/test_planner.py); its modelled part, printed per run, is the 40 missing layers' saved boundaries
  (batch x context x hidden in bf16 each) and the offload staging buffer, and the planner step checks
  the model of activations within 10% on this GPU, so the emulation errs by at most 10% of that part:
  ~0 with activation offload (two layers' boundaries on the GPU either way), under 0.5 GiB at context
  8192 without it (4.8 GiB of boundaries). Not emulated:
  NCCL's buffers (inside the 0.75 GiB overhead below) and the 2-rank all-gather latency (speed only).
  The process is capped with `torch.cuda.set_per_process_memory_fraction` to 24 GiB less the planner's
  0.75 GiB runtime overhead (CUDA context, workspaces, NCCL), as a 24 GB card leaves its allocator;
  the cap bounds reserved memory, so allocator fragmentation counts. Three runs, each a few steps at
  batch 1 (configs/llama-70b-2x24gb.yaml's settings): context 2048 with activation offload and no CPU
  offload (the recipe), the same with --cpu-offload (its fallback), context 8192 with --cpu-offload.
  Pass: every step ran under the cap with a finite loss.
* ``planner``: the planner's predicted peak against `torch.cuda.max_memory_allocated` of the second
  of two real steps (forward with the chunked loss, backward, clipping, AdamW; the first step makes
  the optimizer state), for dense and mixture-of-experts models with and without checkpointing,
  activation offload and CPU offload. Pass: within 10% each.
* ``gpu_tests``: the suite's ``gpu``-marked tests (CPU offload, paged optimizers) with pytest.
* ``throughput``: tokens/s of our QLoRA step against HF PEFT + bitsandbytes (NF4, double quantization,
  bf16 compute; `get_peft_model` on transformers' model with bitsandbytes' Linear4bit layers, as
  `from_pretrained(quantization_config=...)` builds it) on the same GPU, model shape (Llama-2-7B),
  batch (2 x 2048 random tokens, no padding), LoRA (r 8 on every linear, no dropout), AdamW and
  clipping; median over the steps after warm-up (tools/bench_throughput.py's `summarize`).
* ``load_speed``: NF4 quantization throughput on the device on Llama-2-70B's layer shapes (and the
  synthetic draw's), the host-to-device copy rate, the rate at which the project's reader reads a
  safetensors file from this machine's disk with a cold page cache (tools/bench_load.py's
  `drop_page_cache`), and what they imply for loading all of Llama-2-70B on 2 ranks, each reading and
  quantizing its own rows (the loader overlaps reads with quantization, so the slowest of the three
  bounds it).

``--dry-run`` runs every step's code at toy sizes on CPU (no cap, no CPU offload, FSDP2's memory
tracker instead of max_memory_allocated): its figures check the bookkeeping, they are not measurements.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import hashlib
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30
DEFAULT_BUDGET_S = 450  # the whole command within 8 minutes on the lent GPU, start-up and copies aside
CAP_GIB = 24.0
TOLERANCE = 0.10
MARKDOWN, JSON_FILE, LOG = "gpu_check.md", "gpu_check.json", "gpu_check.log"

# ---- model shapes (config.json values; the aliases' from the registry) --------------------------
TINY = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1024, "max_position_embeddings": 4096}
TINY_MOE = {**TINY, "model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 2}


def alias(name: str, **overrides: Any) -> dict[str, Any]:
    from fsdp_qlora.model.registry import alias_config

    return {**alias_config(name), **overrides}


# ---- the plan: steps, their runs and time limits ------------------------------------------------
@dataclasses.dataclass
class Run:
    label: str
    kind: str  # the worker: planner | claim | ours | peer | load | pytest
    spec: dict[str, Any]
    timeout_s: float


@dataclasses.dataclass
class Step:
    name: str
    title: str
    runs: list[Run]


def planner_cases(dry: bool) -> list[dict[str, Any]]:
    """(label, config, TrainConfig settings) of the planner check: dense and MoE, checkpointing, offloads."""
    dense = TINY if dry else alias("llama-2-7b", num_hidden_layers=8)
    mixtral = TINY_MOE if dry else alias("mixtral-8x7b", num_hidden_layers=2)
    many = {**TINY_MOE, "num_local_experts": 8} if dry else alias("qwen3-30b-a3b", num_hidden_layers=4)
    shape = {"batch_size": 1, "context_length": 128} if dry else {"batch_size": 2, "context_length": 2048}
    moe_shape = {"batch_size": 1, "context_length": 128} if dry else {"batch_size": 1, "context_length": 2048}
    ckpt = {"activation_checkpointing": True}
    names = ("toy Llama", "toy Mixtral", "toy Mixtral, 8 experts") if dry else \
        ("Llama-2-7B x8 layers", "Mixtral-8x7B x2 layers", "Qwen3-30B-A3B x4 layers")
    return [
        {"label": f"dense ({names[0]})", "config": dense, "settings": {**shape}},
        {"label": "dense + checkpointing", "config": dense, "settings": {**shape, **ckpt}},
        {"label": "dense + checkpointing + activation offload", "config": dense,
         "settings": {**shape, **ckpt, "activation_offload": True}},
        {"label": "dense + checkpointing + CPU offload", "config": dense,
         "settings": {**shape, **ckpt, "cpu_offload": True}},
        {"label": f"MoE ({names[1]})", "config": mixtral, "settings": {**moe_shape}},
        {"label": f"MoE + checkpointing ({names[2]})", "config": many, "settings": {**moe_shape, **ckpt}},
    ]


RECIPE = {"lora_rank": 8, "lora_alpha": 16.0, "lora_dropout": 0.05, "batch_size": 1, "activation_checkpointing": True,
          "loss_chunk_tokens": 1024, "optimizer": "adamw"}  # configs/llama-70b-2x24gb.yaml


def claim_runs(dry: bool) -> list[Run]:
    config = {**TINY, "num_hidden_layers": 4} if dry else alias("llama-2-70b")
    short, long_ = (128, 256) if dry else (2048, 8192)
    runs = [(f"context {short}, activation offload (the recipe)", {"context_length": short, "activation_offload": True}, 120),
            (f"context {short}, activation offload + CPU offload",
             {"context_length": short, "activation_offload": True, "cpu_offload": True}, 120),
            (f"context {long_}, CPU offload", {"context_length": long_, "cpu_offload": True}, 150)]
    return [Run(label, "claim", {"label": label, "config": config, "settings": {**RECIPE, **settings}, "steps": 3,
                                 "cap_gib": CAP_GIB}, 60 if dry else timeout) for label, settings, timeout in runs]


def throughput_runs(dry: bool) -> list[Run]:
    spec = {"config": TINY if dry else alias("llama-2-7b"), "batch_size": 2, "context_length": 128 if dry else 2048,
            "steps": 4 if dry else 10, "warmup": 1 if dry else 3, "lora_rank": 8, "lora_alpha": 16.0}
    return [Run("ours: FSDP2 QLoRA (NF4Tensor base)", "ours", spec, 60 if dry else 120),
            Run("peer: HF PEFT + bitsandbytes NF4", "peer", spec, 60 if dry else 120)]


def plan_steps(dry: bool) -> list[Step]:
    gpu_test_files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                            if "pytest.mark.gpu" in p.read_text())
    load = {"config": TINY if dry else alias("llama-2-70b"), "layers": 1 if dry else 4, "repeats": 2 if dry else 5,
            "file_mib": 8 if dry else 1024}
    return [
        Step("claim", "Llama-2-70B on 2 x 24 GB: one rank's share, on one GPU capped at 24 GiB", claim_runs(dry)),
        Step("planner", "planner vs measured peak allocated", [
            Run("planner cases", "planner", {"cases": planner_cases(dry)}, 60 if dry else 120)]),
        Step("gpu_tests", "the gpu-marked tests", [
            Run("pytest -m gpu", "pytest", {"files": gpu_test_files}, 90 if dry else 150)]),
        Step("throughput", "tokens/s: ours vs HF PEFT + bitsandbytes, same GPU, model, batch, dtype",
             throughput_runs(dry)),
        Step("load_speed", "load speed: NF4 quantization, copies and reads, and a Llama-2-70B load",
             [Run("rates", "load", load, 60 if dry else 90)]),
    ]


# ---- driver: subprocesses with time limits, results as they come ---------------------------------
class Report:
    """OUT/gpu_check.md (a section per finished step), OUT/gpu_check.json (rewritten each time), the log."""

    def __init__(self, out: Path, meta: dict[str, Any]):
        self.out, self.meta, self.steps = out, meta, []
        out.mkdir(parents=True, exist_ok=True)
        (out / LOG).write_text("")
        (out / MARKDOWN).write_text(header_markdown(meta))
        self.save()

    def save(self) -> None:
        tmp = self.out / f".{JSON_FILE}.tmp"
        tmp.write_text(json.dumps({"meta": self.meta, "steps": self.steps}, indent=1, default=str))
        os.replace(tmp, self.out / JSON_FILE)

    def start(self, step: Step) -> dict[str, Any]:
        record = {"name": step.name, "title": step.title, "status": "running", "seconds": 0.0, "runs": []}
        self.steps.append(record)
        self.save()
        return record

    def finish(self, record: dict[str, Any]) -> None:
        self.save()
        with open(self.out / MARKDOWN, "a") as handle:
            handle.write(step_markdown(record))

    def log(self, title: str, text: str) -> None:
        with open(self.out / LOG, "a") as handle:
            handle.write(f"\n===== {title} =====\n{text}\n")


def run_subprocess(cmd: list[str], timeout_s: float, env: dict[str, str]) -> tuple[int | None, str, float]:
    """(exit code or None on timeout, output, seconds): its own process group, killed whole at the limit."""
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as output:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=max(1.0, timeout_s))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
        output.seek(0)
        return code, output.read(), time.perf_counter() - started


def child_env(work: Path, dry: bool) -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               FSDP_QLORA_CACHE=str(work / "cache"), PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")])))
    if dry:
        env["CUDA_VISIBLE_DEVICES"] = ""  # toy sizes on CPU even where a GPU is present
    return env


def execute_run(run: Run, timeout_s: float, work: Path, dry: bool, report: Report) -> dict[str, Any]:
    records_file = work / f"records-{hashlib.sha256(run.label.encode()).hexdigest()[:8]}.jsonl"
    records_file.unlink(missing_ok=True)
    if run.kind == "pytest":
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rA", "-p", "no:cacheprovider", *run.spec["files"]]
    else:
        spec = {**run.spec, "work": str(work), "records": str(records_file), "dry": dry}
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", run.kind, "--spec", json.dumps(spec)]
    code, output, seconds = run_subprocess(cmd, timeout_s, child_env(work, dry))
    report.log(f"{run.label} (exit {code}, {seconds:.1f} s)", output)
    records = pytest_records(output) if run.kind == "pytest" else read_records(records_file)
    status = run_status(code, records, run.kind, dry)
    tail = "\n".join(output.strip().splitlines()[-15:])
    return {"label": run.label, "kind": run.kind, "status": status, "exit_code": code, "seconds": round(seconds, 1),
            "timeout_s": round(timeout_s), "records": records, "log_tail": tail if status != "pass" else ""}


def read_records(path: Path) -> list[dict[str, Any]]:
    """A worker's records; a line cut short by the kill at the time limit is left out."""
    records = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def pytest_records(output: str) -> list[dict[str, Any]]:
    """One record per test outcome (pytest -rA lines) and one with the counts of the summary line."""
    records = [{"table": "tests", "row": {"test": name, "outcome": outcome}, "ok": outcome == "PASSED"}
               for outcome, name in re.findall(r"^(PASSED|FAILED|ERROR) (\S+)", output, re.M)]
    records += [{"table": "tests", "row": {"test": where, "outcome": f"SKIPPED ({why.strip()})"}}
                for where, why in re.findall(r"^SKIPPED \[\d+\] (\S+): (.*)$", output, re.M)]
    summary = output.strip().splitlines()[-1] if output.strip() else ""
    counts = {kind.rstrip("s"): int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)",
                                                                   summary)}
    return records + [{"note": f"pytest: {summary.strip('= ')}", "counts": counts}]


def run_status(code: int | None, records: list[dict[str, Any]], kind: str, dry: bool) -> str:
    if code is None:
        return "timeout"
    if any(record.get("ok") is False for record in records):
        return "fail"
    if code != 0:
        return "error"
    if kind == "pytest" and not dry and not any(record.get("ok") for record in records):
        return "fail"  # on a GPU the gpu tests must run, not skip
    return "pass"


def step_status(runs: list[dict[str, Any]]) -> str:
    for status in ("error", "timeout", "fail", "skipped"):
        if any(run["status"] == status for run in runs):
            return status
    return "pass"


def run_steps(steps: list[Step], budget_s: float, work: Path, dry: bool, report: Report) -> None:
    deadline = time.monotonic() + budget_s
    for step in steps:
        record = report.start(step)
        started = time.perf_counter()
        for run in step.runs:
            left = deadline - time.monotonic()
            if left < 20:  # not enough for a process to start and measure anything
                record["runs"].append({"label": run.label, "kind": run.kind, "status": "skipped", "seconds": 0.0,
                                       "records": [{"note": f"skipped: {left:.0f} s of the budget left"}]})
                continue
            record["runs"].append(execute_run(run, min(run.timeout_s, left), work, dry, report))
            report.save()
        record["seconds"] = round(time.perf_counter() - started, 1)
        record["status"] = step_status(record["runs"])
        record["notes"] = step_notes(step.name, record["runs"])
        report.finish(record)
        print(f"{step.name}: {record['status']} ({record['seconds']:.0f} s)", flush=True)


def step_notes(name: str, runs: list[dict[str, Any]]) -> list[str]:
    """Figures computed across a step's runs: ours / peer tokens/s."""
    if name != "throughput":
        return []
    rates = {record["variant"]: record["tokens_per_sec"] for run in runs for record in run["records"]
             if "tokens_per_sec" in record}
    if "ours" in rates and "peer" in rates:
        return [f"ours / peer tokens/s: {rates['ours'] / rates['peer']:.2f}"]
    return ["ours / peer: not measured (a run failed)"]


# ---- markdown --------------------------------------------------------------------------------------
def header_markdown(meta: dict[str, Any]) -> str:
    lines = ["# GPU check (tools/gpu_check.py)", "",
             f"- **date:** {meta['date']}", f"- **command:** `{meta['command']}`",
             f"- **device:** {meta['device']}", f"- **software:** {meta['software']}",
             f"- **commit:** {meta['commit']}",
             f"- **mode:** {meta['mode']}", f"- **budget:** {meta['budget_s']:.0f} s", ""]
    return "\n".join(lines) + "\n"


def step_markdown(step: dict[str, Any]) -> str:
    lines = [f"## {step['name']}: {step['title']}", "", f"**{step['status']}** in {step['seconds']:.1f} s", ""]
    for run in step["runs"]:
        limit = f", limit {run['timeout_s']} s" if "timeout_s" in run else ""
        lines.append(f"- {run['label']}: **{run['status']}** ({run['seconds']:.1f} s{limit})")
    lines.append("")
    tables: dict[str, list[dict[str, Any]]] = {}
    notes = []
    for run in step["runs"]:
        for record in run["records"]:
            if "row" in record:
                tables.setdefault(record.get("table", "figures"), []).append(record["row"])
            if "note" in record:
                notes.append(record["note"])
    for rows in tables.values():
        columns = list(dict.fromkeys(key for row in rows for key in row))
        lines += ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
        lines += ["| " + " | ".join(str(row.get(column, "")).replace("|", "/") for column in columns) + " |"
                  for row in rows]
        lines.append("")
    lines += [f"- {note}" for note in notes + step.get("notes", [])]
    for run in step["runs"]:
        if run.get("log_tail"):
            lines += ["", f"{run['label']}, last lines of its output:", "", "```", run["log_tail"], "```"]
    return "\n".join(lines) + "\n\n"


# ---- environment -------------------------------------------------------------------------------
def environment(dry: bool, budget_s: float, argv: list[str]) -> dict[str, Any]:
    """Date, command, device and versions. The GPU is described by nvidia-smi, so that this process
    creates no CUDA context (its memory would be taken from the steps')."""
    import torch

    versions = []
    for package in ("torch", "transformers", "bitsandbytes", "peft", "accelerate"):
        try:
            versions.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{package} missing")
    device = f"CPU ({platform.machine()}, {os.cpu_count()} cores), no GPU used"
    if not dry:
        gpu = _quiet(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"])
        device = f"{gpu or 'a CUDA device'}, CUDA {torch.version.cuda}; {os.cpu_count()} CPU cores"
    mode = ("dry run: toy sizes on CPU, figures check the bookkeeping only, they are not measurements" if dry
            else "real sizes on the GPU")
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": "python tools/gpu_check.py " + " ".join(argv), "device": device,
            "software": f"Python {platform.python_version()}, " + ", ".join(versions),
            "commit": _quiet(["git", "rev-parse", "--short", "HEAD"]) or "unknown", "mode": mode,
            "budget_s": budget_s, "dry_run": dry}


def _quiet(cmd: list[str]) -> str:
    """A command's first output line, or "" when it is missing or fails."""
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    lines = proc.stdout.strip().splitlines()
    return lines[0].strip() if proc.returncode == 0 and lines else ""


# ---- worker side: shared helpers ------------------------------------------------------------------
class Records:
    """Appends a JSON line per figure, flushed at once: a run stopped at its limit keeps what it wrote."""

    def __init__(self, path: str):
        self.path = path

    def add(self, **record: Any) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record, default=str) + "\n")


def gib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / GIB:.2f}"


def init_process():
    from fsdp_qlora.distributed.env import init_distributed
    from fsdp_qlora.distributed.sharding import build_mesh

    env = init_distributed()
    return env, build_mesh(env)


def device_settings(settings: dict[str, Any], device) -> tuple[dict[str, Any], str]:
    """Drop --cpu-offload on CPU (it needs CUDA); say so."""
    if device.type == "cuda" or not settings.get("cpu_offload"):
        return settings, ""
    return {k: v for k, v in settings.items() if k != "cpu_offload"}, " (CPU offload dropped on CPU)"


def build(config: dict[str, Any], settings: dict[str, Any], work: Path, env, mesh):
    """(our model, its TrainConfig) for `config` with synthetic weights, world of this process."""
    from fsdp_qlora.config import TrainConfig
    from fsdp_qlora.model.sources import resolve_model
    from fsdp_qlora.train.build import build_qlora_model

    config_dir = work / "configs" / hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
    config_dir.mkdir(parents=True, exist_ok=True)
    (config_dir / "config.json").write_text(json.dumps(config))
    cfg = TrainConfig(model=str(config_dir), synthetic_weights=True, model_cache_dir=str(work / "cache"), **settings)
    model = build_qlora_model(resolve_model(cfg.model, cfg.model_cache_dir, synthetic=True), cfg, env, mesh)
    return model, cfg


def random_batch(vocab: int, batch: int, context: int, device) -> dict[str, Any]:
    import torch

    ids = torch.randint(0, vocab, (batch, context), generator=torch.Generator().manual_seed(0)).to(device)
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


class OurStep:
    """One optimizer step of our training loop's work: chunked loss, backward, clipping, AdamW."""

    def __init__(self, model, cfg, batch):
        from fsdp_qlora.train.optim import build_optimizer

        self.model, self.cfg, self.batch = model, cfg, batch
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.params, cfg)
        self.tokens = batch["labels"][:, 1:].numel()

    def __call__(self) -> float:
        import torch

        from fsdp_qlora.train.loss import token_loss_sum

        loss = token_loss_sum(self.model, self.batch, self.cfg.loss_chunk_tokens)
        (loss / self.tokens).backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss) / self.tokens  # waits for the device


def second_step_peak(step: OurStep, device) -> int:
    """Peak bytes of the second of two steps: max_memory_allocated on CUDA; on CPU FSDP2's memory tracker
    (every tensor storage, as tests/workers/planner_peak_worker.py counts them)."""
    import torch

    if device.type == "cuda":
        step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    tracker = FSDPMemTracker(step.model, step.optimizer)
    tracker.track_inputs((step.batch,))
    for index in range(2):
        with tracker:
            step()
        if index == 0:
            tracker.reset_mod_stats()
    return sum(snapshot["Total"] for snapshot in tracker.get_tracker_snapshot("peak").values())


def release_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- worker: planner vs measured -------------------------------------------------------------------
def planner_worker(spec: dict[str, Any], records: Records) -> None:
    import torch

    from fsdp_qlora.train.planner import Options, plan_memory

    env, mesh = init_process()
    for case in spec["cases"]:
        before = torch.cuda.memory_allocated() if env.device.type == "cuda" else 0
        measured, cfg, dropped = _measured_case(case, Path(spec["work"]), env, mesh)
        release_memory()  # the case's model and optimizer are gone with its frame
        measured -= before
        predicted = plan_memory(case["config"], Options(cfg, 1)).peak
        error = predicted / measured - 1
        within = abs(error) <= TOLERANCE
        # Toy sizes check the bookkeeping, not the planner (tests/test_planner.py does, at sizes it models).
        records.add(table="planner", ok=None if spec["dry"] else within, predicted=predicted, measured=measured,
                    row={"config": case["label"] + dropped, "batch x context": f"{cfg.batch_size} x {cfg.context_length}",
                         "predicted GiB": gib(predicted), "measured GiB": gib(measured), "error": f"{error:+.1%}",
                         "within 10%": ("yes" if within else "no") + (" (toy size: not a check)" if spec["dry"]
                                                                     else "" if within else " FAIL")})


def _measured_case(case: dict[str, Any], work: Path, env, mesh):
    settings, dropped = device_settings(case["settings"], env.device)
    model, cfg = build(case["config"], settings, work, env, mesh)
    step = OurStep(model, cfg, random_batch(case["config"]["vocab_size"], cfg.batch_size, cfg.context_length,
                                            env.device))
    return second_step_peak(step, env.device), cfg, dropped


# ---- worker: the 2 x 24 GB claim ---------------------------------------------------------------
def rank_equivalence(config: dict[str, Any], cfg) -> dict[str, Any]:
    """Planner figures of one rank of the 2-rank run and of its 1-rank, half-layers emulation."""
    from fsdp_qlora.train.planner import Options, plan_memory

    half = {**config, "num_hidden_layers": config["num_hidden_layers"] // 2}
    real, emulated = plan_memory(config, Options(cfg, 2)), plan_memory(half, Options(cfg, 1))
    static = ("nf4_weights", "quant_constants", "frozen_bf16", "adapter_params", "adapter_grads", "optimizer_state")
    parts = set(real.parts) | set(emulated.parts)
    delta = {part: real.parts.get(part, 0) - emulated.parts.get(part, 0) for part in parts}
    return {"half": half, "real": real, "delta": real.peak - emulated.peak,
            "delta_static": sum(v for k, v in delta.items() if k in static),
            "delta_modelled": sum(v for k, v in delta.items() if k not in static)}


def claim_worker(spec: dict[str, Any], records: Records) -> None:
    import torch

    from fsdp_qlora.config import TrainConfig
    from fsdp_qlora.train.planner import RUNTIME_OVERHEAD

    env, mesh = init_process()
    settings, dropped = device_settings(spec["settings"], env.device)
    eq = rank_equivalence(spec["config"], TrainConfig(**settings))
    cuda = env.device.type == "cuda"
    limit = int(spec["cap_gib"] * GIB) - RUNTIME_OVERHEAD - min(eq["delta"], 0)
    if cuda:  # before anything is allocated: the build runs under the cap too
        total = torch.cuda.get_device_properties(env.device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, limit / total), env.device)
    ballast_bytes = max(eq["delta"], 0)
    label = spec["label"] + dropped
    records.add(note=f"{label}: emulated {eq['half']['num_hidden_layers']} of {spec['config']['num_hidden_layers']} "
                     f"layers at 1 rank; delta = {gib(eq['delta'])} GiB (exact static {gib(eq['delta_static'])}, "
                     f"modelled {gib(eq['delta_modelled'])}); {f'allocator limit {gib(limit)} GiB' if cuda else 'no cap on CPU'}"
                     f", ballast {gib(ballast_bytes)} GiB from step 2")
    started = time.perf_counter()
    model, cfg = build(eq["half"], settings, Path(spec["work"]), env, mesh)
    build_s = time.perf_counter() - started
    step = OurStep(model, cfg, random_batch(spec["config"]["vocab_size"], cfg.batch_size, cfg.context_length, env.device))
    times, losses, oom, peak, reserved = capped_steps(step, spec["steps"], ballast_bytes, env.device)
    equivalent = None if peak is None else peak - ballast_bytes + eq["delta"]
    ok = not oom and len(losses) == spec["steps"] and all(math.isfinite(x) for x in losses)
    predicted = eq["real"].peak
    records.add(table="claim", ok=ok, peak=peak, equivalent=equivalent, predicted=predicted, build_s=build_s,
                step_s=times, losses=losses, oom=oom,
                row={"run": label, "steps": f"{len(losses)}/{spec['steps']}",
                     "s/step": f"{statistics.median(times[1:] or times):.2f}" if times else "n/a",
                     "build s": f"{build_s:.1f}", "peak allocated GiB (steps 2+)": gib(peak),
                     "peak reserved GiB": gib(reserved), "rank-equivalent GiB": gib(equivalent),
                     "planner (2 ranks) GiB": gib(predicted),
                     "planner error": "n/a" if not equivalent else f"{predicted / equivalent - 1:+.1%}",
                     "trained under the cap": "yes" if ok else f"NO {oom[:120]}"})


def capped_steps(step: OurStep, steps: int, ballast_bytes: int, device):
    """(step seconds, losses, the out-of-memory message or "", peak allocated and reserved of steps 2..).

    Step 1 runs without the ballast: FSDP2's lazy init moves CPU-offloaded shards from the device to the
    host, and the optimizer state is made, before any activation exists; from step 2 on (the steady
    state) the ballast stands for what a real rank holds beyond the emulation."""
    import torch

    times, losses, oom, ballast = [], [], "", None
    for index in range(steps):
        if index == 1:
            ballast = torch.empty(ballast_bytes, dtype=torch.uint8, device=device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        try:
            losses.append(step())
        except torch.OutOfMemoryError as err:
            oom = f"step {index + 1}: " + str(err).splitlines()[0]
            break
        times.append(time.perf_counter() - started)
    cuda = device.type == "cuda" and ballast is not None
    peak = torch.cuda.max_memory_allocated() if cuda else None
    reserved = torch.cuda.max_memory_reserved() if cuda else None
    return times, losses, oom, peak, reserved


# ---- workers: throughput ------------------------------------------------------------------------
def timed_steps(step, steps: int) -> tuple[list[float], list[float]]:
    times, losses = [], []
    for _ in range(steps):
        started = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - started)
    return times, losses


def throughput_record(records: Records, variant: str, spec: dict[str, Any], times: list[float], losses: list[float],
                      device) -> None:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_throughput import summarize

    tokens = spec["batch_size"] * spec["context_length"]
    summary = summarize([tokens / t for t in times[spec["warmup"]:]])
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    records.add(table="throughput", variant=variant, tokens_per_sec=summary["median"], summary=summary, step_s=times,
                row={"variant": variant, "batch x context": f"{spec['batch_size']} x {spec['context_length']}",
                     "tokens/s median [p25-p75]": f"{summary['median']:,.0f} [{summary['p25']:,.0f}-{summary['p75']:,.0f}]",
                     "s/step": f"{statistics.median(times[spec['warmup']:]):.3f}", "peak allocated GiB": gib(peak),
                     "loss first -> last": f"{losses[0]:.3f} -> {losses[-1]:.3f}"})


def ours_worker(spec: dict[str, Any], records: Records) -> None:
    env, mesh = init_process()
    settings = {"lora_rank": spec["lora_rank"], "lora_alpha": spec["lora_alpha"], "lora_dropout": 0.0,
                "batch_size": spec["batch_size"], "context_length": spec["context_length"]}
    model, cfg = build(spec["config"], settings, Path(spec["work"]), env, mesh)
    step = OurStep(model, cfg, random_batch(spec["config"]["vocab_size"], cfg.batch_size, cfg.context_length, env.device))
    times, losses = timed_steps(step, spec["steps"])
    throughput_record(records, "ours", spec, times, losses, env.device)


def peer_model(config: dict[str, Any], spec: dict[str, Any], device):
    """transformers' model at random init with bitsandbytes NF4 Linear4bit layers (double quantization,
    bf16 compute, quantized as they move to the device, as from_pretrained's quantizer does), under PEFT LoRA."""
    import bitsandbytes as bnb
    import torch
    from peft import LoraConfig, get_peft_model
    from torch import nn
    from transformers import AutoModelForCausalLM

    from fsdp_qlora.model.structure import config_from_dict, decoder_layers
    from fsdp_qlora.peft.targets import peft_target_modules

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config_from_dict(config), dtype=torch.bfloat16)
    for layer in decoder_layers(model):
        for name, linear in list(layer.named_modules()):
            if not isinstance(linear, nn.Linear):
                continue
            nf4 = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                    compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4",
                                    device="meta")
            nf4.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, compress_statistics=True,
                                           quant_type="nf4")
            if linear.bias is not None:
                nf4.bias = nn.Parameter(linear.bias.data, requires_grad=False)
            parent_name, _, child = name.rpartition(".")
            setattr(layer.get_submodule(parent_name) if parent_name else layer, child, nf4.to(device))
    model.is_loaded_in_4bit = True  # PEFT then wraps Linear4bit with its bitsandbytes LoRA layer
    lora = LoraConfig(r=spec["lora_rank"], lora_alpha=spec["lora_alpha"], lora_dropout=0.0,
                      target_modules=peft_target_modules(["all-linear"]), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def peer_worker(spec: dict[str, Any], records: Records) -> None:
    import torch

    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    model = peer_model(spec["config"], spec, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)
    batch = random_batch(spec["config"]["vocab_size"], spec["batch_size"], spec["context_length"], device)
    model.train()

    def step() -> float:
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    times, losses = timed_steps(step, spec["steps"])
    throughput_record(records, "peer", spec, times, losses, device)


# ---- worker: load speed ------------------------------------------------------------------------
def _timed(fn, repeats: int, device) -> float:
    import torch

    fn()  # warm-up (kernels, allocations)
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / repeats


def load_worker(spec: dict[str, Any], records: Records) -> None:
    import torch

    from fsdp_qlora.model.synthetic import synthetic_rows
    from fsdp_qlora.train.planner import Geometry

    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    shapes = list(Geometry.from_config(spec["config"]).linears().items()) * spec["layers"]
    layer_bytes = sum(out_f * in_f * 2 for _, (out_f, in_f) in shapes)

    def draw():
        return [synthetic_rows(name, o, i, 0, o, 0, 0.02, device) for name, (o, i) in shapes]

    draw_s = _timed(draw, spec["repeats"], device)
    quantize_s = _quantize_seconds(draw(), spec["repeats"], device)
    rates = {"draw": layer_bytes / draw_s, "quantize": layer_bytes / quantize_s}
    for name, rate in rates.items():
        records.add(table="rates", rate=rate, kind=name,
                    row={"what": {"draw": "synthetic draw (bf16 out)", "quantize": "NF4 quantization (bf16 in)"}[name],
                         "shapes": f"{spec['layers']} layer(s) of Llama-2-70B's linears" if spec["layers"] > 1
                         else "one layer's linears", "GB/s": f"{rate / 1e9:.2f}"})
    rates["h2d"] = h2d_rate(device, spec["file_mib"])
    rates["read"] = read_rate(Path(spec["work"]), spec["file_mib"])
    for name in ("h2d", "read"):
        what = {"h2d": "pinned host -> device copy",
                "read": f"safetensors read, cold page cache, 4 readers ({filesystem(Path(spec['work']))})"}[name]
        records.add(table="rates", rate=rates[name], kind=name,
                    row={"what": what, "shapes": f"{spec['file_mib']} MiB",
                         "GB/s": "n/a" if rates[name] is None else f"{rates[name] / 1e9:.2f}"})
    load_implication(records, rates)


def _quantize_seconds(weights: list, repeats: int, device) -> float:
    from fsdp_qlora.model.nf4 import quantize_nf4_rows

    return _timed(lambda: [quantize_nf4_rows(weight) for weight in weights], repeats, device)


def h2d_rate(device, mib: int) -> float | None:
    import torch

    if device.type != "cuda":
        return None
    host = torch.empty(mib << 20, dtype=torch.uint8).pin_memory()
    return host.numel() / _timed(lambda: host.to(device, non_blocking=True), 3, device)


def filesystem(path: Path) -> str:
    """The file system type under `path` (/proc/mounts): a tmpfs 'disk' reads at memory speed."""
    try:
        mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return "file system unknown"
    best = max((m for m in mounts if str(path.resolve()).startswith(m[0])), key=lambda m: len(m[0]), default=None)
    return f"{best[1]} at {best[0]}" if best else "file system unknown"


def read_rate(work: Path, mib: int) -> float:
    """The project's reader (positioned parallel reads of one tensor's rows) on a file just written and
    dropped from the page cache."""
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_load import drop_page_cache

    from fsdp_qlora.model.loader import READ_AHEAD_BYTES
    from fsdp_qlora.model.shard_reader import RowRange, RowReader, read_ahead, read_index

    path = work / "read-rate.safetensors"
    save_file({"w": torch.zeros((mib << 20) // 8192, 4096, dtype=torch.bfloat16)}, str(path))
    drop_page_cache([path])
    entry = read_index(path)["w"]
    started = time.perf_counter()
    with RowReader(4) as reader:
        for _ in read_ahead([RowRange(entry, 0, entry.rows)], reader, READ_AHEAD_BYTES):
            pass
    seconds = time.perf_counter() - started
    path.unlink()
    return (mib << 20) / seconds


def load_implication(records: Records, rates: dict[str, float | None]) -> None:
    """A full Llama-2-70B load on 2 ranks of one node: each rank reads and quantizes half of the bf16
    bytes; the node's disk serves both ranks. Overlapped (the loader's read-ahead), the slowest bounds it."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_load import LLAMA2_70B_BF16_BYTES

    per_rank = LLAMA2_70B_BF16_BYTES / 2
    seconds = {"quantize (per rank)": per_rank / rates["quantize"], "read (node disk)": LLAMA2_70B_BF16_BYTES / rates["read"]}
    if rates["h2d"]:
        seconds["copy to the GPU (per rank)"] = per_rank / rates["h2d"]
    for what, value in seconds.items():
        records.add(table="70B load", row={"Llama-2-70B (137.9 GB bf16), 2 ranks": what, "seconds": f"{value:.0f}"})
    records.add(table="70B load", bound_s=max(seconds.values()),
                row={"Llama-2-70B (137.9 GB bf16), 2 ranks": "load, overlapped (the slowest)",
                     "seconds": f"{max(seconds.values()):.0f}"})


WORKERS = {"planner": planner_worker, "claim": claim_worker, "ours": ours_worker, "peer": peer_worker,
           "load": load_worker}


def worker_main(kind: str, spec: dict[str, Any]) -> int:
    records = Records(spec["records"])
    try:
        WORKERS[kind](spec, records)
    finally:
        from fsdp_qlora.distributed.env import shutdown

        shutdown()
    return 0


# ---- main --------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", default="gpu-check", help="where gpu_check.md/.json/.log go")
    parser.add_argument("--dry-run", action="store_true", help="every step at toy size on CPU (no figure is a measurement)")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="seconds for all steps together")
    parser.add_argument("--steps", default="", help="comma-separated subset of the steps (default: all, in order)")
    parser.add_argument("--keep-work", action="store_true", help="keep the working directory (configs, model cache)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(args.worker, json.loads(args.spec))
    steps = plan_steps(args.dry_run)
    if args.steps:
        chosen = [name.strip() for name in args.steps.split(",") if name.strip()]
        unknown = sorted(set(chosen) - {step.name for step in steps})
        if unknown:
            parser.error(f"--steps: unknown {', '.join(unknown)} (known: {', '.join(s.name for s in steps)})")
        steps = [step for step in steps if step.name in chosen]
    if not args.dry_run and not _cuda_available():
        parser.error("no CUDA device: run with --dry-run on a machine without a GPU")
    work = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    report = Report(Path(args.output_dir), environment(args.dry_run, args.budget_s, argv))
    try:
        run_steps(steps, args.budget_s, work, args.dry_run, report)
    finally:
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    print(f"results: {Path(args.output_dir) / MARKDOWN}, {Path(args.output_dir) / JSON_FILE}")
    return 0 if all(step["status"] == "pass" for step in report.steps) else 1


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
