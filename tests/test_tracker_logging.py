"""``--report_to tensorboard``: every number of the step record as a curve, the validation grid as an image."""

from __future__ import annotations

import io
import json
import sys
import types
from itertools import combinations

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # the dev extra has it

import train_erase
from munba_diffusion.diffusion.trackers import log_images
from munba_diffusion.models import DEMO_MODEL

STEPS = 3
PLAYERS = ["preserve", "forget:red", "forget:blue"]


def test_tensorboard_receives_every_bargain_scalar_and_the_grid(tmp_path):
    out = tmp_path / "erased"
    train_erase.main(
        [
            "--pretrained_model_name_or_path",
            DEMO_MODEL,
            *("--concept", "red", "--concept", "blue"),
            *("--output_dir", str(out)),
            *("--max_train_steps", str(STEPS)),
            *("--report_to", "tensorboard"),
            *("--sampler_steps", "2", "--pool_trajectories", "1", "--train_batch_size", "2"),
            *("--validation_prompt", "a red circle", "--validation_prompt", "a blue square"),
            *("--validation_inference_steps", "1", "--validation_seeds", "1", "--no_evaluation"),
        ]
    )
    records = [json.loads(line) for line in (out / "logs" / "train_log.jsonl").read_text().splitlines()]
    (event_file,) = (out / "logs" / "munba-erasure").glob("events.out.tfevents.*")
    events = EventAccumulator(str(event_file))
    events.Reload()

    expected = {f"{quantity}/{player}" for quantity in ("loss", "weight", "grad_norm", "utility") for player in PLAYERS}
    expected |= {f"cos/{a},{b}" for a, b in combinations(PLAYERS, 2)}  # cos_phi is the one pair of two players
    expected |= {"direction_norm", "clip_coef", "skipped", "lr"}
    numbers = {k for k, v in records[0].items() if k != "step" and isinstance(v, (int, float))}
    assert expected <= numbers  # the log has them all ...
    assert set(events.Tags()["scalars"]) == numbers  # ... and so has the tracker, under the same names
    for tag in numbers:
        points = events.Scalars(tag)
        assert [p.step for p in points] == [r["step"] for r in records] == list(range(1, STEPS + 1)), tag
        for point, record in zip(points, records):
            assert point.value == pytest.approx(float(record[tag]), rel=1e-6, abs=1e-30), (tag, point.step)
    assert records[-1]["weight/forget:red"] > 0  # a real value, not a row of zeros that would match anything

    (image,) = events.Images("validation/before_after")
    grid = Image.open(out / "images" / "before_after.png").convert("RGB")
    assert (image.width, image.height, image.step) == (*grid.size, STEPS)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(image.encoded_image_string)).convert("RGB")), grid)


def test_wandb_gets_the_grid_as_a_wandb_image_and_other_trackers_are_skipped(monkeypatch):
    """The wandb branch with a stand-in for the package and its run (wandb is not a test dependency)."""
    fake_wandb = types.ModuleType("wandb")
    fake_wandb.Image = lambda image: ("wandb.Image", image)
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb)
    logged = []
    wandb_run = types.SimpleNamespace(log=lambda values, step: logged.append((values, step)))
    other = types.SimpleNamespace(name="mlflow")  # no images: nothing is called on it
    accelerator = types.SimpleNamespace(trackers=[types.SimpleNamespace(name="wandb", run=wandb_run), other])
    grid = Image.new("RGB", (8, 4), "white")

    log_images(accelerator, {"validation/before_after": grid}, step=7)

    assert logged == [({"validation/before_after": ("wandb.Image", grid)}, 7)]
