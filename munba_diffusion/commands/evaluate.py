"""Evaluate models on a prompt set: generate images, score them, write report.json, report.md and grid.png.

    munba-evaluate --model BASE_MODEL --model outputs/erase-circle --prompts demo --metrics demo \
        --concept circle --output_dir runs/eval-circle

The same command as ``python eval/evaluate.py``; the options are declared once on
:class:`munba_diffusion.evaluation.evaluate.EvaluationConfig`.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Sequence

from ..config import parse_config
from ..evaluation.evaluate import EvaluationConfig, run_evaluation
from . import error_line

PROG = "munba-evaluate"


def main(argv: Sequence[str] | None = None) -> None:
    """``munba-evaluate`` / ``eval/evaluate.py``: parse and check every option (one line and exit 2 on a bad one), then
    evaluate (one line and exit 1 on a file it cannot read or write)."""
    config = parse_config(EvaluationConfig, argv, description=inspect.cleandoc(EvaluationConfig.__doc__), prog=PROG)
    try:
        table = run_evaluation(config)
    except (ValueError, OSError) as error:  # OSError: missing, unreadable or unwritable files, a full disk, offline
        sys.exit(f"error: {error_line(error, config.output_dir)}")
    if table:
        print(table)
