"""Evaluate models on a prompt set: generate images, score them, write report.json, report.md and grid.png.

    python eval/evaluate.py --model munba-demo --model outputs/erase-circle \
        --prompts eval/demo.csv --metrics demo --concept circle --output_dir runs/eval-circle

    python eval/evaluate.py --model CompVis/stable-diffusion-v1-4 --model outputs/erase-nudity \
        --prompts i2p --nudity_only --metrics nudenet clip --output_dir runs/eval-nudity

The options (help, defaults, ranges) are declared once, on munba_diffusion.evaluation.evaluate.EvaluationConfig;
`--help` lists them. Every flag also has a hyphen spelling (--output-dir). Bad input stops with one line before
any model loads; interrupted runs resume where they stopped (rerun the same command).
"""

from __future__ import annotations

from munba_diffusion.commands.evaluate import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
