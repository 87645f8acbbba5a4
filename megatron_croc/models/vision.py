"""Vision side of the first pipeline stage: CLIP ViT (penultimate layer, class token dropped)
-> mlp2x_gelu projector -> per-token L2 normalisation (SPEC §1.1).

The frozen encoder's forward is paced by the host, not the GPU: megatron-core's local ViT layer
issues 36 top-level torch ops (115 counting the ones they call) through several Python module and
autograd-function layers, about 1 ms of host time per layer on this project's (slow) CPU, while
its GEMMs at 4 CLIP-L/336 images are estimated at tens of microseconds each on an H200. Measured
there: encoder forward + projector forward and backward 33.2 ms per micro-batch of 4 images for
~1.5 TFLOP of work (~6% of the card's matmul rate). So :meth:`VisionTower.encode` runs the
frozen encoder

- on a GPU, by replaying a CUDA graph of its whole forward (uint8 images -> features), one graph
  per input shape (:class:`FrozenForwardGraphs`): one launch per call instead of ~800 host-side
  ops. Only at tensor-parallel size 1 (see :meth:`VisionTower.uses_cuda_graphs` for why); off
  with ``VisionConfig.cuda_graph=False`` (``--no-vision-cuda-graph``);
- everywhere else (CPU, TP > 1, graphs off or failed), eagerly under ``torch.inference_mode``:
  the same kernels with less per-op bookkeeping than ``no_grad`` (no version counters, no view
  tracking), bit-identical results; ~12% less host time per call on the CPU (the op count
  barely changes: 34 top-level ops per layer instead of 36).

megatron-core 0.19.2's own CUDA graphs (``TransformerConfig.cuda_graph_impl="local"``,
``CudaGraphManager``) do not fit a frozen, forward-only encoder: they graph each
TransformerLayer separately (23 replays, each through the manager's Python, instead of one),
capture training graphs only inside the training loop's forward and backward (a layer called
with gradients off in training mode, as the frozen encoder is, runs eagerly), reach graphs
in inference only through the inference engine's ``inference_context``, and require a
CUDA-graph-safe RNG tracker process-wide, which the language model's setup would have to change.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.vision.clip_vit_model import CLIPViTModel
from megatron.core.models.vision.multimodal_projector import MultimodalProjector
from megatron.core.transformer.module import MegatronModule

from megatron_croc.config import (
    CLIP_MEAN,
    CLIP_STD,
    ModelConfig,
    projector_transformer_config,
    vision_transformer_config,
)
from megatron_croc.models import specs

# Distinct input shapes (image counts) a VisionTower keeps CUDA graphs for. A run whose
# micro-batches always hold the same number of images needs one; benchmarks use two or three.
# Each graph keeps its forward's intermediates in a private memory pool (at 16 CLIP-L/336
# images the largest is [9232, 4096] bf16, 76 MB), so the number is bounded; past it, new
# image counts run eagerly.
MAX_ENCODER_GRAPHS = 4

# Eager warm-up runs before a capture: lazy initialisation (cuBLAS workspaces, kernel choices)
# must happen outside the graph.
CAPTURE_WARMUP_RUNS = 2


@dataclass(kw_only=True)
class CapturedForward:
    """A captured forward: replaying ``graph`` computes the forward of whatever is in
    ``static_input`` into ``static_output`` (the same two tensors every replay)."""

    graph: object  # torch.cuda.CUDAGraph; anything with replay() for the CPU tests of the cache
    static_input: torch.Tensor
    static_output: torch.Tensor


def capture_cuda_graph(forward: Callable[[torch.Tensor], torch.Tensor], example: torch.Tensor) -> CapturedForward:
    """Capture ``forward`` of a tensor shaped like ``example`` into a CUDA graph, as torch's
    CUDA-graph documentation prescribes: warm-up runs on a side stream, then the capture on that
    same stream into the graph's private memory pool (``torch.cuda.graph`` synchronises the
    device and empties the allocator's cache first, once per capture).

    ``capture_error_mode="thread_local"`` (what torch.compile's CUDA graphs use): the
    assignment solver's host threads may synchronise on CUDA events while a capture is under
    way; the default "global" mode would make their calls fail. The capturing thread is still
    forbidden unsafe calls, so a forward that cannot be captured still raises here.
    """
    device = example.device
    caller_stream = torch.cuda.current_stream(device)
    static_input = example.clone()  # in the regular pool: it lives as long as the graph
    stream = torch.cuda.Stream(device=device)
    stream.wait_stream(caller_stream)
    try:
        with torch.cuda.stream(stream):
            for _ in range(CAPTURE_WARMUP_RUNS):
                forward(static_input)
        caller_stream.wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
            static_output = forward(static_input)
    finally:
        # torch.cuda.graph leaves its stream current when ending the capture raises (its
        # __exit__ skips restoring it): the caller's work must go on on the caller's stream
        torch.cuda.set_stream(caller_stream)
        caller_stream.wait_stream(stream)
    return CapturedForward(graph=graph, static_input=static_input, static_output=static_output)


class FrozenForwardGraphs:
    """Graphs of a frozen module's forward, one per input signature (shape, dtype, device), at
    most ``max_graphs``; each call copies its input into the graph's static input, replays, and
    returns a copy of the static output.

    Why a copy: every replay writes the same output buffer, and the caller keeps results across
    calls (training.step's look-ahead encodes micro-batch m+1 while m's features still wait for
    its projector's backward). The copy is [N, T, C] — one image's features are ~1.2 MB at
    CLIP-L/336 in bf16 — next to a whole encoder forward.

    A graph reads the weights at the addresses they had when it was captured. Updating them in
    place (``load_state_dict``'s copy, an optimizer) is seen by the graphs; new storage
    (``module.to(...)``, a bf16 conversion, ``param.data = ...``) is not, so the addresses of the
    tensors ``reads()`` listed are compared on every call (CLIP-L's 283 tensors: 63 us of
    ``data_ptr()`` calls on a slow CPU, where walking the module tree takes 1.7 ms), and all
    graphs are dropped, to be recaptured on demand, when one changed. New tensor *objects*
    (``load_state_dict(..., assign=True)``, a parameter attribute reassigned) are not in that
    list: whoever replaces them calls :meth:`invalidate` (VisionTower does on ``.to()``-style
    conversions and state-dict loads). Until then the list keeps the old tensors alive, so a
    graph never reads freed memory.

    ``capture`` is :func:`capture_cuda_graph`; the CPU tests pass a stand-in with the same
    static-buffer semantics. A capture that raises turns the graphs off for good, with one
    warning; a signature past ``max_graphs`` gets no graph (one warning the first time). In
    both cases the call returns None and the caller runs the forward eagerly.
    """

    def __init__(
        self,
        forward: Callable[[torch.Tensor], torch.Tensor],
        *,
        reads: Callable[[], Iterable[torch.Tensor]],
        max_graphs: int,
        name: str,
        capture: Callable[[Callable[[torch.Tensor], torch.Tensor], torch.Tensor], CapturedForward] = capture_cuda_graph,
    ) -> None:
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be at least 1, got {max_graphs}")
        self.forward = forward
        self.reads = reads
        self.max_graphs = max_graphs
        self.name = name
        self.capture = capture
        self.graphs: dict[tuple, CapturedForward] = {}
        self.failure: str | None = None  # why capturing failed; the graphs are off once set
        self.captures = 0  # graphs captured so far (recaptures after weight changes included)
        self._tensors: tuple[torch.Tensor, ...] | None = None  # what reads() listed
        self._addresses: tuple[int, ...] | None = None
        self._warned_full = False

    def invalidate(self) -> None:
        """Drop every graph and list ``reads()`` again at the next call: after the forward's
        tensors were replaced by new objects."""
        self.graphs.clear()
        self._tensors = self._addresses = None

    @staticmethod
    def signature(x: torch.Tensor) -> tuple:
        return tuple(x.shape), x.dtype, x.device

    def __call__(self, x: torch.Tensor) -> torch.Tensor | None:
        """``forward(x)`` from a graph replay (a fresh tensor), or None when the caller must run
        the forward itself: capturing failed before, or ``x``'s signature is new and the cache
        is full."""
        if self.failure is not None:
            return None
        if self._tensors is None:
            self._tensors = tuple(self.reads())
        addresses = tuple(t.data_ptr() for t in self._tensors)
        if addresses != self._addresses:
            self.graphs.clear()  # they read the tensors that were there before
            self._addresses = addresses
        key = self.signature(x)
        captured = self.graphs.get(key)
        if captured is None:
            if len(self.graphs) >= self.max_graphs:
                if not self._warned_full:
                    self._warned_full = True
                    warnings.warn(
                        f"{self.name}: CUDA graphs kept for {self.max_graphs} input shapes already "
                        f"({sorted(k[0] for k in self.graphs)}); new shapes such as {key[0]} run eagerly",
                        RuntimeWarning, stacklevel=3)
                return None
            try:
                captured = self.capture(self.forward, x)
            except Exception as error:  # any capture failure: eager from now on, training goes on
                self.failure = f"{type(error).__name__}: {error}"
                self.graphs.clear()
                warnings.warn(f"{self.name}: CUDA graph capture failed ({self.failure}); running eagerly from now on",
                              RuntimeWarning, stacklevel=3)
                return None
            self.graphs[key] = captured
            self.captures += 1
        captured.static_input.copy_(x)
        captured.graph.replay()
        return captured.static_output.clone(memory_format=torch.contiguous_format)


class VisionTower(MegatronModule):
    """uint8 images [N, 3, H, W] -> unit-norm visual tokens [N, T, H_llm]."""

    def __init__(self, config: ModelConfig, *, use_te: bool):
        vision_config = vision_transformer_config(config)
        super().__init__(config=vision_config)
        vis = config.vision
        self.frozen = vis.frozen
        # Built with num_layers - 1 layers: LLaVA reads hidden_states[-2], the output of the
        # penultimate layer before any post-norm, so the last layer is never needed.
        self.encoder = CLIPViTModel(
            vision_config,
            specs.vision_layer_spec(use_te=use_te),
            ln_pre_impl=specs.vision_norm_impl(use_te=use_te),
            add_class_token=True,
            class_token_len=1,
            patch_dim=vis.patch_size,
            img_h=vis.image_size,
            img_w=vis.image_size,
            model_subtype="clip",
        )
        self.projector = MultimodalProjector(
            projector_transformer_config(config),
            specs.projector_spec(use_te=use_te),
            projector_type="mlp",
            input_size=vis.hidden_size,
        )
        self.register_buffer("pixel_mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("pixel_std", torch.tensor(CLIP_STD).view(1, 3, 1, 1) * 255, persistent=False)
        if self.frozen:
            for p in self.encoder.parameters():
                p.requires_grad_(False)
        # Graphs of the frozen forward (a plain attribute, not a submodule: no state to save).
        self.encoder_graphs: FrozenForwardGraphs | None = None
        if self.frozen and vis.cuda_graph:
            self.encoder_graphs = FrozenForwardGraphs(
                self._frozen_features, reads=self._frozen_reads, max_graphs=MAX_ENCODER_GRAPHS,
                name="vision encoder")
            # a state-dict load with assign=True puts new tensor objects in place
            self.register_load_state_dict_post_hook(lambda module, incompatible: module._invalidate_graphs())

    def _apply(self, fn, *args, **kwargs):
        # .to() / .cuda() / .bfloat16() (Float16Module) give the tensors new storage, or new
        # objects under torch's overwrite-on-conversion flag: list them again
        self._invalidate_graphs()
        return super()._apply(fn, *args, **kwargs)

    def _invalidate_graphs(self) -> None:
        if getattr(self, "encoder_graphs", None) is not None:
            self.encoder_graphs.invalidate()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.project(self.encode(images))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images [N, 3, H, W] -> encoder features [N, T, C] (class token dropped).

        A frozen encoder returns a new tensor without gradient history, from a CUDA graph
        replay when :meth:`uses_cuda_graphs` allows it, else from an eager forward.
        """
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(
                f"images must be uint8 [N, 3, H, W] RGB, got {images.dtype} {tuple(images.shape)}"
            )
        if not self.frozen:
            return self._features(images)
        if self.uses_cuda_graphs(images):
            features = self.encoder_graphs(images)
            if features is not None:
                return features
        # Inference tensors cannot be saved for the projector's backward: hand out a plain copy,
        # contiguous (the projector's GEMM would copy the class-token-dropped view anyway).
        return self._frozen_features(images).clone(memory_format=torch.contiguous_format)

    def uses_cuda_graphs(self, images: torch.Tensor) -> bool:
        """Whether :meth:`encode` replays CUDA graphs for these images: a frozen encoder with
        graphs on (``VisionConfig.cuda_graph``), on a CUDA device, at tensor-parallel size 1,
        without dropout in effect, outside another stream capture.

        Why not with tensor parallelism: the encoder's row-parallel layers all-reduce over the
        TP group. NCCL collectives can be captured, but every TP rank would have to capture and
        replay in lockstep, and a capture failing on one rank only would leave that rank eager
        and the others replaying, an order of collectives nobody has verified; gloo collectives
        cannot be captured at all. So TP > 1 runs eagerly (untested on a GPU here; a next step).
        """
        if self.encoder_graphs is None or not images.is_cuda or not self.pixel_mean.is_cuda:
            return False
        if parallel_state.get_tensor_model_parallel_world_size() != 1:
            return False
        # Dropout is 0 in every config built here; a graph would replay one fixed mask otherwise.
        if self.encoder.training and (self.config.hidden_dropout or self.config.attention_dropout):
            return False
        return not torch.cuda.is_current_stream_capturing()

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        pixels = (images.to(self.pixel_mean.dtype) - self.pixel_mean) / self.pixel_std
        # the weights' dtype, which is the config's unless the module was converted (.to(dtype))
        features = self.encoder(pixels.to(self.encoder.conv1.weight.dtype))  # [N, 1 + T, C]
        return features[:, self.encoder.class_token_len :]

    def _frozen_features(self, images: torch.Tensor) -> torch.Tensor:
        # A frozen encoder needs no activations kept for backward, nor autograd's bookkeeping.
        with torch.inference_mode():
            return self._features(images)

    def _frozen_reads(self) -> Iterable[torch.Tensor]:
        """Every tensor the frozen forward reads besides its input (what a graph captured)."""
        yield self.pixel_mean
        yield self.pixel_std
        yield from self.encoder.parameters()
        yield from self.encoder.buffers()

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Encoder features [N, T, C] -> unit-norm visual tokens [N, T, H_llm]."""
        return F.normalize(self.projector(features), dim=-1)
