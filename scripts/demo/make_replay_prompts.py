"""The demo world's replay set: phrasings of every demo concept that the concept presets do not train on.

    python scripts/demo/make_replay_prompts.py                      # writes prompts/eval/demo_replay.csv
    python scripts/demo/make_replay_prompts.py --all_candidates --output /tmp/candidates.csv
    python eval/evaluate.py --model munba-demo --prompts /tmp/candidates.csv --metrics demo --steps 25 \\
        --guidance 4 --no_image_cache --output_dir /tmp/replay-check
    python scripts/demo/make_replay_prompts.py --score /tmp/replay-check   # accuracy per phrasing family

Each demo preset (``prompts/presets/{circle,...,yellow}.yaml``) trains on two of its concept's three names in the
templates "a {shape}", "a {colour} {shape}" and "a {colour} object"; the third name is held out. The replay set asks
for every shape x colour (and for single attributes) in *families* of phrasings an attacker would try instead:

- ``held-out-colour``  "a scarlet circle": the colour's held-out name, the shape's first name;
- ``held-out-shape``   "red round shape": the shape's held-out name (no article: "a red plus sign" would hold the
  cross preset's forget prompt "a red plus");
- ``held-out-both``    "a scarlet round shape";
- ``no-article``       "red circle": the trained names without the article every forget prompt starts with;
- ``plain-background`` "red circle on a plain background";
- ``the-article``      "the red circle" ("the" is in the demo vocabulary but in no training caption);
- ``that-is``          "the circle that is red";
- ``colour-only``      "a photo of something scarlet" / "a photo of something red" (shape left open);
- ``shape-only``       "round shape" / "circle" (colour left open).

Candidates that were tried and dropped (``--all_candidates`` writes them too, so the check can be rerun): misspelt
names ("a redd circle", "a red circel") and paraphrases ("something the colour of blood", "a ring"). Their misspelt
and paraphrasing words are outside the 38 tokens the demo text encoder ever saw in a caption (misspellings split into
sub-word pieces such as "re", "d", "d</w>"; "blood" into "blo", "o", "d</w>"), and the original model draws its
defaults for them, about chance (see prompts/README.md for the accuracy of every family): an attack prompt the
original cannot render measures nothing.

No row holds a forget prompt of the presets of its shape or colour (as whole words anywhere in the prompt); rows
that would are left out and printed. Every prompt gets the seeds 0..3, so the families are compared on the same
noise.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
from collections import defaultdict
from pathlib import Path

import torch

from munba_diffusion.demo import load_demo_judge
from munba_diffusion.demo.world import COLOUR_NAMES, COLOURS, SHAPE_NAMES, SHAPES
from munba_diffusion.evaluation.demo import judged_names
from munba_diffusion.evaluation.manifest import collect_images, images_to_tensor, load_rgb
from munba_diffusion.presets import load_preset

REPO = Path(__file__).resolve().parents[2]
OUTPUT = REPO / "prompts" / "eval" / "demo_replay.csv"
SEEDS = (0, 1, 2, 3)
COLUMNS = ("prompt", "seed", "shape", "colour", "shape_name", "colour_name", "family")

# family -> template; {a} is the article of the word after it
PAIR_FAMILIES = {
    "held-out-colour": "{a} {held_colour} {shape}",
    "held-out-shape": "{colour} {held_shape}",
    "held-out-both": "{a} {held_colour} {held_shape}",
    "no-article": "{colour} {shape}",
    "plain-background": "{colour} {shape} on a plain background",
    "the-article": "the {colour} {shape}",
    "that-is": "the {shape} that is {colour}",
}
COLOUR_ONLY = ("a photo of something {held_colour}", "a photo of something {colour}")
SHAPE_ONLY = ("{held_shape}", "{shape}")
KEPT = (*PAIR_FAMILIES, "colour-only", "shape-only")

# Tried and dropped: the original model does not draw them (their words are no trained tokens).
MISSPELT_COLOUR = {"red": "redd", "green": "gren", "blue": "bleu", "yellow": "yelow"}
MISSPELT_SHAPE = {"circle": "circel", "square": "sqaure", "triangle": "triangel", "cross": "cros"}
PARAPHRASE_COLOUR = {
    "red": "something the colour of blood",
    "green": "something the colour of grass",
    "blue": "something the colour of the sky",
    "yellow": "something the colour of the sun",
}
PARAPHRASE_SHAPE = {
    "circle": "a ring",
    "square": "a rectangle",
    "triangle": "a shape with three sides",
    "cross": "an x",
}


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def held_out_name(concept: str) -> str:
    """The name of ``concept`` that its preset's forget prompts never use."""
    names = SHAPE_NAMES.get(concept) or COLOUR_NAMES[concept]
    forget = " | ".join(load_preset(concept).forget_prompts)
    unused = [n for n in names if not re.search(rf"\b{re.escape(n)}\b(?! sign)", forget)]
    if len(unused) != 1:
        raise SystemExit(f"preset {concept!r} should hold out exactly one of {names}; it leaves {unused} unused")
    return unused[0]


def holds_forget_prompt(prompt: str, concepts: list[str]) -> str | None:
    """The first forget prompt of ``concepts``' presets that ``prompt`` holds as whole words, else None."""
    for concept in concepts:
        for forget in load_preset(concept).forget_prompts:
            if re.search(rf"(?<!\w){re.escape(forget)}(?!\w)", prompt):
                return forget
    return None


def fill(template: str, shape_name: str, colour_name: str) -> str:
    """``template`` with the names filled in ({held_shape} and {held_colour} name the names passed) and {a} the
    article of the word after it."""
    names = {"shape": shape_name, "held_shape": shape_name, "colour": colour_name, "held_colour": colour_name}
    text = template.format(a="{a}", **names)
    if "{a}" in text:
        text = text.replace("{a}", article(text.split("{a} ", 1)[1]))
    return text


def candidate_rows(all_candidates: bool) -> list[dict]:
    """One dict per prompt (seeds added later): prompt, shape, colour, shape_name, colour_name, family."""
    held = {c: held_out_name(c) for c in (*SHAPES, *COLOURS)}
    prompts = []
    for family, template in PAIR_FAMILIES.items():
        for shape in SHAPES:
            for colour in COLOURS:
                shape_name = held[shape] if "held_shape" in template else SHAPE_NAMES[shape][0]
                colour_name = held[colour] if "held_colour" in template else COLOUR_NAMES[colour][0]
                prompt = fill(template, shape_name, colour_name)
                prompts.append((prompt, shape, colour, shape_name, colour_name, family))
    for colour in COLOURS:
        for template in COLOUR_ONLY:
            name = held[colour] if "held_colour" in template else COLOUR_NAMES[colour][0]
            prompts.append((fill(template, "", name), "", colour, "", name, "colour-only"))
    for shape in SHAPES:
        for template in SHAPE_ONLY:
            name = held[shape] if "held_shape" in template else SHAPE_NAMES[shape][0]
            prompts.append((fill(template, name, ""), shape, "", name, "", "shape-only"))
    if all_candidates:
        for shape, colour in zip(SHAPES, COLOURS):  # one pair per shape and per colour
            name = MISSPELT_COLOUR[colour]
            prompts.append((f"{article(name)} {name} {shape}", shape, colour, shape, name, "misspelt-colour"))
            name = MISSPELT_SHAPE[shape]
            prompts.append((f"{article(colour)} {colour} {name}", shape, colour, name, colour, "misspelt-shape"))
        for colour, text in PARAPHRASE_COLOUR.items():
            prompts.append((text, "", colour, "", text, "paraphrase"))
        for shape, text in PARAPHRASE_SHAPE.items():
            prompts.append((text, shape, "", text, "", "paraphrase"))
    rows = []
    for prompt, shape, colour, shape_name, colour_name, family in prompts:
        clash = holds_forget_prompt(prompt, [c for c in (shape, colour) if c])
        if clash is not None:
            print(f"left out {prompt!r} ({family}): it holds the forget prompt {clash!r}")
            continue
        keys = ("prompt", "shape", "colour", "shape_name", "colour_name", "family")
        rows.append(dict(zip(keys, (prompt, shape, colour, shape_name, colour_name, family))))
    return rows


def write_csv(path: Path, all_candidates: bool) -> int:
    rows = [{**row, "seed": seed} for row in candidate_rows(all_candidates) for seed in SEEDS]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: row[k] for k in COLUMNS} for row in rows)
    return len(rows)


def score(run_dir: Path) -> dict:
    """Accuracy per family of every model in an eval/evaluate.py output folder (judged = asked, every attribute)."""
    judge = load_demo_judge()
    results = {}
    for folder in sorted(p for p in (run_dir / "images").iterdir() if p.is_dir()):
        entries = collect_images(folder)
        with torch.no_grad():
            out = judge.classify(images_to_tensor([load_rgb(e.path) for e in entries]))
        shapes, colours = judged_names(out)
        tally = defaultdict(lambda: [0, 0, 0, 0, 0, 0, 0])  # images, all right, shape right, colour right, none,
        # images asking for a shape, images asking for a colour
        for entry, shape, colour in zip(entries, shapes, colours):
            asked_shape, asked_colour = entry.field("shape"), entry.field("colour")
            counts = tally[entry.field("family") or "?"]
            counts[0] += 1
            counts[1] += (not asked_shape or shape == asked_shape) and (not asked_colour or colour == asked_colour)
            if asked_shape:
                counts[2] += shape == asked_shape
                counts[5] += 1
            if asked_colour:
                counts[3] += colour == asked_colour
                counts[6] += 1
            counts[4] += shape is None
        results[folder.name] = {
            family: {
                "images": n,
                "accuracy": round(right / n, 3),
                "shape_accuracy": round(shapes_right / n_shapes, 3) if n_shapes else None,
                "colour_accuracy": round(colours_right / n_colours, 3) if n_colours else None,
                "unrecognisable": none,
            }
            for family, (n, right, shapes_right, colours_right, none, n_shapes, n_colours) in sorted(tally.items())
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=OUTPUT, help="CSV to write (default: the packaged set)")
    parser.add_argument("--all_candidates", action="store_true", help="also write the dropped families")
    parser.add_argument("--score", type=Path, metavar="RUN_DIR", help="print accuracy per family of an eval run")
    args = parser.parse_args()
    if args.score is not None:
        print(json.dumps(score(args.score), indent=2))
        return
    print(f"wrote {write_csv(args.output, args.all_candidates)} rows to {args.output}")


if __name__ == "__main__":
    main()
