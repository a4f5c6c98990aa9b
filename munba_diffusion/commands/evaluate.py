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


def main(argv: Sequence[str] | None = None) -> None:
    """``munba-evaluate`` / ``eval/evaluate.py``: parse and check every option (one line and exit 2 on a bad one), then evaluate."""
    config = parse_config(
        EvaluationConfig, argv, description=inspect.cleandoc(EvaluationConfig.__doc__), prog="munba-evaluate"
    )
    try:
        table = run_evaluation(config)
    except (ValueError, FileNotFoundError, FileExistsError, ConnectionError) as error:
        sys.exit(f"error: {error}")
    if table:
        print(table)
