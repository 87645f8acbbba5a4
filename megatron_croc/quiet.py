"""Known, harmless third-party warnings, silenced by exact message at start so that a run's
output is the project's own lines; every other warning still shows. No torch import here: the
entry points call this first, before anything heavy is imported.
"""

from __future__ import annotations

import logging
import re
import warnings

__all__ = ["quiet_known_warnings"]

# (warning category, start of the message): megatron-core announcing fallbacks that are what
# this platform layer chose on purpose, and deprecations of defaults we do not use.
_KNOWN_WARNINGS = (
    # megatron-core without TE/apex: torch's optimizers and norms, local multi-tensor kernels
    (UserWarning, "Transformer Engine and Apex are not installed. Falling back to Torch optimizers."),
    (UserWarning, "Transformer Engine and Apex are not installed. Falling back to local implementations of "
                  "multi_tensor_applier"),
    (UserWarning, "Apex is not installed. Falling back to Torch Norm"),
    # TransformerConfig's own default cuda_graph_scope; we do not capture CUDA graphs
    (UserWarning, "full scope is deprecated. Use empty cuda_graph_modules to capture the whole layer."),
    # megatron-core's rank-0 logging asked before the process group exists (the launcher and
    # every rank check datasets and checkpoints before joining the job)
    (UserWarning, "Could not determine rank from torch.distributed, RANK, or SLURM_PROCID."),
    # reading a checkpoint's metadata before any process group exists, on purpose
    (UserWarning, "torch.distributed is disabled, unavailable or uninitialized, assuming the intent is to load "
                  "in a single process."),
    # imported by megatron-core's model registry; we do not use MIMO
    (UserWarning, "MimoModelConfig is experimental and still under active development."),
    # megatron-core's dist_checkpointing calls torch.distributed.checkpoint.load positionally
    # and builds ShardedTensors for its torch_dist format: seen on every --load
    (UserWarning, "The argument order of load has been changed. Please check the document to avoid future breakages."),
    (FutureWarning, "Please use DTensor instead and we are deprecating ShardedTensor."),
)

# logger name -> start of the message, for the ones logged rather than warned
_KNOWN_LOG_LINES = {
    # CPU-only machines: torch looks for a CUDA toolkit when megatron-core imports its extension helpers
    "torch.utils.cpp_extension": "No CUDA runtime is found, using CUDA_HOME=",
    # we build the LLM as megatron-core's GPTModel (its MIMO/hybrid successor is not needed here)
    "megatron.core.models.gpt.gpt_model": "GPTModel IS DEPRECATED.",
    # dist_checkpointing.save's synchronous path goes through the async writer and says so
    "megatron.core.dist_checkpointing.strategies.torch": "MCore's async save is deprecated",
}


class _DropKnownLine(logging.Filter):
    def __init__(self, start: str) -> None:
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self.start)


def quiet_known_warnings() -> None:
    """Silence, by exact message, the third-party warnings listed above (each known and
    harmless); every other warning still shows. Call before importing megatron-core."""
    for category, start in _KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(start), category=category)
    for name, start in _KNOWN_LOG_LINES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnownLine) and f.start == start for f in logger.filters):
            logger.addFilter(_DropKnownLine(start))
