"""Generation harness: per-image seeds, resume after an interruption, run-config guard, model specs (the image
cache: tests/test_image_cache.py)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from munba_diffusion.evaluation import generate
from munba_diffusion.evaluation.generate import (
    GenerationSettings,
    ModelSpec,
    generate_images,
)
from munba_diffusion.evaluation.manifest import collect_images, read_manifest
from munba_diffusion.evaluation.prompt_sets import load_prompt_set
from tests.tiny_flow import build_tiny_flux_pipeline
from tests.tiny_sd import build_tiny_sd_pipeline

SETTINGS = GenerationSettings(num_inference_steps=2, guidance_scale=3.0, batch_size=3)
MODEL = {"label": "tiny", "scheduler": "DDIMScheduler"}


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_sd_pipeline(seed=0)


@pytest.fixture()
def prompt_set(tmp_path):
    path = tmp_path / "prompts.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["prompt", "seed", "concept"])
        for i, prompt in enumerate(
            ["a red circle", "a blue square", "a dog", "a cat", "a tree", "a red circle", "a house"]
        ):
            writer.writerow([prompt, 100 + i if i != 5 else 100, "x"])  # row 5 repeats row 0's prompt and seed
    return load_prompt_set(path)


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.int16)


def test_interrupted_run_resumes_to_the_same_files_none_twice(pipe, prompt_set, tmp_path, monkeypatch):
    reference = generate_images(pipe, prompt_set, tmp_path / "uninterrupted", SETTINGS, model=MODEL)

    saved = []
    real_save = generate.save_png_atomic

    def save_then_crash(image, path):
        if len(saved) == 4:
            raise KeyboardInterrupt
        real_save(image, path)
        saved.append(path.name)

    monkeypatch.setattr(generate, "save_png_atomic", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        generate_images(pipe, prompt_set, tmp_path / "resumed", SETTINGS, model=MODEL)
    monkeypatch.setattr(generate, "save_png_atomic", real_save)
    assert len(list((tmp_path / "resumed").glob("*.png"))) == 4

    made_on_restart = []
    monkeypatch.setattr(
        generate, "save_png_atomic", lambda image, path: (made_on_restart.append(path.name), real_save(image, path))
    )
    resumed = generate_images(pipe, prompt_set, tmp_path / "resumed", SETTINGS, model=MODEL)

    assert sorted(made_on_restart) == sorted(set(made_on_restart)) and not set(made_on_restart) & set(saved)
    assert len(made_on_restart) == len(prompt_set) - 4
    first, second = read_manifest(reference), read_manifest(resumed)
    assert [r["file"] for r in second] == [r["file"] for r in first] and len(second) == len(prompt_set)
    with open(resumed) as handle:
        assert len(handle.readlines()) == len(prompt_set)  # no line twice in the file either
    assert sorted(p.name for p in (tmp_path / "resumed").iterdir()) == sorted(
        p.name for p in (tmp_path / "uninterrupted").iterdir()
    )
    for record in first:  # batches are cut from the whole set: a resumed image is made in the same batch, bit for bit
        assert (reference.parent / record["file"]).read_bytes() == (resumed.parent / record["file"]).read_bytes()


def test_each_image_depends_on_its_own_seed_not_its_batch(pipe, prompt_set, tmp_path):
    manifest = generate_images(pipe, prompt_set, tmp_path / "out", SETTINGS, model=MODEL)
    records = read_manifest(manifest)
    assert records[0]["seed"] == records[5]["seed"] and records[0]["prompt"] == records[5]["prompt"]
    same = np.abs(pixels(manifest.parent / records[0]["file"]) - pixels(manifest.parent / records[5]["file"])).max()
    other = np.abs(pixels(manifest.parent / records[0]["file"]) - pixels(manifest.parent / records[1]["file"])).max()
    assert same <= 1 < other
    assert records[2]["settings"] == {
        "num_inference_steps": 2,
        "guidance_scale": 3.0,
        "height": 32,
        "width": 32,
        "scheduler": "DDIMScheduler",
        "dtype": "float32",
    }
    assert records[2]["extra"] == {"concept": "x"} and records[2]["model"] == "tiny"
    assert [e.field("concept") for e in collect_images(manifest.parent)] == ["x"] * len(prompt_set)


def test_a_folder_of_another_run_is_refused_unless_overwrite(pipe, prompt_set, tmp_path, monkeypatch):
    out = tmp_path / "out"
    generate_images(pipe, prompt_set, out, SETTINGS, model=MODEL)
    (out / "mine.txt").write_text("a user's file")
    other = GenerationSettings(num_inference_steps=3, guidance_scale=3.0, batch_size=3)
    with pytest.raises(FileExistsError) as error:
        generate_images(pipe, prompt_set, out, other, model=MODEL)
    assert "--overwrite" in str(error.value) and "settings" in str(error.value) and "\n" not in str(error.value)
    manifest = generate_images(pipe, prompt_set, out, other, model=MODEL, overwrite=True)
    assert {r["settings"]["num_inference_steps"] for r in read_manifest(manifest)} == {3}
    assert json.loads((out / "generation.json").read_text())["settings"]["num_inference_steps"] == 3
    assert (out / "mine.txt").read_text() == "a user's file"
    made = []
    monkeypatch.setattr(generate, "save_png_atomic", lambda image, path: made.append(path))
    generate_images(
        pipe, prompt_set, out, GenerationSettings(num_inference_steps=3, guidance_scale=3.0, batch_size=7), model=MODEL
    )
    assert made == []  # another batch size is the same run: nothing to remake

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "00000_100.png").write_bytes(b"someone's picture")
    with pytest.raises(FileExistsError, match="new or empty folder"):
        generate_images(pipe, prompt_set, theirs, SETTINGS, model=MODEL)
    assert (theirs / "00000_100.png").read_bytes() == b"someone's picture"


def test_prompt_settings_override_guidance_and_size_only_when_asked(pipe, tmp_path):
    path = tmp_path / "i2p.csv"
    path.write_text("prompt,sd_seed,sd_guidance_scale,sd_image_width,sd_image_height\na cat,1,9,48,32\na dog,2,,,\n")
    prompt_set = load_prompt_set(path)
    settings = GenerationSettings(num_inference_steps=1, guidance_scale=2.0, batch_size=2, use_prompt_settings=True)
    records = read_manifest(generate_images(pipe, prompt_set, tmp_path / "a", settings, model=MODEL))
    assert [(r["settings"]["guidance_scale"], r["settings"]["width"]) for r in records] == [(9.0, 48), (2.0, 32)]
    assert Image.open(tmp_path / "a" / records[0]["file"]).size == (48, 32)
    plain = read_manifest(
        generate_images(
            pipe, prompt_set, tmp_path / "b", GenerationSettings(num_inference_steps=1, guidance_scale=2.0), model=MODEL
        )
    )
    assert {r["settings"]["guidance_scale"] for r in plain} == {2.0}


def test_model_specs():
    assert ModelSpec.parse("runs/erased") == ModelSpec("runs/erased")
    spec = ModelSpec.parse("CompVis/stable-diffusion-v1-4::runs/x/pytorch_lora_weights.safetensors")
    assert (
        spec.lora == "runs/x/pytorch_lora_weights.safetensors"
        and spec.name == "stable-diffusion-v1-4+pytorch_lora_weights"
    )
    with pytest.raises(ValueError, match="BASE::LORA_FILE"):
        ModelSpec.parse("base::")


def test_flux_schnell_images_read_the_prompt_as_the_erasure_was_trained(prompt_set, tmp_path):
    """An evaluation image of FLUX-schnell is the pipeline's image with its 256 T5 tokens, the trainer's encoding
    (FluxPipeline pads to 512 unless told, which draws another image)."""
    schnell = build_tiny_flux_pipeline(0, guidance_embeds=False)
    schnell.set_progress_bar_config(disable=True)
    settings = GenerationSettings(num_inference_steps=2, guidance_scale=0.0, batch_size=1, resolution=32)
    manifest = generate_images(schnell, prompt_set, tmp_path / "out", settings, model=MODEL)
    first = read_manifest(manifest)[0]

    def direct(**extra):
        generator = [torch.Generator("cpu").manual_seed(first["seed"])]
        call = {"num_inference_steps": 2, "guidance_scale": 0.0, "height": 32, "width": 32, **extra}
        return np.asarray(schnell([first["prompt"]], generator=generator, **call).images[0], dtype=np.int16)

    made = pixels(tmp_path / "out" / first["file"])
    assert np.array_equal(made, direct(max_sequence_length=256))
    assert not np.array_equal(made, direct())
