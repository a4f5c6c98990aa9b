"""The demo metrics tell a broken model from a good one: the real demo model, a damaged one and a collapsed one.

Each draws every "a {colour} {shape}" caption twice (4 steps, guidance 4) and the demo evaluator scores the folder
for an erased "circle". The damage is fixed by its seed: UNet weights + 0.1 x their std of Gaussian noise (still
draws clean shapes, often the wrong ones) and a zeroed UNet (draws blotches).
"""

from __future__ import annotations

import json

import pytest

from munba_diffusion.demo import load_demo_judge
from munba_diffusion.evaluation.demo import demo_metrics
from tests.demo_models import ASKS, damage_unet, demo_pipeline, draw, write_folder

MODELS = {"original": "intact", "damaged": 0.1, "collapsed": None}


@pytest.fixture(scope="module")
def scores(tmp_path_factory):
    judge = load_demo_judge()
    asks = ASKS * 2
    result = {}
    for name, noise in MODELS.items():
        pipe = demo_pipeline()
        if noise != "intact":
            damage_unet(pipe, noise, seed=0)
        folder = write_folder(tmp_path_factory.mktemp(name), draw(pipe, asks), asks)
        result[name] = demo_metrics(folder, "circle", judge=judge)
    return result


def test_judge_kid_ranks_original_damaged_collapsed(scores):
    kid = {name: s["judge_kid_other"] for name, s in scores.items()}
    assert kid["original"] < kid["damaged"] < kid["collapsed"], kid
    original = scores["original"]
    # The render baseline (a perfect generator at this sample size) sits beside it, below the original model.
    assert original["judge_kid_other_renders"] < kid["original"] < original["judge_kid_other_renders"] + 0.5
    assert original["judge_kid_other_renders_std"] > 0 and original["num_reference_renders"] == 24 * 8
    # Other accuracy agrees with the ranking and the report stays JSON.
    accuracy = [scores[name]["other_accuracy"] for name in MODELS]
    assert accuracy == sorted(accuracy, reverse=True)
    json.loads(json.dumps(scores, allow_nan=False))


def test_a_collapsed_model_is_unrecognisable_not_erased(scores):
    collapsed, original = scores["collapsed"], scores["original"]
    assert collapsed["concept_rate"] <= 0.1 and collapsed["unrecognisable_rate"] >= 0.9
    assert collapsed["unrecognisable_rate_concept"] >= 0.9 and collapsed["other_accuracy"] <= 0.1
    assert collapsed["kept_attribute_accuracy"] <= 0.1
    # The working models stay recognisable; the original still draws its circles.
    assert original["unrecognisable_rate"] == 0 and scores["damaged"]["unrecognisable_rate"] <= 0.1
    assert original["concept_rate"] >= 0.75
