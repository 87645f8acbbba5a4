"""CrocModel: vision encoder -> projector -> (prompt pool) -> Llama LLM -> LM loss (+ VTR loss),
composed from megatron-core modules and aware of its pipeline stage from the start.

Placement (SPEC §2): the vision tower, the pool and the replacement live on the first pipeline
stage; the VTR head and both losses on the last. Every stage gets the micro-batch's layout
(tokens, positions, visual mask, loss mask) from the data loader, so each builds its own
attention layout without communication. The reconstruction targets (the normalised projected
visual tokens, detached) travel from the first to the last stage *inside* the tensor that
megatron-core's schedules already send between stages: with pipeline parallelism in the
comprehension stage that tensor is ``[2S, B, H]`` — the hidden states, then the targets laid
out at their sequence positions (zeros elsewhere). Intermediate stages pass the second half on
untouched. This costs one more activation-sized p2p message per stage boundary (negligible next
to a stage's compute) and needs no extra communication pattern, so it works with 1F1B and
interleaved schedules alike, and text-only micro-batches cannot hang any stage.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module

from megatron_croc.config import (
    ModelConfig,
    language_transformer_config,
    masked_count,
)
from megatron_croc.models import specs
from megatron_croc.models.attention import AttentionLayout
from megatron_croc.models.initialization import initial_value, initialize_parameters
from megatron_croc.models.matching import PendingAssignment, assign_async
from megatron_croc.models.prompt_pool import PromptPool, draw_mask_positions
from megatron_croc.models.vision import VisionTower


# Checkpoint keys of the tensors with a row per (padded) vocabulary entry.
VOCAB_KEYS = ("language_model.embedding.word_embeddings.weight", "language_model.output_layer.weight")


@dataclass(frozen=True, kw_only=True)
class VisualPrefetch:
    """A micro-batch's vision work started ahead of its forward (:meth:`CrocModel.prefetch_visual`):
    the frozen encoder's features, the replaced positions, and the assignment being solved."""

    images: torch.Tensor  # the micro-batch's images, to check that forward gets the same ones
    features: torch.Tensor
    positions: torch.Tensor
    assignment: PendingAssignment


@dataclass(kw_only=True)
class CrocOutputs:
    """What the last pipeline stage returns to the loss function."""

    lm_loss_per_token: torch.Tensor  # [B, S], unmasked; combine with the loss mask
    vtr_loss: torch.Tensor | None  # scalar mean SmoothL1, None outside the comprehension stage


def pipeline_tensor_seq_length(config: ModelConfig, seq_length: int) -> int:
    """Sequence length of the tensor sent between pipeline stages (see the module doc)."""
    carries_targets = config.croc.uses_pool and config.parallel.pipeline_model_parallel_size > 1
    return 2 * seq_length if carries_targets else seq_length


class VTRHead(MegatronModule):
    """Visual token reconstruction: learned position embedding over an image's T positions,
    one bidirectional transformer layer, Linear H->H (SPEC §1.4).

    It reads the visual positions of the whole (gathered) sequence, the same on every
    tensor-parallel rank, so it runs tensor-parallel but never sequence-parallel: its layer is
    built from the LLM's config with ``sequence_parallel`` off (its N x T tokens are small next
    to the sequence)."""

    def __init__(self, lm_config, *, num_tokens: int, use_te: bool):
        if lm_config.sequence_parallel:
            lm_config = dataclasses.replace(lm_config, sequence_parallel=False)
        super().__init__(config=lm_config)
        hidden = lm_config.hidden_size
        self.position_embedding = torch.nn.Parameter(
            torch.randn(num_tokens, 1, hidden, dtype=lm_config.params_dtype) * lm_config.init_method_std
        )
        # A standalone layer, not one of the LLM's: no pipeline layer offset.
        self.layer = build_module(
            specs.bidirectional_layer_spec(use_te=use_te), config=lm_config, layer_number=1, add_layer_offset=False
        )
        self.output = tensor_parallel.ColumnParallelLinear(
            hidden, hidden, config=lm_config, init_method=lm_config.init_method, bias=True,
            gather_output=True,
        )

    def forward(self, visual_hidden: torch.Tensor) -> torch.Tensor:
        """[T, N, H] final hidden states at one image's visual positions -> [T, N, H]."""
        x = visual_hidden + self.position_embedding
        x, _ = self.layer(x, attention_mask=None)
        out, bias = self.output(x)
        return out if bias is None else out + bias


class CrocModel(MegatronModule):
    def __init__(
        self,
        config: ModelConfig,
        *,
        pre_process: bool = True,
        post_process: bool = True,
        use_te: bool = False,
        vp_stage: int | None = None,
    ):
        lm_config = language_transformer_config(config)
        super().__init__(config=lm_config)
        self.model_config = config
        self.model_type = ModelType.encoder_or_decoder  # read by megatron-core's schedules
        self.croc = config.croc
        self.pre_process = pre_process
        self.post_process = post_process
        self.num_image_tokens = config.vision.num_image_tokens
        self.num_masked = masked_count(config)
        self.carries_targets = pipeline_tensor_seq_length(config, 1) == 2
        self.sequence_parallel = config.parallel.sequence_parallel
        self._passthrough: torch.Tensor | None = None

        self.vision = VisionTower(config, use_te=use_te) if pre_process else None
        self.pool = (
            PromptPool(
                lm_config, pool_size=config.croc.pool_size, hidden_size=config.language.hidden_size,
                init=config.croc.pool_init, seed=config.croc.seed,
            )
            if pre_process and config.croc.uses_pool
            else None
        )
        self.language_model = GPTModel(
            config=lm_config,
            transformer_layer_spec=specs.language_block_spec(lm_config, use_te=use_te, vp_stage=vp_stage),
            vocab_size=config.padded_vocab_size,
            max_sequence_length=config.language.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=not config.language.untie_embeddings,
            position_embedding_type="rope",
            rotary_base=int(config.language.rotary_base),
            # We splice the visual tokens in before scattering to sequence-parallel ranks
            # (_embed): with sequence parallelism the embedding stays whole here.
            scatter_embedding_sequence_parallel=False,
            vp_stage=vp_stage,
        )
        self.vtr_head = (
            VTRHead(lm_config, num_tokens=self.num_image_tokens, use_te=use_te)
            if post_process and config.croc.uses_pool
            else None
        )
        self._freeze_for_stage()
        # The same initial weights at every parallel layout, drawn from config.seed (the pool
        # draws its own from the same seed). A checkpoint load overwrites what it holds.
        initialize_parameters(self, seed=config.seed, **self._initialization)

    @property
    def _initialization(self) -> dict:
        return dict(self_initialised=(PromptPool,),
                    vocab_rows={key: self.model_config.language.vocab_size for key in VOCAB_KEYS})

    def initial_value(self, name: str, *, seed: int | None = None):
        """The full initial tensor of parameter ``name`` for ``seed`` (default: the config's),
        the same at every layout; see models.initialization.initial_value."""
        return initial_value(self, name, seed=self.model_config.seed if seed is None else seed,
                             **self._initialization)

    # -- stage presets (SPEC §1.5) --------------------------------------------------------------

    def _freeze_for_stage(self) -> None:
        """align: only the projector trains; croc/instruct: all but the vision encoder
        (which stays frozen unless the vision config says otherwise)."""
        if not self.croc.trains_language_model:
            for p in self.language_model.parameters():
                p.requires_grad_(False)
        # VisionTower freezes its encoder itself (config.vision.frozen); the projector, pool
        # and VTR head always train.

    # -- pipeline plumbing ------------------------------------------------------------------------

    # megatron-core's finalize_model_grads syncs tied embeddings between the first and last
    # stage through these two names; they belong to the language model.
    @property
    def share_embeddings_and_output_weights(self) -> bool:
        return self.language_model.share_embeddings_and_output_weights

    def shared_embedding_or_output_weight(self):
        return self.language_model.shared_embedding_or_output_weight()

    def set_input_tensor(self, input_tensor) -> None:
        if isinstance(input_tensor, (list, tuple)):
            assert len(input_tensor) == 1, "CrocModel takes one input tensor per stage"
            input_tensor = input_tensor[0]
        self._passthrough = None
        if input_tensor is not None and self.carries_targets:
            half = input_tensor.shape[0] // 2
            self._passthrough = input_tensor[half:]
            input_tensor = input_tensor[:half]
        self.language_model.set_input_tensor(input_tensor)

    # -- forward ----------------------------------------------------------------------------------

    def forward(
        self,
        *,
        tokens: torch.Tensor,
        position_ids: torch.Tensor,
        layout: AttentionLayout,
        visual_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
        image_keys: torch.Tensor | None = None,
        visual_prefetch: VisualPrefetch | None = None,
        visual_index: torch.Tensor | None = None,
    ):
        """One micro-batch.

        tokens/position_ids/labels/visual_mask: [B, S]; images: uint8 [N, 3, H, W] (first
        stage), one per visual span in row-major order; image_keys: int64 [N], the images'
        unique positions in the training stream (seeds their pool masks); visual_prefetch:
        what :meth:`prefetch_visual` started for these images, if it was called;
        visual_index: int64 [N * T], ``visual_mask.flatten().nonzero()`` (flat ``row * S + t``
        positions of the visual tokens, ascending) when the caller has it on the host already
        (training.step does), so no stage reads the visual count back from the device.

        Returns the hidden states for the next stage, or on the last stage CrocOutputs (with
        labels) or logits [B, S, V] (without).
        """
        if visual_index is None:
            visual_index = visual_mask.flatten().nonzero().squeeze(1)  # a device sync on a GPU
        self._check_batch(tokens, visual_index.numel(), images, image_keys)
        targets = decoder_input = positions = None
        if self.pre_process:
            decoder_input, targets, positions = self._embed(tokens, position_ids, visual_index, images, image_keys,
                                                            visual_prefetch)
        elif self.carries_targets:
            targets = self._passthrough

        lm_output = self.language_model(
            input_ids=None if decoder_input is not None else tokens,
            position_ids=position_ids,
            attention_mask=layout.as_attention_mask(),
            decoder_input=decoder_input,
            labels=labels,
            output_processor=self._lm_loss_and_hidden if self.post_process else None,
        )
        if not self.post_process:
            if self.carries_targets:
                return torch.cat([lm_output, targets], dim=0)
            return lm_output
        if labels is None:
            return lm_output
        lm_loss, hidden = lm_output
        vtr_loss = None
        if self.vtr_head is not None:
            vtr_loss = self._vtr_loss(hidden, targets, visual_index, image_keys, positions)
        return CrocOutputs(lm_loss_per_token=lm_loss, vtr_loss=vtr_loss)

    def _check_batch(self, tokens, num_visual: int, images, image_keys) -> None:
        if tokens.dim() != 2 or tokens.shape[0] == 0 or tokens.shape[1] == 0:
            raise ValueError(f"empty or malformed batch: tokens of shape {tuple(tokens.shape)}")
        max_len = self.model_config.language.max_position_embeddings
        if tokens.shape[1] > max_len:
            raise ValueError(
                f"sequence length {tokens.shape[1]} exceeds the model's maximum "
                f"{max_len} (max_position_embeddings); shorten --seq-length or the samples"
            )
        if num_visual % self.num_image_tokens:
            raise ValueError(
                f"{num_visual} visual positions in the batch is not a multiple of "
                f"{self.num_image_tokens} tokens per image: the <image> expansion and the "
                "vision preset disagree"
            )
        num_spans = num_visual // self.num_image_tokens
        if self.pre_process:
            num_images = 0 if images is None else images.shape[0]
            if num_images != num_spans:
                raise ValueError(
                    f"the batch has {num_spans} <image> placeholders but {num_images} images; "
                    "each <image> needs exactly one image"
                )
        if self.croc.uses_pool and (num_spans or image_keys is not None) and (
            image_keys is None or len(image_keys) != num_spans
        ):
            raise ValueError(
                f"the comprehension stage needs one image key per image ({num_spans}), "
                f"got {None if image_keys is None else len(image_keys)}"
            )

    def _mask_positions(self, image_keys: torch.Tensor, device: torch.device) -> torch.Tensor:
        return draw_mask_positions(
            seed=self.croc.seed, keys=image_keys, num_tokens=self.num_image_tokens,
            num_masked=self.num_masked, device=device,
        )

    @property
    def prefetches_visual(self) -> bool:
        """Whether :meth:`prefetch_visual` saves time: this chunk runs the vision tower and the
        pool, the encoder is frozen (its features computed ahead are the ones the forward would
        compute, no work is repeated), and the assignment is solved on the host (scipy), where
        solving ahead takes the solve and its device sync off the GPU's critical path."""
        return (
            self.pool is not None and self.vision.frozen and self.croc.matcher == "hungarian"
        )

    def prefetch_visual(self, images: torch.Tensor, image_keys: torch.Tensor) -> VisualPrefetch | None:
        """Start a micro-batch's vision work ahead of its forward: queue the frozen encoder,
        the projector and the assignment costs on the device, and solve the assignment on the
        solver threads while the device goes on with other work (the previous micro-batch).

        Only valid while the projector and the pool keep their values until the forward that
        uses the result (within one optimizer step): the costs are computed from them now.
        Returns None for a micro-batch without images.
        """
        if not self.prefetches_visual:
            raise RuntimeError("prefetch_visual needs the pool, a frozen encoder and the Hungarian matcher "
                               "on this model chunk (see prefetches_visual)")
        if images is None or images.shape[0] == 0:
            return None
        with torch.no_grad():
            features = self.vision.encode(images)
            # The forward projects the same features with the same weights: the same tokens,
            # so the same costs and the same optimal assignment as if solved there.
            positions, assignment = self._start_pool(self.vision.project(features), image_keys)
        return VisualPrefetch(images=images, features=features, positions=positions, assignment=assignment)

    def _start_pool(self, visual: torch.Tensor, image_keys: torch.Tensor) -> tuple[torch.Tensor, PendingAssignment]:
        """The positions each image has replaced, and the assignment of pool entries to them
        being solved. The costs are the same on every tensor-parallel rank (replicated pool,
        all-reduced visual tokens), so on the host solver each rank solves every TP-th image
        and they exchange the results: 1/TP of the host work per rank, one shared assignment."""
        positions = self._mask_positions(image_keys, visual.device)
        tp_group = None
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            tp_group = parallel_state.get_tensor_model_parallel_group()
        assignment = assign_async(self.pool.cost(visual, positions), method=self.croc.matcher, group=tp_group)
        return positions, assignment

    def _embed(self, tokens, position_ids, visual_index, images, image_keys, prefetch):
        """Text embeddings with the (replaced) visual tokens spliced in at the visual positions.
        Returns decoder input [S(/tp), B, H], the targets when the VTR head needs them, and the
        pool's replaced positions (None without the pool or images)."""
        embeddings = self.language_model.embedding(input_ids=tokens, position_ids=position_ids)
        embeddings = embeddings.transpose(0, 1)  # [B, S, H]
        targets = positions = None
        if images is not None and images.shape[0] > 0:
            assignment = None
            if prefetch is not None:
                if prefetch.images is not images:
                    raise ValueError("visual_prefetch was made for other images than this micro-batch's")
                features, positions, assignment = prefetch.features, prefetch.positions, prefetch.assignment
            else:
                features = self.vision.encode(images)
            visual = self.vision.project(features)  # [N, T, H], unit norm
            if self.pool is not None:
                if assignment is None:
                    positions, assignment = self._start_pool(visual, image_keys)
                targets = visual.detach()
                visual = self.pool(visual, positions, assignment.result())
            embeddings = _put_rows(embeddings, visual_index, visual.to(embeddings.dtype))
        else:
            # Text-only micro-batch: keep the first-stage-only parameters in the graph so that
            # overlapped gradient reduction sees every parameter and no rank waits forever.
            embeddings = embeddings + 0.0 * sum(
                p.sum() for p in self._first_stage_params() if p.requires_grad
            )
        decoder_input = embeddings.transpose(0, 1).contiguous()
        if self.sequence_parallel:
            decoder_input = tensor_parallel.scatter_to_sequence_parallel_region(decoder_input)
        if self.carries_targets:
            aligned = torch.zeros_like(embeddings)
            if targets is not None:
                aligned = _put_rows(aligned, visual_index, targets)
            targets = aligned.transpose(0, 1).contiguous()
            if self.sequence_parallel:
                targets = tensor_parallel.scatter_to_sequence_parallel_region(targets)
        return decoder_input, targets, positions

    def _first_stage_params(self):
        for module in (self.vision, self.pool):
            if module is not None:
                yield from module.parameters()

    def _lm_loss_and_hidden(self, *, hidden_states, output_layer, output_weight, labels,
                            compute_language_model_loss, runtime_gather_output=None, **_):
        """GPTModel output processor: the LM loss, and the final (normed) hidden states that the
        VTR head reads.

        The vocabulary is padded for tensor parallelism (to a multiple of 128 x TP), so the
        padding differs between layouts; its logits are masked out so the model's function is
        the same at every layout and no probability goes to tokens that do not exist.
        """
        logits, _ = output_layer(hidden_states, weight=output_weight, runtime_gather_output=runtime_gather_output)
        vocab = self.model_config.language.vocab_size
        local = logits.shape[-1]
        gathered = labels is None and local == self.model_config.padded_vocab_size
        first = 0 if gathered else parallel_state.get_tensor_model_parallel_rank() * local
        if first + local > vocab:
            ids = torch.arange(first, first + local, device=logits.device)
            logits = logits.masked_fill(ids >= vocab, float("-inf"))
        if labels is None:
            return logits[..., :vocab].transpose(0, 1).contiguous() if gathered else logits.transpose(0, 1)
        return compute_language_model_loss(labels, logits), hidden_states

    def _vtr_loss(self, hidden, targets, visual_index, image_keys, positions) -> torch.Tensor:
        """SmoothL1(beta) between the head's predictions at visual positions and the original
        visual tokens, mean over elements, over all or only the masked positions (``positions``
        when this chunk drew them already, as the first stage, else drawn here from the keys)."""
        if self.sequence_parallel:
            # The head and its loss run whole on every tensor-parallel rank (replicated), so each
            # rank's gradient for the gathered states is already the full one: backward keeps
            # this rank's slice (megatron-core's default reduce-scatter would sum TP copies).
            hidden = tensor_parallel.gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
        # one key per image, on the host (checked in _check_batch): no count read from the device
        num_images = 0 if image_keys is None else len(image_keys)
        if num_images == 0:
            return 0.0 * sum(p.sum() for p in self.vtr_head.parameters())
        size = hidden.shape[-1]
        shape = (num_images, self.num_image_tokens, size)
        visual_hidden = _take_rows(hidden.transpose(0, 1), visual_index).view(shape)
        if self.carries_targets:
            aligned = targets.detach()
            if self.sequence_parallel:
                aligned = tensor_parallel.gather_from_sequence_parallel_region(aligned)
            targets = _take_rows(aligned.transpose(0, 1), visual_index).view(shape)
        prediction = self.vtr_head(visual_hidden.transpose(0, 1)).transpose(0, 1)  # [N, T, H]
        if self.croc.vtr_loss_positions == "masked":
            if positions is None:
                positions = self._mask_positions(image_keys, prediction.device)
            index = positions.unsqueeze(-1).expand(-1, -1, size)
            prediction, targets = prediction.gather(1, index), targets.gather(1, index)
        return F.smooth_l1_loss(prediction.float(), targets.float(), beta=self.croc.vtr_smooth_l1_beta)


def _put_rows(sequence: torch.Tensor, flat_index: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``sequence`` [B, S, H] with positions ``flat_index`` (row * S + t) replaced by ``rows``
    (reshaped to [len(flat_index), H]); what ``masked_scatter`` with the visual mask does,
    without the mask."""
    bsz, seq, hidden = sequence.shape
    return sequence.reshape(bsz * seq, hidden).index_copy(0, flat_index, rows.reshape(-1, hidden)).view(
        bsz, seq, hidden)


def _take_rows(sequence: torch.Tensor, flat_index: torch.Tensor) -> torch.Tensor:
    """Rows ``flat_index`` (row * S + t) of ``sequence`` [B, S, H], as [len(flat_index), H]."""
    return sequence.reshape(-1, sequence.shape[-1]).index_select(0, flat_index)


def croc_loss(outputs: CrocOutputs, loss_mask: torch.Tensor, config: ModelConfig):
    """L = L_lm + alpha * L_vtr for one micro-batch. L_lm is the mean next-token loss over the
    supervised answer tokens. Returns the total and the detached parts for reporting."""
    mask = loss_mask.float()
    lm = (outputs.lm_loss_per_token.float() * mask).sum() / mask.sum().clamp(min=1.0)
    # clone: megatron-core's schedules scale the returned loss in place (/= micro-batches)
    parts = {"lm loss": lm.detach().clone()}
    total = lm
    if outputs.vtr_loss is not None:
        total = total + config.croc.vtr_weight * outputs.vtr_loss
        parts["vtr loss"] = outputs.vtr_loss.detach().clone()
    return total, parts
