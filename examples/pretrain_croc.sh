#!/usr/bin/env bash
# Croc pretraining launcher (torchrun). Any extra arguments are passed to the trainer
# (python -m megatron_croc.training.pretrain --help lists them all).
#
#   bash examples/pretrain_croc.sh                    # embedded default: tiny model, demo data, CPU or GPU
#   STAGE=croc TP=4 PP=2 bash examples/pretrain_croc.sh --model vicuna-7b \
#       --data-path /data/croc_1.5m/croc --load ckpts/align --save ckpts/croc --train-iters 5859 ...
#
# Variables (defaults in brackets):
#   STAGE [croc]          align | croc | instruct
#   TP [1], PP [1]        tensor / pipeline model-parallel sizes (data parallel = the rest)
#   NPROC_PER_NODE        [#GPUs, or 2 on a CPU-only machine]
#   NNODES [1], NODE_RANK [0], MASTER_ADDR [127.0.0.1], MASTER_PORT [29500], RDZV_ID [croc]
#   OUTPUT_DIR [outputs/croc_run]  checkpoints and TensorBoard logs when --save/--tensorboard-dir are not given
#   PYTHON [.venv/bin/python if present, else python3]
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
STAGE=${STAGE:-croc}
TP=${TP:-1}
PP=${PP:-1}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_ID=${RDZV_ID:-croc}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/croc_run}

NUM_GPUS=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')
if [ -z "${NPROC_PER_NODE:-}" ]; then
  if [ "$NUM_GPUS" -gt 0 ]; then NPROC_PER_NODE=$NUM_GPUS; else NPROC_PER_NODE=2; fi
fi

# Megatron's usual environment: one CUDA work queue keeps TP communication ordered with
# compute; NCCL tuned for overlap; no tokenizer thread storms; one OpenMP thread per CPU rank.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
export TORCH_NCCL_AVOID_RECORD_STREAMS=${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}
export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export PYTHONUNBUFFERED=1

args=(--croc-stage "$STAGE" --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP")
# Embedded default: no --data-path given -> the tiny model on the bundled demo data.
if [[ " $* " != *" --data-path "* ]]; then
  if [ "$NUM_GPUS" -eq 0 ] && [ "$TP" -eq 1 ] && [ "$PP" -eq 1 ] && [ "$NPROC_PER_NODE" -eq 2 ]; then
    # two CPU processes: one pipeline stage each measured fastest on 2 cores
    args=(--croc-stage "$STAGE" --tensor-model-parallel-size 1 --pipeline-model-parallel-size 2)
  fi
  args+=(--num-workers 0)
fi
[[ " $* " == *" --save "* ]] || args+=(--save "$OUTPUT_DIR/checkpoints" --save-interval 100)
[[ " $* " == *" --tensorboard-dir "* ]] || args+=(--tensorboard-dir "$OUTPUT_DIR/tensorboard")

if [ "$NNODES" -eq 1 ]; then
  rdzv=(--standalone)  # a free local port, no rendezvous server needed
else
  rdzv=(--nnodes "$NNODES" --node-rank "$NODE_RANK" --rdzv-backend c10d
        --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$RDZV_ID")
fi
exec "$PYTHON" -m torch.distributed.run "${rdzv[@]}" --nproc-per-node "$NPROC_PER_NODE" \
  -m megatron_croc.training.pretrain "${args[@]}" "$@"
