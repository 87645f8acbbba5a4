"""HF <-> megatron end to end, in one process (TP=PP=1; tests/parallel/test_convert.py does TP=2
and PP=2): our forward equals transformers' LLaVA, the export reloads in transformers with the
same logits and generates, every tensor survives HF -> megatron -> HF and megatron -> HF ->
megatron bit for bit, and bad inputs fail clearly without leaving anything behind."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import tiny_hf as T

from megatron_croc.config import CrocConfig
from megatron_croc.convert.hf import ConvertError, hf_to_megatron, megatron_to_hf, model_config_from_hf

PARTS = ("llm", "vision", "projector")


@pytest.fixture(scope="module")
def reference_logits(hf):
    ref = T.reference_llava(hf, image_token_index=T.VOCAB - 1)
    with torch.no_grad():
        return ref(**T.hf_inputs(T.batch(), T.VOCAB - 1)).logits


def _config(paths, stage="align"):
    from transformers import AutoConfig

    config = model_config_from_hf(AutoConfig.from_pretrained(paths["llm"]), AutoConfig.from_pretrained(paths["vision"]))
    return config.replace(croc=CrocConfig(stage=stage, pool_size=64))


def _load(ckpt, config):
    from megatron_croc.models.croc import CrocModel
    from megatron_croc.training.checkpoint import load_checkpoint

    model = CrocModel(config).eval()
    load_checkpoint(str(ckpt), model_chunks=[model], optimizer=None, scheduler=None, stage=config.croc.stage)
    return model


def _no_leftovers(folder):
    return not [p.name for p in folder.iterdir() if p.name.startswith(".") and "converting" in p.name]


def test_import_matches_transformers_export_reloads_and_generates(hf, reference_logits, tmp_path, megatron_world):
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from megatron_croc.convert.cli import main

    ckpt = hf_to_megatron(tmp_path / "mg", model="from-hf", progress=False, **{k: hf[k] for k in PARTS})
    assert sorted(p.name for p in ckpt.iterdir()) == ["hf_conversion", "iter_0000000", "latest_checkpointed_iteration.txt"]
    assert sorted(p.name for p in (ckpt / "hf_conversion").iterdir()) == ["record.json", "unused_hf_tensors.safetensors"]

    b = T.batch()
    model = _load(ckpt, _config(hf))
    ours = T.our_logits(model, b)[..., : T.VOCAB]
    assert torch.isneginf(reference_logits[..., T.TEXT_IDS]).all()  # the reference's <image>: never emitted
    torch.testing.assert_close(ours[..., : T.TEXT_IDS], reference_logits[..., : T.TEXT_IDS], atol=1e-4, rtol=0)

    out = tmp_path / "hf_out"
    assert main(["megatron-to-hf", "--load", str(ckpt), "--save", str(out), "--hf-llm", str(hf["llm"]),
                 "--hf-vision", str(hf["vision"]), "--no-progress"]) == 0
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "modeling_croc.py", "model.safetensors.index.json",
            "model-00001-of-00001.safetensors", "tokenizer.json", "processor_config.json"} <= files, files
    cfg = json.loads((out / "config.json").read_text())
    # the tokenizer had no <image>: appended after the LLM vocabulary, with one (zero) row
    assert cfg["image_token_index"] == T.VOCAB and cfg["text_config"]["vocab_size"] == T.VOCAB + 1
    assert cfg["auto_map"]["AutoModelForImageTextToText"] == "modeling_croc.CrocLlavaForConditionalGeneration"
    assert cfg["croc"]["llm_vocab_size"] == T.VOCAB and cfg["vision_feature_layer"] == -2
    T.assert_export_equals_inputs(out, hf)

    exported = AutoModelForImageTextToText.from_pretrained(str(out), trust_remote_code=True).eval()
    assert type(exported).__name__ == "CrocLlavaForConditionalGeneration"
    with torch.no_grad():
        theirs = exported(**T.hf_inputs(b, T.VOCAB)).logits
    torch.testing.assert_close(theirs[..., : T.VOCAB], ours, atol=1e-5, rtol=0)

    processor = AutoProcessor.from_pretrained(str(out))
    image = Image.fromarray(b["images"][0].permute(1, 2, 0).numpy())
    inputs = processor(text=["w7 <image> w9 w11"], images=[image], return_tensors="pt")
    assert int((inputs["input_ids"] == T.VOCAB).sum()) == T.NUM_IMAGE_TOKENS
    generated = exported.generate(**inputs, max_new_tokens=4, do_sample=False)
    new = generated[0, inputs["input_ids"].shape[1]:]
    assert 1 <= len(new) <= 4 and int(new.max()) < T.VOCAB  # never the <image> token (suppressed)

    # and back: export -> megatron -> export is bit-identical, tensor by tensor
    again = megatron_to_hf(hf_to_megatron(tmp_path / "mg2", model="from-hf", llava=out, progress=False),
                           tmp_path / "hf_out2", progress=False)
    first, second = T.canonical_tensors([("llava", out)]), T.canonical_tensors([("llava", again)])
    assert set(first) == set(second)
    for name, t in first.items():
        assert second[name].dtype == t.dtype and torch.equal(second[name], t), name
    assert json.loads((again / "config.json").read_text())["image_token_index"] == T.VOCAB


def test_tied_embeddings(tmp_path, megatron_world):
    paths = T.make_hf_models(tmp_path / "hf", tied=True, seed=7)
    ref = T.reference_llava(paths, image_token_index=T.VOCAB - 1)
    b = T.batch()
    with torch.no_grad():
        ref_logits = ref(**T.hf_inputs(b, T.VOCAB - 1)).logits
    ckpt = hf_to_megatron(tmp_path / "mg", model="from-hf", progress=False, **{k: paths[k] for k in PARTS})
    ours = T.our_logits(_load(ckpt, _config(paths)), b)[..., : T.TEXT_IDS]
    torch.testing.assert_close(ours, ref_logits[..., : T.TEXT_IDS], atol=1e-4, rtol=0)
    out = megatron_to_hf(ckpt, tmp_path / "hf_out", progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert "lm_head.weight" not in index
    assert json.loads((out / "config.json").read_text())["text_config"]["tie_word_embeddings"] is True
    T.assert_export_equals_inputs(out, paths)


def test_bf16_storage_and_a_fresh_projector(hf, tmp_path, megatron_world):
    from safetensors.torch import load_file
    from torch.distributed.checkpoint import FileSystemReader

    # stage 1 from scratch: no projector given, it is initialised
    ckpt = hf_to_megatron(tmp_path / "mg", model="from-hf", bf16=True, progress=False, llm=hf["llm"], vision=hf["vision"])
    stored = FileSystemReader(str(ckpt / "iter_0000000")).read_metadata().state_dict_metadata
    assert stored["language_model.decoder.layers.self_attention.linear_qkv.weight"].properties.dtype == torch.bfloat16
    out = megatron_to_hf(ckpt, tmp_path / "hf_out", progress=False)  # auto: back to the HF weights' fp32
    projector = {n: t for n, t in load_file(out / "model-00001-of-00001.safetensors").items() if "projector" in n}
    assert not projector["model.multi_modal_projector.linear_1.bias"].any()
    assert 0.015 < float(projector["model.multi_modal_projector.linear_1.weight"].std()) < 0.025
    inputs = T.canonical_tensors([("llm", hf["llm"])])
    exported = T.canonical_tensors([("llava", out)])
    name = "model.language_model.layers.0.mlp.gate_proj.weight"
    assert exported[name].dtype == torch.float32
    assert torch.equal(exported[name], inputs[name].to(torch.bfloat16).float())


def test_comprehension_stage_pool_and_vtr_head_round_trip(hf, tmp_path, megatron_world):
    """A comprehension-stage checkpoint -> HF (pool and VTR head in croc_extras.safetensors) ->
    megatron again: every parameter of the model comes back exactly, so training continues."""
    from safetensors.torch import load_file

    from megatron_croc.convert.mappings import MappingEngine, croc_extras_mappings, croc_llava_mappings, load_full_into_stage
    from megatron_croc.convert.sources import HFInputs, TensorSource
    from megatron_croc.models.croc import CrocModel
    from megatron_croc.training.checkpoint import save_weights

    config = _config(hf, stage="croc")
    trained = CrocModel(config)  # pool and VTR head: their own (random) initialisation
    names = [n for n, _ in trained.named_parameters()]
    engine = MappingEngine(config, croc_llava_mappings(config) + croc_extras_mappings(names))
    inputs = HFInputs([TensorSource(hf[k], k) for k in PARTS])
    shapes = {n: tuple(p.shape) for n, p in trained.named_parameters()}
    untouched = load_full_into_stage(
        trained, lambda n: engine.to_megatron(n, inputs.get, shapes[n]) if not n.startswith(("pool.", "vtr_head.")) else None,
        layer_offset=0, tp_rank=0, tp_size=1,
    )
    assert untouched and all(n.startswith(("pool.", "vtr_head.")) for n in untouched)
    save_weights(str(tmp_path / "run"), model_chunks=[trained])

    # a training folder has no conversion record: the architecture comes from the HF folders
    out = megatron_to_hf(tmp_path / "run", tmp_path / "hf_out", model="from-hf", llm=str(hf["llm"]),
                         vision=str(hf["vision"]), progress=False)
    extras = load_file(out / "croc_extras.safetensors")
    assert sorted(extras) == sorted(untouched)
    assert torch.equal(extras["pool.weight"], trained.pool.weight.detach())
    T.assert_export_equals_inputs(out, hf)

    back = hf_to_megatron(tmp_path / "mg", model="from-hf", llava=out, progress=False)  # auto -> croc stage
    assert json.loads((back / "hf_conversion" / "record.json").read_text())["stage"] == "croc"
    restored = _load(back, config)
    for name, param in trained.named_parameters():
        assert torch.equal(dict(restored.named_parameters())[name], param), name


def test_bad_inputs_fail_clearly_and_leave_nothing(hf, tmp_path, megatron_world, monkeypatch):
    from safetensors.torch import load_file, save_file

    from megatron_croc.convert.cli import main
    from megatron_croc.convert.sources import TensorSource

    parts = {k: hf[k] for k in PARTS}
    save = tmp_path / "out"

    def fails(match, **kwargs):
        with pytest.raises(ConvertError, match=match):
            hf_to_megatron(save, progress=False, **{"model": "from-hf", **parts, **kwargs})
        assert not save.exists() and _no_leftovers(tmp_path)

    # a config that does not match the preset: the field is named
    fails(r"--model vicuna-7b: language\.num_layers is 32 in the preset but 2 in .*llm/config\.json \(num_hidden_layers\)",
          model="vicuna-7b")
    # a missing file
    broken = tmp_path / "llm_missing_shard"
    shutil.copytree(hf["llm"], broken)
    (broken / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors",
                        "model.norm.weight": "model-00002-of-00002.safetensors"}}))
    fails(r"lists model-0000[12]-of-00002\.safetensors, which is missing", llm=str(broken))
    fails(r"projector.*no such file", projector=str(tmp_path / "nope.bin"))
    # a tensor of the wrong shape: file, tensor, both shapes
    wrong = tmp_path / "llm_wrong_shape"
    shutil.copytree(hf["llm"], wrong)
    tensors = load_file(wrong / "model.safetensors")
    tensors["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(64, 64)
    save_file(tensors, str(wrong / "model.safetensors"))
    fails(r"model\.safetensors: model\.layers\.1\.self_attn\.k_proj\.weight: shape \(64, 64\), expected \(32, 64\)",
          llm=str(wrong))
    # a failure in the middle of writing removes what was written
    real_get = TensorSource.get

    def flaky(self, name):
        if name.endswith("layers.1.mlp.down_proj.weight"):
            raise ConvertError(f"read error in {name}")
        return real_get(self, name)

    monkeypatch.setattr(TensorSource, "get", flaky)
    fails(r"read error in .*layers\.1\.mlp\.down_proj\.weight")
    monkeypatch.undo()

    # export: not a checkpoint; a vocabulary larger than the stored rows
    ckpt = hf_to_megatron(tmp_path / "mg", model="from-hf", progress=False, **parts)
    with pytest.raises(ConvertError, match="neither a checkpoint folder"):
        megatron_to_hf(tmp_path, tmp_path / "hf_out", progress=False)
    with pytest.raises(ConvertError, match="fewer than the vocabulary 1000"):
        megatron_to_hf(ckpt, tmp_path / "hf_out", vocab_size=1000, progress=False)
    # an image processor that cannot be loaded is refused before anything is written
    import megatron_croc.convert.hf as hf_module

    def no_writing(*args, **kwargs):
        raise AssertionError("the export started writing before checking its inputs")

    monkeypatch.setattr(hf_module, "_staging", no_writing)
    with pytest.raises(ConvertError, match=r"--image-processor .*nothing_here: transformers cannot load it"):
        megatron_to_hf(ckpt, tmp_path / "hf_out", image_processor=str(tmp_path / "nothing_here"), progress=False)
    monkeypatch.undo()
    assert not (tmp_path / "hf_out").exists() and _no_leftovers(tmp_path)
    # the command line reports it in one line
    assert main(["megatron-to-hf", "--load", str(tmp_path / "nothing"), "--save", str(tmp_path / "x")]) == 2
