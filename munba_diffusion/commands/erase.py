"""Erase concepts from a Stable Diffusion model with MUNBa (Nash-bargained LoRA fine-tuning).

    accelerate launch train_erase.py --concept nudity --output_dir sd14-no-nudity
    munba-erase --pretrained_model_name_or_path path/to/diffusers-folder --concept circle --output_dir no-circle

Every step bargains between a preservation player and one forgetting player per --concept; the output folder loads
with diffusers (README "Using an erased model"). Every option is declared once, in
munba_diffusion/diffusion/config.py.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from ..config import parse_config
from ..diffusion.config import ErasureTrainingConfig
from ..diffusion.train import train_erasure
from ..evaluation.erasure import evaluate_erasure
from . import error_line

PROG = "train_erase.py"


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_config(ErasureTrainingConfig, argv, description=__doc__, prog=PROG)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        train_erasure(config, evaluate=evaluate_erasure)
    except (ValueError, OSError) as error:  # bad input found after parsing, a full disk: one line that names the fix
        sys.exit(f"{PROG}: error: {error_line(error, str(config.output_dir))}")


if __name__ == "__main__":
    main()
