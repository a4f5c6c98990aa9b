"""The image cache: same key -> the PNG is copied (no pipeline call); any change that shapes an image -> a miss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers
from peft.utils import get_peft_model_state_dict
from PIL import Image

from munba_diffusion.config import parse_config
from munba_diffusion.evaluation import generate
from munba_diffusion.evaluation.evaluate import EvaluationConfig, MetricOptions, evaluate_models
from munba_diffusion.evaluation.generate import (
    CACHE_ENV,
    GenerationSettings,
    ImageCache,
    default_cache_dir,
    generate_images,
    model_fingerprint,
)
from munba_diffusion.evaluation.manifest import read_manifest
from munba_diffusion.evaluation.prompt_sets import load_prompt_set
from tests.eval_helpers import save_tiny_clip
from tests.tiny_sd import add_random_lora, build_tiny_sd_pipeline, save_tiny_sd

STEPS = 2
SETTINGS = GenerationSettings(num_inference_steps=STEPS, guidance_scale=3.0, batch_size=2)
MODEL = {"label": "tiny", "scheduler": "DDIMScheduler"}
ROWS = [("a red circle", 100), ("a blue square", 101), ("a dog", 102), ("a cat in a house", 103)]


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_sd_pipeline(seed=0)


@pytest.fixture()
def cache_dir(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "image-cache"
    monkeypatch.setenv(CACHE_ENV, str(folder))
    return folder


def write_prompts(path: Path, rows=ROWS) -> Path:
    path.write_text("prompt,seed\n" + "".join(f"{prompt},{seed}\n" for prompt, seed in rows))
    return path


@pytest.fixture()
def prompts(tmp_path):
    return load_prompt_set(write_prompts(tmp_path / "prompts.csv"))


def count_unet_calls(pipe, monkeypatch) -> list:
    """The UNet forward calls of ``pipe`` from now on (``STEPS`` per pipeline call: guidance is one batch)."""
    calls, real = [], pipe.unet.forward

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(pipe.unet, "forward", counting)
    return calls


def make(pipe, prompt_set, out: Path, settings=SETTINGS, cache=True) -> list[dict]:
    cache = ImageCache.for_pipeline(pipe) if cache else None
    return read_manifest(generate_images(pipe, prompt_set, out, settings, model=MODEL, cache=cache))


def cache_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def test_same_key_is_a_hit_without_any_pipeline_call_and_byte_identical(
    pipe, prompts, cache_dir, tmp_path, monkeypatch
):
    assert default_cache_dir() == cache_dir
    calls = count_unet_calls(pipe, monkeypatch)
    first = make(pipe, prompts, tmp_path / "first")
    assert len(calls) == 2 * STEPS and not any(r["from_cache"] for r in first)  # 4 rows, 2 batches
    stored = cache_files(cache_dir)
    assert [p.name for p in stored] == sorted(f"{r['cache_key']}.png" for r in first)
    assert all(p.parent.name == p.name[:2] for p in stored)  # layout: <key[:2]>/<key>.png, PNGs only

    calls.clear()
    second = make(pipe, prompts, tmp_path / "second")
    assert calls == [] and all(r["from_cache"] for r in second)
    assert [r["cache_key"] for r in second] == [r["cache_key"] for r in first]
    plain = make(pipe, prompts, tmp_path / "plain", cache=False)  # a run without the cache makes the same bytes
    assert {r["cache_key"] for r in plain} == {None}
    for record in first:
        made = (tmp_path / "first" / record["file"]).read_bytes()
        assert (tmp_path / "second" / record["file"]).read_bytes() == made
        assert (tmp_path / "plain" / record["file"]).read_bytes() == made
    assert cache_files(cache_dir) == stored and not list((tmp_path / "second").glob(".*"))  # no temporaries left


def test_a_nudged_weight_misses(pipe, prompts, cache_dir, tmp_path, monkeypatch):
    make(pipe, prompts, tmp_path / "base")
    other = build_tiny_sd_pipeline(seed=0)
    assert model_fingerprint(other) == model_fingerprint(pipe)  # same weights, other objects: same fingerprint
    with torch.no_grad():
        other.unet.conv_out.bias[0] += 1e-4
    assert model_fingerprint(other) != model_fingerprint(pipe)
    calls = count_unet_calls(other, monkeypatch)
    records = make(other, prompts, tmp_path / "nudged")
    assert len(calls) == 2 * STEPS and not any(r["from_cache"] for r in records)
    assert len(cache_files(cache_dir)) == 2 * len(prompts)


@pytest.mark.parametrize("change", ["guidance", "steps", "seed", "prompt", "batch"])
def test_a_changed_setting_seed_or_prompt_misses(change, pipe, prompts, cache_dir, tmp_path, monkeypatch):
    base = make(pipe, prompts, tmp_path / "base")
    settings, rows = SETTINGS, list(ROWS)
    if change == "guidance":
        settings = GenerationSettings(num_inference_steps=STEPS, guidance_scale=5.0, batch_size=2)
    elif change == "steps":
        settings = GenerationSettings(num_inference_steps=STEPS + 1, guidance_scale=3.0, batch_size=2)
    elif change == "batch":  # other batch companions may round differently on a GPU: the batch is in the key
        settings = GenerationSettings(num_inference_steps=STEPS, guidance_scale=3.0, batch_size=4)
    elif change == "seed":
        rows = [(prompt, seed + 10) for prompt, seed in rows]
    else:
        rows = [(prompt + " in a house", seed) for prompt, seed in rows]
    prompt_set = load_prompt_set(write_prompts(tmp_path / "changed.csv", rows))
    calls = count_unet_calls(pipe, monkeypatch)
    records = make(pipe, prompt_set, tmp_path / "changed", settings)
    assert calls and not any(r["from_cache"] for r in records)
    assert not {r["cache_key"] for r in records} & {r["cache_key"] for r in base}


def test_library_version_device_and_lora_are_in_the_key(pipe, cache_dir, monkeypatch, tmp_path):
    call = {"prompt": ["a dog"], "num_inference_steps": 2, "guidance_scale": 3.0, "height": 32, "width": 32}
    cache = ImageCache.for_pipeline(pipe)
    key = cache.key(call, [1], 0, "float32")
    assert set(cache.environment["libraries"]) >= {"torch", "diffusers", "transformers", "peft"}
    assert cache.environment["device"]["type"] == "cpu"
    real = generate.library_versions
    monkeypatch.setattr(generate, "library_versions", lambda names: {**real(names), "diffusers": "0.0.1"})
    assert ImageCache.for_pipeline(pipe).key(call, [1], 0, "float32") != key
    monkeypatch.setattr(generate, "library_versions", real)
    monkeypatch.setattr(generate, "device_identity", lambda device: {"type": "cuda", "name": "NVIDIA H200"})
    assert ImageCache.for_pipeline(pipe).key(call, [1], 0, "float32") != key
    assert cache.key(call, [1], 0, "float16") != key and cache.key(call, [1, 2], 0, "float32") != key

    lora_file = tmp_path / "lora.safetensors"
    lora_file.write_bytes(b"x")  # only its sha256 is read here
    assert ImageCache(cache_dir, model_fingerprint(pipe, lora_file), cache.environment).key(
        call, [1], 0, "float32"
    ) != (key)


def test_a_torn_or_foreign_entry_is_ignored_and_made_again(pipe, prompts, cache_dir, tmp_path, monkeypatch, caplog):
    first = make(pipe, prompts, tmp_path / "first")
    entry = {r["index"]: cache_dir / r["cache_key"][:2] / f"{r['cache_key']}.png" for r in first}
    whole = entry[0].read_bytes()
    entry[0].write_bytes(whole[: len(whole) // 2])  # torn: a write cut short (not by us: ours are atomic)
    calls = count_unet_calls(pipe, monkeypatch)
    second = make(pipe, prompts, tmp_path / "second")
    assert len(calls) == STEPS  # only the batch of the torn entry (rows 0 and 1) is made again
    assert [r["from_cache"] for r in second] == [False, False, True, True]
    assert entry[0].read_bytes() == whole and "damaged" in caplog.text

    entry[2].write_bytes(b"not a png at all")
    Image.new("RGB", (16, 16)).save(entry[3])  # a PNG of the wrong size
    calls.clear()
    third = make(pipe, prompts, tmp_path / "third")
    assert len(calls) == STEPS and [r["from_cache"] for r in third] == [True, True, False, False]
    for record in first:
        assert (tmp_path / "third" / record["file"]).read_bytes() == (tmp_path / "first" / record["file"]).read_bytes()
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in cache_files(cache_dir))


def test_an_unusable_cache_folder_costs_a_warning_not_the_run(pipe, prompts, tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(CACHE_ENV, str(blocker))
    records = make(pipe, prompts, tmp_path / "out")
    assert len(records) == len(prompts) and "cannot write" in caplog.text and blocker.read_text() == "not a folder"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache-assets")
    loras = {}
    for seed in (1, 2):  # two "erased" models of the same base
        lora_pipe = build_tiny_sd_pipeline(seed=0)
        add_random_lora(lora_pipe, seed=seed)
        StableDiffusionPipeline.save_lora_weights(
            root / f"lora{seed}",
            unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(lora_pipe.unet)),
        )
        loras[seed] = root / f"lora{seed}" / "pytorch_lora_weights.safetensors"
    return {
        "base": save_tiny_sd(root / "tiny-sd", seed=0),
        "loras": loras,
        "prompts": write_prompts(root / "prompts.csv"),
        "clip": save_tiny_clip(root / "clip"),
    }


def test_the_second_evaluation_makes_only_the_erased_images_and_the_report_says_so(
    assets, cache_dir, tmp_path, monkeypatch
):
    calls, real = [], UNet2DConditionModel.forward

    def counting(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", counting)
    base = str(assets["base"])

    def evaluate(out: Path, lora_seed: int, **kwargs) -> dict:
        models = [base, f"{base}::{assets['loras'][lora_seed]}"]
        evaluate_models(
            models,
            assets["prompts"],
            out,
            metrics=["clip"],
            settings=SETTINGS,
            options=MetricOptions(clip_model=str(assets["clip"])),
            device="cpu",
            **kwargs,
        )
        return json.loads((out / "report.json").read_text())["protocol"]["image_cache"]

    first = evaluate(tmp_path / "run1", 1)
    assert len(calls) == 2 * 2 * STEPS and first["enabled"] and first["folder"] == str(cache_dir)
    assert [m["images_from_cache"] for m in first["models"].values()] == [0, 0]
    calls.clear()
    second = evaluate(tmp_path / "run2", 2)  # the same base, another erased model: only its images are made
    assert len(calls) == 2 * STEPS
    assert [(m["images_from_cache"], m["images_generated"]) for m in second["models"].values()] == [(4, 0), (0, 4)]
    assert "images_from_cache: 4" in (tmp_path / "run2" / "report.md").read_text()
    fingerprints = [m["model_fingerprint"] for m in second["models"].values()]
    assert fingerprints[0] == list(first["models"].values())[0]["model_fingerprint"] != fingerprints[1]

    # --no_image_cache: nothing read, nothing written
    def refuse(*args, **kwargs):
        raise AssertionError("the cache was used")

    monkeypatch.setattr(ImageCache, "read", refuse)
    monkeypatch.setattr(ImageCache, "write", refuse)
    before = cache_files(cache_dir)
    calls.clear()
    assert evaluate(tmp_path / "run3", 2, image_cache=False) == {"enabled": False}
    assert len(calls) == 2 * 2 * STEPS and cache_files(cache_dir) == before


def test_the_command_line_turns_the_cache_off(tmp_path):
    common = ["--model", "m", "--prompts", "p.csv", "--output_dir", str(tmp_path / "out")]
    assert parse_config(EvaluationConfig, common).image_cache is True
    assert parse_config(EvaluationConfig, [*common, "--no_image_cache"]).image_cache is False
    assert parse_config(EvaluationConfig, [*common, "--no-image-cache"]).image_cache is False


def test_the_default_folder(monkeypatch, tmp_path):
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert default_cache_dir() == Path.home() / ".cache" / "munba_diffusion" / "images"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "munba_diffusion" / "images"
