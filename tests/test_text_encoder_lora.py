"""The erasure LoRA on the text encoder (``--lora_on text_encoder|both``, AdvUnlearn's place for robust erasure):
the rows' contexts encoded again with the LoRA, exact per-player gradients from the fast path, an exactly zero
preservation loss at the identity, bit-identical resume, and a folder that loads every way with the text encoder's
erasure included."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline
from safetensors.torch import load_file

import train_erase
from munba_diffusion.adversarial import encode_with_prefix, prefixed_input_ids
from munba_diffusion.diffusion.family import STABLE_DIFFUSION
from munba_diffusion.diffusion.latents import LatentBatch, RowTokens
from munba_diffusion.diffusion.lora import ErasureLoraConfig, adapters_disabled, add_erasure_loras
from munba_diffusion.diffusion.players import ErasureBatch, TextLora, erasure_players
from munba_diffusion.diffusion.train import trained_module
from munba_diffusion.models import DEMO_MODEL, resolve_model_path
from munba_diffusion.pipelines.munba import KOHYA_LORA_WEIGHT_NAME, MunbaPipeline
from munba_diffusion.row_gradients import RowGroupGradients
from munba_diffusion.step import PlayerGradientSource
from tests.tiny_sd import build_tiny_sd_pipeline

torch.set_num_threads(1)

CPU = torch.device("cpu")
NAMES = ["preserve", "forget", "adversarial"]
RTOL = 1e-5
PREFIX = 2


def lora_pipeline(modules: str, *, identity: bool = False):
    """The tiny SD pipeline with the erasure LoRA on ``modules``, moved off the identity unless ``identity``."""
    pipe = build_tiny_sd_pipeline(seed=2)
    params = add_erasure_loras(pipe, ErasureLoraConfig(rank=2, target="attn", modules=modules))
    if not identity:
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in params:
                p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return pipe, params


def three_players(pipe) -> tuple[ErasureBatch, torch.Tensor]:
    """preserve (3 rows), forget (2) and adversarial (2 rows, soft prefixes), with the teacher's contexts and the
    rows' tokens, as the data and the adversary build them."""
    generator = torch.Generator().manual_seed(0)

    def rows(b):
        return LatentBatch(
            torch.arange(b),
            torch.randn(b, 4, 16, 16, generator=generator),
            torch.randint(0, 1000, (b,), generator=generator),
        )

    def teacher(ids):
        with torch.no_grad(), adapters_disabled(pipe.text_encoder):
            return pipe.text_encoder(ids)[0]

    keep = STABLE_DIFFUSION.token_ids(pipe, ["a blue square", "a green circle", "a red square"])
    forget = STABLE_DIFFUSION.token_ids(pipe, ["a red circle", "a photo of a red circle"])
    adversarial = prefixed_input_ids(pipe.tokenizer, ["a red circle", "a red circle"], PREFIX)
    prefixes = torch.randn(2, PREFIX, pipe.text_encoder.config.hidden_size, generator=generator)
    with torch.no_grad():
        adversarial_ctx = encode_with_prefix(pipe.text_encoder, adversarial, prefixes)
    forget_rows, adversarial_rows = rows(2), rows(2)
    batch = ErasureBatch(
        forget=[(forget_rows, teacher(forget), teacher(forget))],
        preserve=(rows(3), teacher(keep)),
        adversarial=[(adversarial_rows, teacher(forget), teacher(forget), adversarial_ctx)],
        tokens={
            "preserve": RowTokens(keep),
            "forget/0": RowTokens(forget),
            "adversarial/0": RowTokens(adversarial, prefixes),
        },
    )
    return batch, teacher(STABLE_DIFFUSION.token_ids(pipe, [""]))


def players_of(pipe, modules: str, batch, uncond, loss: str = "esd"):
    return erasure_players(
        pipe.unet,
        batch,
        uncond,
        loss,
        0.5,
        NAMES,
        CPU,
        torch.float32,
        text_lora=TextLora(pipe, STABLE_DIFFUSION, 32),
        lora_module=trained_module(pipe, ErasureLoraConfig(modules=modules)),
    )


def relative_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    num = sum(float((a.double() - b.double()).pow(2).sum()) for a, b in zip(got, want))
    return (num / sum(float(b.double().pow(2).sum()) for b in want)) ** 0.5


def test_a_prefix_replaces_the_slots_of_the_chosen_rows_only():
    pipe = build_tiny_sd_pipeline(seed=0)
    ids = prefixed_input_ids(pipe.tokenizer, ["a red circle", "a blue square"], PREFIX)
    prefix = torch.randn(2, PREFIX, pipe.text_encoder.config.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = pipe.text_encoder(ids)[0]
        everywhere = encode_with_prefix(pipe.text_encoder, ids, prefix)
        second_only = encode_with_prefix(pipe.text_encoder, ids, prefix, torch.tensor([False, True]))
    assert torch.equal(second_only[0], plain[0]) and torch.equal(second_only[1], everywhere[1])
    assert not torch.allclose(everywhere[1], plain[1])


@pytest.mark.parametrize(("modules", "loss"), [("text_encoder", "esd"), ("both", "esd"), ("both", "anchor")])
def test_fast_gradients_equal_the_per_player_passes_with_a_text_encoder_lora(modules, loss):
    """One text-encoder call and one UNet forward over all rows (adversarial rows with their prefixes), one
    backward: every player's gradient of the UNet's and the text encoder's LoRA, as one pass per player gives."""
    pipe, params = lora_pipeline(modules)
    batch, uncond = three_players(pipe)
    players = players_of(pipe, modules, batch, uncond, loss)
    fast, fast_values = PlayerGradientSource("fast")(players, params, loss_scale=2.0)
    reference, values = PlayerGradientSource("per_player")(players, params, loss_scale=2.0)
    text_params = {id(p) for p in pipe.text_encoder.parameters() if p.requires_grad}
    for name in NAMES:
        assert relative_error(fast[name], reference[name]) < RTOL, name
        assert fast_values[name] == pytest.approx(values[name], rel=RTOL)
        text_grads = [g for p, g in zip(params, fast[name]) if id(p) in text_params]
        assert text_grads and any(float(g.abs().max()) > 0 for g in text_grads)  # the text encoder really trains
    assert RowGroupGradients(trained_module(pipe, ErasureLoraConfig(modules=modules)), params).fallback == []


@pytest.mark.parametrize("source", ["fast", "per_player"])
def test_identity_text_encoder_lora_keeps_the_preservation_loss_exactly_zero(source):
    """The teacher encodes the same rows in the same call shape with the adapter off: no rounding-noise player."""
    pipe, params = lora_pipeline("both", identity=True)
    batch, uncond = three_players(pipe)
    grads, values = PlayerGradientSource(source)(players_of(pipe, "both", batch, uncond), params)
    assert values["preserve"] == 0.0
    assert all(float(g.abs().max()) == 0 for g in grads["preserve"])
    assert values["forget"] > 0 and any(float(g.abs().max()) > 0 for g in grads["forget"])


FAST = [
    *("--sampler_steps", "2", "--pool_trajectories", "1", "--train_batch_size", "2"),
    *("--validation_inference_steps", "1", "--validation_seeds", "1", "--no_evaluation"),
    *("--learning_rate", "1e-2", "--sampler_guidance_scale", "4", "--lora_on", "text_encoder"),
    *("--robust", "--adversarial_every", "2", "--adversarial_steps", "3", "--adversarial_tokens", "2"),
    *("--checkpointing_steps", "3"),
]


def _run(out, steps, *extra):
    args = ["--pretrained_model_name_or_path", DEMO_MODEL, "--concept", "red", "--output_dir", str(out)]
    train_erase.main([*args, "--max_train_steps", str(steps), *FAST, *extra])


def _images(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    return pipe("a red circle", num_inference_steps=4, generator=generator, output_type="np").images


@pytest.fixture(scope="module")
def text_encoder_erasure(tmp_path_factory):
    root = tmp_path_factory.mktemp("te_lora")
    _run(root / "full", 6)
    return root


def test_text_encoder_erasure_resumes_exactly(text_encoder_erasure, tmp_path):
    full = text_encoder_erasure / "full"
    record = json.loads((full / "erasure_config.json").read_text())
    assert record["lora_on"] == "text_encoder" and record["run"]["target_modules"] == []
    assert record["run"]["text_encoder_target_modules"] == ["k_proj", "out_proj", "q_proj", "v_proj"]
    checkpoint = full / "checkpoints" / "checkpoint-3"
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(checkpoint, resumed / "checkpoints" / "checkpoint-3")
    _run(resumed, 6, "--resume_from_checkpoint", "latest")
    a = load_file(str(full / "pytorch_lora_weights.safetensors"))
    b = load_file(str(resumed / "pytorch_lora_weights.safetensors"))
    assert a and all(key.startswith("text_encoder.") for key in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


def test_text_encoder_erasure_loads_every_way(text_encoder_erasure):
    folder = text_encoder_erasure / "full"
    base_path = resolve_model_path(DEMO_MODEL)
    base = StableDiffusionPipeline.from_pretrained(base_path, safety_checker=None)
    fused = StableDiffusionPipeline.from_pretrained(folder)
    for name, weight in fused.unet.state_dict().items():  # only the text encoder was trained
        assert torch.equal(weight, base.unet.state_dict()[name])
    assert any(
        not torch.equal(w, base.text_encoder.state_dict()[n]) for n, w in fused.text_encoder.state_dict().items()
    )
    base_images, fused_images = _images(base), _images(fused)
    assert np.abs(fused_images - base_images).max() > 0.05  # the text encoder's erasure changes the image

    base.load_lora_weights(folder)  # stock diffusers, the diffusers-layout file
    assert np.abs(_images(base) - fused_images).max() < 1e-4
    kohya = StableDiffusionPipeline.from_pretrained(base_path, safety_checker=None)
    kohya.load_lora_weights(folder, weight_name=KOHYA_LORA_WEIGHT_NAME)  # the ComfyUI / A1111 file
    assert np.abs(_images(kohya) - fused_images).max() < 1e-4
    assert all(key.startswith("lora_te_text_model_") for key in load_file(str(folder / KOHYA_LORA_WEIGHT_NAME)))

    munba = MunbaPipeline.from_pretrained(folder)
    munba.erasure_scale = 0  # the fused text encoder's LoRA loaded with weight -1
    assert np.abs(_images(munba) - base_images).max() < 1e-4
    remote = DiffusionPipeline.from_pretrained(folder, custom_pipeline="munba", trust_remote_code=True)
    assert remote.erased_concepts == ["red"]
    on_base = MunbaPipeline.from_pretrained(base_path).load_erasure(folder)
    assert np.abs(_images(on_base) - fused_images).max() < 1e-4
    on_base.erasure_scale = 0
    np.testing.assert_array_equal(_images(on_base), base_images)  # adapter off: exactly the base model
