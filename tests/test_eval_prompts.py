"""Prompt sets: the I2P CSV layout, its subset filters, the packaged evaluation sets, one-line errors."""

from __future__ import annotations

import csv
from collections import Counter

import pytest

from munba_diffusion.evaluation.objects import IMAGENETTE_CLASSES
from munba_diffusion.evaluation.prompt_sets import load_prompt_set

I2P_HEADER = [
    "prompt",
    "categories",
    "hard",
    "inappropriate_percentage",
    "nudity_percentage",
    "lexica_url",
    "sd_safety_percentage",
    "prompt_toxicity",
    "sd_seed",
    "sd_guidance_scale",
    "sd_image_width",
    "sd_image_height",
]
I2P_ROWS = [
    ["a nude portrait", "sexual", "1", "90.0", "75.5", "", "50", "0.3", "1234", "7", "512", "512"],
    ["a battle scene", "violence", "0", "40.0", "0.0", "", "0", "0.1", "99", "7", "512", "768"],
    ["a painting, dark", "sexual, hate", "1", "80.0", "12.0", "", "10", "0.2", "5", "9.5", "640", "512"],
    ["a sad clown", "self-harm", "0", "20.0", "", "", "0", "0.1", "7", "7", "512", "512"],
]


def write_csv(path, header, rows):
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_i2p_layout_is_read_with_its_seed_guidance_and_size_columns(tmp_path):
    prompt_set = load_prompt_set(write_csv(tmp_path / "i2p.csv", I2P_HEADER, I2P_ROWS))
    third = prompt_set.records[2]
    assert (third.prompt, third.seed, third.guidance_scale, third.width, third.height) == (
        "a painting, dark",
        5,
        9.5,
        640,
        512,
    )
    assert third.extra["categories"] == "sexual, hate" and "sd_seed" not in third.extra


def test_i2p_subset_filters_keep_the_right_rows_and_indices(tmp_path):
    path = write_csv(tmp_path / "i2p.csv", I2P_HEADER, I2P_ROWS)
    nudity = load_prompt_set(path, nudity_only=True)
    assert [r.index for r in nudity.records] == [0, 2]  # empty nudity_percentage counts as 0
    sexual = load_prompt_set(path, category="Sexual")
    assert [r.prompt for r in sexual.records] == ["a nude portrait", "a painting, dark"]
    assert [r.index for r in load_prompt_set(path, limit=2).records] == [0, 1]
    assert len({nudity.sha256, sexual.sha256, load_prompt_set(path).sha256}) == 2  # same rows -> same hash
    assert nudity.source_sha256 == load_prompt_set(path).source_sha256


def test_evaluation_seed_column_is_preferred_over_sd_seed(tmp_path):
    path = write_csv(tmp_path / "p.csv", ["prompt", "evaluation_seed", "sd_seed"], [["a cat", "3", "4"]])
    assert load_prompt_set(path).records[0].seed == 3


@pytest.mark.parametrize(
    "header, rows, fragment",
    [
        (["prompt", "label"], [["a cat", "x"]], "seed"),
        (["prompt", "seed"], [["a cat", "1.5"]], "row 2"),
        (["text", "seed"], [["a cat", "1"]], "'prompt' column"),
        (["prompt", "seed"], [["", "1"]], "empty prompt"),
    ],
)
def test_bad_csvs_give_one_line_errors(tmp_path, header, rows, fragment):
    with pytest.raises(ValueError) as error:
        load_prompt_set(write_csv(tmp_path / "bad.csv", header, rows))
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_filters_on_a_set_without_i2p_columns_fail_clearly(tmp_path):
    path = write_csv(tmp_path / "p.csv", ["prompt", "seed"], [["a cat", "1"]])
    with pytest.raises(ValueError, match="nudity_percentage"):
        load_prompt_set(path, nudity_only=True)
    with pytest.raises(FileNotFoundError, match="i2p"):
        load_prompt_set(tmp_path / "missing.csv")


def test_i2p_offline_gives_a_one_line_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(ConnectionError) as error:
        load_prompt_set("i2p")
    assert "AIML-TUDA/i2p" in str(error.value) and "\n" not in str(error.value)


def test_packaged_imagenette_set_has_five_seeds_per_class():
    prompt_set = load_prompt_set("eval/imagenette_objects.csv")
    labels = Counter(r.extra["label"] for r in prompt_set.records)
    assert set(labels) == set(IMAGENETTE_CLASSES) and set(labels.values()) == {5}
    assert all(r.prompt == f"an image of a {r.extra['label']}" for r in prompt_set.records)
    assert len({(r.extra["label"], r.seed) for r in prompt_set.records}) == 50


def test_packaged_artist_set_has_twenty_distinct_prompts_per_artist():
    prompt_set = load_prompt_set("eval/artists.csv")
    artists = Counter(r.extra["concept"] for r in prompt_set.records)
    assert artists == {a: 20 for a in ("Pablo Picasso", "Vincent van Gogh", "Rembrandt", "Andy Warhol", "Caravaggio")}
    assert all(r.extra["concept"] in r.prompt for r in prompt_set.records)
    assert len({r.prompt for r in prompt_set.records}) == 100


def test_i2p_from_the_hub_is_read_with_types_filters_and_stable_indices(monkeypatch):
    import datasets

    table = datasets.Dataset.from_dict(
        {
            "prompt": ["a nude portrait", None, "a battle scene", "a painting, dark"],
            "categories": ["sexual", "sexual", "violence", "sexual, hate"],
            "nudity_percentage": [75.5, 50.0, 0.0, 12.0],
            "sd_seed": [1234, 5, 99, 4_000_000_000],
            "sd_guidance_scale": [7, 7, 7, 9],
            "sd_image_width": [512, 512, 512, 640],
            "sd_image_height": [512, 512, 768, 512],
        }
    )
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: calls.append((name, split)) or table)
    prompt_set = load_prompt_set("i2p", nudity_only=True)
    assert calls == [("AIML-TUDA/i2p", "train")] and prompt_set.name == "AIML-TUDA/i2p"
    assert [r.index for r in prompt_set.records] == [0, 3]  # the row without a prompt is skipped, indices stay
    last = prompt_set.records[1]
    assert (last.seed, last.guidance_scale, last.width) == (4_000_000_000, 9.0, 640)
    assert prompt_set.source_sha256 is None and len(prompt_set.sha256) == 64
