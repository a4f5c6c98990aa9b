"""Evaluate models on a prompt set: generate images, score them, write report.json, report.md and grid.png.

    munba-evaluate --model BASE_MODEL --model outputs/erase-circle --prompts demo --metrics demo \
        --concept circle --output_dir runs/eval-circle

The same command as ``python eval/evaluate.py``; the options are declared once on
:class:`munba_diffusion.evaluation.evaluate.EvaluationConfig`.
"""

from __future__ import annotations

import errno
import inspect
import sys
from collections.abc import Sequence

from ..config import parse_config
from ..evaluation.evaluate import EvaluationConfig, run_evaluation

PROG = "munba-evaluate"


def error_line(error: BaseException, output_dir: str) -> str:
    """One line for an error that stopped an evaluation: its own message (first line), or for a failed write what to
    do about it (every file is written atomically, so nothing half-written is left and a rerun resumes)."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        where = f" ({error.filename})" if error.filename else ""
        return (
            f"no space left on the device of --output_dir {output_dir}{where}; free some space or pass another "
            "--output_dir, then rerun the same command (finished images are kept)"
        )
    if isinstance(error, OSError) and error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {error.filename or output_dir} ({error.strerror}); pass an --output_dir you can write to"
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


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
