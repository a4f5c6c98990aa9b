"""Write the demo world's evaluation prompt set, ``prompts/eval/demo.csv`` (the presets' ``eval: demo``).

    python scripts/demo/make_eval_prompts.py --output prompts/eval/demo.csv

One prompt per shape name x colour name: every name of every shape (circle, disc, round shape, ...) with the first
two names of every colour (red, crimson, ...; the colours' third names, e.g. scarlet, are not in the set), 96
prompts. Each prompt is drawn with ``--seeds_per_prompt`` seeds (default 4, 384 rows), so that a rate of a concept
rests on enough images to carry a useful interval (the reports give each rate its 95% Wilson interval).

Rows come in blocks: block b holds the 96 prompts in the same order with seeds ``96 b .. 96 b + 95``, so every seed
is unique, the first block is the one-seed set of earlier versions (its images stay in the image cache), and
"the first N rows of each (shape, colour)" (the benchmarks' ``--max_eval_prompts``) picks whole blocks first.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from munba_diffusion.demo.world import COLOUR_NAMES, COLOURS, SHAPE_NAMES, SHAPES

COLUMNS = ("prompt", "seed", "shape", "colour", "shape_name", "colour_name")
COLOUR_NAMES_USED = 2  # the first two names of each colour
DEFAULT_SEEDS_PER_PROMPT = 4


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def demo_prompts() -> list[dict]:
    """The 96 prompts (one row each, without a seed), shape-major."""
    return [
        {
            "prompt": f"{_article(colour_name)} {colour_name} {shape_name}",
            "shape": shape,
            "colour": colour,
            "shape_name": shape_name,
            "colour_name": colour_name,
        }
        for shape in SHAPES
        for shape_name in SHAPE_NAMES[shape]
        for colour in COLOURS
        for colour_name in COLOUR_NAMES[colour][:COLOUR_NAMES_USED]
    ]


def demo_rows(seeds_per_prompt: int = DEFAULT_SEEDS_PER_PROMPT) -> list[dict]:
    """The prompt set's rows: ``seeds_per_prompt`` blocks of :func:`demo_prompts`, seeds numbered through."""
    if seeds_per_prompt < 1:
        raise ValueError(f"seeds_per_prompt must be at least 1, got {seeds_per_prompt}")
    prompts = demo_prompts()
    return [
        {**row, "seed": block * len(prompts) + i} for block in range(seeds_per_prompt) for i, row in enumerate(prompts)
    ]


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path("prompts/eval/demo.csv"), help="CSV to write")
    parser.add_argument(
        "--seeds_per_prompt", type=int, default=DEFAULT_SEEDS_PER_PROMPT, help="seeds (rows) per prompt"
    )
    args = parser.parse_args(argv)
    rows = demo_rows(args.seeds_per_prompt)
    write_csv(args.output, rows)
    print(f"wrote {len(rows)} rows to {args.output}")


if __name__ == "__main__":
    main()
