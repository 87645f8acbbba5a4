"""The benchmarks run end to end at toy size on the CPU, through the same one command the GPU
machine runs (bench/gpu_suite.sh --cpu), and report every row of their tables with finite
numbers; bench_step's profiled breakdown adds up to the step, and its attribution is checked
exactly on a hand-made GPU trace. The GPU figures themselves are measured, not asserted
(docs/PERFORMANCE.md)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
BENCH = REPO / "bench"


# The suite's CPU mode runs bench_step at 7B width's code path at toy size: a named model with its
# depth overridden (gpu_suite.sh: STEP7B_ARGS=(--model tiny --num-layers 1)); that part stands in
# for the plain --tiny one (the same script, --tiny being --model tiny), so one bench_step run
# covers both. T_STEP7B: room for every optional row on a loaded 2-core machine (~15-40 s).
STEP_PART, STEP_LAYERS = "bench_step_7b", 1


@pytest.fixture(scope="module")
def suite_out(tmp_path_factory):
    """One CPU run of the suite's attention benchmark and its bench_step part at 7B width's
    code path (the GPU tests, the assignment and vision benchmarks have their own CPU
    coverage)."""
    out = tmp_path_factory.mktemp("gpu_suite")
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, SUITE_PARTS=f"bench_attention {STEP_PART}",
               T_STEP7B="150")
    proc = subprocess.run(["bash", str(BENCH / "gpu_suite.sh"), "--cpu"], env=env, capture_output=True,
                          text=True, timeout=400)
    return out, proc


def _log(out: Path, name: str) -> str:
    path = out / f"{name}.log"
    return path.read_text() if path.exists() else f"(no {path})"


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_suite_runs_both_benchmarks_and_reports_their_tables(suite_out):
    out, proc = suite_out
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    status = {line.split()[0]: line.split(None, 1)[1] for line in (out / "status.txt").read_text().splitlines()}
    for part in ("bench_attention", STEP_PART):
        assert status[part].startswith("ok"), status
    assert status["gpu_tests"].startswith("not run"), status
    # the summary at the end of the output repeats the tables
    summary = proc.stdout.split("gpu_suite summary", 1)[1]
    assert "=== attention table" in summary and "=== step table" in summary


MAIN_ROWS = ["GPT, our spec (SDPA flash causal)", "Croc stage step (mixed attention)",
             "Paper's stack (HF LLaVA, SDPA dense mask, serial scipy)"]
OPTIONAL_ROWS = ["Croc step, nearest matcher (no host solve)", "Croc step, assignment look-ahead off",
                 "GPT, megatron local spec (unfused attention)"]
BREAKDOWN_KEYS = ["vision_encoder", "projector", "pool", "llm_attention", "llm_linear", "llm_rest", "llm_io", "vtr",
                  "losses", "grads", "optimizer", "other", "idle"]


def test_step_benchmark_rows_and_numbers(suite_out):
    out, _ = suite_out
    log = _log(out, STEP_PART)
    result = json.loads((out / f"{STEP_PART}.json").read_text())
    assert result["failures"] == 0 and not result["skipped"], log[-4000:]
    # --model tiny --num-layers 1: the named preset with its depth overridden
    assert (result["model"], result["num_layers"]) == ("tiny", STEP_LAYERS)
    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows) == MAIN_ROWS + OPTIONAL_ROWS, log[-4000:]
    for name, row in rows.items():
        assert name in log
        for key in ("step_s", "tokens_per_s", "model_tflops", "llm_tflops", "last_loss"):
            assert _finite(row[key]) and row[key] > 0, (name, key, row[key])
    croc, paper = rows[MAIN_ROWS[1]], rows[MAIN_ROWS[2]]
    # Croc and the paper's stack count the vision encoder, projector and VTR head on top of the LLM
    assert croc["model_tflops"] > croc["llm_tflops"] and paper["model_tflops"] > paper["llm_tflops"]
    parts = croc["components"]
    for key in ("vision_ms", "vision_tflops", "pool_forward_ms", "scipy_ms", "scipy_serial_ms", "attention_ms", "attention_gpt_ms",
                "attention_layer_mixed_ms", "attention_layer_causal_ms", "mask_build_ms"):
        assert _finite(parts[key]) and parts[key] > 0, (key, parts.get(key))
    assert parts["attention_backend"] == "sdpa"  # FlexAttention has no CPU backward
    assert parts["scipy_one_to_one"] and parts["scipy_max_rel_cost_diff"] < 1e-9
    assert _finite(result["matmul_tflops"])
    assert result["lookahead"] and result["num_microbatches"] == 2
    for line in ("Croc / GPT tokens/s:", "Croc / paper's stack tokens/s", "Croc step, components alone",
                 "vision encoder", "of the matmul rate (target >= 50%)", "assignment exposed in the step", "look-ahead: step",
                 "assignment, solved in the forward", "serial scipy", "attention:",
                 "mixed / causal attention per layer", "Croc step, profiled", "sum of the rows",
                 "exposed assignment per step", "FP8: n/a (TransformerEngine not installed)"):
        assert line in log, line


def test_step_benchmark_profiled_breakdown_adds_up(suite_out):
    """The profiled Croc step's rows (self CPU time of aten ops here, kernel time on a GPU) plus
    the time outside them sum to the profiled step's wall time: every busy interval is counted
    once, in one row (float rounding aside: 0.1% allowed). Each part of the model got time, the
    backward went to the trained parts' rows (through the forward ops' sequence numbers) and
    none to the frozen encoder's."""
    out, _ = suite_out
    result = json.loads((out / f"{STEP_PART}.json").read_text())
    croc = next(r for r in result["rows"] if r["name"] == MAIN_ROWS[1])
    b = croc["breakdown"]
    rows = {r["key"]: r for r in b["rows"]}
    assert list(rows) == BREAKDOWN_KEYS
    assert not b["missing_scopes"], b["missing_scopes"]
    for key, r in rows.items():
        assert _finite(r["ms"]) and r["ms"] >= 0, (key, r)
    assert abs(sum(r["ms"] for r in rows.values()) - b["profiled_step_ms"]) <= 1e-3 * b["profiled_step_ms"], b
    assert abs(b["residual_ms"]) <= 1e-3 * b["profiled_step_ms"]
    assert _finite(b["timed_step_ms"]) and b["timed_step_ms"] > 0
    for key in ("vision_encoder", "projector", "pool", "llm_attention", "llm_linear", "llm_rest", "llm_io", "vtr",
                "losses", "grads", "optimizer", "idle"):
        assert rows[key]["ms"] > 0, (key, rows[key])
    for key in ("projector", "llm_attention", "llm_linear", "llm_io", "vtr", "losses"):
        assert rows[key]["bwd_ms"] > 0, (key, rows[key])
    assert rows["vision_encoder"]["bwd_ms"] == 0 and rows["optimizer"]["bwd_ms"] == 0


def test_step_benchmark_exposed_assignment_in_both_pool_regimes(suite_out):
    """The sweep: at the default 2 and at 4 micro-batches, in both pool regimes, the Croc step
    and the same step with the nearest matcher, and their difference."""
    out, _ = suite_out
    result = json.loads((out / f"{STEP_PART}.json").read_text())
    assert [(r["num_microbatches"], r["pool_init"], r["matcher"]) for r in result["sweep"]] == [
        (2, "normal", "hungarian"), (4, "token_scale", "hungarian"), (4, "normal", "hungarian"),
        (4, "token_scale", "nearest")]
    for r in result["sweep"]:
        assert _finite(r["step_s"]) and r["step_s"] > 0 and _finite(r["last_loss"]), r
    exposed = {(e["num_microbatches"], e["pool_init"]): e for e in result["exposed_assignment"]}
    assert sorted(exposed) == [(2, "normal"), (2, "token_scale"), (4, "normal"), (4, "token_scale")]
    for e in exposed.values():
        assert _finite(e["exposed_s"]) and _finite(e["share"])  # CPU timing noise: either sign


class _Event:
    """A kineto event as attribute_profile reads it: torch._C._autograd._KinetoEvent's methods,
    each returning the value given here."""

    def __init__(self, name, start, end, *, thread=1, corr=0, linked=0, seq=-1, fwd_thread=0, device=False,
                 annotation=False):
        import torch

        self._values = dict(
            name=name, start_ns=start, end_ns=end, start_thread_id=thread, end_thread_id=thread,
            correlation_id=corr, linked_correlation_id=linked, sequence_nr=seq, fwd_thread_id=fwd_thread,
            device_type=torch.autograd.DeviceType.CUDA if device else torch.autograd.DeviceType.CPU,
            is_async=False, is_user_annotation=annotation)

    def __getattr__(self, method):
        value = self.__dict__["_values"][method]
        return lambda: value


def test_profile_attribution_of_kernels_backward_overlap_and_idle():
    """benchlib.attribute_profile on a hand-made GPU trace: a kernel belongs to the op that
    launched it and that op to its innermost scope; a backward op (on the engine's thread) to
    the scope of the forward op with its sequence number; AccumulateGrad to the accumulation
    key; overlapping kernels split the overlap; kernels are clipped to the window; GPU user
    annotations are not work; idle is the rest. On the CPU the same trace counts ops' self time."""
    sys.path.insert(0, str(BENCH))
    try:
        from benchlib import SCOPE_PREFIX, attribute_profile
    finally:
        sys.path.remove(str(BENCH))

    class Trace:
        def __init__(self, events):
            self._events = events

        def events(self):
            return self._events

    events = [
        _Event(SCOPE_PREFIX + "window", 0, 1000, corr=1),
        _Event(SCOPE_PREFIX + "A", 10, 100, corr=2),
        _Event("aten::mm", 20, 30, corr=3, seq=5),
        _Event(SCOPE_PREFIX + "A", 10, 100, device=True, annotation=True),  # its GPU-side annotation
        _Event("aten::add", 110, 120, corr=4, seq=6),
        _Event("autograd::engine::evaluate_function: MmBackward0", 300, 400, thread=2, corr=5, seq=5, fwd_thread=1),
        _Event("aten::mm", 310, 320, thread=2, corr=7),
        _Event("autograd::engine::evaluate_function: torch::autograd::AccumulateGrad", 500, 510, thread=2, corr=8),
        _Event("aten::add_", 505, 508, thread=2, corr=9),
        _Event("cudaLaunchKernel", 22, 25, corr=100, linked=3),  # a runtime call: not a tree node
        _Event("gemm_fwd", 40, 90, device=True, corr=100, linked=3),
        _Event("add_kernel", 120, 200, device=True, corr=101, linked=4),
        _Event("gemm_bwd", 350, 450, device=True, corr=102, linked=7),
        _Event("accumulate_kernel", 400, 500, device=True, corr=103, linked=9),  # overlaps gemm_bwd by 50
        _Event("lost_kernel", 600, 650, device=True, corr=104, linked=999),
        _Event("late_kernel", 950, 1100, device=True, corr=105, linked=4),  # clipped to the window
    ]
    gpu = attribute_profile(Trace(events), on_device=True, accumulate_key="grads")
    assert gpu["by_key"] == {"A": {"fwd": 50.0, "bwd": 75.0}, "grads": {"fwd": 0.0, "bwd": 75.0},
                             "other": {"fwd": 180.0, "bwd": 0.0}}
    assert (gpu["window_ns"], gpu["busy_ns"], gpu["idle_ns"]) == (1000, 380, 620)
    assert (gpu["device_events"], gpu["unlinked_device_events"]) == (6, 1)
    cpu = attribute_profile(Trace(events), on_device=False, accumulate_key="grads")
    assert cpu["by_key"] == {"A": {"fwd": 10.0, "bwd": 10.0}, "other": {"fwd": 10.0, "bwd": 0.0},
                             "grads": {"fwd": 0.0, "bwd": 3.0}}
    assert (cpu["busy_ns"], cpu["idle_ns"]) == (33, 967)


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


def test_step_models_croc_1b_by_default_and_vicuna_7b_width():
    sys.path.insert(0, str(BENCH))
    try:
        import bench_step
    finally:
        sys.path.remove(str(BENCH))
    args = bench_step.parse_args([])
    assert (args.preset, args.seq_length, args.micro_batch_size, args.num_microbatches) == ("croc-1b", 2048, 4, 4)
    assert args.sweep_microbatches == [8, 16]
    config = bench_step.build_model_config(args)
    assert 0.8e9 < bench_step.llm_params(config) < 1.2e9
    assert config.vision.num_image_tokens == 576 and config.croc.pool_size == 2048
    assert config.croc.attention_variant == "visual" and config.precision.bf16
    assert config.croc.pool_init == "token_scale"
    # 7B width: Vicuna-7B's layer shape with CLIP-L/336, 8 layers unless --num-layers says otherwise
    for argv, layers in ((["--model", "vicuna-7b"], 8), (["--preset", "vicuna-7b", "--num-layers", "4"], 4)):
        config = bench_step.build_model_config(bench_step.parse_args(argv))
        lm = config.language
        assert (lm.hidden_size, lm.num_attention_heads, lm.num_query_groups, lm.ffn_hidden_size) == (
            4096, 32, 32, 11008)
        assert lm.num_layers == layers and config.vision.num_image_tokens == 576
    assert 1.8e9 < bench_step.llm_params(bench_step.build_model_config(bench_step.parse_args(
        ["--model", "vicuna-7b"]))) < 2.0e9
    normal = bench_step.build_model_config(bench_step.parse_args(["--pool-init", "normal"]))
    assert normal.croc.pool_init == "normal"
    for bad in (["--tiny", "--model", "vicuna-7b"], ["--num-layers", "0"], ["--sweep-microbatches", "0"]):
        with pytest.raises(SystemExit):
            bench_step.parse_args(bad)


def test_assignment_benchmark_reports_every_solver_against_serial_scipy(capsys):
    """--tiny on the CPU: both pool regimes, serial vs concurrent scipy, the same optimum; with a
    zero time budget every regime still gets one timed call per path and the table is printed."""
    sys.path.insert(0, str(BENCH))
    try:
        import bench_assignment
    finally:
        sys.path.remove(str(BENCH))
    for extra, calls in (([], (5, 2)), (["--budget-s", "0", "--microbatch-ms", "0.5"], (1, 1))):
        assert bench_assignment.main(["--tiny", "--device", "cpu", *extra]) == 0
        printed = capsys.readouterr().out
        assert "=== assignment table" in printed and "=== end assignment table" in printed
        result = json.loads(printed.split("BENCH_ASSIGNMENT_JSON ", 1)[1])
        assert (result["config"]["batch"], result["config"]["rows"]) == (3, 12)
        assert [r["pool_init"] for r in result["rows"]] == ["unit", "normal"]
        assert tuple(r["timed_calls"] for r in result["rows"]) == calls
        for row in result["rows"]:
            for key in ("serial_scipy_ms", "concurrent_scipy_ms", "concurrent_scipy_speedup"):
                assert _finite(row[key]) and row[key] > 0, (key, row)
            # the concurrent path returns the serial loop's optimum
            assert row["concurrent_scipy_max_rel_diff"] < 1e-9
        if extra:
            shares = [row["exposed_per_step"][m]["share"] for row in result["rows"] for m in ("4", "8", "16")]
            assert all(0 < share < 1 for share in shares) and "exposed assignment per step" in printed
    with pytest.raises(SystemExit):
        bench_assignment.parse_args(["--tiny", "--rows", "41"])  # more rows than pool entries


def test_vision_benchmark_reports_the_eager_tower_and_marks_graphs_gpu_only(capsys):
    """--tiny on the CPU: the eager frozen-encoder row with finite figures (time, FLOPs, share of
    the matmul rate, host time, op counts) and the graphed row marked as needing a GPU."""
    sys.path.insert(0, str(BENCH))
    try:
        import bench_vision
    finally:
        sys.path.remove(str(BENCH))
    before = signal.getsignal(signal.SIGTERM)
    assert bench_vision.main(["--device", "cpu", "--tiny", "--images", "2", "--iters", "1", "--warmup", "1"])[
        "interrupted"] is None
    printed = capsys.readouterr().out
    assert "=== vision table" in printed and "=== end vision table" in printed
    result = json.loads(printed.split("BENCH_VISION_JSON ", 1)[1])
    eager, graphed = result["rows"]
    assert (eager["images"], eager["path"], graphed["path"]) == (2, "eager", "graphed")
    for key in ("encoder_ms", "tower_ms", "host_ms", "tflop", "tflops", "pct_matmul"):
        assert _finite(eager[key]) and eager[key] > 0, (key, eager)
    assert eager["ops_per_call"] > 0 and result["aten_ops_per_layer"]["top_level"] > 0
    assert "GPU" in graphed["na"]
    assert signal.getsignal(signal.SIGTERM) is before  # the benchmark's SIGTERM handler is gone again


def test_suite_bundles_its_outputs_into_one_archive(tmp_path):
    """BUNDLE_OUT=1 (what the lent GPU machine needs: it brings back at most 8 files): one
    archive with every log, beside the parts' status; nothing else left in $OUT."""
    import tarfile

    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, SUITE_PARTS="none", BUNDLE_OUT="1")
    proc = subprocess.run(["bash", str(BENCH / "gpu_suite.sh"), "--cpu"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_suite_out.tar.gz", "status.txt"], proc.stdout[-2000:]
    with tarfile.open(out / "gpu_suite_out.tar.gz") as archive:
        names = {Path(n).name for n in archive.getnames()}
    assert {"env.txt", "status.txt", "gpu_tests.log", "bench_step_7b.log"} <= names, names


def test_init_benchmark_times_both_initialisations():
    proc = subprocess.run([sys.executable, str(BENCH / "bench_init.py"), "--tiny"], capture_output=True, text=True,
                          timeout=300, env={k: v for k, v in os.environ.items()
                                            if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["model"] == "tiny" and result["parameters"] > 0
    for key in ("megatron_init_s", "layout_invariant_init_s", "ratio"):
        assert _finite(result[key]) and result[key] > 0, (key, result)
