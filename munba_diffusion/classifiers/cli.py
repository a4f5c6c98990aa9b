"""Command line for the classifier unlearning benchmark (``munba-unlearn-classifier``).

Example::

    munba-unlearn-classifier --seeds 0 1 2 --forget random:0.1 class:3 \\
        --methods retrain ft ga rl munba --output-dir benchmarks/results/classifier_digits
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from ..bargaining import COMBINERS
from .benchmark import (
    DEFAULT_UNLEARN_LR,
    BenchmarkConfig,
    check_output_dir,
    run_benchmark,
    sweep_unlearn_lr,
    write_results,
    write_sweep,
)
from .models import MODELS
from .unlearn import METHODS, TrainConfig

PROG = "munba-unlearn-classifier"


def _method_lr(text: str) -> tuple[str | None, str, float]:
    """``[KIND:]METHOD=LR`` -> ``(kind or None for every kind, method, lr)``."""
    target, sep, value = text.partition("=")
    kind, _, method = target.rpartition(":")
    try:
        return kind or None, method, float(value) if sep else float("nan")
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected [KIND:]METHOD=LR such as class:munba=0.03, got {text!r}") from None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Unlearn random data or a class from an image classifier "
        "and compare methods with UA/RA/TA/MIA-efficacy/Avg. Gap (SalUn convention).",
    )
    parser.add_argument(
        "--dataset", default="digits", help="'digits' (scikit-learn, offline) or a datasets name/folder, e.g. cifar10"
    )
    parser.add_argument("--model", default="small-resnet", choices=MODELS)
    parser.add_argument("--image-size", type=int, default=None, help="resize images (digits default: 16)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--forget", nargs="+", default=["random:0.1", "class:3"], help="random:FRACTION and/or class:ID"
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS), help=f"any of {', '.join(METHODS)}")
    parser.add_argument("--combiner", default="nash", help=f"combiner for munba: {', '.join(COMBINERS)}")
    parser.add_argument(
        "--epochs", type=int, default=TrainConfig.epochs, help="epochs of the original and Retrain models"
    )
    parser.add_argument(
        "--lr", type=float, default=TrainConfig.lr, help="peak learning rate of the original and Retrain models"
    )
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--unlearn-epochs", type=int, default=5, help="epochs of every unlearning method")
    parser.add_argument(
        "--unlearn-lr",
        type=_method_lr,
        nargs="+",
        default=[],
        metavar="[KIND:]METHOD=LR",
        help="override unlearning learning rates, for one forget kind (random, class) or both; defaults: "
        + ", ".join(f"{k}:{m}={lr:g}" for k, lrs in DEFAULT_UNLEARN_LR.items() for m, lr in lrs.items()),
    )
    parser.add_argument(
        "--lr-grid",
        type=float,
        nargs="+",
        default=None,
        metavar="LR",
        help="instead of the table, sweep every method over these learning rates and write lr_sweep.json/md "
        "(use seeds you will not report)",
    )
    parser.add_argument("--max-grad-norm", type=float, default=None, help="clip each unlearning step's gradient")
    parser.add_argument("--max-train-samples", type=int, default=None)
    parser.add_argument("--max-test-samples", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--overwrite", action="store_true", help="replace results already in --output-dir")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> BenchmarkConfig:
    unlearn_lr = {kind: dict(lrs) for kind, lrs in DEFAULT_UNLEARN_LR.items()}
    for kind, method, lr in args.unlearn_lr:
        if kind not in (None, *unlearn_lr) or method not in METHODS or method == "retrain" or not lr > 0:
            raise ValueError(
                f"--unlearn-lr expects [KIND:]METHOD=LR with KIND in {', '.join(unlearn_lr)}, METHOD in "
                f"ft, ga, rl, munba and LR > 0, got {kind + ':' if kind else ''}{method}={lr}"
            )
        for target in [kind] if kind else unlearn_lr:
            unlearn_lr[target][method] = lr
    return BenchmarkConfig(
        dataset=args.dataset,
        model=args.model,
        image_size=args.image_size,
        seeds=tuple(args.seeds),
        forget=tuple(args.forget),
        methods=tuple(args.methods),
        train=TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size),
        unlearn_epochs=args.unlearn_epochs,
        unlearn_lr=unlearn_lr,
        batch_size=args.batch_size,
        combiner=args.combiner,
        max_grad_norm=args.max_grad_norm,
        device=args.device,
        max_train_samples=args.max_train_samples,
        max_test_samples=args.max_test_samples,
    )


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        config = config_from_args(args)
        config.validate()
        if args.lr_grid is not None:
            if any(not lr > 0 for lr in args.lr_grid):
                raise ValueError(f"--lr-grid values must be positive, got {args.lr_grid}")
            check_output_dir(args.output_dir, args.overwrite, ("lr_sweep.json", "lr_sweep.md"))
            paths = write_sweep(
                sweep_unlearn_lr(config, args.lr_grid, progress=not args.quiet), args.output_dir, args.overwrite
            )
        else:
            check_output_dir(args.output_dir, args.overwrite)
            paths = write_results(run_benchmark(config, progress=not args.quiet), args.output_dir, args.overwrite)
    except (ValueError, FileExistsError, FileNotFoundError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    print("wrote " + ", ".join(map(str, paths)))


if __name__ == "__main__":
    main()
