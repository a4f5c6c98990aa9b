"""The model-family interface: detection from model_index.json (one line for what is not supported), SD 2.x's
v-prediction (the ESD target formed in the model's own prediction space) and an SD 2.x erasure end to end."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import load_file

import train_erase
from munba_diffusion.diffusion.base_model import check_base_model
from munba_diffusion.diffusion.export import kohya_lora_state_dict
from munba_diffusion.diffusion.family import (
    STABLE_DIFFUSION,
    STABLE_DIFFUSION_XL,
    denoise,
    family_of_class,
    family_of_pipeline,
)
from munba_diffusion.diffusion.latents import LatentBatch
from munba_diffusion.diffusion.lora import ErasureLoraConfig, add_erasure_lora
from munba_diffusion.diffusion.losses import esd_target
from munba_diffusion.diffusion.players import ErasureBatch, joint_frozen_targets
from munba_diffusion.evaluation.evaluate import MetricOptions, evaluate_models
from munba_diffusion.evaluation.generate import GenerationSettings
from munba_diffusion.pipelines.munba import KOHYA_LORA_WEIGHT_NAME, MunbaPipeline
from munba_diffusion.pipelines.munba_xl import MunbaXLPipeline
from tests.eval_helpers import save_tiny_clip
from tests.tiny_sd import build_tiny_sd_pipeline, build_tiny_sdxl_pipeline, save_tiny_sd

torch.set_num_threads(1)

CPU = torch.device("cpu")
ETA = 0.7


def _folder(tmp_path, class_name: str):
    folder = tmp_path / class_name
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
    return str(folder)


@pytest.mark.parametrize(
    ("class_name", "reason"),
    [
        ("StableDiffusionXLImg2ImgPipeline", "SDXL refiner folder"),
        ("KandinskyV22Pipeline", "KandinskyV22Pipeline is not supported"),
        ("FluxImg2ImgPipeline", "FluxImg2ImgPipeline is not supported"),
    ],
)
def test_unsupported_pipeline_classes_get_one_line_before_any_weight_loads(tmp_path, class_name, reason):
    with pytest.raises(ValueError, match=reason) as error:
        check_base_model(_folder(tmp_path, class_name))
    message = str(error.value)
    supported = "StableDiffusionPipeline (SD 1.x, 2.x), StableDiffusionXLPipeline (SDXL), StableDiffusion3Pipeline (SD3"
    assert "\n" not in message and supported in message and "FluxPipeline (FLUX.1 dev, schnell)" in message


def test_the_family_is_found_from_the_class_and_from_a_loaded_pipeline():
    assert family_of_class("StableDiffusionPipeline") is STABLE_DIFFUSION
    pipe = build_tiny_sd_pipeline(0, version=2)
    assert family_of_pipeline(pipe) is STABLE_DIFFUSION
    munba = MunbaPipeline(**pipe.components)
    assert family_of_pipeline(munba) is STABLE_DIFFUSION  # subclasses belong to their family
    assert STABLE_DIFFUSION.prediction_type(pipe.scheduler) == "v_prediction"
    assert STABLE_DIFFUSION.describe(pipe) == "Stable Diffusion (v-prediction, 32 px)"
    pipe.scheduler.register_to_config(prediction_type="sample")
    with pytest.raises(ValueError, match="erasure supports epsilon and v_prediction models"):
        STABLE_DIFFUSION.prediction_type(pipe.scheduler)


def _v_to_epsilon(v: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """eps = sqrt(a) v + sqrt(1 - a) x_t, per row."""
    a = alpha_bar.view(-1, 1, 1, 1)
    return a.sqrt() * v + (1 - a).sqrt() * x_t


def test_esd_target_of_a_v_model_is_formed_from_its_own_velocities():
    """The target is v*(empty) - eta (v*(c) - v*(empty)) from the v model's own predictions, and (the weights sum
    to 1) it is exactly the velocity of the epsilon-space ESD target of the same predictions."""
    pipe = build_tiny_sd_pipeline(0, version=2)
    generator = torch.Generator().manual_seed(0)
    rows = LatentBatch(
        torch.zeros(2, dtype=torch.long), torch.randn(2, 4, 16, 16, generator=generator), torch.tensor([100, 700])
    )
    concept, keep, uncond = (torch.randn(b, 8, 32, generator=generator) for b in (2, 2, 1))
    batch = ErasureBatch(forget=[(rows, concept, concept)], preserve=(rows, keep))
    targets = joint_frozen_targets(pipe.unet, batch, uncond, "esd", ETA, ["preserve", "forget"], CPU, torch.float32)

    with torch.no_grad():
        v_concept = denoise(pipe.unet, rows.latents, rows.timesteps, concept)
        v_empty = denoise(pipe.unet, rows.latents, rows.timesteps, uncond.expand_as(concept))
    expected = v_empty - ETA * (v_concept - v_empty)
    torch.testing.assert_close(targets["forget"], expected, rtol=1e-5, atol=1e-6)

    alpha_bar = pipe.scheduler.alphas_cumprod[rows.timesteps]
    in_epsilon = esd_target(
        _v_to_epsilon(v_empty, rows.latents, alpha_bar), _v_to_epsilon(v_concept, rows.latents, alpha_bar), ETA
    )
    torch.testing.assert_close(
        _v_to_epsilon(targets["forget"], rows.latents, alpha_bar), in_epsilon, rtol=1e-4, atol=1e-5
    )
    assert not torch.allclose(targets["forget"], in_epsilon, atol=1e-3)  # the spaces really differ


def _images(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        "a red circle", num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np"
    ).images


def _erase(base, out, *extra):
    train_erase.main(
        [
            *("--pretrained_model_name_or_path", str(base), "--concept", "text:a red circle"),
            *("--output_dir", str(out), "--max_train_steps", "12", "--train_batch_size", "2"),
            *("--lora_target", "attn", "--learning_rate", "5e-3", "--sampler_steps", "3", "--pool_trajectories", "2"),
            *("--validation_inference_steps", "1", "--validation_seeds", "1", "--no_evaluation", *extra),
        ]
    )
    return [json.loads(line) for line in (out / "logs" / "train_log.jsonl").read_text().splitlines()]


def _erase_and_check_the_losses(base, tmp_path, pipeline_class, family):
    """Erase "a red circle" (nash) and forget-only from ``base``: the bargain keeps the preservation loss under half
    of forget-only's, and the forget loss at fixed (x_t, t) rows falls by more than 20% from the base to the fused
    folder, against the base's ESD target. Returns the output folder and the base and fused pipelines."""
    out = tmp_path / "erased"
    log = _erase(base, out)
    alone = _erase(base, tmp_path / "forget_only", "--combiner", "sum", "--combiner_weights", "0", "1")
    assert np.mean([r["loss/preserve"] for r in log]) < 0.5 * np.mean([r["loss/preserve"] for r in alone])
    fused, base_pipe = pipeline_class.from_pretrained(out), pipeline_class.from_pretrained(base)
    generator = torch.Generator().manual_seed(3)
    x_t, t = torch.randn(8, 4, 16, 16, generator=generator), torch.linspace(50, 950, 8).long()
    with torch.no_grad():
        concept = family.encode_prompts(base_pipe, ["a red circle"] * 8, CPU, 32)
        empty = family.null_conditioning(base_pipe, CPU, 32).expand_as(concept)  # what the trainer's ESD uses
        before = denoise(base_pipe.unet, x_t, t, concept)
        target = esd_target(denoise(base_pipe.unet, x_t, t, empty), before, 1.0)
        after = denoise(fused.unet, x_t, t, concept)
    assert float((after - target).pow(2).mean()) < 0.8 * float((before - target).pow(2).mean())
    return out, base_pipe, fused


def test_sd2_v_prediction_erasure_end_to_end(tmp_path):
    """A tiny SD 2.x (v-prediction) pipeline: the forget loss falls while the bargain keeps the preservation loss
    far below what forgetting alone does to it; the folder loads three ways offline; erasure_scale 0 is exactly the
    base; the record names the family."""
    base = save_tiny_sd(tmp_path / "sd2", seed=0, version=2)
    out, base_pipe, fused = _erase_and_check_the_losses(base, tmp_path, StableDiffusionPipeline, STABLE_DIFFUSION)
    record = json.loads((out / "erasure_config.json").read_text())
    assert "v-prediction" in record["run"]["family"]

    assert fused.scheduler.config.prediction_type == "v_prediction"
    base_images, fused_images = _images(base_pipe), _images(fused)
    assert np.abs(fused_images - base_images).max() > 1e-3
    base_pipe.load_lora_weights(out)
    assert np.abs(_images(base_pipe) - fused_images).max() < 1e-4
    remote = DiffusionPipeline.from_pretrained(out, custom_pipeline="munba", trust_remote_code=True)
    assert remote.erased_concepts == ["a red circle"]
    on_base = MunbaPipeline.from_pretrained(base).load_erasure(out)
    on_base.erasure_scale = 0
    np.testing.assert_array_equal(_images(on_base), base_images)


def test_sdxl_conditioning_packs_and_unpacks_to_the_pipelines_own():
    """The packed row carries the pooled embedding and the time ids: the UNet's prediction from the packed tensor
    equals its prediction from the pipeline's own encode_prompt and _get_add_time_ids."""
    pipe = build_tiny_sdxl_pipeline(0)
    family = family_of_pipeline(pipe)
    assert family is STABLE_DIFFUSION_XL and len(family.text_encoders(pipe)) == 2
    packed = family.encode_prompts(pipe, ["a red circle", "a blue square"], CPU, resolution=32)
    assert packed.shape == (2, 78, 64)
    hidden, _, pooled, _ = pipe.encode_prompt(
        ["a red circle", "a blue square"], device=CPU, do_classifier_free_guidance=False
    )
    time_ids = pipe._get_add_time_ids((32, 32), (0, 0), (32, 32), torch.float32, text_encoder_projection_dim=32).repeat(
        2, 1
    )
    x_t = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 600])
    with torch.no_grad():
        own = pipe.unet(
            x_t, t, encoder_hidden_states=hidden, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}
        ).sample
        torch.testing.assert_close(denoise(pipe.unet, x_t, t, packed), own)
    null = family.null_conditioning(pipe, CPU, resolution=32)
    assert null.shape == (1, 78, 64) and float(null[0, :-1].abs().max()) == 0.0  # force_zeros_for_empty_prompt
    assert family.describe(pipe) == "Stable Diffusion XL (epsilon, 32 px)"


def test_sdxl_prefix_encoding_is_the_pipelines_encoding_with_the_slots_replaced():
    """A prefix of typed tokens' embeddings (both tables) encodes exactly as the pipeline encodes the typed prompt;
    a soft prefix changes both encoders' states and the pooled embedding, and only in the rows asked for."""
    pipe = build_tiny_sdxl_pipeline(0)
    family = STABLE_DIFFUSION_XL
    typed = torch.tensor(pipe.tokenizer("red circle", add_special_tokens=False).input_ids)
    ids = family.prefixed_ids(pipe, ["a red circle", "a blue square"], len(typed))
    assert ids.shape == (2, 2, 77)
    vocabulary = family.prefix_vocabulary(pipe)
    with torch.no_grad():
        as_typed = family.encode_with_prefix(pipe, ids, vocabulary[typed], resolution=32)
        plain = family.encode_prompts(pipe, ["red circle a red circle", "red circle a blue square"], CPU, 32)
        torch.testing.assert_close(as_typed, plain)
        prefix = torch.randn(2, len(typed), vocabulary.shape[1], generator=torch.Generator().manual_seed(0))
        both = family.encode_with_prefix(pipe, ids, prefix, resolution=32)
        second = family.encode_with_prefix(pipe, ids, prefix, torch.tensor([False, True]), resolution=32)
        untouched = family.encode_with_prefix(pipe, ids, prefix, torch.tensor([False, False]), resolution=32)
    assert family.prefix_vocabulary(pipe).shape[1] == 64  # both 32-wide tables, side by side
    torch.testing.assert_close(second[1], both[1])
    torch.testing.assert_close(second[0], untouched[0])
    assert not torch.allclose(both[0, :-1, :32], untouched[0, :-1, :32])  # the first encoder's states
    assert not torch.allclose(both[0, :-1, 32:], untouched[0, :-1, 32:])  # the second encoder's states
    assert not torch.allclose(both[0, -1, :32], untouched[0, -1, :32])  # the pooled embedding


def test_sdxl_refuses_the_full_target_set(tmp_path):
    base = _folder(tmp_path, "StableDiffusionXLPipeline")  # refused before any weight loads: the index is enough
    args = ["--pretrained_model_name_or_path", base, "--concept", "red", "--output_dir", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as error:
        train_erase.main([*args, "--lora_target", "full"])
    assert "use --lora_target noxattn" in str(error.value.code)


def test_sdxl_erasure_end_to_end(tmp_path):
    """A tiny SDXL pipeline: the forget loss falls at fixed rows while the bargain keeps the preservation loss far
    below what forgetting alone does to it; the folder loads with the stock SDXL class, base + LoRA, the kohya file
    and custom_pipeline="munba"; erasure_scale 0 on base + LoRA is exactly the base."""
    base = tmp_path / "sdxl"
    build_tiny_sdxl_pipeline(0).save_pretrained(base)
    out, base_pipe, fused = _erase_and_check_the_losses(base, tmp_path, StableDiffusionXLPipeline, STABLE_DIFFUSION_XL)
    record = json.loads((out / "erasure_config.json").read_text())
    assert record["run"]["family"].startswith("Stable Diffusion XL")
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    card = (out / "README.md").read_text()
    assert "Stable Diffusion XL (epsilon, 32 px)" in card and "MunbaXLPipeline.from_pretrained(" in card

    base_images, fused_images = _images(base_pipe), _images(fused)
    assert np.abs(fused_images - base_images).max() > 1e-3
    base_pipe.load_lora_weights(out)
    assert np.abs(_images(base_pipe) - fused_images).max() < 1e-4
    kohya = StableDiffusionXLPipeline.from_pretrained(base)
    kohya.load_lora_weights(out, weight_name=KOHYA_LORA_WEIGHT_NAME)
    assert np.abs(_images(kohya) - fused_images).max() < 1e-4
    remote = DiffusionPipeline.from_pretrained(out, custom_pipeline="munba", trust_remote_code=True)
    assert type(remote).__name__ == "MunbaXLPipeline" and remote.erased_concepts == ["a red circle"]
    on_base = MunbaXLPipeline.from_pretrained(base).load_erasure(out)
    assert np.abs(_images(on_base) - fused_images).max() < 1e-4
    on_base.erasure_scale = 0
    np.testing.assert_array_equal(_images(on_base), base_images)

    # evaluated like any model: generated with the evaluators' own loader, scored, reported
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("prompt,seed\na red circle,1\na blue square,2\n")
    settings = GenerationSettings(num_inference_steps=2, guidance_scale=4.0, batch_size=2)
    options = MetricOptions(clip_model=str(save_tiny_clip(tmp_path / "clip")))
    evaluate_models(
        [str(base), str(out)],
        prompts,
        tmp_path / "eval",
        metrics=["clip"],
        settings=settings,
        options=options,
        device="cpu",
    )
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert list(report["results"]) == ["sdxl", "erased"]
    assert all(r["clip"]["num_images"] == 2 for r in report["results"].values())


def test_sdxl_noxattn_lora_round_trips_through_the_kohya_layout():
    """noxattn on SDXL leaves out add_embedding (the pooled text path, which kohya's names cannot carry): the
    kohya state dict loaded by diffusers' own kohya loader reproduces the LoRA UNet's predictions."""
    trained = build_tiny_sdxl_pipeline(0)
    params = add_erasure_lora(trained.unet, ErasureLoraConfig(rank=2, target="noxattn"))
    assert not any("add_embedding" in name for name in trained.unet.peft_config["erasure"].target_modules)
    with torch.no_grad():
        for p in params:
            p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(p.shape))))
    loaded = build_tiny_sdxl_pipeline(0)
    loaded.load_lora_weights(kohya_lora_state_dict(trained.unet, "erasure"))
    conditioning = STABLE_DIFFUSION_XL.encode_prompts(trained, ["a red circle"], CPU, 32)
    x_t, t = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([400])
    with torch.no_grad():
        want, got = (denoise(p.unet, x_t, t, conditioning) for p in (trained, loaded))
        base = denoise(build_tiny_sdxl_pipeline(0).unet, x_t, t, conditioning)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert float((want - base).abs().max()) > 1e-3


def test_sdxl_robust_erasure_on_both_text_encoders_resumes_exactly_and_loads(tmp_path):
    """--robust with --lora_on both on SDXL: prefixes searched in both encoders' spaces against the current model,
    an adversarial player in the bargain, the LoRA on the UNet and both text encoders; a resumed run ends where the
    uninterrupted one does; the folder (both encoders fused) equals base + the diffusers LoRA and + the kohya file."""
    base = tmp_path / "sdxl"
    build_tiny_sdxl_pipeline(0).save_pretrained(base)
    robust = ("--robust", "--adversarial_every", "2", "--adversarial_steps", "2", "--adversarial_tokens", "2")
    extra = (*robust, "--lora_on", "both", "--checkpointing_steps", "6")
    log = _erase(base, tmp_path / "full", *extra)
    assert all("weight/adversarial" in r and "attack_loss/adversarial" in r for r in log)
    assert any(r["weight/adversarial"] > 0 for r in log)
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "checkpoint-6", resumed / "checkpoints" / "checkpoint-6")
    _erase(base, resumed, *extra, "--resume_from_checkpoint", "latest")
    a = load_file(str(tmp_path / "full" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(resumed / "pytorch_lora_weights.safetensors"))
    assert {key.split(".")[0] for key in a} == {"unet", "text_encoder", "text_encoder_2"}
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)

    out = tmp_path / "full"
    fused = StableDiffusionXLPipeline.from_pretrained(out)
    reference = StableDiffusionXLPipeline.from_pretrained(base)
    for part in ("text_encoder", "text_encoder_2"):  # both encoders were trained and fused
        trained, original = getattr(fused, part).state_dict(), getattr(reference, part).state_dict()
        assert any(not torch.equal(w, original[n]) for n, w in trained.items())
    fused_images = _images(fused)
    reference.load_lora_weights(out)
    assert np.abs(_images(reference) - fused_images).max() < 1e-4
    kohya = StableDiffusionXLPipeline.from_pretrained(base)
    kohya.load_lora_weights(out, weight_name=KOHYA_LORA_WEIGHT_NAME)
    assert np.abs(_images(kohya) - fused_images).max() < 1e-4
    prefixes = {key.split("_text_model")[0] for key in load_file(str(out / KOHYA_LORA_WEIGHT_NAME)) if "_te" in key}
    assert prefixes == {"lora_te1", "lora_te2"}
