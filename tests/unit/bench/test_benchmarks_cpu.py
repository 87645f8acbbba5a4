"""The benchmarks run end to end at toy size on the CPU, through the same one command the GPU
machine runs (bench/gpu_suite.sh --cpu), and report every row of their tables with finite
numbers. The GPU figures themselves are measured, not asserted (docs/PERFORMANCE.md)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
BENCH = REPO / "bench"


@pytest.fixture(scope="module")
def suite_out(tmp_path_factory):
    """One CPU run of the suite's two benchmarks (the GPU tests and the assignment benchmark
    have their own CPU coverage)."""
    out = tmp_path_factory.mktemp("gpu_suite")
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, SUITE_PARTS="bench_attention bench_step")
    proc = subprocess.run(["bash", str(BENCH / "gpu_suite.sh"), "--cpu"], env=env, capture_output=True,
                          text=True, timeout=300)
    return out, proc


def _log(out: Path, name: str) -> str:
    path = out / f"{name}.log"
    return path.read_text() if path.exists() else f"(no {path})"


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_suite_runs_both_benchmarks_and_reports_their_tables(suite_out):
    out, proc = suite_out
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    status = (out / "status.txt").read_text()
    for part in ("bench_attention", "bench_step"):
        assert f"{part}" in status and "ok" in status.split(part, 1)[1].splitlines()[0], status
    assert "not run" in status.split("gpu_tests", 1)[1].splitlines()[0]
    # the summary at the end of the output repeats the tables
    summary = proc.stdout.split("gpu_suite summary", 1)[1]
    assert "=== attention table" in summary and "=== step table" in summary


def test_step_benchmark_rows_and_numbers(suite_out):
    out, _ = suite_out
    log = _log(out, "bench_step")
    result = json.loads((out / "bench_step.json").read_text())
    assert result["failures"] == 0, log[-4000:]
    rows = {r["name"]: r for r in result["rows"]}
    expected = ["GPT, our spec (SDPA flash causal)", "Croc stage step (mixed attention)",
                "Croc step, nearest matcher (no host solve)", "Croc step, assignment look-ahead off",
                "GPT, megatron local spec (unfused attention)"]
    assert list(rows) == expected, log[-4000:]
    for name in expected:
        row = rows[name]
        assert name in log
        for key in ("step_s", "tokens_per_s", "model_tflops", "llm_tflops", "last_loss"):
            assert _finite(row[key]) and row[key] > 0, (name, key, row[key])
    croc = rows["Croc stage step (mixed attention)"]
    # Croc counts the vision encoder, projector and VTR head on top of the same LLM
    assert croc["model_tflops"] > croc["llm_tflops"]
    parts = croc["components"]
    for key in ("vision_ms", "pool_forward_ms", "scipy_serial_ms", "attention_ms", "attention_gpt_ms",
                "attention_layer_mixed_ms", "attention_layer_causal_ms", "mask_build_ms"):
        assert _finite(parts[key]) and parts[key] > 0, (key, parts.get(key))
    assert parts["attention_backend"] == "sdpa"  # FlexAttention has no CPU backward
    assert parts["scipy_one_to_one"] and parts["scipy_max_rel_cost_diff"] < 1e-9
    assert _finite(result["matmul_tflops"])
    assert result["lookahead"] and result["num_microbatches"] == 2
    for line in ("Croc / GPT tokens/s:", "Croc step breakdown", "vision encoder", "assignment exposed in the step",
                 "look-ahead: step", "assignment, solved in the forward",
                 "serial scipy", "attention:", "mixed / causal attention per layer",
                 "FP8: n/a (TransformerEngine not installed)"):
        assert line in log, line


def test_attention_benchmark_rows_numbers_and_accuracy(suite_out):
    out, _ = suite_out
    log = _log(out, "bench_attention")
    result = json.loads((out / "bench_attention.json").read_text())
    cases = [(r["shape"], r["case"]) for r in result["rows"]]
    assert ("B2 S128 H4/2 D32", "causal") in cases and ("B2 S128 H4/2 D32", "visual") in cases
    assert ("B2 S128 H4/2 D32", "prefix") in cases
    assert ("B1 S256 H4 D32", "packed visual (2/row)") in cases, log[-3000:]
    for r in result["rows"]:
        assert _finite(r["fwd_bwd_ms"]) and r["fwd_bwd_ms"] > 0
        assert _finite(r["vs_causal"])
        # bf16 against the dense fp32 reference: errors of bf16 rounding, not of a wrong mask
        assert r["max_err_out"] < 0.05 and r["max_err_grad"] < 0.2, r
        if r["case"] != "causal":
            assert _finite(r["build_ms"])
    assert "=== attention table" in log and "=== end attention table" in log


def test_default_step_preset_is_a_1b_llm_with_clip_l():
    sys.path.insert(0, str(BENCH))
    try:
        import bench_step
    finally:
        sys.path.remove(str(BENCH))
    args = bench_step.parse_args([])
    assert (args.preset, args.seq_length, args.micro_batch_size, args.num_microbatches) == ("croc-1b", 2048, 4, 4)
    config = bench_step.build_model_config(args)
    assert 0.8e9 < bench_step.llm_params(config) < 1.2e9
    assert config.vision.num_image_tokens == 576 and config.croc.pool_size == 2048
    assert config.croc.attention_variant == "visual" and config.precision.bf16


def test_assignment_benchmark_reports_every_solver_against_serial_scipy(capsys):
    sys.path.insert(0, str(BENCH))
    try:
        import bench_assignment
    finally:
        sys.path.remove(str(BENCH))
    assert bench_assignment.main(["--batch", "3", "--rows", "12", "--cols", "40", "--hidden", "16",
                                  "--pool-init", "both", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "=== assignment table" in printed
    result = json.loads(printed.split("BENCH_ASSIGNMENT_JSON ", 1)[1])
    assert [r["pool_init"] for r in result["rows"]] == ["unit", "normal"]
    for row in result["rows"]:
        for key in ("serial_scipy_ms", "concurrent_scipy_ms", "gpu_solver_ms"):
            assert _finite(row[key]) and row[key] > 0, (key, row)
        # both fast paths return scipy's optimum
        assert row["concurrent_scipy_max_rel_diff"] < 1e-9 and row["gpu_solver_max_rel_diff"] < 1e-6
        assert row["gpu_solver_stats"]["fallbacks"] == 0


def test_init_benchmark_times_both_initialisations():
    proc = subprocess.run([sys.executable, str(BENCH / "bench_init.py"), "--tiny"], capture_output=True, text=True,
                          timeout=300, env={k: v for k, v in os.environ.items()
                                            if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["model"] == "tiny" and result["parameters"] > 0
    for key in ("megatron_init_s", "layout_invariant_init_s", "ratio"):
        assert _finite(result[key]) and result[key] > 0, (key, result)
