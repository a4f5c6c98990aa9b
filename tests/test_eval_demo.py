"""The demo evaluator: scoring rules on constructed lists, then the bundled judge and CLIP on true renders."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from munba_diffusion.demo import COLOURS, SHAPES, canonical_caption, render_scene
from munba_diffusion.evaluation.demo import demo_concept_scores, demo_metrics
from tests.eval_helpers import write_generation_folder

# asked (shape, colour) -> judged (shape, colour)
ROWS = [
    (("circle", "red"), ("circle", "red")),  # concept still there, colour kept
    (("circle", "blue"), ("square", "blue")),  # erased, colour kept
    (("circle", None), ("triangle", "green")),  # erased, no colour asked
    (("circle", "green"), ("square", "red")),  # erased, colour lost
    (("square", "red"), ("square", "red")),  # other prompt, right
    ((None, "blue"), ("cross", "blue")),  # other prompt naming only a colour, right
    (("triangle", "yellow"), ("triangle", "red")),  # other prompt, wrong colour
]


def scores(concept):
    asked_s, asked_c = [a[0] for a, _ in ROWS], [a[1] for a, _ in ROWS]
    judged_s, judged_c = [j[0] for _, j in ROWS], [j[1] for _, j in ROWS]
    return demo_concept_scores(asked_s, asked_c, judged_s, judged_c, concept)


def test_scores_for_an_erased_shape():
    result = scores("circle")
    assert result["concept_kind"] == "shape" and result["num_concept_images"] == 4
    assert result["concept_rate"] == 1 / 4
    assert result["kept_attribute_accuracy"] == 2 / 3
    assert result["other_accuracy"] == 2 / 3


def test_scores_for_an_erased_colour_and_for_no_concept():
    result = scores("blue")
    assert result["concept_kind"] == "colour" and result["concept_rate"] == 1.0
    assert result["kept_attribute_accuracy"] == 0.0  # the one blue prompt that names a shape got a square, not a circle
    assert result["other_accuracy"] == 2 / 5
    plain = scores(None)
    assert plain["other_accuracy"] == 3 / 7 and "concept_rate" not in plain
    with pytest.raises(ValueError, match="unknown demo concept 'dog'"):
        scores("dog")


def test_unrecognisable_images_are_neither_the_concept_nor_right():
    # A judged name of None = unrecognisable: the first circle row and the first other row lose their verdict.
    rows = [(a, (None, None)) if i in (0, 4) else (a, j) for i, (a, j) in enumerate(ROWS)]
    asked_s, asked_c = [a[0] for a, _ in rows], [a[1] for a, _ in rows]
    judged_s, judged_c = [j[0] for _, j in rows], [j[1] for _, j in rows]
    result = demo_concept_scores(asked_s, asked_c, judged_s, judged_c, "circle")
    assert result["concept_rate"] == 0.0  # was 1/4: the one circle still drawn is now unrecognisable
    assert result["kept_attribute_accuracy"] == 1 / 3 and result["other_accuracy"] == 1 / 3
    assert result["unrecognisable_rate"] == 2 / 7
    assert result["unrecognisable_rate_concept"] == 1 / 4 and result["unrecognisable_rate_other"] == 1 / 3
    assert scores("circle")["unrecognisable_rate"] == 0.0
    # Everything unrecognisable: nothing is the concept, nothing is right, and the report says why.
    none = [None] * len(ROWS)
    collapsed = demo_concept_scores(asked_s, asked_c, none, none, "circle")
    assert collapsed["concept_rate"] == collapsed["other_accuracy"] == collapsed["kept_attribute_accuracy"] == 0.0
    assert collapsed["unrecognisable_rate"] == 1.0


def render_folder(folder, swap_circles: bool = False, noise: bool = False):
    """A generation folder of true renders for every (shape, colour) prompt plus shape-only and colour-only ones.

    With ``swap_circles`` every circle prompt gets a square of the asked colour: a perfect erasure of "circle".
    """
    asks = [(s, c) for s in SHAPES for c in COLOURS] * 2 + [(s, None) for s in SHAPES] + [(None, c) for c in COLOURS]
    images, prompts, extras = [], [], []
    for i, (shape, colour) in enumerate(asks):
        rng = np.random.default_rng(
            1000 + i
        )  # per row, so other rows do not depend on the swap; != the reference's seed
        drawn_shape = "square" if swap_circles and shape == "circle" else shape or SHAPES[rng.integers(4)]
        image = render_scene(rng, drawn_shape, colour or COLOURS[rng.integers(4)])
        images.append(Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) if noise else image)
        prompts.append(canonical_caption(shape, colour))
        extras.append({"shape": shape or "", "colour": colour or ""})
    return write_generation_folder(folder, images, prompts, extras)


def test_bundled_judge_sees_an_erased_circle_and_kept_colours(tmp_path):
    faithful = demo_metrics(render_folder(tmp_path / "faithful", swap_circles=False), "circle")
    erased = demo_metrics(render_folder(tmp_path / "erased", swap_circles=True), "circle")
    assert faithful["num_images"] == erased["num_images"] == 40 and faithful["num_concept_images"] == 9
    assert faithful["concept_rate"] >= 0.85 and erased["concept_rate"] <= 0.15
    assert erased["kept_attribute_accuracy"] >= 0.85 and faithful["kept_attribute_accuracy"] >= 0.85
    assert faithful["other_accuracy"] >= 0.85 and erased["other_accuracy"] == pytest.approx(faithful["other_accuracy"])
    assert faithful["unrecognisable_rate"] == erased["unrecognisable_rate"] == 0.0
    # Same non-circle images in both folders -> same judge KID on them; CLIP likes squares less for "a red circle".
    assert erased["judge_kid_other"] == pytest.approx(faithful["judge_kid_other"])
    assert erased["judge_kid_other_renders"] == pytest.approx(faithful["judge_kid_other_renders"])
    assert erased["clip_score_concept"] < faithful["clip_score_concept"]
    assert erased["clip_score_other"] == pytest.approx(faithful["clip_score_other"], rel=1e-4)


def test_judge_kid_and_unrecognisable_rate_separate_renders_from_noise(tmp_path):
    renders = demo_metrics(render_folder(tmp_path / "renders"), None)
    noise = demo_metrics(render_folder(tmp_path / "noise", noise=True), None)
    assert renders["num_concept_images"] == 0 and renders["other_accuracy"] >= 0.85
    # Noise is unrecognisable, so it is right on nothing (the judge alone would have named a shape and a colour).
    assert renders["unrecognisable_rate"] == 0.0 and noise["unrecognisable_rate"] == 1.0
    assert noise["other_accuracy"] == 0.0
    # True renders score what fresh renders score (the baseline printed beside the KID); noise is far off.
    assert renders["num_reference_renders"] == 40 * 8
    baseline, spread = renders["judge_kid_other_renders"], renders["judge_kid_other_renders_std"]
    assert abs(renders["judge_kid_other"] - baseline) < 0.1 and 0 < spread < 0.1
    assert noise["judge_kid_other"] > baseline + 1.0
    assert renders["clip_score_other"] > noise["clip_score_other"]
