"""Initialisation time of one rank's model, megatron-core's own initialisation vs ours
(models.initialization: every parameter drawn at full size from its own seeded generator, the
same at every parallel layout), measured side by side in one run.

A rank of a TP x PP layout draws the full tensors of the parameters its pipeline stage holds
(megatron-core's CPU initialisation draws the same full master weights; only the copy kept is
1/TP), so the first stage of a ``--stage-layers``-layer model stands for any TP at that PP:

    python bench/bench_init.py --model vicuna-7b --stage-layers 8   # a PP=4 first stage of vicuna-7b
    python bench/bench_init.py --tiny                                # CI: the tiny model

Prints one JSON line: parameters held (about the numbers each method draws), seconds for each
method and the ratio.
On a GPU (``--device cuda``) the model is built on the device and both methods draw there.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Sequence
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _build(config, device, *, megatron_init: bool):
    import torch

    import megatron_croc.config as model_configs
    from megatron_croc.models import croc

    common = model_configs._common_transformer_kwargs

    def with_megatron_init(c):
        return {**common(c), "perform_initialization": True}

    patches = [mock.patch.object(model_configs, "_common_transformer_kwargs", with_megatron_init),
               mock.patch.object(croc, "initialize_parameters", lambda *a, **k: None)] if megatron_init else []
    for p in patches:
        p.start()
    try:
        start = time.perf_counter()
        with torch.device(device):
            model = croc.CrocModel(config, pre_process=True, post_process=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return model, time.perf_counter() - start
    finally:
        for p in patches:
            p.stop()


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vicuna-7b")
    p.add_argument("--stage-layers", type=int, default=8, help="LLM layers of the stage (32 layers / PP)")
    p.add_argument("--tiny", action="store_true", help="the tiny model (CI)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--bf16", action="store_true")
    args = p.parse_args(argv)

    from megatron_croc.quiet import quiet_known_warnings

    quiet_known_warnings()
    import torch

    from megatron_croc.config import PrecisionConfig, model_preset
    from megatron_croc.distributed import init_model_parallel, init_process_group
    from megatron_croc.platform import init_platform

    platform = init_platform(force_cpu=args.device == "cpu")
    init_process_group(platform.backend)
    init_model_parallel()
    name = "tiny" if args.tiny else args.model
    config = model_preset(name)
    config = config.replace(
        language=dataclasses.replace(config.language, num_layers=config.language.num_layers if args.tiny else args.stage_layers),
        precision=PrecisionConfig(bf16=args.bf16))
    device = platform.device
    ours, ours_s = _build(config, device, megatron_init=False)
    params = sum(t.numel() for t in ours.parameters())
    del ours
    theirs, theirs_s = _build(config, device, megatron_init=True)
    del theirs
    result = {
        "model": name, "stage_layers": config.language.num_layers, "device": str(device),
        "threads": torch.get_num_threads(), "parameters": params,
        "megatron_init_s": round(theirs_s, 3), "layout_invariant_init_s": round(ours_s, 3),
        "ratio": round(ours_s / theirs_s, 3),
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
