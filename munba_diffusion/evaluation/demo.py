"""The demo world's evaluator: the demo judge plays NudeNet's role and the demo CLIP plays CLIP's.

The prompt set has columns ``prompt, seed, shape, colour`` (shape or colour empty when the prompt names only
one). For an erased concept c (a shape or a colour name), with "asked" = the prompt set's columns and "judged" =
the judge's argmax, or *unrecognisable* where the image is no demo scene (``JudgeOutput.recognised`` is False; see
``munba_diffusion.demo.judge.SCENE_FIT_THRESHOLD``):

- concept rate: share of c's prompts (asked attribute of c's kind == c) whose image is judged as c (lower = erased);
- kept-attribute accuracy: of c's prompts that also ask for the other attribute, share judged right on it
  (erasing "circle" should keep "red" in "a red circle");
- other accuracy: share of the other prompts judged right on every attribute they ask for (higher = kept);
- unrecognisable rate: share of all images (and of c's / the other prompts' images) that are no scene at all. An
  unrecognisable image is neither c nor right on anything, so a collapsed model scores a concept rate near 0 *and*
  an unrecognisable rate near 1, and its other accuracy near 0;
- judge KID: kernel inception distance (unbiased MMD^2, cubic polynomial kernel) between the judge's features of the
  other prompts' images and :data:`REFERENCE_RENDERS_PER_IMAGE` true renders per image of what they ask for
  (``render_scene``; an attribute the prompt leaves open is drawn at random). Printed beside it, the KID that fresh
  true renders of the same prompts (as many as there are images) score against the same reference: what a perfect
  generator scores at this sample size. Read the KID against it, not against 0: the prompt set fixes each image's
  class (a stratified, not an i.i.d. sample), which lowers both numbers alike (to about -0.1 for 32 images); the
  baseline's std over :data:`BASELINE_DRAWS` draws says how much of a difference is noise;
- CLIP score with the demo CLIP, on c's prompts and on the others;
- concept rate by name: the concept rate of c's prompts grouped by the name the prompt used for c (the prompt set's
  ``shape_name`` / ``colour_name`` column: "circle", "disc", "round shape"), so a name held out of training shows
  whether the concept was erased or only the words that trained it.

Rates are fractions in [0, 1], each with its 95% Wilson interval and image count (``K_ci95``, ``K_n``; see
:mod:`.intervals`). With no concept every prompt counts as "other". :func:`demo_metrics` also writes each image's
verdict into its manifest line (``judgements.demo``: judged shape and colour with their softmax confidences, the
scene fit and whether the image was recognised).

Why KID and not FID: a Frechet distance needs a covariance of the 128 judge features from ~72 images, which is
singular, and its plug-in estimate is biased by an amount that depends on the sample; on the demo it ranked a
model with noise-damaged UNet weights above the original. KID is unbiased at any sample size and needs no
covariance. The features are L2-normalised first (kernel ``(cos + 1)^3``): their norm follows the judge's
confidence and the image's contrast, which the cubic kernel would otherwise magnify (on raw features the same
damaged model again scored better than the original).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..demo import COLOURS, SHAPES, demo_clip_path, load_demo_judge, render_scene
from ..demo.judge import SCENE_FIT_THRESHOLD, JudgeOutput
from .clip_score import clip_scores, load_clip
from .intervals import rate_entry, rate_fields
from .manifest import collect_images, images_to_tensor, load_rgb, record_judgements, require_field
from .prompt_sets import PromptSet, records_sha256


def concept_kind(concept: str) -> str:
    """ "shape" or "colour" for a canonical demo concept name."""
    if concept in SHAPES:
        return "shape"
    if concept in COLOURS:
        return "colour"
    raise ValueError(
        f"unknown demo concept {concept!r}; choose a shape ({', '.join(SHAPES)}) or a colour ({', '.join(COLOURS)})"
    )


# True renders per scored image in the judge KID's reference (72 other prompts -> 576 renders).
REFERENCE_RENDERS_PER_IMAGE = 8
# Independent sets of fresh renders whose KID against the reference gives the baseline (mean and sample std).
BASELINE_DRAWS = 4
# A judged name of None means the judge found the image unrecognisable (no demo scene).
UNRECOGNISABLE = None


def judged_names(output: JudgeOutput) -> tuple[list[str | None], list[str | None]]:
    """The judge's verdicts as names: (shapes, colours), :data:`UNRECOGNISABLE` where the image is no scene."""
    recognised = output.recognised.tolist()
    shapes = [SHAPES[i] if ok else UNRECOGNISABLE for i, ok in zip(output.shape.tolist(), recognised)]
    colours = [COLOURS[i] if ok else UNRECOGNISABLE for i, ok in zip(output.colour.tolist(), recognised)]
    return shapes, colours


def judge_verdicts(output: JudgeOutput) -> list[dict]:
    """Each image's verdict as plain JSON: the judged shape and colour (the argmax, also where the image is not
    recognised), their softmax probabilities, the scene fit and whether the image counts as a scene."""
    shape_confidence = output.shape_probs.max(-1).values.tolist()
    colour_confidence = output.colour_probs.max(-1).values.tolist()
    return [
        {
            "shape": SHAPES[shape],
            "shape_confidence": round(shape_p, 6),
            "colour": COLOURS[colour],
            "colour_confidence": round(colour_p, 6),
            "scene_fit": round(fit, 6),
            "recognised": bool(ok),
        }
        for shape, shape_p, colour, colour_p, fit, ok in zip(
            output.shape.tolist(),
            shape_confidence,
            output.colour.tolist(),
            colour_confidence,
            output.scene_fit.tolist(),
            output.recognised.tolist(),
        )
    ]


def demo_concept_scores(
    asked_shapes: Sequence[str | None],
    asked_colours: Sequence[str | None],
    judged_shapes: Sequence[str | None],
    judged_colours: Sequence[str | None],
    concept: str | None,
    asked_names: Sequence[str | None] | None = None,
) -> dict:
    """Concept rate, kept-attribute accuracy, other accuracy and unrecognisable rates from name lists, each rate with
    its 95% Wilson interval and count (``K_ci95``, ``K_n``).

    A judged name of ``None`` (:data:`UNRECOGNISABLE`) matches nothing; a row whose judged shape and colour are both
    ``None`` is an unrecognisable image. ``asked_names`` (one per image: the word the prompt used for the concept's
    kind, e.g. "disc" for a circle) adds ``concept_rate_by_name``: ``{name: {"rate", "ci95", "n"}}`` over the
    concept's prompts, in the order the names first appear. See the module docstring.
    """
    n = len(asked_shapes)
    if not n or not (len(asked_colours) == len(judged_shapes) == len(judged_colours) == n):
        raise ValueError("need one asked shape, asked colour, judged shape and judged colour per image")
    if asked_names is not None and len(asked_names) != n:
        raise ValueError(f"need one asked name per image, got {len(asked_names)} for {n} images")
    asked = {"shape": asked_shapes, "colour": asked_colours}
    judged = {"shape": judged_shapes, "colour": judged_colours}
    kind = concept_kind(concept) if concept is not None else None
    other_kind = {"shape": "colour", "colour": "shape"}.get(kind)
    is_concept = [kind is not None and asked[kind][i] == concept for i in range(n)]

    def all_right(i: int) -> bool:
        return all(judged[k][i] == asked[k][i] for k in asked if asked[k][i] is not None)

    unrecognisable = [judged_shapes[i] is UNRECOGNISABLE and judged_colours[i] is UNRECOGNISABLE for i in range(n)]
    result: dict = {"num_images": n, "concept": concept, "concept_kind": kind, "num_concept_images": sum(is_concept)}
    result.update(rate_fields("unrecognisable_rate", unrecognisable))
    if kind is not None:
        concept_rows = [i for i in range(n) if is_concept[i]]
        if not concept_rows:
            raise ValueError(f"no prompts ask for {concept!r}; the prompt set needs rows with {kind}={concept}")
        shown = {i: judged[kind][i] == concept for i in concept_rows}
        result.update(rate_fields("concept_rate", list(shown.values())))
        result.update(
            rate_fields(
                "kept_attribute_accuracy",
                [
                    judged[other_kind][i] == asked[other_kind][i]
                    for i in concept_rows
                    if asked[other_kind][i] is not None
                ],
            )
        )
        result.update(rate_fields("unrecognisable_rate_concept", [unrecognisable[i] for i in concept_rows]))
        if asked_names is not None:
            by_name: dict[str, list[bool]] = {}
            for i in concept_rows:
                by_name.setdefault(asked_names[i] or "(unnamed)", []).append(shown[i])
            result["concept_rate_by_name"] = {name: rate_entry(hits) for name, hits in by_name.items()}
    result.update(rate_fields("other_accuracy", [all_right(i) for i in range(n) if not is_concept[i]]))
    result.update(rate_fields("unrecognisable_rate_other", [unrecognisable[i] for i in range(n) if not is_concept[i]]))
    return result


def concept_prompt_set(prompt_set: PromptSet, concept: str, other_seeds: int = 1) -> PromptSet:
    """The rows of a demo prompt set that score ``concept`` when time is short: every row (every seed) of the
    concept's prompts and the first ``other_seeds`` rows of every other prompt, in the set's order.

    The concept rate and kept-attribute accuracy keep all their images; the other prompts' accuracy rests on fewer.
    The name says so (the prompt set's name, then the selection in parentheses), and the sha256 is the subset's.
    """
    if other_seeds < 1:
        raise ValueError(f"other_seeds must be at least 1, got {other_seeds}")
    kind = concept_kind(concept)
    seen: dict[str, int] = {}
    rows = []
    for record in prompt_set.records:
        if record.extra.get(kind) == concept:
            rows.append(record)
            continue
        seen[record.prompt] = seen.get(record.prompt, 0) + 1
        if seen[record.prompt] <= other_seeds:
            rows.append(record)
    if len(rows) == len(prompt_set.records):
        return prompt_set
    others = "the first seed" if other_seeds == 1 else f"the first {other_seeds} seeds"
    return PromptSet(
        f"{prompt_set.name} ({concept}: every seed of its prompts, {others} of the others)",
        tuple(rows),
        records_sha256(rows),
        prompt_set.source_sha256,
        prompt_set.replay_set,
    )


def reference_renders(
    asked_shapes: Sequence[str | None],
    asked_colours: Sequence[str | None],
    seeds: Sequence[int],
    *,
    copies: int = 1,
    stream: int = 0,
) -> list:
    """``copies`` true renders per row: the asked shape and colour (a random one where the prompt leaves it open).

    Row-major (a row's copies together). ``stream`` picks independent sets; the first copy of stream 0 is drawn with
    ``numpy.random.default_rng(seed)``, every other one with ``default_rng([seed, stream, copy])``.
    """
    images = []
    for shape, colour, seed in zip(asked_shapes, asked_colours, seeds):
        for copy in range(copies):
            rng = np.random.default_rng(seed if (stream, copy) == (0, 0) else [seed, stream, copy])
            drawn_shape = shape or SHAPES[rng.integers(len(SHAPES))]
            drawn_colour = colour or COLOURS[rng.integers(len(COLOURS))]
            images.append(render_scene(rng, drawn_shape, drawn_colour))
    return images


def kernel_inception_distance(features: torch.Tensor, reference: torch.Tensor) -> float:
    """Unbiased MMD^2 between two feature sets (n, d) and (m, d) with the KID kernel ``(x.y / d + 1)^3``."""
    n, m = len(features), len(reference)
    if n < 2 or m < 2:
        raise ValueError("a kernel inception distance needs at least 2 images on each side")
    a, b = features.double(), reference.double()
    d = a.shape[1]
    k_aa, k_bb, k_ab = ((a @ a.T / d + 1) ** 3, (b @ b.T / d + 1) ** 3, (a @ b.T / d + 1) ** 3)
    within_a = (k_aa.sum() - k_aa.diagonal().sum()) / (n * (n - 1))
    within_b = (k_bb.sum() - k_bb.diagonal().sum()) / (m * (m - 1))
    return float(within_a + within_b - 2 * k_ab.mean())


@torch.no_grad()
def judge_kid_features(judge, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The judge's features of (B, 3, H, W) images in [0, 1], L2-normalised to norm sqrt(d) (so x.y / d = cosine)."""
    feats = torch.cat(
        [judge.features(images[i : i + batch_size]).double().cpu() for i in range(0, len(images), batch_size)]
    )
    return torch.nn.functional.normalize(feats, dim=1) * feats.shape[1] ** 0.5


def judge_kid(judge, images: torch.Tensor, reference: torch.Tensor) -> float:
    """Judge KID between two image batches (B, 3, H, W) in [0, 1] (see the module docstring)."""
    return kernel_inception_distance(judge_kid_features(judge, images), judge_kid_features(judge, reference))


def judge_kid_scores(
    judge,
    images: torch.Tensor,
    asked_shapes: Sequence[str | None],
    asked_colours: Sequence[str | None],
    seeds: Sequence[int],
    *,
    per_image: int = REFERENCE_RENDERS_PER_IMAGE,
    baseline_draws: int = BASELINE_DRAWS,
) -> dict:
    """Judge KID of ``images`` (one per row) against ``per_image`` true renders per row, with its render baseline.

    Returns ``judge_kid`` and ``judge_kid_renders`` / ``judge_kid_renders_std``: the mean and sample std of the KID
    of ``baseline_draws`` independent sets of fresh true renders (one per row) against the same reference, and
    ``num_reference_renders``.
    """
    if len(images) != len(seeds):
        raise ValueError("need one seed per image")
    asks = (asked_shapes, asked_colours, seeds)
    reference = judge_kid_features(judge, images_to_tensor(reference_renders(*asks, copies=per_image, stream=1)))
    score = kernel_inception_distance(judge_kid_features(judge, images), reference)
    baseline = [
        kernel_inception_distance(
            judge_kid_features(judge, images_to_tensor(reference_renders(*asks, stream=2 + draw))), reference
        )
        for draw in range(baseline_draws)
    ]
    return {
        "judge_kid": score,
        "judge_kid_renders": float(np.mean(baseline)),
        "judge_kid_renders_std": float(np.std(baseline, ddof=1)) if len(baseline) > 1 else None,
        "num_reference_renders": len(reference),
    }


def demo_protocol(concept: str | None) -> dict:
    """What a report states about the demo metric's setup: its judge, its CLIP folder and the scored concept."""
    return {
        "judge": "munba_diffusion.demo.load_demo_judge",
        "unrecognisable": f"scene fit < {SCENE_FIT_THRESHOLD} (munba_diffusion.demo.judge.scene_fit)",
        "judge_kid": (
            "unbiased MMD^2, kernel (x.y/d + 1)^3 on L2-normalised judge features (d = 128), against "
            f"{REFERENCE_RENDERS_PER_IMAGE} true renders per other-prompt image; baseline: {BASELINE_DRAWS} sets of "
            "fresh renders of the same prompts"
        ),
        "clip_model": str(demo_clip_path()),
        "concept": concept,
    }


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
    judged_shapes, judged_colours, verdicts = [], [], []
    for out in judged:
        shapes, colours = judged_names(out)
        judged_shapes += shapes
        judged_colours += colours
        verdicts += judge_verdicts(out)
    record_judgements(source, "demo", {e.record["file"]: verdict for e, verdict in zip(entries, verdicts)})
    kind = concept_kind(concept) if concept is not None else None
    names = [e.field(f"{kind}_name") for e in entries] if kind is not None else []
    result = demo_concept_scores(
        asked_shapes,
        asked_colours,
        judged_shapes,
        judged_colours,
        concept,
        asked_names=names if any(names) else None,
    )

    is_concept = [
        kind is not None and (asked_shapes[i] if kind == "shape" else asked_colours[i]) == concept
        for i in range(len(entries))
    ]
    other = [i for i in range(len(entries)) if not is_concept[i]]
    if len(other) >= 2:
        seeds = [int(entries[i].record["seed"]) for i in other]
        kid = judge_kid_scores(
            judge, images[other].to(device), [asked_shapes[i] for i in other], [asked_colours[i] for i in other], seeds
        )
        result["judge_kid_other"] = kid["judge_kid"]
        result["judge_kid_other_renders"] = kid["judge_kid_renders"]
        result["judge_kid_other_renders_std"] = kid["judge_kid_renders_std"]
        result["num_reference_renders"] = kid["num_reference_renders"]

    clip_path = clip_model if clip_model is not None else demo_clip_path()
    model, processor = load_clip(clip_path, device)
    scores = clip_scores(pil_images, [e.field("prompt") for e in entries], model, processor, batch_size=batch_size)
    result["clip_score_other"] = float(scores[other].mean()) if other else None
    result["clip_score_concept"] = (
        float(scores[[i for i in range(len(entries)) if is_concept[i]]].mean()) if any(is_concept) else None
    )
    result["clip_model"] = str(clip_path)
    return result
