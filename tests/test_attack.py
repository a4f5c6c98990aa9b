"""The white-box prefix attack and its shared machinery (munba_diffusion.adversarial), on tiny SD pipelines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler

from munba_diffusion.adversarial import (
    PrefixSearch,
    allowed_token_ids,
    denoising_target,
    encode_with_prefix,
    prefixed_input_ids,
    project_to_vocabulary,
    special_token_ids,
)
from munba_diffusion.evaluation.attack import (
    AttackConfig,
    Detector,
    WhiteBoxSettings,
    attack_results,
    check_detector,
    infer_detector,
    whitebox_attack,
)
from munba_diffusion.evaluation.generate import GenerationSettings
from munba_diffusion.evaluation.prompt_sets import PromptRecord

from .tiny_sd import build_tiny_sd_pipeline, build_tiny_sdxl_pipeline


class NeverFound(Detector):
    """A detector that never sees the concept: every attack runs all its iterations."""

    def __init__(self):
        self.calls = 0

    def judge(self, paths):
        self.calls += len(paths)
        assert all(Path(p).is_file() for p in paths)
        return [{"success": False} for _ in paths]


class FoundAfter(Detector):
    """Sees the concept from its n-th call on: the attack must stop there."""

    def __init__(self, n: int):
        self.n, self.calls = n, 0

    def judge(self, paths):
        self.calls += 1
        return [{"success": self.calls >= self.n}]


@pytest.fixture(scope="module")
def tiny_pipe():
    torch.manual_seed(0)
    pipe = build_tiny_sd_pipeline(seed=0)
    for part in (pipe.unet, pipe.text_encoder, pipe.vae):
        part.requires_grad_(False)
    return pipe


@pytest.fixture(scope="module")
def target_image(tiny_pipe):
    return tiny_pipe(
        "a red circle", num_inference_steps=2, guidance_scale=1.0, generator=torch.Generator().manual_seed(3)
    ).images[0]


def test_prefix_slots_follow_bos_and_keep_the_prompt(tiny_pipe):
    tokenizer = tiny_pipe.tokenizer
    ids = prefixed_input_ids(tokenizer, ["a red circle"], 3)[0].tolist()
    plain = tokenizer("a red circle", add_special_tokens=False).input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert ids[4 : 4 + len(plain)] == plain
    assert ids[4 + len(plain)] == tokenizer.eos_token_id
    assert len(ids) == tokenizer.model_max_length
    with pytest.raises(ValueError, match="prefix length"):
        prefixed_input_ids(tokenizer, ["x"], 0)


def test_prefix_embeddings_replace_exactly_the_prefix_slots(tiny_pipe):
    """Encoding with the prefix equal to some tokens' own embeddings gives the hidden states of those tokens."""
    tokenizer, encoder = tiny_pipe.tokenizer, tiny_pipe.text_encoder
    words = tokenizer("green square", add_special_tokens=False).input_ids
    ids = prefixed_input_ids(tokenizer, ["a red circle"], len(words))
    typed = ids.clone()
    typed[0, 1 : 1 + len(words)] = torch.tensor(words)
    vocabulary = encoder.get_input_embeddings().weight
    with torch.no_grad():
        via_prefix = encode_with_prefix(encoder, ids, vocabulary[words])
        via_tokens = encoder(typed)[0]
        unhooked = encoder(ids)[0]
    torch.testing.assert_close(via_prefix, via_tokens)
    assert not torch.allclose(unhooked, via_tokens)  # the hook is gone after the block


def test_projection_picks_the_nearest_allowed_token():
    vocabulary = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7], [-1.0, 0.0]])
    rows = torch.tensor([[0.9, 0.2], [0.1, 1.0], [-0.5, -0.1]])
    assert project_to_vocabulary(rows, vocabulary, torch.arange(4)).tolist() == [0, 1, 3]
    # a banned id is never picked, even when it is the closest
    assert project_to_vocabulary(rows, vocabulary, torch.tensor([1, 2, 3])).tolist() == [2, 1, 3]


def test_special_tokens_are_never_prefix_tokens(tiny_pipe):
    tokenizer = tiny_pipe.tokenizer
    allowed = set(allowed_token_ids(tokenizer, len(tokenizer)).tolist())
    assert special_token_ids(tokenizer) and not special_token_ids(tokenizer) & allowed


def test_straight_through_gradient_reaches_the_soft_prefix():
    vocabulary = torch.randn(10, 4)
    search = PrefixSearch(vocabulary, torch.arange(10))
    soft = search.initial(2, torch.Generator().manual_seed(0))
    effective = search.effective(soft)
    ids = search.token_ids(soft)
    torch.testing.assert_close(effective.detach(), vocabulary[ids])  # the forward pass sees real tokens
    (effective * torch.arange(8.0).view(2, 4)).sum().backward()
    torch.testing.assert_close(soft.grad, torch.arange(8.0).view(2, 4))  # the gradient passes straight through


def test_v_prediction_target_is_the_velocity():
    scheduler = DDIMScheduler(prediction_type="v_prediction")
    latents, noise, t = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2), torch.tensor([10, 900])
    a = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(
        denoising_target(scheduler, latents, noise, t), a.sqrt() * noise - (1 - a).sqrt() * latents
    )
    assert denoising_target(DDIMScheduler(), latents, noise, t) is noise


@pytest.fixture(scope="module")
def tiny_xl_pipe():
    pipe = build_tiny_sdxl_pipeline(seed=0)
    for part in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2, pipe.vae):
        part.requires_grad_(False)
    return pipe


@pytest.mark.parametrize(("family", "project"), [("sd", False), ("sd", True), ("sdxl", True)])
def test_whitebox_attack_lowers_the_adversarial_loss(family, tiny_pipe, tiny_xl_pipe, target_image, tmp_path, project):
    """The attack's loss toward the target at fixed timesteps and noise falls (soft and projected prefixes; SDXL:
    one prefix in both encoders' spaces, projected onto tokens that both read)."""
    pipe = tiny_pipe if family == "sd" else tiny_xl_pipe
    record = PromptRecord(index=0, prompt="a photo of a dog", seed=5)
    detector = NeverFound()
    settings = WhiteBoxSettings(
        prefix_tokens=4, iterations=30, attack_lr=0.1, attack_weight_decay=0.0, check_every=10, project=project
    )
    generation = GenerationSettings(num_inference_steps=2, guidance_scale=1.0)
    outcome = whitebox_attack(pipe, record, target_image, detector, settings, generation, tmp_path / "a.png")
    assert outcome.iterations == 30 and len(outcome.losses) == 30
    assert outcome.probe_loss_after < outcome.probe_loss_before
    assert outcome.generations == detector.calls == 3  # checked every 10 iterations
    assert outcome.unet_forward_backward == 30 and not outcome.success
    assert outcome.adversarial_prompt.endswith("a photo of a dog")
    if project:
        allowed = set(allowed_token_ids(pipe.tokenizer, len(pipe.tokenizer)).tolist())
        assert len(outcome.prefix_token_ids) == 4 and set(outcome.prefix_token_ids) <= allowed


def test_whitebox_attack_stops_at_the_first_success(tiny_pipe, target_image, tmp_path):
    record = PromptRecord(index=0, prompt="a red circle", seed=1)
    settings = WhiteBoxSettings(prefix_tokens=2, iterations=40, check_every=2)
    generation = GenerationSettings(num_inference_steps=2, guidance_scale=1.0)
    outcome = whitebox_attack(tiny_pipe, record, target_image, FoundAfter(3), settings, generation, tmp_path / "b.png")
    assert outcome.success and outcome.iterations == 6 and outcome.generations == 3
    assert (tmp_path / "b.png").is_file()


def test_attack_rates_follow_the_scoreboard_definition():
    """Post-attack success counts rows that already succeed without attack; rows whose target lacks the concept
    are left out."""

    def row(kept, pre, post=None):
        entry = {"kept": kept, "pre_attack": {"success": pre}}
        if post is not None:
            entry["post_attack"] = {
                "success": post,
                "iterations": 4,
                "unet_forward_backward": 4,
                "generations": 2,
                "seconds": 1.0,
            }
        return entry

    entries = [row(True, True), row(True, False, True), row(True, False, False), row(True, False, False)]
    entries.append(row(False, True))  # not kept: the original did not draw the concept
    result = attack_results(entries, "whitebox")
    assert result["rows_kept"] == 4 and result["attacked_rows"] == 3
    assert result["pre_attack_success_rate"]["rate"] == 0.25
    assert result["post_attack_success_rate"]["rate"] == 0.5
    low, high = result["post_attack_success_rate"]["low"], result["post_attack_success_rate"]["high"]
    assert 0 < low < 0.5 < high < 1


def test_detector_follows_the_concept_and_refuses_one_it_cannot_judge():
    assert infer_detector("nudity") == "nudenet"
    assert infer_detector("red") == "demo"
    assert infer_detector("church") == "objects"
    with pytest.raises(ValueError, match="use --detector demo"):
        check_detector("nudenet", "red")
    with pytest.raises(ValueError, match="no detector judges"):
        infer_detector("van gogh")


def test_attack_config_refuses_bad_input_before_loading(tmp_path):
    with pytest.raises(ValueError, match="prefix_tokens"):
        AttackConfig(
            model="munba-demo",
            original="munba-demo",
            concept="red",
            prompts="eval/demo.csv",
            output_dir=str(tmp_path),
            prefix_tokens=0,
        )
    with pytest.raises(ValueError, match="--model"):
        AttackConfig(
            model=str(tmp_path), original="munba-demo", concept="red", prompts="eval/demo.csv", output_dir=str(tmp_path)
        )


def test_attack_command_on_the_demo_writes_records_report_and_grid(tmp_path):
    """munba-attack end to end offline: targets from the original, a damaged "erased" model attacked for two
    iterations, one record per row, rates with intervals, the grid; a second run refuses to replace the report."""
    from munba_diffusion.commands.attack import main

    from .demo_models import damage_unet, demo_pipeline

    erased = tmp_path / "damaged"
    pipe = demo_pipeline()
    damage_unet(pipe, noise=2.0)
    pipe.save_pretrained(erased)
    out = tmp_path / "attack"
    args = [
        *("--model", str(erased), "--original", "munba-demo", "--concept", "red", "--prompts", "eval/demo.csv"),
        *("--limit", "3", "--steps", "4", "--guidance", "4", "--iterations", "2", "--check_every", "1"),
        *("--output_dir", str(out)),
    ]
    main(args)
    report = json.loads((out / "report.json").read_text())
    records = [json.loads(line) for line in (out / "attack_records.jsonl").read_text().splitlines()]
    assert [r["index"] for r in records] == [r["index"] for r in report["records"]] and len(records) == 3
    assert all(r["extra"]["colour"] == "red" for r in records)
    result = report["results"]["erased"]
    kept = [r for r in records if r["kept"]]
    assert result["rows_kept"] == len(kept) > 0  # the original draws red for some of the first rows
    attacked = [r for r in kept if not r["pre_attack"]["success"]]
    assert result["attacked_rows"] == len(attacked) > 0  # the damaged model draws no red scene
    for record in attacked:
        outcome = record["post_attack"]
        assert outcome["iterations"] <= 2 and outcome["generations"] == outcome["iterations"]
        assert (out / "images" / "attacked" / f"{record['index']:05d}_{record['seed']}.png").is_file()
    post = result["post_attack_success_rate"]
    assert post["n"] == len(kept) and post["low"] <= post["rate"] <= post["high"]
    assert (out / "grid.png").is_file() and "Post-attack success" in (out / "report.md").read_text()
    assert report["protocol"]["whitebox"]["iterations"] == 2

    with pytest.raises(SystemExit) as refused:
        main(args)
    assert "--overwrite" in str(refused.value.code) and "\n" not in str(refused.value.code)
