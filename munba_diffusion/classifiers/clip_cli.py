"""Command line for the CLIP zero-shot class-unlearning benchmark.

The offline demo (the bundled tiny CLIP forgets "circle"; held-out task: colours)::

    python -m munba_diffusion.classifiers.clip_cli --threads 1 --output-dir benchmarks/results/clip_demo

A real CLIP and dataset (needs the Hub once)::

    python -m munba_diffusion.classifiers.clip_cli --model openai/clip-vit-base-patch32 \\
        --dataset timm/oxford-iiit-pet --forget "abyssinian" "bengal" "birman" \\
        --templates "a photo of a {label}, a type of pet." --heldout-dataset uoft-cs/cifar10 \\
        --params text-attention --adapters direct --steps 200 --device cuda --output-dir runs/clip_pets
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

import torch
from transformers.utils import logging as transformers_logging

from ..bargaining import COMBINERS
from ..demo import DEMO_MODEL_NAME
from .benchmark import check_output_dir
from .clip_benchmark import DEFAULT_TEMPLATES, DTYPES, ClipBenchmarkConfig, run_clip_benchmark, write_results
from .clip_unlearn import ADAPTERS, CLIP_METHODS, NONFINITE_POLICIES, PARAM_SETS, ClipUnlearnConfig

PROG = "python -m munba_diffusion.classifiers.clip_cli"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    defaults, unlearn = ClipBenchmarkConfig(), ClipBenchmarkConfig().unlearn
    parser = argparse.ArgumentParser(prog=PROG, description="Make a CLIP zero-shot classifier forget classes with "
                                     "MUNBa and compare with fine-tuning (ft) and random labels (rl).")
    parser.add_argument("--model", default=DEMO_MODEL_NAME, help="CLIP Hub id or folder, or munba-demo (bundled)")
    parser.add_argument("--dataset", default=DEMO_MODEL_NAME,
                        help="munba-demo (rendered shapes) or a datasets name/folder with Image and ClassLabel columns")
    parser.add_argument("--forget", nargs="+", default=list(defaults.forget), help="class name(s) to forget")
    parser.add_argument("--templates", nargs="+", default=None,
                        help="prompt templates with {label} (default: the demo's, else 'a photo of a {label}.')")
    parser.add_argument("--heldout-dataset", default=None, help="datasets name/folder of a held-out zero-shot task "
                        "(default: colours for the demo, none otherwise)")
    parser.add_argument("--heldout-templates", nargs="+", default=list(DEFAULT_TEMPLATES))
    parser.add_argument("--methods", nargs="+", default=list(defaults.methods),
                        help=f"any of {', '.join(CLIP_METHODS)}")
    parser.add_argument("--combiner", default=unlearn.combiner, help=f"munba's combiner: {', '.join(COMBINERS)}")
    parser.add_argument("--params", nargs="+", default=list(defaults.params), help=f"any of {', '.join(PARAM_SETS)}")
    parser.add_argument("--adapters", nargs="+", default=list(defaults.adapters), help=f"any of {', '.join(ADAPTERS)}")
    parser.add_argument("--lora-rank", type=int, default=unlearn.lora_rank)
    parser.add_argument("--lora-alpha", type=float, default=unlearn.lora_alpha)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(defaults.seeds))
    parser.add_argument("--steps", type=int, default=unlearn.steps)
    parser.add_argument("--batch-size", type=int, default=unlearn.batch_size)
    parser.add_argument("--lr", type=float, default=unlearn.lr)
    parser.add_argument("--momentum", type=float, default=unlearn.momentum)
    parser.add_argument("--weight-decay", type=float, default=unlearn.weight_decay)
    parser.add_argument("--max-grad-norm", type=float, default=None)
    parser.add_argument("--on-nonfinite", default=unlearn.nonfinite_gradients, help=f"{' or '.join(NONFINITE_POLICIES)} "
                        "when a player's gradient is not finite")
    parser.add_argument("--dtype", default=defaults.dtype, help=f"model dtype: {', '.join(DTYPES)} (trained "
                        "parameters and losses stay float32)")
    parser.add_argument("--max-train-samples", type=int, default=None)
    parser.add_argument("--max-test-samples", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--overwrite", action="store_true", help="replace results already in --output-dir")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> ClipBenchmarkConfig:
    return ClipBenchmarkConfig(
        model=args.model,
        dataset=args.dataset,
        forget=tuple(args.forget),
        templates=None if args.templates is None else tuple(args.templates),
        heldout_dataset=args.heldout_dataset,
        heldout_templates=tuple(args.heldout_templates),
        methods=tuple(args.methods),
        params=tuple(args.params),
        adapters=tuple(args.adapters),
        seeds=tuple(args.seeds),
        unlearn=ClipUnlearnConfig(
            combiner=args.combiner, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, steps=args.steps,
            batch_size=args.batch_size, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
            max_grad_norm=args.max_grad_norm, nonfinite_gradients=args.on_nonfinite,
        ),
        dtype=args.dtype,
        device=args.device,
        max_train_samples=args.max_train_samples,
        max_test_samples=args.max_test_samples,
    )


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.quiet:
        transformers_logging.disable_progress_bar()
    try:
        config = config_from_args(args)
        config.validate()
        check_output_dir(args.output_dir, args.overwrite)
        paths = write_results(run_clip_benchmark(config, progress=not args.quiet), args.output_dir, args.overwrite)
    except (ValueError, FileExistsError, FileNotFoundError, FloatingPointError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    print("wrote " + ", ".join(map(str, paths)))


if __name__ == "__main__":
    main()
