"""Attack an erased model: white-box adversarial prefixes or replayed adversarial prompts.

    python eval/attack.py --model outputs/demo-no-red --original munba-demo --concept red \
        --prompts eval/demo.csv --output_dir runs/attack-red

The options (help, defaults, ranges) are declared once, on munba_diffusion.evaluation.attack.AttackConfig;
`--help` lists them. Bad input stops with one line before any model loads; an interrupted attack resumes where it
stopped (rerun the same command).
"""

from __future__ import annotations

from munba_diffusion.commands.attack import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
