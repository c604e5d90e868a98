"""The training recipe: config -> sharded QLoRA model -> steps -> PEFT adapter. Reads top to bottom."""

from __future__ import annotations

import math
import time
from datetime import datetime
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from transformers import AutoTokenizer

from fsdp_qlora import faults
from fsdp_qlora.checkpoint.manager import CheckpointManager, TrainerState, base_model_identity, read_trainer_state
from fsdp_qlora.checkpoint.resume import check_resume_settings, resolve_resume
from fsdp_qlora.config import TrainConfig
from fsdp_qlora.data.pipeline import build_train_data
from fsdp_qlora.data.sft import IGNORE_INDEX
from fsdp_qlora.distributed import pair
from fsdp_qlora.distributed.env import DistEnv, broadcast_object, init_distributed, shutdown
from fsdp_qlora.distributed.grad_norm import clip_grad_norm
from fsdp_qlora.distributed.sharding import build_mesh, reduced_squares_of, set_gradient_sync, shard_size
from fsdp_qlora.errors import ConfigError
from fsdp_qlora.metrics.logger import MetricsLogger
from fsdp_qlora.metrics.progress import Progress
from fsdp_qlora.metrics.system import flops_per_token, memory_scalars, peak_tflops
from fsdp_qlora.model.gguf import gguf_note
from fsdp_qlora.model.host_memory import reuse_freed_memory
from fsdp_qlora.model.sources import resolve_model
from fsdp_qlora.peft.apply import adapter_param_groups
from fsdp_qlora.peft.export import export_trained_adapter
from fsdp_qlora.peft.spec import AdapterSpec
from fsdp_qlora.train.build import build_qlora_model, check_model
from fsdp_qlora.train.evaluate import evaluate
from fsdp_qlora.train.loss import token_loss_sum
from fsdp_qlora.train.memory import check_device_options
from fsdp_qlora.train.optim import build_optimizer, build_scheduler
from fsdp_qlora.train.plan_advice import auto_replicates, warn_if_plan_does_not_fit
from fsdp_qlora.train.precision import LossScaler, resolve_compute_dtype
from fsdp_qlora.train.signals import EXIT_DIVERGED, EXIT_PREEMPTED, PreemptionFlag, TrainingInterrupted


def train(cfg: TrainConfig) -> Path:
    """Run one training job; returns the run directory. Every rank calls this."""
    model_dir = resolve_model(cfg.model, cfg.model_cache_dir, cfg.synthetic_weights)  # validates before any weight loads
    check_model(model_dir, cfg)  # architecture and adapter targets, from config.json on the meta device
    env = init_distributed(timeout_s=cfg.collective_timeout_s, rdzv_timeout_s=cfg.rdzv_timeout_s)
    try:
        check_device_options(cfg, env.device)  # e.g. --cpu-offload without a GPU: fail before any work
        run_dir = _prepare_run_dir(cfg, env)
        note = gguf_note(model_dir) if env.is_main else None
        if note:
            print(note, flush=True)  # weights dequantized from a k-bit GGUF keep its error
        checkpoints = CheckpointManager(run_dir, env.rank, cfg.keep_last, cfg.async_save)
        resume_from = resolve_resume(cfg.resume, checkpoints)
        saved = read_trainer_state(resume_from) if resume_from else None
        if saved:  # another base, adapter shape or data: refused here, before data or weights load
            check_resume_settings(cfg, saved, resume_from, base_model_identity(model_dir))
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        # tokenized once (rank 0, then per node) and cached; data errors surface before weights load
        data = build_train_data(cfg, tokenizer, env.rank, env.world_size, env.is_main, env.local_rank)
        if saved:
            _restore_data_position(data, saved, env)  # refuses changed data content, before weights
        # auto: ddp when the whole model fits each GPU (rank 0's plan, so that every rank builds one mesh)
        replicate = broadcast_object(env.is_main and auto_replicates(cfg, model_dir, env.world_size, env.device))
        mesh = build_mesh(env, cfg.sharding, cfg.replicate_groups, replicate)  # fsdp | hsdp | ddp
        if env.is_main:
            warn_if_plan_does_not_fit(cfg, model_dir, shard_size(mesh), env.device)  # before loading weights
        model = build_qlora_model(model_dir, cfg, env, mesh)
        reuse_freed_memory(env.device)  # CPU steps: no fresh pages for every transient (model/host_memory.py)
        _train_loop(model, data, cfg, env, run_dir, model_dir, checkpoints, resume_from)
        _export_adapter(model, cfg, env, model_dir, run_dir / "adapter")
        return run_dir
    finally:
        shutdown()


def _prepare_run_dir(cfg: TrainConfig, env: DistEnv) -> Path:
    """Choose the run directory on rank 0 (the default is time-stamped) and save config.yaml."""
    if not cfg.output_dir:
        name = Path(cfg.model).name or "model"
        cfg.output_dir = str(Path("runs") / f"{name}-{datetime.now():%Y%m%d-%H%M%S}")
    cfg.output_dir = broadcast_object(cfg.output_dir)
    run_dir = Path(cfg.output_dir)
    resumable = cfg.resume != "none" and any((run_dir / "checkpoints").glob("step-*"))
    if (run_dir / "adapter").exists() and not resumable:
        raise ConfigError(f"{run_dir} already holds a finished run (adapter/) and no checkpoint to resume: "
                          "choose another --output-dir")
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save_yaml(run_dir / "config.yaml")
    dist.barrier()
    return run_dir


class _RankSums:
    """Host numbers summed over the ranks by one `all_reduce` (``dist``'s or `pair`'s), started now and
    waited for only when a sum is first read."""

    def __init__(self, values: list[float], all_reduce):
        self._sums = torch.tensor(values, dtype=torch.float64)
        self._work = all_reduce(self._sums, async_op=True)
        self._values: list[float] | None = None

    def _read(self, index: int) -> float:
        if self._values is None:
            self._work.wait()
            self._values = self._sums.tolist()
        return self._values[index]


class _GlobalCounts(_RankSums):
    """(labelled tokens, input tokens) of the whole global batch, from the host batches: one
    all-reduce of two numbers per step, started before the forward and waited for only when the
    first backward needs the count, so that it overlaps the forward (and a rank that arrives first
    computes instead of waiting for the others at the start of the step)."""

    def __init__(self, micro: list[dict[str, torch.Tensor]]):
        super().__init__([sum(float((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro),
                          sum(float(b["attention_mask"].sum()) for b in micro)],
                         dist.all_reduce)

    @property
    def label_tokens(self) -> float:
        return self._read(0)

    @property
    def input_tokens(self) -> int:
        return int(self._read(1))


def _train_step(model, micro: list[dict[str, torch.Tensor]], env: DistEnv, step: int, counts: _GlobalCounts,
                loss_chunk_tokens: int = 0, loss_scale: float = 1.0) -> torch.Tensor:
    """Forward/backward over the micro-batches; returns this rank's summed token loss (on the device;
    the loop sums it over the ranks in `_StepSums`)."""
    # Normalize by the labelled tokens of the whole global batch, so the gradient is that
    # of the mean token loss however the tokens fall across ranks and micro-steps.
    # FSDP averages gradients over ranks, hence the world_size factor; fp16 scales the loss
    # (train/precision.py), and the gradients are unscaled before clipping.
    loss_sum = torch.zeros((), device=env.device)
    for i, batch in enumerate(micro):
        set_gradient_sync(model, i == len(micro) - 1)
        loss = token_loss_sum(model, batch, loss_chunk_tokens)
        if faults.nan_loss_at(step):
            loss = loss * float("nan")
        (loss * (env.world_size * loss_scale / counts.label_tokens)).backward()
        loss_sum += loss.detach()
    return loss_sum


class _StepSums(_RankSums):
    """The step's token loss summed over the ranks, and whether any rank got a stop signal: one
    all-reduce of two numbers, started as backward ends and read after the optimizer step.

    A blocking collective after the step (as the stop check and the logged loss each were) holds
    every rank until the slowest arrives, and rank 0 is the slowest there: it writes the metrics.
    Started early, it has completed by the time it is read, and the other ranks go on into the
    next step while rank 0 logs. A signal that arrives after backward is seen one step later.
    Between two ranks on one host it is an exchange (distributed/pair.py), done where it starts:
    right after backward's gradient reduction, where the ranks are aligned."""

    def __init__(self, loss_sum: torch.Tensor, preemption: PreemptionFlag):
        super().__init__([float(loss_sum), float(preemption.received is not None)],
                         pair.all_reduce)

    def mean_loss(self, global_label_tokens: float) -> float:
        """The global batch's mean token loss."""
        return self._read(0) / global_label_tokens

    @property
    def stop_agreed(self) -> bool:
        """Whether any rank got a stop signal by the end of this step's backward (every rank agrees)."""
        return self._read(1) > 0


def _train_loop(model, data, cfg: TrainConfig, env: DistEnv, run_dir: Path, model_dir: Path,
                checkpoints: CheckpointManager, resume_from: Path | None) -> None:
    adapter_params = [p for p in model.parameters() if p.requires_grad]
    reduced_squares = reduced_squares_of(model)  # the gradients' squares summed as they are reduced (CPU fsdp)
    per_epoch = data.steps_per_epoch  # None when streaming, which requires --max-steps
    total_steps = cfg.max_steps if cfg.max_steps > 0 else cfg.num_epochs * per_epoch
    # LoRA+ (--loraplus-lr-ratio) puts B in a group of its own with a higher LR.
    optimizer = build_optimizer(adapter_param_groups(model, cfg.loraplus_lr_ratio, cfg.lr), cfg)
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    state = TrainerState(base_model_id=base_model_identity(model_dir), base_model_path=str(model_dir.resolve()),
                         world_size=env.world_size, config=cfg.to_dict())
    torch.manual_seed(cfg.seed + env.rank)  # dropout differs per rank, repeatably
    if resume_from is not None:
        state = _resume(resume_from, cfg, env, checkpoints, model, optimizer, scheduler)
    metrics = MetricsLogger(run_dir, enabled=env.is_main, resume_step=state.step)
    metrics.log_hparams(cfg.to_dict(), {"train/loss": float("nan")})
    metrics.log(state.step, data.scalars(), jsonl=False)  # data/efficiency (padding or packing), sizes
    progress = Progress(total_steps, state.step, enabled=env.is_main)
    model_flops_per_token = flops_per_token(model, cfg.context_length)
    device_peak = peak_tflops(env.device, resolve_compute_dtype(cfg.compute_dtype, env.device))
    batches = data.batches()  # from the position restored before the weights loaded (if resuming)
    preemption = PreemptionFlag()
    scaler = LossScaler(enabled=resolve_compute_dtype(cfg.compute_dtype, env.device) == torch.float16)
    if state.loss_scale:
        scaler.load_state_dict(state.loss_scale)
    bad_steps = 0
    model.train()
    while state.step < total_steps:
        started = time.perf_counter()
        position_before_step = data.state_dict()
        host_micro = [next(batches) for _ in range(cfg.grad_accum_steps)]
        counts = _GlobalCounts(host_micro)
        micro = [{k: v.to(env.device, non_blocking=True) for k, v in b.items()} for b in host_micro]
        loss_sum = _train_step(model, micro, env, state.step + 1, counts, cfg.loss_chunk_tokens, scaler.scale)
        sums = _StepSums(loss_sum, preemption)
        label_tokens, input_tokens = counts.label_tokens, counts.input_tokens
        squares = reduced_squares.take() if reduced_squares is not None else None
        scaler.unscale_(adapter_params)  # (fp16) the gradients are then no longer what was reduced
        # A non-finite loss makes non-finite gradients, so the norm (needed for clipping anyway) is
        # the only check the step needs.
        grad_norm = clip_grad_norm(adapter_params, cfg.max_grad_norm, None if scaler.enabled else squares)
        finite = math.isfinite(grad_norm)
        overflow = scaler.update(finite)
        if finite:
            optimizer.step()
            bad_steps = 0
        elif overflow:
            progress.message(f"fp16 overflow at step {state.step + 1}: update skipped, loss scale now {scaler.scale:g}")
        else:
            bad_steps += 1
            progress.message(f"warning: step {state.step + 1}: non-finite loss/grad norm "
                             f"({sums.mean_loss(label_tokens)}, {grad_norm}); "
                             f"update skipped ({bad_steps}/{cfg.max_bad_steps} in a row)")
        optimizer.zero_grad(set_to_none=True)
        if bad_steps >= cfg.max_bad_steps:
            # the last good state: nothing was applied since; a resume feeds this step's batches again
            checkpoints.save(model, optimizer, _with_data(state, position_before_step))
            raise TrainingInterrupted(EXIT_DIVERGED, f"{bad_steps} non-finite steps in a row; checkpoint saved at "
                                      f"step {state.step} with the last good weights (step {state.step - bad_steps + 1}): "
                                      "lower --lr or check the data")
        scheduler.step()
        state.step += 1
        state.micro_batches_consumed += cfg.grad_accum_steps
        state.tokens_seen += input_tokens
        state.scheduler = scheduler.state_dict()
        state.loss_scale = scaler.state_dict() if scaler.enabled else {}
        elapsed = time.perf_counter() - started
        if finite and (state.step % cfg.log_every == 0 or state.step == total_steps):
            step_loss = sums.mean_loss(label_tokens)
            tokens_per_sec = input_tokens / elapsed
            scalars = {"loss": step_loss, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                       "tokens_per_sec": tokens_per_sec,
                       # per-rank achieved model FLOP/s against one device's peak
                       "mfu": tokens_per_sec * model_flops_per_token / env.world_size / (device_peak * 1e12),
                       **{f"memory/{k}": v for k, v in memory_scalars(env.device).items()}}
            metrics.log(state.step, scalars)
            progress.update(state.step, scalars)
        eval_due = state.step == total_steps or (cfg.eval_every and state.step % cfg.eval_every == 0)
        if data.eval is not None and eval_due:
            eval_scalars = evaluate(model, data.eval.batches(), env, cfg.loss_chunk_tokens)
            metrics.log(state.step, eval_scalars, prefix="eval")
            progress.message(f"step {state.step}: eval loss {eval_scalars['eval_loss']:.4f}, "
                             f"perplexity {eval_scalars['eval_perplexity']:.2f}")
        if sums.stop_agreed:
            checkpoints.save(model, optimizer, _with_data(state, data.state_dict()))
            checkpoints.wait()
            raise TrainingInterrupted(EXIT_PREEMPTED, f"stopped by a signal; checkpoint saved at step {state.step}: "
                                      "rerun the same command to resume")
        if state.step == total_steps or (cfg.save_every and state.step % cfg.save_every == 0):
            checkpoints.save(model, optimizer, _with_data(state, data.state_dict()))
            metrics.log(state.step, {"checkpoint/saved_step": state.step}, jsonl=False)
    checkpoints.wait()
    progress.close()
    metrics.close()


def _with_data(state: TrainerState, position: dict) -> TrainerState:
    state.data = position
    return state


def _restore_data_position(data, saved: TrainerState, env: DistEnv) -> None:
    """Continue the data after exactly the examples the checkpoint consumed (any layout)."""
    if saved.data:
        data.load_state_dict(saved.data)
    else:  # checkpoints from before data positions were saved: micro-batches, rescaled by world size
        data.set_position(saved.micro_batches_consumed * saved.world_size // env.world_size)


def _resume(path: Path, cfg, env, checkpoints, model, optimizer, scheduler) -> TrainerState:
    loaded = checkpoints.load(path, model, optimizer)
    scheduler.load_state_dict(loaded.scheduler)
    if loaded.world_size != env.world_size:
        torch.manual_seed(cfg.seed + env.rank + loaded.step)  # other ranks: fresh dropout streams, repeatable
    if env.is_main:
        print(f"resumed from {path} at step {loaded.step}", flush=True)
    return TrainerState(**{**loaded.__dict__, "world_size": env.world_size, "config": cfg.to_dict()})


def _export_adapter(model: nn.Module, cfg: TrainConfig, env: DistEnv, model_dir: Path, out_dir: Path) -> None:
    # full_tensor() all-gathers each sharded adapter tensor: every rank joins, rank 0 writes.
    full = {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu()
            for name, p in model.named_parameters() if p.requires_grad}
    if env.is_main:
        export_trained_adapter(out_dir, full, AdapterSpec.from_config(cfg), str(model_dir.resolve()))
