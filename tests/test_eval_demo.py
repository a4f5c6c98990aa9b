"""The demo evaluator: scoring rules on constructed lists, then the bundled judge and CLIP on true renders."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from munba_diffusion.demo import COLOURS, SHAPES, canonical_caption, load_demo_judge, render_scene
from munba_diffusion.evaluation.demo import concept_prompt_set, demo_concept_scores, demo_metrics
from munba_diffusion.evaluation.intervals import wilson_bounds
from munba_diffusion.evaluation.manifest import read_manifest
from munba_diffusion.evaluation.prompt_sets import load_prompt_set
from tests.eval_helpers import write_generation_folder

REPO = Path(__file__).resolve().parents[1]

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


def test_every_rate_carries_its_wilson_interval_and_count():
    result = scores("circle")
    expected = {  # rate key -> (images counted in it, images in it)
        "concept_rate": (1, 4),
        "kept_attribute_accuracy": (2, 3),
        "other_accuracy": (2, 3),
        "unrecognisable_rate": (0, 7),
        "unrecognisable_rate_concept": (0, 4),
        "unrecognisable_rate_other": (0, 3),
    }
    for key, (hits, n) in expected.items():
        assert result[key] == hits / n and result[f"{key}_n"] == n, key
        assert result[f"{key}_ci95"] == pytest.approx(list(wilson_bounds(hits, n))), key
    # An empty group has no rate and no interval: no circle prompt here asks for a colour.
    no_colour = demo_concept_scores(["circle", "square"], [None, "red"], ["circle", "square"], [None, "red"], "circle")
    assert no_colour["kept_attribute_accuracy"] is None and no_colour["kept_attribute_accuracy_ci95"] is None
    assert no_colour["kept_attribute_accuracy_n"] == 0


def test_concept_rate_is_broken_down_by_the_name_in_the_prompt():
    # Erasing red: the trained names lost it, the held-out "scarlet" kept it (a word erased, not the concept).
    rows = [
        ("red", "square"),
        ("red", "square"),
        ("crimson", "circle"),
        ("crimson", "circle"),
        ("crimson", "circle"),
        ("scarlet", "red"),
        ("scarlet", "red"),
        ("scarlet", None),  # no colour judged: not red
        ("blue", "blue"),  # another colour: not in the breakdown
    ]
    names = [name for name, _ in rows]
    asked = ["red"] * 8 + ["blue"]
    judged = [colour for _, colour in rows]
    judged = [{"square": "blue", "circle": "green"}.get(j, j) for j in judged]
    shapes = ["circle"] * len(rows)
    result = demo_concept_scores(shapes, asked, shapes, judged, "red", asked_names=names)
    by_name = result["concept_rate_by_name"]
    assert list(by_name) == ["red", "crimson", "scarlet"]  # in the order they first appear; "blue" is no red prompt
    assert by_name["red"] == {"rate": 0.0, "ci95": pytest.approx(list(wilson_bounds(0, 2))), "n": 2}
    assert by_name["crimson"]["rate"] == 0.0 and by_name["crimson"]["n"] == 3
    assert by_name["scarlet"]["rate"] == 2 / 3 and by_name["scarlet"]["ci95"] == pytest.approx(
        list(wilson_bounds(2, 3))
    )
    assert result["concept_rate"] == 2 / 8 and sum(e["n"] for e in by_name.values()) == result["concept_rate_n"]
    assert "concept_rate_by_name" not in demo_concept_scores(shapes, asked, shapes, judged, "red")
    with pytest.raises(ValueError, match="one asked name per image"):
        demo_concept_scores(shapes, asked, shapes, judged, "red", asked_names=names[:-1])


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


def test_demo_metrics_keep_each_verdict_in_the_manifest_and_break_down_by_name(tmp_path):
    # Circle prompts under two names: "disc" prompts get squares (erased), "circle" prompts get circles.
    rng = np.random.default_rng(5)
    asks = [("circle", "circle", "red"), ("disc", "circle", "blue"), ("disc", "circle", "green")] * 2
    asks += [("box", "square", "yellow"), ("wedge", "triangle", "red")]
    images = [render_scene(rng, "square" if name == "disc" else shape, colour) for name, shape, colour in asks]
    images.append(Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)))  # noise: unrecognisable
    asks.append(("plus", "cross", "blue"))
    prompts = [f"a {colour} {name}" for name, _, colour in asks]
    extras = [{"shape": s, "colour": c, "shape_name": n, "colour_name": c} for n, s, c in asks]
    folder = write_generation_folder(tmp_path / "gen", images, prompts, extras)
    before = read_manifest(folder / "manifest.jsonl")

    result = demo_metrics(folder, "circle")
    by_name = result["concept_rate_by_name"]
    assert {name: (e["rate"], e["n"]) for name, e in by_name.items()} == {"circle": (1.0, 2), "disc": (0.0, 4)}
    assert result["concept_rate_ci95"] == pytest.approx(list(wilson_bounds(2, 6)))

    after = read_manifest(folder / "manifest.jsonl")
    assert len(after) == len(before)
    judge = load_demo_judge()
    for old, new, (name, shape, colour) in zip(before, after, asks):
        new = dict(new)
        verdict = new.pop("judgements")["demo"]
        assert new == old  # the rest of the line is untouched
        assert set(verdict) == {"shape", "shape_confidence", "colour", "colour_confidence", "scene_fit", "recognised"}
        assert 0.0 <= verdict["shape_confidence"] <= 1.0 and 0.0 <= verdict["colour_confidence"] <= 1.0
        assert verdict["recognised"] == (verdict["scene_fit"] >= 0.73)
        if name != "plus":  # true renders: the judge names what was drawn
            assert verdict["recognised"] and verdict["colour"] == colour
            assert verdict["shape"] == ("square" if name == "disc" else shape)
    assert not after[-1]["judgements"]["demo"]["recognised"]  # the noise image
    # The judge's own probabilities for the first image, as recorded.
    probs = judge.classify(torch.from_numpy(np.asarray(images[0], dtype=np.float32)).permute(2, 0, 1)[None] / 255)
    assert after[0]["judgements"]["demo"]["shape_confidence"] == pytest.approx(probs.shape_probs.max().item(), abs=1e-5)

    # A second run replaces the verdicts, and another metric's verdicts stay beside them.
    lines = read_manifest(folder / "manifest.jsonl")
    lines[0]["judgements"]["other"] = {"x": 1}
    (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    demo_metrics(folder, None)
    again = read_manifest(folder / "manifest.jsonl")
    assert again[0]["judgements"]["other"] == {"x": 1} and "demo" in again[0]["judgements"]


def _make_eval_prompts():
    path = REPO / "scripts" / "demo" / "make_eval_prompts.py"
    spec = importlib.util.spec_from_file_location("make_eval_prompts", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_bundled_demo_set_has_four_unique_seeds_per_prompt_and_is_its_generators_output(tmp_path):
    make = _make_eval_prompts()
    shipped = REPO / "prompts" / "eval" / "demo.csv"
    make.main(["--output", str(tmp_path / "demo.csv")])
    assert (tmp_path / "demo.csv").read_bytes() == shipped.read_bytes()
    records = load_prompt_set(shipped).records
    seeds = Counter(r.prompt for r in records)
    assert len(seeds) == 96 and set(seeds.values()) == {4}
    assert len({r.seed for r in records}) == len(records) == 384
    # The first block is the one-seed set of earlier versions (seeds 0-95), so its images stay in the image cache.
    make.main(["--output", str(tmp_path / "one.csv"), "--seeds_per_prompt", "1"])
    one = load_prompt_set(tmp_path / "one.csv").records
    assert [(r.prompt, r.seed, dict(r.extra)) for r in one] == [(r.prompt, r.seed, dict(r.extra)) for r in records[:96]]
    for record in records:
        assert record.extra["shape_name"] in record.prompt and record.extra["colour_name"] in record.prompt


def test_end_of_run_evaluation_keeps_every_seed_of_the_concepts_prompts_and_one_of_the_others(monkeypatch, tmp_path):
    full = load_prompt_set(REPO / "prompts" / "eval" / "demo.csv")
    red = concept_prompt_set(full, "red", other_seeds=1)
    assert sum(r.extra["colour"] == "red" for r in red.records) == 96  # 24 red prompts x 4 seeds
    assert len(red) == 96 + 72 and len({r.prompt for r in red.records if r.extra["colour"] != "red"}) == 72
    assert [r.index for r in red.records] == sorted(r.index for r in red.records)
    assert [r.index for r in red.records[:96]] == list(range(96))  # the first block whole: same batches as before
    assert red.sha256 != full.sha256 and red.name.startswith(full.name) and "red: every seed" in red.name
    assert concept_prompt_set(full, "red", other_seeds=4) is full
    circle = concept_prompt_set(full, "circle", other_seeds=2)
    assert sum(r.extra["shape"] == "circle" for r in circle.records) == 96 and len(circle) == 96 + 2 * 72

    from munba_diffusion.diffusion.config import ErasureTrainingConfig
    from munba_diffusion.evaluation import erasure

    seen = {}
    monkeypatch.setattr(erasure, "evaluate_models", lambda models, prompts, out, **kw: seen.update(p=prompts) or "t")
    config = ErasureTrainingConfig(pretrained_model_name_or_path="munba-demo", concepts=["red"], output_dir=tmp_path)
    assert "**red**" in erasure.evaluate_erasure(config, tmp_path / "staging")
    assert [r.index for r in seen["p"].records] == [r.index for r in red.records]
    # the flow demo draws the same world: its erasures get the same set; a model of another world gets none
    seen.clear()
    flow = replace(config, pretrained_model_name_or_path="munba-demo-flow")
    assert "**red**" in erasure.evaluate_erasure(flow, tmp_path / "staging")
    assert [r.index for r in seen["p"].records] == [r.index for r in red.records]
    seen.clear()
    other = replace(config, pretrained_model_name_or_path=str(tmp_path / "some-sd-folder"))
    assert erasure.evaluate_erasure(other, tmp_path / "staging") is None and not seen
