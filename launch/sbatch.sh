#!/bin/bash
# QLoRA fine-tuning on SLURM: one torchrun per node, c10d rendezvous on the allocation's first
# node; requeued on preemption or time limit, resuming from the run's checkpoints.
#
#   sbatch --nodes 2 --gpus-per-node 8 --partition X launch/sbatch.sh --model llama-3-70b --output-dir /shared/runs/x
#
# Arguments are train.py flags. Keep --output-dir on a filesystem every node sees (a requeued job
# resumes from its checkpoints; without the flag the template uses runs/<job name>-<job id>).
# Environment (all optional; pass with `sbatch --export=ALL,NAME=value` or export before sbatch):
#   GPUS_PER_NODE     ranks per node (default: SLURM_GPUS_ON_NODE, else 1)
#   LAUNCH_MODE       torchrun (default) | tasks (one srun task per rank through launch.slurm_env;
#                     submit with --ntasks-per-node=GPUS_PER_NODE)
#   PYTHON            interpreter with fsdp_qlora installed (default: python3)
#   FSDP_QLORA_REPO   checkout holding train.py (default: the submit directory)
#   RDZV_PORT         rendezvous port on the first node (default: 20000 + job id % 20000)
#   RDZV_TIMEOUT      seconds for every node to join (default: 600)
#   EXPECT_NODES      fail fast unless the allocation has exactly this many nodes
#   NETWORK_IFNAME    interface for gloo and NCCL (sets GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME)
#   MAX_REQUEUES      stop requeueing after this many restarts (default: 20)
#   SHUTDOWN_TIMEOUT  seconds torchrun waits for ranks to checkpoint after a signal (default: 120)
# NCCL_* variables (NCCL_IB_HCA, NCCL_DEBUG, ...) pass through to the ranks: docs/multinode.md.
#
#SBATCH --job-name=fsdp-qlora
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --requeue
#SBATCH --signal=B:USR1@180
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
## GPUs: pass --gpus-per-node (and --cpus-per-task) on the sbatch command line or add them here.

set -uo pipefail

log() { echo "[sbatch.sh $(date +%H:%M:%S) job ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0}] $*" >&2; }
die() { echo "sbatch.sh: error: $*" >&2; exit 2; }

for var in SLURM_JOB_ID SLURM_JOB_NUM_NODES SLURM_JOB_NODELIST; do
  [[ -n "${!var:-}" ]] || die "$var not set: submit this script with sbatch (it reads the allocation from SLURM)"
done
NNODES=$SLURM_JOB_NUM_NODES
if [[ -n "${EXPECT_NODES:-}" && "$EXPECT_NODES" != "$NNODES" ]]; then
  die "node-count mismatch: EXPECT_NODES=$EXPECT_NODES but the allocation has $NNODES node(s) ($SLURM_JOB_NODELIST): submit with --nodes $EXPECT_NODES"
fi
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
PYTHON=${PYTHON:-python3}
REPO=${FSDP_QLORA_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
[[ -f "$REPO/train.py" ]] || die "no train.py in $REPO: submit from the checkout or set FSDP_QLORA_REPO"
cd "$REPO" || die "cannot cd to $REPO"
RDZV_PORT=${RDZV_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
RDZV_TIMEOUT=${RDZV_TIMEOUT:-600}
MAX_REQUEUES=${MAX_REQUEUES:-20}
SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-120}
if [[ -n "${NETWORK_IFNAME:-}" ]]; then
  export GLOO_SOCKET_IFNAME=$NETWORK_IFNAME NCCL_SOCKET_IFNAME=$NETWORK_IFNAME
fi

# A fixed run directory: the requeued job must find the checkpoints of the preempted one.
args=("$@")
output_dir=""
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[i]}" in
    --output-dir) output_dir=${args[i + 1]:-} ;;
    --output-dir=*) output_dir=${args[i]#--output-dir=} ;;
  esac
done
if [[ -z "$output_dir" ]]; then
  output_dir="runs/${SLURM_JOB_NAME:-fsdp-qlora}-$SLURM_JOB_ID"
  args+=(--output-dir "$output_dir")
fi

head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
head_addr=${FSDP_QLORA_MASTER_ADDR:-$(scontrol show node -o "$head_node" | tr ' ' '\n' | sed -n 's/^NodeAddr=//p')}
head_addr=${head_addr:-$head_node}

latest_step() {  # the step of the newest complete checkpoint, 0 if none
  local latest="$output_dir/checkpoints/latest"
  [[ -f "$latest" ]] && sed -n 's/.*step-0*\([0-9][0-9]*\).*/\1/p' "$latest" | head -n 1 || echo 0
}
start_step=$(latest_step); start_step=${start_step:-0}

if [[ "${LAUNCH_MODE:-torchrun}" == tasks ]]; then
  step=(srun --kill-on-bad-exit=1 --nodes="$NNODES" --ntasks-per-node="$GPUS_PER_NODE"
        "$PYTHON" -m launch.slurm_env --expect-nodes "$NNODES" -- "$PYTHON" train.py
        --rdzv-timeout-s "$RDZV_TIMEOUT" "${args[@]}")
  export FSDP_QLORA_MASTER_PORT=$RDZV_PORT
else
  step=(srun --kill-on-bad-exit=1 --nodes="$NNODES" --ntasks-per-node=1
        "$PYTHON" -m torch.distributed.run
        --nnodes="$NNODES" --nproc-per-node="$GPUS_PER_NODE"
        --rdzv-backend=c10d --rdzv-endpoint="$head_addr:$RDZV_PORT" --rdzv-id="$SLURM_JOB_ID"
        --rdzv-conf="join_timeout=$RDZV_TIMEOUT" --max-restarts=0
        --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout="$SHUTDOWN_TIMEOUT"
        train.py "${args[@]}")
fi

# Signals: the time-limit warning (--signal=B:USR1@180) and `scancel --batch --signal=USR1` reach
# only this shell: pass USR1 on to the ranks once (torchrun forwards it; they finish the step,
# checkpoint and exit 75). SIGTERM (scontrol requeue, preemption, scancel) already reaches every
# step from SLURM itself: only remember it.
stopping=0
on_usr1() {
  log "USR1: asking the ranks to checkpoint"
  if [[ $stopping == 0 ]]; then stopping=1; scancel --signal=USR1 "$SLURM_JOB_ID" 2>/dev/null || kill -USR1 "$srun_pid"; fi
}
on_term() { log "SIGTERM: the job is being stopped by SLURM"; stopping=2; }
trap on_usr1 USR1
trap on_term TERM

log "nodes=$NNODES ($SLURM_JOB_NODELIST) ranks/node=$GPUS_PER_NODE rendezvous=$head_addr:$RDZV_PORT output=$output_dir resume-from-step=$start_step"
"${step[@]}" &
srun_pid=$!
while true; do  # `wait` returns early whenever a trapped signal arrives
  wait "$srun_pid"; rc=$?
  kill -0 "$srun_pid" 2>/dev/null || break
done
end_step=$(latest_step); end_step=${end_step:-0}
log "step exited rc=$rc; checkpoint step $start_step -> $end_step"

if [[ -d "$output_dir/adapter" && $rc == 0 ]]; then
  log "finished: adapter in $output_dir/adapter"
  exit 0
fi
if [[ $stopping == 2 ]]; then
  log "stopped by SLURM (requeue/preemption/cancel): SLURM decides whether it comes back"
  exit "$rc"
fi
# Unfinished: requeue when told to stop (signal, or exit 75 in tasks mode) or when the ranks made
# progress before dying (a lost node): the requeued job resumes from the newest checkpoint.
if [[ $stopping == 1 || $rc == 75 || $end_step -gt $start_step ]]; then
  if (( ${SLURM_RESTART_COUNT:-0} >= MAX_REQUEUES )); then
    log "not requeueing: already restarted ${SLURM_RESTART_COUNT} times (MAX_REQUEUES=$MAX_REQUEUES)"
    exit 1
  fi
  log "requeueing job $SLURM_JOB_ID to resume from step $end_step"
  scontrol requeue "$SLURM_JOB_ID" || log "scontrol requeue failed"
  exit 0
fi
log "failed without progress (rc=$rc): not requeueing; see the errors above"
exit "$rc"
