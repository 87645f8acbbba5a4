"""The memory a training run needs per GPU, before it runs (``--dry-run``): Megatron-LM's
"theoretical memory footprint", for a Croc model at a given layout.

**Parameters** come from the model itself. Each pipeline stage's model chunks are built by the
training code (``pretrain.build_model_chunks``'s CrocModel) on the meta device — no weights are
allocated, a 7B layout reports in seconds — in one process that plays the first rank of each
stage on torch's ``fake`` process group (real ranks and group sizes, no-op collectives). So
tensor-parallel sharding, vocabulary padding, the vision tower / pool / VTR head placement and
what the stage freezes are exactly what the run builds.

**Gradients and optimizer state** follow from them by megatron-core's rules as the trainer
configures it (``pretrain.wrap_ddp`` and ``optim.build_optimizer``): an fp32 gradient buffer for
every trainable parameter (``grad_reduce_in_fp32``); Adam's two fp32 moments, plus an fp32 master
copy of bf16 weights; with the distributed optimizer the optimizer part is sharded over the
data-parallel ranks. (Bucket padding, at most a few hundred elements per parameter, is not
counted.)

**Activations** per micro-batch are an estimate: the tensors our layers keep for backward,
counted from the layer structure (megatron-core's local layer with CrocCoreAttention, or TE's
layers) as it runs on a GPU with fused attention (FlashAttention / FlexAttention: no S x S
tensor is kept): per LLM layer and token, the layer input, the QKV input and output, the
rotated query and key, the attention output and its log-sum-exp, the projection input, the
MLP input, its SwiGLU input, activation and product, and two norms' inputs (/ TP with sequence
parallelism where the tensor is sequence-sharded). Recomputation keeps less: ``selective``
drops what megatron-core recomputes (core attention: its output; mlp: all but its input);
``full`` keeps each recomputed chunk's input, and recomputes one chunk at a time in backward
(a workspace of one chunk's activations). The first stage adds the projector (and the vision
encoder when it trains), the last the final norm, the cross-entropy's fp32 softmax and the VTR
head; with pipeline parallelism in the comprehension stage, later stages keep the received
targets. A stage holds the activations of the micro-batches in flight in megatron-core's 1F1B
schedule (``PP - stage``, interleaved: its warm-up count + 1 model chunks). Not counted: the
CUDA context, NCCL buffers and allocator fragmentation (typically 2-5 GiB on a GPU).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

GIB = 2**30


@dataclass(frozen=True, kw_only=True)
class MemoryReportConfig:
    """What ``--dry-run`` needs beyond the training flags."""

    world_size: int | None = None  # GPUs of the planned run; None: TP x PP (one replica)
    gpu_memory_gb: float = 80.0


@dataclass(frozen=True, kw_only=True)
class RunShape:
    """The run a report is for: the model at its layout and the batch shape."""

    model: object  # megatron_croc.config.ModelConfig
    world_size: int
    micro_batch_size: int
    seq_length: int
    num_microbatches: int  # per optimizer step and data-parallel rank
    use_distributed_optimizer: bool
    gpu_memory_gb: float = 80.0

    @property
    def tensor_parallel(self) -> int:
        return self.model.parallel.tensor_model_parallel_size

    @property
    def pipeline_parallel(self) -> int:
        return self.model.parallel.pipeline_model_parallel_size

    @property
    def virtual_stages(self) -> int:
        return self.model.parallel.virtual_pipeline_model_parallel_size or 1

    @property
    def data_parallel(self) -> int:
        return self.world_size // (self.tensor_parallel * self.pipeline_parallel)


@dataclass(frozen=True, kw_only=True)
class StageParams:
    """What one rank of a pipeline stage holds, from the model built on the meta device."""

    stage: int
    ranks: tuple[int, ...]  # every global rank of this stage (its TP x DP ranks)
    num_params: int
    num_trainable: int
    llm_layers_per_chunk: tuple[int, ...]  # the LLM layers of each model chunk on this rank
    pre_process: bool  # holds the vision tower and pool (the first stage)
    post_process: bool  # holds the output layer and VTR head (the last stage)


@dataclass(frozen=True, kw_only=True)
class ModelState:
    weights: int
    grads: int
    optimizer: int  # with the run's optimizer choice
    optimizer_distributed: int
    optimizer_replicated: int

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer


@dataclass(frozen=True, kw_only=True)
class Activations:
    per_microbatch: int  # kept for backward by one micro-batch on this stage
    in_flight: float  # micro-batches whose activations a stage holds at its peak
    workspace: int  # transient, once: a recomputed chunk, gathered sequence, the logits

    @property
    def peak(self) -> int:
        return int(self.per_microbatch * self.in_flight) + self.workspace


# ---------------------------------------------------------------------------------------------
# model state: build every stage on the meta device
# ---------------------------------------------------------------------------------------------


def stage_params(shape: RunShape) -> list[StageParams]:
    """Build each pipeline stage's model chunks on the meta device, as its first rank would.

    Needs a process without a torch.distributed process group (it creates fake ones, one rank
    at a time) and runs on the CPU platform (a report needs no GPU)."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    import torch.testing._internal.distributed.fake_pg  # noqa: F401  (registers torch's "fake" backend)
    from megatron_croc.platform import init_platform
    from megatron_croc.training.pretrain import build_model_chunks

    if dist.is_initialized():
        raise RuntimeError("the memory report builds fake process groups; run it in a process without "
                           "torch.distributed initialised (e.g. `python -m megatron_croc.training.pretrain "
                           "--dry-run ...`)")
    platform = init_platform(force_cpu=True)
    if platform.device.type != "cpu":
        raise RuntimeError("the memory report runs on the CPU platform; start it before anything uses CUDA "
                           "(or set MEGATRON_CROC_FORCE_CPU=1)")
    par = shape.model.parallel
    tp, pp, dp = shape.tensor_parallel, shape.pipeline_parallel, shape.data_parallel

    def init(rank: int) -> None:
        dist.init_process_group("fake", rank=rank, world_size=shape.world_size)
        ps.initialize_model_parallel(
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
            virtual_pipeline_model_parallel_size=par.virtual_pipeline_model_parallel_size,
            create_gloo_process_groups=False,
        )
        model_parallel_cuda_manual_seed(0)

    def shutdown() -> None:
        ps.destroy_model_parallel()
        dist.destroy_process_group()

    # The rank that plays each stage: rank 0's pipeline group, in stage order.
    init(0)
    try:
        first_ranks = dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group())
    finally:
        shutdown()
    # All of a stage's ranks: a contiguous block in megatron-core's default order (tp-cp-ep-dp-pp).
    blocks = [tuple(range(i * tp * dp, (i + 1) * tp * dp)) for i in range(pp)]
    stage_ranks = blocks if [b[0] for b in blocks] == first_ranks else [(r,) for r in first_ranks]

    stages = []
    for stage, rank in enumerate(first_ranks):
        init(rank)
        try:
            with torch.device("meta"):
                chunks = build_model_chunks(shape.model, dataclasses.replace(platform, device=torch.device("meta")))
            params = {id(p): p for chunk in chunks for p in chunk.parameters()}.values()
            stages.append(StageParams(
                stage=stage, ranks=stage_ranks[stage],
                num_params=sum(p.numel() for p in params),
                num_trainable=sum(p.numel() for p in params if p.requires_grad),
                llm_layers_per_chunk=tuple(len(_croc(c).language_model.decoder.layers) for c in chunks),
                pre_process=_croc(chunks[0]).pre_process, post_process=_croc(chunks[-1]).post_process,
            ))
        finally:
            shutdown()
    return stages


def _croc(chunk):
    from megatron.core.utils import unwrap_model

    return unwrap_model(chunk)


def model_state(shape: RunShape, stage: StageParams) -> ModelState:
    """Weights, gradients and optimizer state of one rank of ``stage``, in bytes."""
    bf16 = shape.model.precision.bf16
    weights = stage.num_params * (2 if bf16 else 4)
    grads = stage.num_trainable * 4  # megatron-core DDP's fp32 grad buffer (grad_reduce_in_fp32)
    # Adam's exp_avg and exp_avg_sq in fp32, and fp32 master weights of bf16 parameters
    optimizer_replicated = stage.num_trainable * (8 + (4 if bf16 else 0))
    optimizer_distributed = -(-optimizer_replicated // shape.data_parallel)
    return ModelState(
        weights=weights, grads=grads,
        optimizer=optimizer_distributed if shape.use_distributed_optimizer else optimizer_replicated,
        optimizer_distributed=optimizer_distributed, optimizer_replicated=optimizer_replicated,
    )


# ---------------------------------------------------------------------------------------------
# activations: counted from the layer structure
# ---------------------------------------------------------------------------------------------


def _llm_layer_bytes_per_token(model, *, sequence_parallel: bool, drop: frozenset[str] = frozenset()) -> float:
    """Bytes one LLM (or VTR-head) layer keeps for backward per token on one tensor-parallel
    rank; ``drop``: the parts selective recomputation recomputes instead of keeping."""
    lm = model.language
    e = 2 if model.precision.bf16 else 4
    t = model.parallel.tensor_model_parallel_size
    seq = t if sequence_parallel else 1  # sequence-sharded tensors
    h, a, g, d, f = lm.hidden_size, lm.num_attention_heads, lm.num_query_groups, lm.kv_channels, lm.ffn_hidden_size
    norms = e * 2 * h / seq + 4 * 2 / seq  # input_layernorm and pre_mlp_layernorm inputs (+ fp32 rstd)
    linear_inputs = e * 2 * h / seq  # QKV and fc1 inputs (sequence-parallel linears keep the local slice)
    qkv = e * ((a + 2 * g) * d + a * d + g * d) / t  # QKV output (kept by the value view), rotated q and k
    core_attention = e * a * d / t + 4 * a / t  # attention output and its fp32 log-sum-exp
    projection_input = e * a * d / t
    mlp = e * 4 * f / t  # SwiGLU input (2f), silu output (f), the product (fc2 input, f)
    total = norms + linear_inputs + qkv + projection_input
    if "core_attn" not in drop:
        total += core_attention
    if "mlp" not in drop:
        total += mlp
    return total


def _vit_layer_bytes_per_token(model) -> float:
    """The vision encoder's layer (LayerNorm, no RoPE, quick-GELU MLP), when it trains."""
    vis = model.vision
    e = 2 if model.precision.bf16 else 4
    t = model.parallel.tensor_model_parallel_size
    c, f, heads = vis.hidden_size, vis.ffn_hidden_size, vis.num_attention_heads
    return (e * (4 * c + 3 * c / t + 2 * c / t + 3 * f / t)  # norms, linear inputs, QKV, attention, MLP
            + 4 * heads / t + 16)  # log-sum-exp, LayerNorm statistics


def activations(shape: RunShape, stage: StageParams, model=None) -> Activations:
    """Activation estimate for one rank of ``stage`` under ``model``'s recomputation and
    sequence-parallel settings (default: the run's)."""
    model = model or shape.model
    lm = model.language
    e = 2 if model.precision.bf16 else 4
    t = model.parallel.tensor_model_parallel_size
    sp = model.parallel.sequence_parallel and t > 1
    seq = t if sp else 1
    tokens = shape.seq_length * shape.micro_batch_size
    h = lm.hidden_size
    layer_input = e * h / seq
    full_layer = _llm_layer_bytes_per_token(model, sequence_parallel=sp)
    drop = frozenset(model.recompute_modules or ("core_attn",)) if model.recompute_granularity == "selective" \
        else frozenset()
    kept_layer = _llm_layer_bytes_per_token(model, sequence_parallel=sp, drop=drop)

    per_token = 0.0
    workspace_per_token = 0.0
    for layers in stage.llm_layers_per_chunk:
        if model.recompute_granularity == "full":
            n = model.recompute_num_layers or 1
            if model.recompute_method == "uniform":
                per_token += math.ceil(layers / n) * layer_input
                workspace_per_token = max(workspace_per_token, min(n, layers) * full_layer)
            else:  # block: the first n layers of each chunk, one at a time
                recomputed = min(n, layers)
                per_token += recomputed * layer_input + (layers - recomputed) * full_layer
                workspace_per_token = max(workspace_per_token, full_layer if recomputed else 0.0)
        else:
            per_token += layers * kept_layer
    per_microbatch = per_token * tokens
    workspace = workspace_per_token * tokens
    if sp:  # megatron-core's buffer for the all-gathered sequence of the sequence-parallel linears
        workspace += e * h * tokens

    images = shape.micro_batch_size  # one image per sample (SPEC §1.1)
    num_visual = images * model.vision.num_image_tokens
    if stage.pre_process:
        c = model.vision.hidden_size
        # projector: fc1 input (encoder features), GELU input and output; the normalised output
        per_microbatch += num_visual * (e * (c + 2 * h / t + h) + 4)
        if not model.vision.frozen:
            vit_tokens = images * (model.vision.num_image_tokens + 1)
            per_microbatch += vit_tokens * model.vision.num_built_layers * _vit_layer_bytes_per_token(model)
    elif model.croc.uses_pool and shape.pipeline_parallel > 1:
        per_microbatch += tokens * layer_input  # the received targets, beside the hidden states
    if stage.post_process:
        vocab = model.padded_vocab_size // t
        # final norm input, output-layer input, the cross entropy's fp32 softmax
        per_microbatch += tokens * (2 * layer_input + 4 / seq + 4 * vocab)
        workspace += tokens * vocab * (e + 4)  # the logits and their fp32 copy, while the loss runs
        if model.croc.uses_pool:
            # VTR head: one layer (not sequence-parallel, selective recomputation applies), its
            # output linear's input, SmoothL1's fp32 prediction and target
            vtr_drop = drop if model.recompute_granularity == "selective" else frozenset()
            per_microbatch += num_visual * (
                _llm_layer_bytes_per_token(model, sequence_parallel=False, drop=vtr_drop) + e * h + 8 * h)
    return Activations(per_microbatch=int(per_microbatch), in_flight=in_flight_microbatches(shape, stage.stage),
                       workspace=int(workspace))


def in_flight_microbatches(shape: RunShape, stage: int) -> float:
    """Micro-batches whose activations pipeline rank ``stage`` holds at once in megatron-core's
    schedules: 1F1B runs ``PP - stage - 1`` warm-up forwards, then one more before the first
    backward; the interleaved schedule ``2 (PP - stage - 1) + (VP - 1) PP`` warm-up model
    chunks, each a 1/VP share of the stage's layers."""
    pp, vp, m = shape.pipeline_parallel, shape.virtual_stages, shape.num_microbatches
    if pp == 1:
        return 1.0
    if vp == 1:
        return float(min(pp - stage, m))
    warmup = min((pp - stage - 1) * 2 + (vp - 1) * pp, m * vp)
    return min(warmup + 1, m * vp) / vp


# ---------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------

# The recomputation settings the report compares (label, ModelConfig changes).
RECOMPUTE_CHOICES = (
    ("none", dict(recompute_granularity=None, recompute_method=None, recompute_num_layers=None,
                  recompute_modules=None)),
    ("selective (core_attn)", dict(recompute_granularity="selective", recompute_method=None,
                                   recompute_num_layers=None, recompute_modules=None)),
    ("selective (core_attn, mlp)", dict(recompute_granularity="selective", recompute_method=None,
                                        recompute_num_layers=None, recompute_modules=("core_attn", "mlp"))),
    ("full, uniform, 1 layer", dict(recompute_granularity="full", recompute_method="uniform",
                                    recompute_num_layers=1, recompute_modules=None)),
)


def recompute_label(model) -> str:
    if model.recompute_granularity is None:
        return "none"
    if model.recompute_granularity == "selective":
        return f"selective ({', '.join(model.recompute_modules or ('core_attn',))})"
    n = model.recompute_num_layers
    return f"full, {model.recompute_method}, {n} layer{'s' if n != 1 else ''}"


@dataclass(frozen=True, kw_only=True)
class MemoryReport:
    shape: RunShape
    stages: tuple[StageParams, ...]

    def state(self, stage: StageParams) -> ModelState:
        return model_state(self.shape, stage)

    def activations(self, stage: StageParams, model=None) -> Activations:
        return activations(self.shape, stage, model)

    def total(self, stage: StageParams) -> int:
        """Peak bytes of one rank of ``stage`` with the run's own settings."""
        return self.state(stage).total + self.activations(stage).peak

    def fits(self) -> bool:
        return all(self.total(s) <= self.shape.gpu_memory_gb * GIB for s in self.stages)

    def format(self) -> str:
        shape, model = self.shape, self.shape.model
        par = model.parallel
        gib = lambda n: f"{n / GIB:.2f}"  # noqa: E731
        ranks = lambda s: (f"{s.ranks[0]}-{s.ranks[-1]}" if len(s.ranks) > 1 else f"{s.ranks[0]}")  # noqa: E731
        lines = [
            f"Theoretical memory per GPU (GiB) -- {model.language.num_layers}-layer LLM "
            f"(hidden {model.language.hidden_size}), {model.croc.stage} stage, "
            f"{'bf16' if model.precision.bf16 else 'fp32'}",
            f"layout: TP={par.tensor_model_parallel_size} PP={par.pipeline_model_parallel_size}"
            + (f" VP={par.virtual_pipeline_model_parallel_size}" if par.virtual_pipeline_model_parallel_size else "")
            + f" DP={shape.data_parallel} ({shape.world_size} GPUs); micro-batch {shape.micro_batch_size} x "
            f"{shape.seq_length} tokens, {shape.num_microbatches} micro-batches per step; "
            f"this run: recompute {recompute_label(model)}, sequence parallel "
            f"{'on' if par.sequence_parallel else 'off'}, "
            f"{'distributed' if shape.use_distributed_optimizer else 'replicated'} optimizer",
            "",
            "Model state per GPU        params  trainable  weights  grads  optimizer state",
            "stage  ranks               (M)     (M)                        dist. opt.  replicated",
        ]
        for s in self.stages:
            st = self.state(s)
            lines.append(f"{s.stage:<6} {ranks(s):<19} {s.num_params / 1e6:<7.1f} {s.num_trainable / 1e6:<10.1f} "
                         f"{gib(st.weights):<8} {gib(st.grads):<6} {gib(st.optimizer_distributed):<11} "
                         f"{gib(st.optimizer_replicated)}")
        lines += ["", "Activations per micro-batch, by stage (x micro-batches in flight: "
                  + ", ".join(f"stage {s.stage}: {activations(shape, s).in_flight:g}" for s in self.stages) + ")"]
        sp_choices = (False, True) if par.tensor_model_parallel_size > 1 else (False,)
        header = f"{'recompute':<28}" + "".join(
            f"{'SP ' + ('on' if sp else 'off'):<{10 * len(self.stages) + 2}}" for sp in sp_choices)
        lines.append(header)
        for label, changes in RECOMPUTE_CHOICES:
            row = f"{label:<28}"
            for sp in sp_choices:
                variant = model.replace(parallel=dataclasses.replace(par, sequence_parallel=sp), **changes)
                cells = " / ".join(gib(activations(shape, s, variant).per_microbatch) for s in self.stages)
                row += f"{cells:<{10 * len(self.stages) + 2}}"
            lines.append(row)
        budget = shape.gpu_memory_gb * GIB
        lines += ["", f"This run, per GPU           weights+grads+optimizer  activations (x in flight)  workspace  "
                      f"total   of {shape.gpu_memory_gb:g} GiB"]
        for s in self.stages:
            st, act = self.state(s), self.activations(s)
            total = st.total + act.peak
            verdict = "fits" if total <= budget else f"exceeds by {gib(total - budget)}"
            lines.append(f"stage {s.stage:<21} {gib(st.total):<24} {gib(act.per_microbatch * act.in_flight):<26} "
                         f"{gib(act.workspace):<10} {gib(total):<7} {verdict}")
        lines.append("Not counted: CUDA context, NCCL buffers, allocator fragmentation (typically 2-5 GiB).")
        return "\n".join(lines)


def run_shape(config, report: MemoryReportConfig | None = None) -> RunShape:
    """The RunShape of a TrainConfig (``training.arguments``)."""
    report = report or config.memory_report or MemoryReportConfig()
    par = config.model.parallel
    world = report.world_size or par.tensor_model_parallel_size * par.pipeline_model_parallel_size
    dp = world // (par.tensor_model_parallel_size * par.pipeline_model_parallel_size)
    return RunShape(
        model=config.model, world_size=world, micro_batch_size=config.micro_batch_size,
        seq_length=config.data.seq_length,
        num_microbatches=config.global_batch_size // (config.micro_batch_size * dp),
        use_distributed_optimizer=config.optim.use_distributed_optimizer, gpu_memory_gb=report.gpu_memory_gb,
    )


def build_report(shape: RunShape) -> MemoryReport:
    return MemoryReport(shape=shape, stages=tuple(stage_params(shape)))


def dry_run(config) -> MemoryReport:
    """``--dry-run``: the report for a parsed training config, its vocabulary sized as training
    sizes it where that is known without building data (the demo's tokenizer, when its data
    exists). The layout is checked as training checks it, for the machine the run is planned
    for (TE and apex assumed there), not this one."""
    from megatron_croc.config import validate

    validate(config.model, has_te=True, has_apex=True)
    if config.data.demo:
        from megatron_croc.data.indexed import read_meta
        from megatron_croc.training.arguments import DEMO_DATA_DIR

        metas = []
        if os.path.isdir(DEMO_DATA_DIR):
            for name in sorted(os.listdir(DEMO_DATA_DIR)):
                if name.endswith(".meta.json"):
                    metas.append(read_meta(os.path.join(DEMO_DATA_DIR, name[: -len(".meta.json")])))
        if metas:
            vocab = max(m["tokenizer"]["vocab_size"] for m in metas)
            language = dataclasses.replace(config.model.language, vocab_size=vocab)
            config = dataclasses.replace(config, model=config.model.replace(language=language))
    return build_report(run_shape(config))
