"""HF -> megatron at TP=2 and at PP=2 (two gloo processes, converting together as under
torchrun), then our forward at that layout equals transformers' LLaVA within 1e-4 (fp32); the
same full tensors placed by the declarative TP split / PP placement equal what the checkpoint
gives; exporting either checkpoint gives back every HF tensor bit for bit."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit" / "convert"))
import tiny_hf as T  # noqa: E402

from megatron_croc.testing import run_distributed  # noqa: E402

pytestmark = pytest.mark.parallel


def _forward(model, b, config):
    """Our logits [B, S, vocab] on the last stage (None elsewhere), passing the hidden states
    between pipeline stages by hand."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_croc.models.attention import build_attention_layout

    layout = build_attention_layout("causal", segment_ids=b["segment_ids"], visual_mask=b["visual_mask"],
                                    loss_mask=b["loss_mask"])
    if not ps.is_pipeline_first_stage():
        hidden = torch.empty(b["tokens"].shape[1], b["tokens"].shape[0], config.language.hidden_size)
        dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(hidden)
    with torch.no_grad():
        out = model(tokens=b["tokens"], position_ids=b["position_ids"], layout=layout, visual_mask=b["visual_mask"],
                    images=b["images"], image_keys=b["image_keys"])
    if not ps.is_pipeline_last_stage():
        dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
        return None
    return gather_from_tensor_model_parallel_region(out)[..., : config.language.vocab_size]


def _worker(rank, world_size, paths, outputs, ref_logits):
    from megatron.core import parallel_state as ps
    from transformers import AutoConfig

    from megatron_croc.config import CrocConfig, ParallelConfig
    from megatron_croc.convert.hf import hf_to_megatron, model_config_from_hf
    from megatron_croc.convert.mappings import MappingEngine, croc_llava_mappings, load_full_into_stage
    from megatron_croc.convert.sources import HFInputs, TensorSource
    from megatron_croc.convert.streaming import build_meta_stage
    from megatron_croc.models.croc import CrocModel
    from megatron_croc.testing import init_distributed
    from megatron_croc.training.checkpoint import load_checkpoint

    init_distributed()
    base = model_config_from_hf(AutoConfig.from_pretrained(paths["llm"]), AutoConfig.from_pretrained(paths["vision"]))
    base = base.replace(croc=CrocConfig(stage="align"))
    inputs = HFInputs([TensorSource(paths["llm"], "llm"), TensorSource(paths["vision"], "vision"),
                       TensorSource(paths["projector"], "projector")])
    b = T.batch()
    results = {}
    for layout, (tp, pp) in {"tp2": (2, 1), "pp2": (1, 2)}.items():
        hf_to_megatron(outputs[layout], model="from-hf", tensor_parallel=tp, pipeline_parallel=pp, progress=False,
                       **{k: paths[k] for k in ("llm", "vision", "projector")})
        config = base.replace(parallel=ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp))
        init_distributed()  # full shapes (with this layout's vocabulary padding) from a TP=PP=1 meta model
        whole = build_meta_stage(config.replace(parallel=ParallelConfig(), make_vocab_size_divisible_by=128 * tp))
        shapes = {n: tuple(p.shape) for n, p in whole.named_parameters()}
        init_distributed(tensor_parallel=tp, pipeline_parallel=pp)
        first, last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
        model = CrocModel(config, pre_process=first, post_process=last).eval()
        load_checkpoint(str(outputs[layout]), model_chunks=[model], optimizer=None, scheduler=None, stage="align")
        logits = _forward(model, b, config)
        diff = None if logits is None else float((logits - ref_logits)[..., : T.TEXT_IDS].abs().max())

        # The declarative path on a live model: full tensors -> PP placement -> TP split.
        engine = MappingEngine(config, croc_llava_mappings(config))
        live = CrocModel(config, pre_process=first, post_process=last)
        offset = ps.get_pipeline_model_parallel_rank() * (config.language.num_layers // pp)
        untouched = load_full_into_stage(
            live, lambda name: engine.to_megatron(name, inputs.get, shapes[name]), layer_offset=offset,
            tp_rank=ps.get_tensor_model_parallel_rank(), tp_size=tp,
        )
        loaded = dict(model.named_parameters())
        mismatched = [n for n, p in live.named_parameters()
                      if not torch.equal(p[: loaded[n].shape[0]] if "word_emb" in n or "output_layer" in n else p, loaded[n])]
        results[layout] = {"diff": diff, "untouched": untouched, "mismatched": mismatched,
                           "fc1": tuple(loaded["language_model.decoder.layers.0.mlp.linear_fc1.weight"].shape),
                           "layers": len(model.language_model.decoder.layers)}
    return results


def test_import_at_tp2_and_pp2_matches_transformers(tmp_path, megatron_world):
    from megatron_croc.convert.hf import megatron_to_hf

    paths = T.make_hf_models(tmp_path / "hf")
    ref = T.reference_llava(paths, image_token_index=T.VOCAB - 1)
    with torch.no_grad():
        ref_logits = ref(**T.hf_inputs(T.batch(), T.VOCAB - 1)).logits
    outputs = {"tp2": tmp_path / "mg_tp2", "pp2": tmp_path / "mg_pp2"}
    per_rank = run_distributed(_worker, 2, paths=paths, outputs=outputs, ref_logits=ref_logits)

    for layout in outputs:
        diffs = [r[layout]["diff"] for r in per_rank if r[layout]["diff"] is not None]
        assert diffs and max(diffs) <= 1e-4, f"{layout}: logits differ from transformers by {diffs}"
        for r in per_rank:
            assert r[layout]["untouched"] == [] and r[layout]["mismatched"] == [], (layout, r[layout])
    assert all(r["tp2"]["fc1"] == (128, 64) for r in per_rank)  # [gate; up] halves of 128 -> 2 x 64
    assert [r["pp2"]["layers"] for r in per_rank] == [1, 1]  # one layer per stage

    for layout, out in outputs.items():
        export = megatron_to_hf(out, tmp_path / f"hf_from_{layout}", progress=False)
        T.assert_export_equals_inputs(export, paths)
