"""HF checkpoints as users bring them: LLaVA folders in every layout transformers writes, names
the converter does not know (said beside the missing ones), layouts that do not split, and an
export whose <image> token can never be generated and whose files all have the same mode."""

from __future__ import annotations

import json
import os
import stat

import pytest
import tiny_hf as T
import torch

from megatron_croc.config import CrocConfig
from megatron_croc.convert.hf import ConvertError, hf_to_megatron, megatron_to_hf, model_config_from_hf

PARTS = ("llm", "vision", "projector")


@pytest.fixture(scope="module")
def reference(hf):
    return T.reference_llava(hf, image_token_index=T.VOCAB - 1)


def _our_text_logits(ckpt, hf):
    from transformers import AutoConfig

    from megatron_croc.models.croc import CrocModel
    from megatron_croc.training.checkpoint import load_checkpoint

    config = model_config_from_hf(AutoConfig.from_pretrained(hf["llm"]), AutoConfig.from_pretrained(hf["vision"]))
    model = CrocModel(config.replace(croc=CrocConfig(stage="align"))).eval()
    load_checkpoint(str(ckpt), model_chunks=[model], optimizer=None, scheduler=None, stage="align")
    return T.our_logits(model, T.batch())[..., : T.TEXT_IDS]


def _save_llava(reference, folder, rename=None, *, plain=False):
    """The reference LLaVA saved by transformers (rename=None: as our class, or as transformers'
    own LlavaForConditionalGeneration when ``plain``), or with its tensors renamed by hand."""
    from safetensors.torch import save_file
    from transformers import LlavaForConditionalGeneration

    if rename is None:
        if plain:
            model = LlavaForConditionalGeneration(reference.config)
            model.load_state_dict(reference.state_dict())
            model.save_pretrained(folder)
        else:
            reference.save_pretrained(folder)
        return folder
    folder.mkdir(parents=True)
    reference.config.save_pretrained(folder)
    state = {rename(n): t.contiguous() for n, t in reference.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def _transformers4_name(name: str) -> str:
    for new, old in (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                     ("model.vision_tower.", "vision_tower.vision_model."),
                     ("model.multi_modal_projector.", "multi_modal_projector.")):
        if name.startswith(new):
            return old + name[len(new):]
    raise AssertionError(name)


def test_llava_folders_in_every_layout_import(hf, reference, tmp_path, megatron_world):
    from safetensors import safe_open

    with torch.no_grad():
        ref_logits = reference(**T.hf_inputs(T.batch(), T.VOCAB - 1)).logits[..., : T.TEXT_IDS]
    folders = {
        "transformers 5 save_pretrained": _save_llava(reference, tmp_path / "llava5", plain=True),
        "transformers 5 save_pretrained of our class": _save_llava(reference, tmp_path / "llava5_croc"),
        "transformers 4 (by hand)": _save_llava(reference, tmp_path / "llava4", rename=_transformers4_name),
    }

    def names(layout):
        with safe_open(str(folders[layout] / "model.safetensors"), "pt") as f:
            return list(f.keys())

    # the layouts under test: what the pinned transformers writes
    assert any(n.startswith("vision_tower.embeddings.") for n in names("transformers 5 save_pretrained"))
    assert not any(n.startswith(("vision_tower.vision_model.", "model.")) for n in names("transformers 5 save_pretrained"))
    assert any(n.startswith("model.language_model.model.layers.") for n in names("transformers 5 save_pretrained of our class"))
    for layout, folder in folders.items():
        ckpt = hf_to_megatron(tmp_path / f"mg_{folder.name}", model="from-hf", llava=str(folder), progress=False)
        torch.testing.assert_close(_our_text_logits(ckpt, hf), ref_logits, atol=1e-4, rtol=0, msg=layout)


def test_unrecognised_names_are_shown_beside_the_missing_ones(hf, reference, tmp_path, megatron_world):
    odd = _save_llava(reference, tmp_path / "odd", rename=lambda n: _transformers4_name(n).replace(
        "vision_tower.vision_model.", "visual_tower."))
    with pytest.raises(ConvertError) as err:
        hf_to_megatron(tmp_path / "out", model="from-hf", llava=str(odd), progress=False)
    message = str(err.value)
    lines = message.splitlines()
    assert "names the converter does not recognise, e.g." in lines[1] and "visual_tower.embeddings" in lines[1]
    assert "tensors the model needs are missing, e.g. model.vision_tower." in lines[2]
    assert "look like another layout: visual_tower.* where model.vision_tower.* is expected" in lines[3]
    assert "transformers 4 (llava-hf/llava-1.5-*): language_model.model.*" in lines[3]
    assert not (tmp_path / "out").exists()


def test_layout_errors_name_the_flags_given(hf, tmp_path, megatron_world):
    parts = {k: hf[k] for k in PARTS}
    with pytest.raises(ConvertError) as err:
        hf_to_megatron(tmp_path / "o", model="from-hf", tensor_parallel=4, progress=False, **parts)
    message = str(err.value)
    assert message.startswith("--target-tensor-parallel-size 4 does not divide the LLM's query groups (2: "
                              f"num_key_value_heads in {hf['llm']}/config.json)")
    assert "--tensor-model-parallel-size" not in message and "preset" not in message
    with pytest.raises(ConvertError, match=r"--target-pipeline-parallel-size 3 does not divide the LLM's 2 layers "
                                           r"\(num_hidden_layers in .*llm/config\.json\)"):
        hf_to_megatron(tmp_path / "o", model="from-hf", pipeline_parallel=3, progress=False, **parts)


def test_export_never_generates_image_tokens_and_respects_the_umask(hf, tmp_path, megatron_world):
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    ckpt = hf_to_megatron(tmp_path / "mg", model="from-hf", progress=False, **{k: hf[k] for k in PARTS})
    old = os.umask(0o027)
    try:
        out = megatron_to_hf(ckpt, tmp_path / "hf_out", progress=False, llm=str(hf["llm"]), vision=str(hf["vision"]))
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert set(modes.values()) == {0o640}, modes  # safetensors' own 0600 included
    assert stat.S_IMODE(out.stat().st_mode) == 0o750

    image_id = json.loads((out / "config.json").read_text())["image_token_index"]
    model = AutoModelForImageTextToText.from_pretrained(str(out), trust_remote_code=True).eval()
    b = T.batch()
    with torch.no_grad():
        logits = model(**T.hf_inputs(b, image_id)).logits
    assert torch.isneginf(logits[..., image_id]).all() and torch.isfinite(logits[..., :image_id]).all()
    # with the image row made the most likely by far, sampling still never picks it
    with torch.no_grad():
        model.lm_head.weight[image_id] = 100 * model.lm_head.weight[:image_id].abs().max()
    processor = AutoProcessor.from_pretrained(str(out))
    image = Image.fromarray(b["images"][0].permute(1, 2, 0).numpy())
    inputs = processor(text=["w7 <image> w9"], images=[image], return_tensors="pt")
    torch.manual_seed(0)
    generated = model.generate(**inputs, max_new_tokens=20, do_sample=True, temperature=5.0, suppress_tokens=None,
                               min_new_tokens=20)
    assert image_id not in generated[0, inputs["input_ids"].shape[1]:].tolist()
