"""Attack an erased model: white-box adversarial prefixes (UnlearnDiffAtk-style) or replayed adversarial prompts.

    munba-attack --model outputs/demo-no-red --original BASE_MODEL --concept red \
        --prompts eval/demo.csv --output_dir runs/attack-red

The same command as ``python eval/attack.py``; the options are declared once on
:class:`munba_diffusion.evaluation.attack.AttackConfig`.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Sequence

from ..config import parse_config
from ..evaluation.attack import AttackConfig, run_attack
from . import error_line

PROG = "munba-attack"


def main(argv: Sequence[str] | None = None) -> None:
    """``munba-attack`` / ``eval/attack.py``: parse and check every option (one line and exit 2 on a bad one), then
    attack (one line and exit 1 on a file it cannot read or write)."""
    config = parse_config(AttackConfig, argv, description=inspect.cleandoc(AttackConfig.__doc__), prog=PROG)
    try:
        table = run_attack(config)
    except (ValueError, OSError) as error:
        sys.exit(f"error: {error_line(error, config.output_dir)}")
    if table:
        print(table)
