"""Command line of ``tools/convert_checkpoint.py``: ``hf-to-megatron`` and ``megatron-to-hf``."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from megatron_croc.config import MODEL_PRESETS

EXAMPLES = """\
examples:
  # stage 1 from released weights: Vicuna-7B-v1.5 + CLIP ViT-L/14-336, TP=2 PP=2
  python tools/convert_checkpoint.py hf-to-megatron --model vicuna-7b \\
      --hf-llm models/vicuna-7b-v1.5 --hf-vision models/clip-vit-large-patch14-336 \\
      --save ckpt/vicuna7b-clipL --target-tensor-parallel-size 2 --target-pipeline-parallel-size 2 --bf16
  # ... with a stage-1 projector (LLaVA's mm_projector.bin) for the comprehension stage
  python tools/convert_checkpoint.py hf-to-megatron --model vicuna-7b --hf-llm ... --hf-vision ... \\
      --hf-projector models/llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5/mm_projector.bin --save ckpt/stage1
  # back to HuggingFace (any TP/PP layout), with the tokenizer and image processor
  python tools/convert_checkpoint.py megatron-to-hf --load runs/croc-instruct --save hf/croc-7b \\
      --hf-llm models/vicuna-7b-v1.5 --hf-vision models/clip-vit-large-patch14-336
  # a training run's own checkpoint (e.g. the demo's), with its SentencePiece tokenizer
  python tools/convert_checkpoint.py megatron-to-hf --load outputs/croc_run/checkpoints --save hf/croc-demo \\
      --model tiny --vocab-size 640 --tokenizer DEMO_DATA/tokenizer.model
  # an export (or a llava-hf model, any transformers layout) back to megatron, to continue training
  python tools/convert_checkpoint.py hf-to-megatron --model vicuna-7b --hf-llava hf/croc-7b --save ckpt/again
(the --hf-* arguments are local folders, e.g. from `huggingface-cli download`; nothing is fetched)
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tools/convert_checkpoint.py",
        description="Convert Croc checkpoints between HuggingFace and megatron-core (CPU, gloo; streams "
        "one tensor at a time). See docs/CONVERT.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXAMPLES,
    )
    sub = p.add_subparsers(dest="command", required=True)
    models = sorted(MODEL_PRESETS) + ["from-hf"]

    a = sub.add_parser("hf-to-megatron", help="HF LLM + CLIP [+ projector], or a LLaVA folder -> dist checkpoint",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a.add_argument("--model", required=True, choices=models,
                   help="model preset, checked against the HF configs; from-hf takes the architecture from them")
    a.add_argument("--hf-llm", help="LlamaForCausalLM folder (Llama 2/3, Vicuna): config.json + weights")
    a.add_argument("--hf-vision", help="CLIP folder (CLIPVisionModel or a full CLIPModel)")
    a.add_argument("--hf-projector", help="stage-1 projector: LLaVA's mm_projector.bin or a safetensors file")
    a.add_argument("--hf-llava", help="a LLaVA folder instead (our export, or e.g. llava-hf/llava-1.5-7b-hf)")
    a.add_argument("--save", required=True, help="output folder (use it as --load for training)")
    a.add_argument("--target-tensor-parallel-size", type=int, default=1)
    a.add_argument("--target-pipeline-parallel-size", type=int, default=1)
    a.add_argument("--croc-stage", default="auto", choices=["auto", "align", "croc", "instruct"],
                   help="stage whose modules the checkpoint holds (auto: croc when the input has a pool)")
    a.add_argument("--croc-pool-size", type=int, default=None)
    a.add_argument("--bf16", action="store_true", help="store parameters in bf16 (as --bf16 training does), else fp32")
    a.add_argument("--seed", type=int, default=1234, help="initialises the projector when none is given")
    a.add_argument("--overwrite", action="store_true", help="replace a non-empty --save folder")
    a.add_argument("--no-progress", action="store_true")

    e = sub.add_parser("megatron-to-hf", help="dist checkpoint (any layout) -> HF LLaVA folder",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    e.add_argument("--load", required=True, help="a --save folder (latest iteration) or one iter_XXXXXXX folder")
    e.add_argument("--save", required=True, help="output folder")
    e.add_argument("--iteration", type=int, default=None)
    e.add_argument("--model", default=None, choices=models,
                   help="architecture (default: recorded at import; from-hf needs --hf-llm and --hf-vision)")
    e.add_argument("--hf-llm", help="the original LLM folder: config, tokenizer, generation config")
    e.add_argument("--hf-vision", help="the original CLIP folder: config, image processor, the unused last layer")
    e.add_argument("--tokenizer", help="tokenizer folder, or a SentencePiece tokenizer.model file (e.g. the demo's); "
                   "default: --hf-llm when it has one")
    e.add_argument("--image-processor", help="image processor folder (default: --hf-vision when it has one, else "
                   "CLIP's at the model's image size when a tokenizer is written)")
    e.add_argument("--image-token-id", type=int, default=None,
                   help="id of <image> (default: the tokenizer's, else a row appended after the vocabulary)")
    e.add_argument("--vocab-size", type=int, default=None, help="the LLM vocabulary (default: recorded / HF config / preset)")
    e.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: the dtype of the original HF weights when recorded, else the checkpoint's")
    e.add_argument("--max-shard-size", default="2GB")
    e.add_argument("--overwrite", action="store_true")
    e.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_croc.config import ConfigError
    from megatron_croc.convert.hf import ConvertError, hf_to_megatron, megatron_to_hf

    try:
        if args.command == "hf-to-megatron":
            hf_to_megatron(
                args.save, model=args.model, llm=args.hf_llm, vision=args.hf_vision, projector=args.hf_projector,
                llava=args.hf_llava, tensor_parallel=args.target_tensor_parallel_size,
                pipeline_parallel=args.target_pipeline_parallel_size, stage=args.croc_stage, bf16=args.bf16,
                pool_size=args.croc_pool_size, seed=args.seed, overwrite=args.overwrite, progress=not args.no_progress,
            )
        else:
            megatron_to_hf(
                args.load, args.save, model=args.model, llm=args.hf_llm, vision=args.hf_vision,
                tokenizer=args.tokenizer, image_processor=args.image_processor, image_token_id=args.image_token_id,
                vocab_size=args.vocab_size, dtype=args.dtype, iteration=args.iteration,
                max_shard_size=args.max_shard_size, overwrite=args.overwrite, progress=not args.no_progress,
            )
    except (ConvertError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
