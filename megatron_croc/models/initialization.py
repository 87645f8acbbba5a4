"""Initial weights that are the same at every parallel layout.

megatron-core draws each weight from the process's RNG stream in construction order, so what a
parameter gets depends on what was built before it on that rank: a pipeline stage without the
embedding, or a vocabulary padded differently for another tensor-parallel size, shifts every
later draw, and a TP=2 or PP=2 run starts from other weights than the single process (a
different experiment). Here every parameter is drawn from its own generator, seeded by
``(seed, the parameter's global checkpoint key, its layer)``, at its full (unsharded) size, and
this rank keeps its shard — the slice that megatron-core's own ``sharded_state_dict`` says this
rank holds. So the initial model is a function of the seed alone, whatever the TP / PP / DP /
virtual-pipeline layout, including the modules one stage adds (projector, pool, VTR head).

The draws themselves are megatron-core's initialisers (``config.init_method`` for weights,
``config.output_layer_init_method`` for the output projections of attention and MLP, as
megatron-core assigns them), torch's own for the torch modules of the CLIP stem, zeros for
biases and ones for norm weights; only the order and the seed are ours. The vocabulary's
padding rows (which the model masks out) start at zero, so the padding that depends on TP does
not shift the real rows.

Cost: every rank draws the full tensors of the parameters it holds (on their device), i.e. the
same numbers megatron-core's CPU initialisation draws for its master weights, once.
"""

from __future__ import annotations

import hashlib
from typing import Callable, Iterator

import torch

__all__ = ["initialize_parameters", "initial_value", "parameter_seed"]

# Megatron-core's convention (attention.py, mlp.py): the layers writing back into the
# residual stream use the scaled output initialisation.
_OUTPUT_PROJECTIONS = ("linear_proj", "linear_fc2")


def parameter_seed(seed: int, key: str, layer: tuple[int, ...]) -> int:
    # A hash, not seed + index: nearby seeds and keys must not give correlated streams.
    digest = hashlib.blake2b(f"croc-init:{seed}:{key}:{layer}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _pieces(model: torch.nn.Module) -> Iterator[tuple[str, object]]:
    """(local parameter name, ShardedTensor) for every piece of a parameter: a gated MLP's
    fused gate/up weight comes as its two halves, views into the parameter."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    for name, entry in model.sharded_state_dict().items():
        if isinstance(entry, ShardedTensorFactory):
            built = entry.build()
            for piece in (built.values() if isinstance(built, dict) else built):
                yield name, piece
        elif isinstance(entry, ShardedTensor):
            yield name, entry


def _draw_full(piece, seed: int, draw: Callable[[torch.Tensor], None], *, valid_rows: int | None,
               device: torch.device) -> torch.Tensor:
    """The parameter's full (unsharded) tensor, fp32 on ``device``."""
    prepend = piece.prepend_axis_num
    full_shape = tuple(piece.global_shape[prepend:])
    layer = tuple(piece.global_offset[:prepend])
    full = torch.zeros(full_shape, dtype=torch.float32, device=device)
    target = full if valid_rows is None or valid_rows >= full_shape[0] else full[:valid_rows]
    with _seeded(parameter_seed(seed, piece.key, layer), device):
        draw(target)
    return full


def _shard(full: torch.Tensor, piece) -> torch.Tensor:
    offsets = piece.global_offset[piece.prepend_axis_num:]
    return full[tuple(slice(o, o + n) for o, n in zip(offsets, piece.local_shape))]


class _seeded:
    """The default generator of ``device`` seeded for one draw, restored afterwards (dropout
    and data order downstream see the same stream as without this module)."""

    def __init__(self, seed: int, device: torch.device) -> None:
        self.seed, self.device = seed, device

    def __enter__(self):
        cuda = self.device.type == "cuda"
        self._fork = torch.random.fork_rng(devices=[self.device.index or 0] if cuda else [])
        self._fork.__enter__()
        if cuda:
            with torch.cuda.device(self.device):
                torch.cuda.manual_seed(self.seed)
        else:
            torch.default_generator.manual_seed(self.seed)

    def __exit__(self, *exc):
        return self._fork.__exit__(*exc)


def _is_norm(module: torch.nn.Module) -> bool:
    # torch's, apex's (FusedLayerNorm) and TE's (LayerNorm, RMSNorm) norms; not TE's fused
    # LayerNormLinear, whose norm weight is the leaf "layer_norm_weight"
    return isinstance(module, (torch.nn.LayerNorm, torch.nn.RMSNorm)) or type(module).__name__.endswith("Norm")


def _rule(model: torch.nn.Module, name: str, self_initialised: tuple[type, ...]):
    """How the parameter ``name`` is drawn: a callable filling its full tensor, "reset" (a
    replicated torch module re-running its own initialiser), or None (the module draws it from
    the seed itself)."""
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if isinstance(owner, self_initialised):
        return None
    if leaf.endswith("bias"):
        return torch.nn.init.zeros_
    if leaf == "layer_norm_weight" or _is_norm(owner):  # TE's fused norm+linear, or a norm
        return torch.nn.init.ones_
    if isinstance(owner, (torch.nn.Conv2d, torch.nn.Embedding)):
        return "reset"  # CLIP's patch embedding and position table: torch's defaults, as megatron-core
    if leaf == "class_token":
        return torch.nn.init.normal_  # N(0, 1), megatron-core's CLIPViTModel draws it with randn
    config = getattr(owner, "config", None)
    if config is None or not hasattr(config, "init_method"):
        raise RuntimeError(f"no initialisation rule for parameter {name!r} ({type(owner).__name__}); "
                           "add one in megatron_croc.models.initialization")
    if owner_name.rpartition(".")[2] in _OUTPUT_PROJECTIONS:
        return config.output_layer_init_method
    from megatron.core.tensor_parallel import VocabParallelEmbedding

    if isinstance(owner, VocabParallelEmbedding):
        return getattr(config, "embedding_init_method", None) or config.init_method
    return config.init_method


@torch.no_grad()
def initialize_parameters(model: torch.nn.Module, *, seed: int, vocab_rows: dict[str, int] | None = None,
                          self_initialised: tuple[type, ...] = ()) -> None:
    """Draw every parameter of ``model`` from ``seed`` and its global key (see the module doc).

    ``vocab_rows``: checkpoint key -> real vocabulary rows, for the padded vocabulary tensors.
    ``self_initialised``: module types that draw their parameters from the seed themselves.
    Parameters on the meta device are left alone (nothing to draw into).
    """
    vocab_rows = vocab_rows or {}
    covered: set[int] = set()
    params = {id(p): n for n, p in model.named_parameters()}
    reset_done: set[str] = set()
    for name, piece in _pieces(model):
        target = piece.data
        if target.is_meta:
            return
        covered |= {id(p) for p in _owning_parameters(model, name)}
        rule = _rule(model, name, self_initialised)
        if rule is None:
            continue
        if rule == "reset":
            owner_name = name.rpartition(".")[0]
            if owner_name not in reset_done:
                reset_done.add(owner_name)
                with _seeded(parameter_seed(seed, piece.key, ()), target.device):
                    model.get_submodule(owner_name).reset_parameters()
            continue
        full = _draw_full(piece, seed, rule, valid_rows=vocab_rows.get(piece.key), device=target.device)
        target.copy_(_shard(full, piece).to(target.dtype))
    missing = [n for i, n in params.items() if i not in covered]
    if missing:
        raise RuntimeError(f"parameters outside the sharded state dict were not initialised: {missing[:5]}")


def _owning_parameters(model: torch.nn.Module, name: str):
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    param = getattr(owner, leaf, None)
    return [param] if isinstance(param, torch.nn.Parameter) else []


@torch.no_grad()
def initial_value(model: torch.nn.Module, name: str, *, seed: int, vocab_rows: dict[str, int] | None = None,
                  self_initialised: tuple[type, ...] = ()) -> torch.Tensor:
    """The full (unsharded) fp32 CPU tensor that :func:`initialize_parameters` gives parameter
    ``name`` at every layout, for code that needs one parameter without building the model's
    weights (e.g. the converter, on a meta-device model, for a projector the HF source lacks).
    Only for parameters drawn by a rule here (not the pool, not CLIP's torch-default stem)."""
    for local, piece in _pieces(model):
        if local != name:
            continue
        rule = _rule(model, name, self_initialised)
        if rule is None or rule == "reset":
            raise ValueError(f"{name!r} is initialised by its own module, not drawn here")
        return _draw_full(piece, seed, rule, valid_rows=(vocab_rows or {}).get(piece.key), device=torch.device("cpu"))
    raise KeyError(f"{name!r} is not a parameter of this model")
