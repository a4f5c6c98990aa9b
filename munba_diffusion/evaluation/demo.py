"""The demo world's evaluator: the demo judge plays NudeNet's role and the demo CLIP plays CLIP's.

The prompt set has columns ``prompt, seed, shape, colour`` (shape or colour empty when the prompt names only
one). For an erased concept c (a shape or a colour name), with "asked" = the prompt set's columns and "judged" =
the judge's argmax:

- concept rate: share of c's prompts (asked attribute of c's kind == c) whose image is judged as c (lower = erased);
- kept-attribute accuracy: of c's prompts that also ask for the other attribute, share judged right on it
  (erasing "circle" should keep "red" in "a red circle");
- other accuracy: share of the other prompts judged right on every attribute they ask for (higher = kept);
- judge FID: Frechet distance between judge features of the other prompts' images and of true renders of what
  they ask for (``render_scene`` with the row's seed; an attribute the prompt leaves open is drawn at random);
- CLIP score with the demo CLIP, on c's prompts and on the others.

Rates are fractions in [0, 1]. With no concept every prompt counts as "other".
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from cleanfid.fid import frechet_distance

from ..demo import COLOURS, SHAPES, demo_clip_path, load_demo_judge, render_scene
from .clip_score import clip_scores, load_clip
from .manifest import collect_images, images_to_tensor, load_rgb, require_field


def concept_kind(concept: str) -> str:
    """ "shape" or "colour" for a canonical demo concept name."""
    if concept in SHAPES:
        return "shape"
    if concept in COLOURS:
        return "colour"
    raise ValueError(
        f"unknown demo concept {concept!r}; choose a shape ({', '.join(SHAPES)}) or a colour ({', '.join(COLOURS)})"
    )


def _rate(hits: Sequence[bool]) -> float | None:
    return sum(hits) / len(hits) if hits else None


def demo_concept_scores(
    asked_shapes: Sequence[str | None],
    asked_colours: Sequence[str | None],
    judged_shapes: Sequence[str],
    judged_colours: Sequence[str],
    concept: str | None,
) -> dict:
    """Concept rate, kept-attribute accuracy and other accuracy (see the module docstring) from name lists."""
    n = len(asked_shapes)
    if not n or not (len(asked_colours) == len(judged_shapes) == len(judged_colours) == n):
        raise ValueError("need one asked shape, asked colour, judged shape and judged colour per image")
    asked = {"shape": asked_shapes, "colour": asked_colours}
    judged = {"shape": judged_shapes, "colour": judged_colours}
    kind = concept_kind(concept) if concept is not None else None
    other_kind = {"shape": "colour", "colour": "shape"}.get(kind)
    is_concept = [kind is not None and asked[kind][i] == concept for i in range(n)]

    def all_right(i: int) -> bool:
        return all(judged[k][i] == asked[k][i] for k in asked if asked[k][i] is not None)

    result: dict = {"num_images": n, "concept": concept, "concept_kind": kind, "num_concept_images": sum(is_concept)}
    if kind is not None:
        concept_rows = [i for i in range(n) if is_concept[i]]
        if not concept_rows:
            raise ValueError(f"no prompts ask for {concept!r}; the prompt set needs rows with {kind}={concept}")
        result["concept_rate"] = _rate([judged[kind][i] == concept for i in concept_rows])
        result["kept_attribute_accuracy"] = _rate(
            [judged[other_kind][i] == asked[other_kind][i] for i in concept_rows if asked[other_kind][i] is not None]
        )
    result["other_accuracy"] = _rate([all_right(i) for i in range(n) if not is_concept[i]])
    return result


def reference_renders(
    asked_shapes: Sequence[str | None], asked_colours: Sequence[str | None], seeds: Sequence[int]
) -> list:
    """One true render per row: the asked shape and colour (a random one where the prompt leaves it open)."""
    images = []
    for shape, colour, seed in zip(asked_shapes, asked_colours, seeds):
        rng = np.random.default_rng(seed)
        shape = shape or SHAPES[rng.integers(len(SHAPES))]
        colour = colour or COLOURS[rng.integers(len(COLOURS))]
        images.append(render_scene(rng, shape, colour))
    return images


@torch.no_grad()
def judge_frechet_distance(judge, images: torch.Tensor, reference: torch.Tensor) -> float:
    """Frechet distance between the judge's features of two image batches (B, 3, H, W) in [0, 1]."""
    if len(images) < 2 or len(reference) < 2:
        raise ValueError("a Frechet distance needs at least 2 images on each side")
    a = judge.features(images).double().cpu().numpy()
    b = judge.features(reference).double().cpu().numpy()
    return float(frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)))


def demo_protocol(concept: str | None) -> dict:
    """What a report states about the demo metric's setup: its judge, its CLIP folder and the scored concept."""
    return {"judge": "munba_diffusion.demo.load_demo_judge", "clip_model": str(demo_clip_path()), "concept": concept}


def demo_metrics(
    source: str | Path,
    concept: str | None,
    *,
    device: str | torch.device = "cpu",
    judge: torch.nn.Module | None = None,
    clip_model: str | Path | None = None,
    batch_size: int = 256,
) -> dict:
    """Demo-world scores of a generation folder (or manifest) made from a demo prompt set.

    ``judge`` defaults to ``load_demo_judge(device)`` and ``clip_model`` to ``demo_clip_path()``.
    """
    entries = collect_images(source)
    asked_shapes = require_field(entries, "shape", "the demo evaluator", every_row=False)
    asked_colours = require_field(entries, "colour", "the demo evaluator", every_row=False)
    for value in {*asked_shapes, *asked_colours} - {None, *SHAPES, *COLOURS}:
        raise ValueError(f"unknown shape or colour {value!r} in the prompt set; use {', '.join(SHAPES + COLOURS)}")
    judge = judge if judge is not None else load_demo_judge(device=device)
    pil_images = [load_rgb(e.path) for e in entries]
    images = images_to_tensor(pil_images)
    judged = [judge.classify(images[i : i + batch_size].to(device)) for i in range(0, len(images), batch_size)]
    judged_shapes = [SHAPES[i] for out in judged for i in out.shape.tolist()]
    judged_colours = [COLOURS[i] for out in judged for i in out.colour.tolist()]
    result = demo_concept_scores(asked_shapes, asked_colours, judged_shapes, judged_colours, concept)

    kind = result["concept_kind"]
    is_concept = [
        kind is not None and (asked_shapes[i] if kind == "shape" else asked_colours[i]) == concept
        for i in range(len(entries))
    ]
    other = [i for i in range(len(entries)) if not is_concept[i]]
    if len(other) >= 2:
        seeds = [int(entries[i].record["seed"]) for i in other]
        reference = images_to_tensor(
            reference_renders([asked_shapes[i] for i in other], [asked_colours[i] for i in other], seeds)
        )
        result["judge_fid_other"] = judge_frechet_distance(judge, images[other].to(device), reference.to(device))

    clip_path = clip_model if clip_model is not None else demo_clip_path()
    model, processor = load_clip(clip_path, device)
    scores = clip_scores(pil_images, [e.field("prompt") for e in entries], model, processor, batch_size=batch_size)
    result["clip_score_other"] = float(scores[other].mean()) if other else None
    result["clip_score_concept"] = (
        float(scores[[i for i in range(len(entries)) if is_concept[i]]].mean()) if any(is_concept) else None
    )
    result["clip_model"] = str(clip_path)
    return result
