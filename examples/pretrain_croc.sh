#!/usr/bin/env bash
# Croc pretraining launcher (torchrun). Extra arguments go to the trainer
# (python -m megatron_croc.training.pretrain --help lists them all, with their defaults).
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
#
# Which wins: an explicit flag (--tensor-model-parallel-size, --croc-stage, ... written
# `--flag value` or `--flag=value`) over the variables, and both over the embedded demo's
# layout (PP=2 on 2 CPU processes). Without --save/--load, a rerun continues its own run from
# OUTPUT_DIR (or says it is done). Everything is checked before a process starts: a bad flag or
# file is one `error:` line and exit 2. The logic lives in megatron_croc/training/launcher.py.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

# Megatron's usual environment: one CUDA work queue keeps TP communication ordered with
# compute; NCCL tuned for overlap; no tokenizer thread storms; one OpenMP thread per CPU rank.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
export TORCH_NCCL_AVOID_RECORD_STREAMS=${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}
export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export PYTHONUNBUFFERED=1

exec "$PYTHON" -m megatron_croc.training.launcher "$@"
