"""tools/evaluate.py end to end: a small evaluation set (question types, a fact-scored caption, a
multi-turn and a text-only record) made by the real preprocessing, a tiny model trained briefly by
the real trainer, evaluated via --load and via --hf on its export. The loss is checked against
one computed by hand from the HF model's logits, the batched (left-padded) answers against batch
size 1, and the inputs it cannot use against their one-line errors (exit 2)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_croc.data.demo import caption, render, sample_scene

NEW_TOKENS = 16
FIELDS = {"id", "question_type", "question", "reference", "answer", "correct"}


def _records(image_dir: Path) -> list[dict]:
    """13 LLaVA records: colour / count questions, untyped background questions (type "all"),
    fact-scored captions, a multi-turn record and a text-only one."""
    rng = np.random.default_rng(7)
    image_dir.mkdir(parents=True, exist_ok=True)
    out = []

    def add(i, question, answer, *, extra=None, more=(), image=True):
        rid = f"eval-{i:02d}"
        rec = {"id": rid}
        if image:
            scene = scenes[i]
            render(scene, 64).save(image_dir / f"{rid}.png")
            rec["image"] = f"images/{rid}.png"
            question = f"<image>\n{question}"
        convs = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
        for q, a in more:
            convs += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
        rec["conversations"] = convs
        rec.update(extra or {})
        out.append(rec)

    scenes = [sample_scene(rng) for _ in range(13)]
    for i in range(4):
        s = scenes[i].shapes[0]
        add(i, f"What color is the {s.shape} at the {s.position}?", f"The {s.shape} at the {s.position} is {s.color}.",
            extra={"question_type": "color"})
    for i in range(4, 7):
        n = len(scenes[i].shapes)
        add(i, "How many shapes are there?", "There is one shape." if n == 1 else
            f"There are {('zero', 'one', 'two', 'three')[n]} shapes.", extra={"question_type": "count"})
    for i in range(7, 9):  # no question_type: "all"
        add(i, "What is the background color?", f"The background is {scenes[i].background}.")
    for i in range(9, 11):
        sc = scenes[i]
        facts = [f"{s.color} {s.shape}" for s in sc.shapes] + [f"{sc.background} background"]
        add(i, "Describe the image in detail.", caption(sc), extra={"question_type": "caption", "facts": facts})
    sc = scenes[11]
    add(11, "Describe the image in detail.", caption(sc), extra={"question_type": "caption", "facts": [sc.background]},
        more=[("What is the background color?", f"The background is {sc.background}.")])
    add(12, "How many corners does a square have?", "A square has four corners.", extra={"question_type": "text"},
        image=False)
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory, megatron_world):
    from megatron_croc.convert.cli import main as convert_main
    from megatron_croc.data.demo import ensure_demo_dataset
    from megatron_croc.data.preprocess import PreprocessConfig, run_preprocess
    from megatron_croc.training.arguments import parse_args
    from megatron_croc.training.pretrain import train

    root = tmp_path_factory.mktemp("evaluation")
    demo = ensure_demo_dataset(root / "demo", image_size=32, num_image_tokens=16, seq_length=160, num_samples=200)
    records = _records(root / "eval_src" / "images")
    source = root / "eval_src" / "eval.json"
    source.write_text(json.dumps(records))
    prefix = str(root / "eval" / "eval")
    run_preprocess(PreprocessConfig(
        inputs=[str(source)], image_folder=str(root / "eval_src"), output_prefix=prefix,
        tokenizer_type="SentencePieceTokenizer", tokenizer_model=demo.tokenizer_model, template="vicuna_v1",
        image_size=32, image_transform="pad", seq_length=160, num_image_tokens=16, workers=1, progress_bar=False,
    ), log=lambda _msg: None)

    save = root / "ckpt"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the model is tiny; more threads only slow a loaded machine down
    try:
        train(parse_args(["--data-path", demo.prefix, "--vocab-size", "640", "--seq-length", "160",
                          "--micro-batch-size", "2", "--global-batch-size", "8", "--num-workers", "0", "--lr", "2e-3",
                          "--train-iters", "12", "--log-interval", "12", "--save", str(save)], world_size=1))
        hf = root / "hf"
        assert convert_main(["megatron-to-hf", "--load", str(save), "--save", str(hf), "--model", "tiny",
                             "--vocab-size", "640", "--tokenizer", demo.tokenizer_model, "--no-progress"]) == 0
        yield {"root": root, "prefix": prefix, "records": records, "save": save, "hf": hf, "demo": demo}
    finally:
        torch.set_num_threads(threads)


def _noised_copy(hf: Path, out: Path) -> Path:
    """The export with every weight perturbed (seeded): a model whose greedy answers depend on the
    prompt and the image, so that padding mistakes show in them (the briefly trained model mostly
    repeats one caption whatever it is asked)."""
    from megatron_croc.convert.hf_modeling.modeling_croc import CrocLlavaForConditionalGeneration

    shutil.copytree(hf, out)
    model = CrocLlavaForConditionalGeneration.from_pretrained(str(hf))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            scale = float(p.std()) if p.ndim > 1 else 1.0
            p.add_(torch.randn(p.shape, generator=g) * 2.0 * scale)
    for f in list(out.glob("*.safetensors")) + list(out.glob("*.safetensors.index.json")):
        f.unlink()
    model.save_pretrained(str(out))
    return out


def _answers(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "answers.jsonl").read_text().splitlines()]


def test_load_and_hf_give_the_same_answers_batched_or_not(setup, tmp_path, capsys):
    from megatron_croc.evaluation.cli import main

    records = setup["records"]
    common = ["--data-path", setup["prefix"], "--max-new-tokens", str(NEW_TOKENS), "--no-progress", "--device", "cpu"]
    assert main(["--load", str(setup["save"]), "--model", "tiny", "--batch-size", "4", "--output-dir",
                 str(tmp_path / "a"), "--save-hf", str(tmp_path / "kept"), *common]) == 0
    out = capsys.readouterr()
    assert "first round" in out.err  # the multi-turn record, said once
    assert out.err.count("several rounds") == 1
    table = out.out.splitlines()
    assert table[0].split()[:3] == ["question", "type", "n"]
    rows = {line.split()[0]: line.split() for line in table[1:] if line.strip()}
    assert rows["overall"][1] == "13" and rows["caption"][1] == "3" and rows["all"][1] == "2"
    assert rows["caption"][3].endswith("%") and rows["color"][3] == "-"
    assert any(line.startswith("validation lm loss:") for line in table)

    a = _answers(tmp_path / "a")
    assert [x["id"] for x in a] == [r["id"] for r in records]
    for x, r in zip(a, records):
        assert FIELDS <= set(x), x
        assert x["question_type"] == r.get("question_type", "all")
        assert x["question"] == r["conversations"][0]["value"].replace("<image>\n", "")
        assert x["reference"] == r["conversations"][1]["value"]  # the first round, without EOS
        assert isinstance(x["answer"], str) and isinstance(x["correct"], bool)
        assert ("fact_recall" in x) == ("facts" in r)
        if "facts" in r:
            assert 0.0 <= x["fact_recall"] <= 1.0 and x["facts"] == r["facts"]
    assert any(x["answer"] for x in a)
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert math.isfinite(summary["lm_loss"]) and summary["supervised_tokens"] > 0
    assert summary["counts"]["evaluated"] == 13 and summary["counts"]["multi_turn_first_round_only"] == 1
    assert summary["counts"]["fact_scored"] == 3
    assert summary["question_types"]["overall"]["n"] == 13
    assert summary["question_types"]["caption"]["fact_recall"] is not None
    assert summary["question_types"]["color"]["fact_recall"] is None
    assert Path(summary["checkpoint"]).name == "iter_0000012" and summary["data_path"] == setup["prefix"]
    assert summary["hf_dir"] == str((tmp_path / "kept").resolve()) and (tmp_path / "kept" / "config.json").is_file()
    assert summary["wall_time_s"] > 0

    # the export, one sample at a time: the same answers (left padding changes nothing) and loss
    assert main(["--hf", str(setup["hf"]), "--batch-size", "1", "--output-dir", str(tmp_path / "b"), *common]) == 0
    b = _answers(tmp_path / "b")
    assert [x["answer"] for x in b] == [x["answer"] for x in a]
    assert b == a
    summary_b = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary_b["lm_loss"] == pytest.approx(summary["lm_loss"], rel=1e-5)
    assert summary_b["supervised_tokens"] == summary["supervised_tokens"]
    assert summary_b["checkpoint"] == str(setup["hf"].resolve())

    # batched (left-padded, mixed lengths, with and without images) == batch size 1, on a model
    # whose answers differ from sample to sample
    from megatron_croc.evaluation import evaluate

    noised = _noised_copy(setup["hf"], tmp_path / "noised")
    runs = {bs: evaluate(hf_dir=str(noised), data_path=setup["prefix"], batch_size=bs, max_new_tokens=NEW_TOKENS,
                         device="cpu", progress=False, log=lambda _m: None) for bs in (1, 5, 16)}
    single = [x.answer for x in runs[1].answers]
    assert len(set(single)) >= 5, single
    for bs in (5, 16):
        assert [x.answer for x in runs[bs].answers] == single, bs
        assert runs[bs].loss == pytest.approx(runs[1].loss, rel=1e-5)


def test_loss_equals_one_computed_by_hand_from_the_logits(setup):
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from megatron_croc.data.constants import IMAGE_TOKEN_ID
    from megatron_croc.data.indexed import MultimodalIndexedDataset
    from megatron_croc.evaluation import evaluate

    result = evaluate(hf_dir=str(setup["hf"]), data_path=setup["prefix"], batch_size=5, max_new_tokens=2,
                      device="cpu", progress=False, log=lambda _m: None)
    assert len(result.answers) == 13 and result.output_dir is None

    model = AutoModelForImageTextToText.from_pretrained(str(setup["hf"]), trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(str(setup["hf"]))
    image_id = model.config.image_token_index
    total, count, first_hf_loss = 0.0, 0, None
    for sample in MultimodalIndexedDataset(setup["prefix"]):
        ids, sup = [], []
        for t, m in zip(sample.tokens.tolist(), sample.loss_mask.tolist()):
            ids += [image_id] * 16 if t == IMAGE_TOKEN_ID else [t]
            sup += [0] * 16 if t == IMAGE_TOKEN_ID else [m]
        ids, sup = torch.tensor([ids]), torch.tensor(sup, dtype=torch.bool)
        kwargs = {}
        if sample.image is not None:
            image = Image.fromarray(np.ascontiguousarray(sample.image.transpose(1, 2, 0)))
            kwargs["pixel_values"] = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
        labels = ids.masked_fill(~sup[None], -100)
        with torch.no_grad():
            out = model(input_ids=ids, labels=labels, **kwargs)
        logp = torch.log_softmax(out.logits[0].float(), dim=-1)
        # training's alignment: logits at t predict token t+1, counted where token t+1 is supervised
        at = torch.nonzero(sup[1:]).flatten()
        total += float(-logp[at, ids[0, at + 1]].sum())
        count += len(at)
        if first_hf_loss is None:
            first_hf_loss = (float(out.loss), len(at), float(-logp[at, ids[0, at + 1]].mean()))
    assert result.supervised_tokens == count
    assert result.loss == pytest.approx(total / count, rel=1e-4)
    # ... and transformers' own shifted loss agrees on a sample (evaluated alone with limit=1)
    hf_loss, _, by_hand = first_hf_loss
    assert hf_loss == pytest.approx(by_hand, rel=1e-4)
    one = evaluate(hf_dir=str(setup["hf"]), data_path=setup["prefix"], limit=1, max_new_tokens=1, device="cpu",
                   progress=False, log=lambda _m: None)
    assert one.num_samples == 1 and one.loss == pytest.approx(hf_loss, rel=1e-4)


def test_errors_exit_2_with_one_line(setup, tmp_path, capsys):
    from megatron_croc.evaluation.cli import main

    hf, prefix = str(setup["hf"]), setup["prefix"]
    quick = ["--no-progress", "--device", "cpu", "--max-new-tokens", "1"]
    if not torch.cuda.is_available():
        assert main(["--hf", hf, "--data-path", prefix, "--device", "cuda"]) == 2
        assert "no CUDA GPU here" in capsys.readouterr().err

    def error(argv):
        assert main([*argv, *quick]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err and err[-1].startswith("error: ")
        return err[-1]

    assert "no-such" in error(["--hf", hf, "--data-path", str(tmp_path / "no-such")])
    (tmp_path / "empty").mkdir()
    assert "neither a checkpoint folder" in error(["--load", str(tmp_path / "empty"), "--model", "tiny",
                                                   "--data-path", prefix])
    assert "missing or incomplete" in error(["--load", str(setup["save"]), "--iteration", "7", "--model", "tiny",
                                             "--data-path", prefix])
    msg = error(["--load", str(setup["save"]), "--data-path", prefix])  # a training checkpoint: no record
    assert "no conversion record" in msg and msg.endswith("pass --model (one of the presets)")
    assert "--save-hf" in error(["--hf", hf, "--save-hf", str(tmp_path / "x"), "--data-path", prefix])
    assert "not a HuggingFace export" in error(["--hf", str(tmp_path / "empty"), "--data-path", prefix])

    # an eval set whose tokenizer does not fit the export's vocabulary
    other = tmp_path / "other" / "eval"
    other.parent.mkdir()
    for suffix in (".bin", ".idx"):
        shutil.copyfile(prefix + suffix, str(other) + suffix)
    meta = json.loads(Path(prefix + ".meta.json").read_text())
    meta["tokenizer"]["vocab_size"] = 700
    Path(str(other) + ".meta.json").write_text(json.dumps(meta))
    assert "does not match the model's vocabulary (640)" in error(["--hf", hf, "--data-path", str(other)])
    assert "--vocab-size 600 does not match" in error(["--load", str(setup["save"]), "--model", "tiny",
                                                      "--vocab-size", "600", "--data-path", prefix])

    # references that lack a sample's id
    refs = tmp_path / "refs.jsonl"
    refs.write_text(json.dumps(setup["records"][0]) + "\n")
    msg = error(["--hf", hf, "--data-path", prefix, "--references", str(refs)])
    assert "'eval-01'" in msg and "not found in the references" in msg
    assert "no such file" in error(["--hf", hf, "--data-path", prefix, "--references", str(tmp_path / "nope.json")])
    # ... and the right records given explicitly are fine
    (tmp_path / "refs.json").write_text(json.dumps(setup["records"]))
    assert main(["--hf", hf, "--data-path", prefix, "--references", str(tmp_path / "refs.json"), "--limit", "2",
                 *quick]) == 0


def test_code_shipped_in_an_hf_folder_never_runs(setup, tmp_path, capsys):
    """--hf takes folders from anyone: the model class of our exports comes from this package,
    never from the folder's modeling_croc.py (no trust_remote_code; docs/SECURITY.md)."""
    from megatron_croc.evaluation.cli import main

    hostile = tmp_path / "hf"
    shutil.copytree(setup["hf"], hostile)
    marker = tmp_path / "ran"
    (hostile / "modeling_croc.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n"
                                              + (hostile / "modeling_croc.py").read_text())
    assert main(["--hf", str(hostile), "--data-path", setup["prefix"], "--limit", "2", "--max-new-tokens", "4",
                 "--no-progress", "--device", "cpu"]) == 0
    assert not marker.exists()
    assert "overall" in capsys.readouterr().out


def test_a_second_run_on_the_same_output_dir_is_refused_unless_overwrite(setup, tmp_path, capsys):
    from megatron_croc.evaluation.cli import main

    out = tmp_path / "eval"
    argv = ["--hf", str(setup["hf"]), "--data-path", setup["prefix"], "--limit", "2", "--max-new-tokens", "2",
            "--no-progress", "--device", "cpu", "--output-dir", str(out)]
    assert main(argv) == 0
    first = (out / "answers.jsonl").read_text()
    capsys.readouterr()
    assert main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == (f"error: --output-dir {out} already holds an evaluation (answers.jsonl, summary.json); choose "
                    "another folder, or pass --overwrite to replace it")
    assert (out / "answers.jsonl").read_text() == first  # nothing lost
    assert main([*argv, "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["answers.jsonl", "summary.json"]  # no partial files
    (tmp_path / "file").write_text("x")
    assert main([*argv[:-1], str(tmp_path / "file")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_sigterm_removes_the_temporary_export(setup, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    job = subprocess.Popen(
        [sys.executable, "tools/evaluate.py", "--load", str(setup["save"]), "--model", "tiny", "--data-path",
         setup["prefix"], "--device", "cpu", "--no-progress", "--batch-size", "1",  # slow enough to be stopped
         "--output-dir", str(tmp_path / "out")],
        cwd=Path(__file__).resolve().parents[3], env=dict(os.environ, TMPDIR=str(scratch)),
        stderr=subprocess.PIPE, text=True)
    seen = []
    try:
        for line in job.stderr:
            seen.append(line)
            if line.startswith("[evaluate]") and "samples of" in line:  # exported, now evaluating
                break
        assert not [x for x in seen if "Warning" in x], seen  # known third-party warnings stay silent
        assert any(scratch.iterdir())  # the temporary export is there
        job.send_signal(signal.SIGTERM)
        job.communicate(timeout=60)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 128 + signal.SIGTERM
    assert not list(scratch.iterdir()) and not (tmp_path / "out" / "summary.json").exists()


def test_a_checkpoint_of_another_model_is_named_with_the_flag(setup, capsys):
    from megatron_croc.evaluation.cli import main

    assert main(["--load", str(setup["save"]), "--model", "vicuna-7b", "--data-path", setup["prefix"],
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error: ")]
    assert len(errors) == 1 and "does not match the model --model vicuna-7b builds" in errors[0], err
    assert len(err) <= 1 + 1 + 5 + 1  # the [evaluate] line, the error, 5 examples, "... and N more"
