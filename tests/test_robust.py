"""The robust erasure mode (--robust): the adversarial prefix search, the adversarial player, exact resume."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import train_erase
from munba_diffusion.diffusion.adversary import CHECKPOINT_NAME, Adversary, AdversarySettings
from munba_diffusion.diffusion.config import ErasureTrainingConfig
from munba_diffusion.diffusion.latents import LatentBatch
from munba_diffusion.models import DEMO_MODEL

from .tiny_sd import add_random_lora, build_tiny_sd_pipeline

FAST = [
    *("--sampler_steps", "2", "--pool_trajectories", "1", "--train_batch_size", "2"),
    *("--validation_inference_steps", "1", "--validation_seeds", "1", "--no_evaluation"),
    *("--lora_target", "attn", "--learning_rate", "1e-3", "--sampler_guidance_scale", "4"),
    *("--robust", "--adversarial_every", "2", "--adversarial_steps", "3", "--adversarial_tokens", "2"),
    *("--checkpointing_steps", "3"),
]


class FixedRows:
    """A latent source that always gives the same rows."""

    def __init__(self, latents: torch.Tensor):
        self.latents = latents

    def sample(self, batch_size: int, generator: torch.Generator) -> LatentBatch:
        n = len(self.latents)
        return LatentBatch(torch.zeros(n, dtype=torch.long), self.latents, torch.tensor([500] * n))


def test_prefix_search_makes_the_erased_model_predict_the_concept_again():
    """The search lowers || f_theta(x_t, P ++ c) - f_0(x_t, c) ||^2, and keeps only the newest prefixes."""
    pipe = build_tiny_sd_pipeline(seed=0)
    for part in (pipe.unet, pipe.text_encoder, pipe.vae):
        part.requires_grad_(False)
    add_random_lora(pipe, strength=0.5)  # the "erased" model differs from the original (adapters off)
    prompts = ["a red circle", "a photo of a red circle"]
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        contexts = pipe.text_encoder(ids)[0]
    settings = AdversarySettings(tokens=3, every=1, steps=15, lr=0.05, kept=2)
    adversary = Adversary(pipe, [prompts], settings, torch.device("cpu"))
    source = FixedRows(torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)))
    losses = []
    original_search = adversary.search.run

    def recording_run(soft, loss, iterations, **kwargs):
        result = original_search(soft, loss, iterations, **kwargs)
        losses.append(result)
        return result

    adversary.search.run = recording_run
    for step in range(3):
        adversary.refresh(pipe.unet, [source], [contexts], seed=0, step=step, batch_size=2, dtype=torch.float32)
    assert losses[0][-1] < losses[0][0]  # the first search lowers its loss
    assert losses[1][0] < losses[0][0]  # later searches start from the last prefix
    assert len(adversary.banks[0]) == 2  # only the newest prefixes are kept
    lora_grads = [p.grad for n, p in pipe.unet.named_parameters() if "lora" in n]
    assert all(g is None for g in lora_grads)  # the search leaves the model's gradients alone
    rows = source.sample(2, torch.Generator())
    adversarial = adversary.contexts(0, rows, adversary.draw(0, 2, torch.Generator().manual_seed(1)))
    assert adversarial.shape == contexts.shape and not torch.allclose(adversarial, contexts)

    restored = Adversary(pipe, [prompts], settings, torch.device("cpu"))
    restored.load_state_dict(adversary.state_dict())
    for a, b in zip(restored.banks[0], adversary.banks[0]):
        assert torch.equal(a, b)


def test_robust_needs_a_weighted_adversarial_player_and_its_own_flag():
    names = ErasureTrainingConfig(concepts=["red", "blue"], output_dir="out", robust=True).player_names()
    assert names == ["preserve", "forget:red", "forget:blue", "adversarial:red", "adversarial:blue"]
    with pytest.raises(ValueError, match="add --robust"):
        ErasureTrainingConfig(concepts=["red"], output_dir="out", adversarial_every=3)
    with pytest.raises(ValueError, match="zero weight on every adversarial player"):
        ErasureTrainingConfig(
            concepts=["red"], output_dir="out", robust=True, combiner="sum", combiner_weights=[1.0, 1.0, 0.0]
        )


def _run(out, steps, *extra):
    args = ["--pretrained_model_name_or_path", DEMO_MODEL, "--concept", "red", "--output_dir", str(out)]
    train_erase.main([*args, "--max_train_steps", str(steps), *FAST, *extra])


def test_robust_erasure_bargains_the_adversarial_player_and_resumes_exactly(tmp_path):
    full = tmp_path / "full"
    _run(full, 6)
    records = [json.loads(line) for line in (full / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert all("weight/adversarial" in r and "attack_loss/adversarial" in r for r in records)
    assert any(r["weight/adversarial"] > 0 for r in records)
    checkpoint = full / "checkpoints" / "checkpoint-3"
    bank = load_file(str(checkpoint / CHECKPOINT_NAME))
    assert len(bank) == 2 and all(t.shape == (2, 64) for t in bank.values())  # refreshed at steps 0 and 2
    assert json.loads((full / "erasure_config.json").read_text())["run"]["players"][-1] == "adversarial"

    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(checkpoint, resumed / "checkpoints" / "checkpoint-3")
    (resumed / "logs").mkdir()
    lines = (full / "logs" / "train_log.jsonl").read_text().splitlines()[:3]
    (resumed / "logs" / "train_log.jsonl").write_text("".join(line + "\n" for line in lines))
    _run(resumed, 6, "--resume_from_checkpoint", "latest")
    a = load_file(str(full / "pytorch_lora_weights.safetensors"))
    b = load_file(str(resumed / "pytorch_lora_weights.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
