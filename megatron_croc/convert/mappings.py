"""Declarative weight mappings between a CrocModel (megatron-core) and HuggingFace LLaVA.

One table (:func:`croc_llava_mappings`) lists, per parameter kind, which HF tensors make which
megatron tensor and how (a typed :class:`Kind`); one engine (:class:`MappingEngine`) applies it
in both directions. There is no per-model conversion loop anywhere else.

Conventions:

* **HF side**: the names of transformers' ``LlavaForConditionalGeneration`` (v5 layout:
  ``model.language_model.*``, ``model.vision_tower.*``,
  ``model.multi_modal_projector.*``, ``lm_head.weight``). Inputs laid out differently (a bare
  ``LlamaForCausalLM``, a ``CLIPVisionModel`` or full ``CLIPModel``, LLaVA's ``mm_projector.bin``,
  transformers-4 LLaVA names) are renamed into these by :func:`canonical_hf_name`. The prompt
  pool and the VTR head have no HF counterpart: they keep their megatron names and live in
  ``croc_extras.safetensors`` beside the export (``where="extras"``).
* **Megatron side**: *full* (unsharded) tensors, named as in ``CrocModel(...).state_dict()``
  with the local (non-TE) layer specs and *global* layer numbers. Tensor-parallel split and
  gather are megatron-core's own rules (:mod:`megatron_croc.models.parallel_plan`, and the
  model's ``sharded_state_dict`` for checkpoints); pipeline placement is :func:`pp_placement`.

Layouts the kinds encode:

* fused QKV (``linear_qkv``): ``[ng * (q_per_group + 2) * d, h]``, per query group ``g``: its
  ``q_per_group`` query heads, then its key head, then its value head. HF Llama uses the same
  RoPE convention as megatron-core (rotate-half, not interleaved), so no head permutation.
  CLIP has no grouped-query attention: groups = heads; its biases fuse the same way.
* gated MLP (``linear_fc1`` of SwiGLU): ``[gate; up]``.
* vocabulary: megatron pads the rows to ``config.padded_vocab_size``; the pad rows are zeros on
  import and dropped on export. The exported LLaVA may carry extra rows past the LLM vocabulary
  (the ``<image>`` token added for transformers): ``hf_rows``; they are dropped on import and
  written as zeros on export.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, Iterable, Literal

import torch

from megatron_croc.config import STAGE_SPECIFIC_PREFIXES, ModelConfig

Shape = tuple[int, ...]


class ConvertError(ValueError):
    """A conversion cannot proceed; the message names the file or tensor and what to do."""


class MappingError(ConvertError):
    """A tensor does not have the shape its mapping expects (names the tensor and both shapes)."""


# ---------------------------------------------------------------------------------------------
# kinds: how n HF tensors become one megatron tensor, and back
# ---------------------------------------------------------------------------------------------


class Kind(ABC):
    """A typed transformation between ``n_hf`` HF tensors and one full megatron tensor."""

    n_hf: int = 1

    @abstractmethod
    def hf_shapes(self, megatron_shape: Shape) -> list[Shape]:
        """The HF tensors' shapes that make a megatron tensor of ``megatron_shape``."""

    @abstractmethod
    def to_megatron(self, hf: list[torch.Tensor]) -> torch.Tensor: ...

    @abstractmethod
    def to_hf(self, tensor: torch.Tensor) -> list[torch.Tensor]: ...


@dataclass(frozen=True)
class Direct(Kind):
    def hf_shapes(self, megatron_shape: Shape) -> list[Shape]:
        return [tuple(megatron_shape)]

    def to_megatron(self, hf):
        return hf[0]

    def to_hf(self, tensor):
        return [tensor]


@dataclass(frozen=True)
class Reshape(Kind):
    """Same numbers, another shape (CLIP's class embedding [C] <-> megatron's [1, 1, C])."""

    hf_shape: Shape

    def hf_shapes(self, megatron_shape: Shape) -> list[Shape]:
        return [tuple(self.hf_shape)]

    def to_megatron(self, hf):
        return hf[0]  # the engine reshapes to the megatron shape (known from the model)

    def to_hf(self, tensor):
        return [tensor.reshape(self.hf_shape)]


@dataclass(frozen=True)
class QKVFusion(Kind):
    """HF q, k, v projections (weights or biases) <-> megatron's fused ``linear_qkv``, laid out
    per query group: ``[q heads of g; k_g; v_g]`` for each group g."""

    heads: int
    groups: int
    head_dim: int
    n_hf: int = 3

    @property
    def q_per_group(self) -> int:
        return self.heads // self.groups

    def hf_shapes(self, megatron_shape: Shape) -> list[Shape]:
        rest = tuple(megatron_shape[1:])
        return [
            (self.heads * self.head_dim, *rest),
            (self.groups * self.head_dim, *rest),
            (self.groups * self.head_dim, *rest),
        ]

    def to_megatron(self, hf):
        q, k, v = hf
        rest = q.shape[1:]
        g, d = self.groups, self.head_dim
        fused = torch.cat(
            [q.reshape(g, self.q_per_group * d, *rest), k.reshape(g, d, *rest), v.reshape(g, d, *rest)], dim=1
        )
        return fused.reshape(g * (self.q_per_group + 2) * d, *rest)

    def to_hf(self, tensor):
        rest = tensor.shape[1:]
        g, d = self.groups, self.head_dim
        per_group = tensor.reshape(g, (self.q_per_group + 2) * d, *rest)
        q, k, v = per_group.split([self.q_per_group * d, d, d], dim=1)
        return [
            q.reshape(self.heads * d, *rest),
            k.reshape(g * d, *rest),
            v.reshape(g * d, *rest),
        ]


@dataclass(frozen=True)
class GatedMLP(Kind):
    """HF gate_proj, up_proj <-> megatron's SwiGLU ``linear_fc1`` = ``[gate; up]``."""

    n_hf: int = 2

    def hf_shapes(self, megatron_shape: Shape) -> list[Shape]:
        half = (megatron_shape[0] // 2, *megatron_shape[1:])
        return [half, half]

    def to_megatron(self, hf):
        return torch.cat(hf, dim=0)

    def to_hf(self, tensor):
        return list(tensor.chunk(2, dim=0))


@dataclass(frozen=True)
class PaddedVocab(Kind):
    """Vocabulary rows: HF has ``hf_rows`` (>= ``vocab``: rows past the LLM vocabulary are the
    export's added ``<image>`` token), megatron has ``padded`` (>= ``vocab``, padded for TP)."""

    vocab: int
    padded: int
    hf_rows: int

    def hf_shapes(self, megatron_shape: Shape) -> list[Shape]:
        return [(self.hf_rows, *megatron_shape[1:])]

    def to_megatron(self, hf):
        rows = hf[0][: self.vocab]
        pad = rows.new_zeros(self.padded - self.vocab, *rows.shape[1:])
        return torch.cat([rows, pad], dim=0)

    def to_hf(self, tensor):
        rows = tensor[: self.vocab]
        extra = rows.new_zeros(self.hf_rows - self.vocab, *rows.shape[1:])
        return [torch.cat([rows, extra], dim=0) if self.hf_rows > self.vocab else rows]


DIRECT = Direct()

# ---------------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------------

Where = Literal["model", "extras"]
LayerRange = Literal["language", "vision"]


@dataclass(frozen=True)
class Mapping:
    """HF name pattern(s) <-> a megatron name pattern, with ``{i}`` the layer number when
    ``layers`` says which stack the pattern runs over."""

    hf: tuple[str, ...]
    megatron: str
    kind: Kind = DIRECT
    layers: LayerRange | None = None
    where: Where = "model"
    # Present only in some stages (the pool, the VTR head): absent sources are not an error.
    stage_specific: bool = False

    def __post_init__(self):
        if isinstance(self.hf, str):
            object.__setattr__(self, "hf", (self.hf,))
        if len(self.hf) != self.kind.n_hf:
            raise ValueError(f"{self.megatron}: {type(self.kind).__name__} takes {self.kind.n_hf} HF tensors")


HF_LM = "model.language_model"
HF_VISION = "model.vision_tower"
HF_PROJECTOR = "model.multi_modal_projector"
HF_LM_HEAD = "lm_head.weight"


def croc_llava_mappings(config: ModelConfig, *, hf_vocab_rows: int | None = None) -> list[Mapping]:
    """The mapping table of a CrocModel with this config. ``hf_vocab_rows``: rows of the HF
    embedding/LM head (default: the LLM vocabulary)."""
    lm, vis = config.language, config.vision
    qkv = QKVFusion(heads=lm.num_attention_heads, groups=lm.num_query_groups, head_dim=lm.kv_channels)
    vis_qkv = QKVFusion(
        heads=vis.num_attention_heads, groups=vis.num_attention_heads,
        head_dim=vis.hidden_size // vis.num_attention_heads,
    )
    vocab = PaddedVocab(vocab=lm.vocab_size, padded=config.padded_vocab_size, hf_rows=hf_vocab_rows or lm.vocab_size)
    L, V, P = HF_LM, HF_VISION, HF_PROJECTOR
    ml, mv = "language_model.decoder.layers.{i}", "vision.encoder.decoder.layers.{i}"
    hl, hv = f"{L}.layers.{{i}}", f"{V}.encoder.layers.{{i}}"

    table = [
        # -- LLM --
        Mapping(f"{L}.embed_tokens.weight", "language_model.embedding.word_embeddings.weight", vocab),
        Mapping(f"{hl}.input_layernorm.weight", f"{ml}.input_layernorm.weight", layers="language"),
        Mapping((f"{hl}.self_attn.q_proj.weight", f"{hl}.self_attn.k_proj.weight", f"{hl}.self_attn.v_proj.weight"),
                f"{ml}.self_attention.linear_qkv.weight", qkv, layers="language"),
        Mapping(f"{hl}.self_attn.o_proj.weight", f"{ml}.self_attention.linear_proj.weight", layers="language"),
        Mapping(f"{hl}.post_attention_layernorm.weight", f"{ml}.pre_mlp_layernorm.weight", layers="language"),
        Mapping((f"{hl}.mlp.gate_proj.weight", f"{hl}.mlp.up_proj.weight"), f"{ml}.mlp.linear_fc1.weight",
                GatedMLP(), layers="language"),
        Mapping(f"{hl}.mlp.down_proj.weight", f"{ml}.mlp.linear_fc2.weight", layers="language"),
        Mapping(f"{L}.norm.weight", "language_model.decoder.final_layernorm.weight"),
    ]
    if lm.untie_embeddings:
        table.append(Mapping(HF_LM_HEAD, "language_model.output_layer.weight", vocab))
    # -- CLIP ViT: embeddings, pre-LN, the layers we build (not the last one, not post-LN) --
    c = vis.hidden_size
    table += [
        Mapping(f"{V}.embeddings.class_embedding", "vision.encoder.class_token", Reshape((c,))),
        Mapping(f"{V}.embeddings.patch_embedding.weight", "vision.encoder.conv1.weight"),
        Mapping(f"{V}.embeddings.position_embedding.weight", "vision.encoder.position_embeddings.weight"),
        Mapping(f"{V}.pre_layrnorm.weight", "vision.encoder.ln_pre.weight"),
        Mapping(f"{V}.pre_layrnorm.bias", "vision.encoder.ln_pre.bias"),
    ]
    for p in ("weight", "bias"):
        table += [
            Mapping(f"{hv}.layer_norm1.{p}", f"{mv}.input_layernorm.{p}", layers="vision"),
            Mapping((f"{hv}.self_attn.q_proj.{p}", f"{hv}.self_attn.k_proj.{p}", f"{hv}.self_attn.v_proj.{p}"),
                    f"{mv}.self_attention.linear_qkv.{p}", vis_qkv, layers="vision"),
            Mapping(f"{hv}.self_attn.out_proj.{p}", f"{mv}.self_attention.linear_proj.{p}", layers="vision"),
            Mapping(f"{hv}.layer_norm2.{p}", f"{mv}.pre_mlp_layernorm.{p}", layers="vision"),
            Mapping(f"{hv}.mlp.fc1.{p}", f"{mv}.mlp.linear_fc1.{p}", layers="vision"),
            Mapping(f"{hv}.mlp.fc2.{p}", f"{mv}.mlp.linear_fc2.{p}", layers="vision"),
        ]
    # -- projector (mlp2x_gelu) --
    for hf_name, mg_name in (("linear_1", "linear_fc1"), ("linear_2", "linear_fc2")):
        for p in ("weight", "bias"):
            table.append(Mapping(f"{P}.{hf_name}.{p}", f"vision.projector.encoder.{mg_name}.{p}"))
    return table


def croc_extras_mappings(names: Iterable[str]) -> list[Mapping]:
    """The pool and the VTR head: megatron tensors without an HF counterpart, saved under their
    own names in ``croc_extras.safetensors``."""
    return [
        Mapping(n, n, where="extras", stage_specific=True)
        for n in names
        if n.startswith(STAGE_SPECIFIC_PREFIXES)
    ]

# ---------------------------------------------------------------------------------------------
# names
# ---------------------------------------------------------------------------------------------

# With TransformerEngine layer specs the pre-attention/pre-MLP norms are fused into the next
# linear layer; megatron-core's checkpoints always use these (TE) keys. Our conversion builds
# the local specs, whose state_dict() names are on the left.
TE_SPEC_NAMES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "input_layernorm.bias": "self_attention.linear_qkv.layer_norm_bias",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
    "pre_mlp_layernorm.bias": "mlp.linear_fc1.layer_norm_bias",
}


def croc_engine(config: ModelConfig, names: Iterable[str], *, hf_vocab_rows: int | None = None) -> "MappingEngine":
    """The engine for a CrocModel whose parameters are ``names``: the LLaVA mappings plus the
    stage-specific extras among them (the one engine import, checks and export use)."""
    return MappingEngine(config, croc_llava_mappings(config, hf_vocab_rows=hf_vocab_rows) + croc_extras_mappings(names))


def local_spec_name(name: str) -> str:
    """A megatron parameter name with TE-spec norm names turned into local-spec names."""
    for local, te in TE_SPEC_NAMES.items():
        if name.endswith("." + te):
            return name[: -len(te)] + local
    return name


# (pattern, replacement) applied in order; the first match wins. Inputs: a LlamaForCausalLM
# folder, a CLIPVisionModel / CLIPModel folder, LLaVA's stage-1 mm_projector.bin, and LLaVA
# folders in every layout transformers writes (LLAVA_LAYOUTS).
_RENAMES: dict[str, list[tuple[str, str]]] = {
    "llm": [(r"^model\.", f"{HF_LM}."), (r"^lm_head\.weight$", HF_LM_HEAD)],
    "vision": [
        (r"^vision_model\.", f"{HF_VISION}."),  # transformers 4 CLIPVisionModel, any CLIPModel
        (r"^(embeddings|encoder|pre_layrnorm|post_layernorm)\.", f"{HF_VISION}.\\1."),  # transformers 5
    ],
    "projector": [
        (r"^(model\.)?mm_projector\.0\.", f"{HF_PROJECTOR}.linear_1."),
        (r"^(model\.)?mm_projector\.2\.", f"{HF_PROJECTOR}.linear_2."),
        (r"^(model\.)?multi_modal_projector\.", f"{HF_PROJECTOR}."),
    ],
    "llava": [
        # transformers 5's save_pretrained of a LLaVA subclass (our exported class, loaded with
        # trust_remote_code and saved again) nests the LLM once more
        (r"^model\.language_model\.model\.", f"{HF_LM}."),
        (r"^model\.language_model\.", f"{HF_LM}."),
        (r"^model\.vision_tower\.vision_model\.", f"{HF_VISION}."),
        (r"^model\.vision_tower\.", f"{HF_VISION}."),
        (r"^model\.multi_modal_projector\.", f"{HF_PROJECTOR}."),
        (r"^lm_head\.weight$", HF_LM_HEAD),
        # transformers 4 (e.g. llava-hf/llava-1.5-7b-hf), and transformers 5's save_pretrained
        # (which writes the 4.x LLM names but a vision tower without "vision_model.")
        (r"^language_model\.model\.", f"{HF_LM}."),
        (r"^language_model\.lm_head\.weight$", HF_LM_HEAD),
        (r"^vision_tower\.vision_model\.", f"{HF_VISION}."),
        (r"^vision_tower\.", f"{HF_VISION}."),
        (r"^multi_modal_projector\.", f"{HF_PROJECTOR}."),
    ],
}

# The LLaVA layouts :func:`canonical_hf_name` reads (for docs and error messages): name prefixes
# of the language model, its LM head, the vision tower and the projector.
LLAVA_LAYOUTS = {
    "transformers 5 (in memory; our export)": ("model.language_model.", "lm_head.", "model.vision_tower.",
                                               "model.multi_modal_projector."),
    "transformers 5 save_pretrained": ("language_model.model.", "language_model.lm_head.", "vision_tower.",
                                       "multi_modal_projector."),
    "transformers 5 save_pretrained of a subclass": ("model.language_model.model.", "lm_head.",
                                                     "model.vision_tower.", "model.multi_modal_projector."),
    "transformers 4 (llava-hf/llava-1.5-*)": ("language_model.model.", "language_model.lm_head.",
                                              "vision_tower.vision_model.", "multi_modal_projector."),
}

# Tensors an input may hold that the LLaVA model does not use, dropped on import.
_IGNORED: dict[str, list[str]] = {
    "llm": [r"\.rotary_emb\.inv_freq$"],
    "vision": [r"^text_model\.", r"^visual_projection\.", r"^text_projection\.", r"^logit_scale$",
               r"\.position_ids$"],
    "projector": [],
    "llava": [r"\.rotary_emb\.inv_freq$", r"\.position_ids$"],
}


def canonical_hf_name(name: str, source: str) -> str | None:
    """The LLaVA (transformers 5) name of tensor ``name`` of an input of kind ``source``
    ("llm", "vision", "projector", "llava"); None when the LLaVA model does not use it."""
    for pattern in _IGNORED[source]:
        if re.search(pattern, name):
            return None
    for pattern, repl in _RENAMES[source]:
        if re.search(pattern, name):
            return re.sub(pattern, repl, name, count=1)
    return ""  # not understood: the caller reports it


# ---------------------------------------------------------------------------------------------
# the engine
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Resolved:
    """One mapping instantiated for one layer."""

    hf: tuple[str, ...]
    megatron: str
    kind: Kind
    where: Where
    stage_specific: bool


@dataclass
class MappingEngine:
    """Applies a mapping table in both directions on full tensors."""

    config: ModelConfig
    mappings: list[Mapping]
    by_megatron: dict[str, Resolved] = field(init=False)

    def __post_init__(self):
        counts = {"language": self.config.language.num_layers, "vision": self.config.vision.num_built_layers}
        self.by_megatron = {}
        for m in self.mappings:
            indices = range(counts[m.layers]) if m.layers else [None]
            for i in indices:
                fmt = (lambda s: s.format(i=i)) if i is not None else (lambda s: s)
                r = Resolved(tuple(fmt(h) for h in m.hf), fmt(m.megatron), m.kind, m.where, m.stage_specific)
                if r.megatron in self.by_megatron:
                    raise ValueError(f"two mappings produce {r.megatron}")
                self.by_megatron[r.megatron] = r

    def hf_names(self, where: Where | None = None) -> list[str]:
        return [h for r in self.by_megatron.values() if where is None or r.where == where for h in r.hf]

    def expected_hf_shapes(self, megatron_name: str, megatron_shape: Shape) -> dict[str, Shape]:
        r = self.by_megatron[megatron_name]
        return dict(zip(r.hf, r.kind.hf_shapes(tuple(megatron_shape))))

    def to_megatron(self, megatron_name: str, fetch: Callable[[str], torch.Tensor],
                    megatron_shape: Shape) -> torch.Tensor:
        """The full megatron tensor ``megatron_name`` from HF tensors (``fetch(hf_name)``),
        checking every shape on the way."""
        r = self.by_megatron[megatron_name]
        hf = []
        for name, expected in zip(r.hf, r.kind.hf_shapes(tuple(megatron_shape))):
            t = fetch(name)
            if tuple(t.shape) != tuple(expected):
                raise MappingError(
                    f"{name}: shape {tuple(t.shape)}, expected {tuple(expected)} to make "
                    f"{megatron_name} {tuple(megatron_shape)} ({type(r.kind).__name__})"
                )
            hf.append(t)
        out = r.kind.to_megatron(hf)
        if out.numel() != _numel(megatron_shape):
            raise MappingError(f"{megatron_name}: made {tuple(out.shape)} from {r.hf}, expected {tuple(megatron_shape)}")
        return out.reshape(megatron_shape)

    def to_hf(self, megatron_name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        r = self.by_megatron[megatron_name]
        return dict(zip(r.hf, r.kind.to_hf(tensor)))


def _numel(shape: Shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# ---------------------------------------------------------------------------------------------
# parallel placement
# ---------------------------------------------------------------------------------------------

_LAYER = re.compile(r"^(language_model\.decoder\.layers\.)(\d+)(\..*)$")


def pp_placement(global_layer: int, num_layers: int, pp_size: int) -> tuple[int, int]:
    """(pipeline stage, local layer number) of a language-model layer: with PP=p, stage r holds
    layers [r*L/p, (r+1)*L/p), numbered from 0 on each stage. (The vision encoder, projector and
    pool live on the first stage, the final norm, output layer and VTR head on the last.)"""
    if num_layers % pp_size:
        raise ValueError(f"{num_layers} layers do not split over {pp_size} pipeline stages")
    per_stage = num_layers // pp_size
    return global_layer // per_stage, global_layer % per_stage


def to_global_name(local_name: str, layer_offset: int) -> str:
    """A stage's parameter name with its language-model layer number made global."""
    m = _LAYER.match(local_name)
    if not m:
        return local_name
    return f"{m.group(1)}{int(m.group(2)) + layer_offset}{m.group(3)}"


def to_local_name(global_name: str, layer_offset: int) -> str:
    m = _LAYER.match(global_name)
    if not m:
        return global_name
    return f"{m.group(1)}{int(m.group(2)) - layer_offset}{m.group(3)}"


def load_full_into_stage(
    model: torch.nn.Module,
    full_tensor: Callable[[str], torch.Tensor | None],
    *,
    layer_offset: int,
    tp_rank: int,
    tp_size: int,
) -> list[str]:
    """Fill a live (pipeline stage of a) model from full tensors named globally: PP placement,
    then TP split (``parallel_plan.load_full_state``). ``full_tensor(global_name)`` may answer
    None for stage-specific tensors (they keep their initialisation). Returns the names left
    untouched."""
    from megatron_croc.models.parallel_plan import load_full_state

    full, untouched = {}, []
    for name, _ in model.named_parameters():
        tensor = full_tensor(to_global_name(name, layer_offset))
        if tensor is None:
            untouched.append(name)
        else:
            full[name] = tensor
    load_full_state(model, full, tp_rank, tp_size, keep=untouched)
    return untouched
