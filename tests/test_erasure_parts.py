"""Unit tests of the erasure building blocks: presets, LoRA target sets, losses, the trajectory pool."""

from __future__ import annotations

import pytest
import torch

from munba_diffusion.diffusion.config import ErasureTrainingConfig
from munba_diffusion.diffusion.latents import LatentBatch, SamplerSettings, TrajectoryPool, ddim_trajectory
from munba_diffusion.diffusion.lora import ErasureLoraConfig, adapters_disabled, add_erasure_lora, target_module_names
from munba_diffusion.diffusion.losses import esd_target, forget_loss, preservation_loss
from munba_diffusion.diffusion.players import ErasureBatch, erasure_player_gradients
from munba_diffusion.presets import list_presets, load_preset, resolve_concept
from tests.tiny_sd import build_tiny_sd_pipeline


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_sd_pipeline(seed=0)


def test_bundled_presets_cover_the_required_concepts():
    names = set(list_presets())
    imagenette = {
        "tench",
        "english-springer",
        "cassette-player",
        "chain-saw",
        "church",
        "french-horn",
        "garbage-truck",
        "gas-pump",
        "golf-ball",
        "parachute",
    }
    assert {"nudity", "van-gogh", "circle", "square", "triangle", "cross", "red"} <= names
    assert imagenette <= names
    for name in names:
        preset = load_preset(name)
        assert preset.forget_prompts and preset.preserve_prompts, name
        assert not set(preset.forget_prompts) & set(preset.preserve_prompts), name
        # every bundled concept names its neighbours, so --neighbour_player works on each (issue 19)
        assert preset.neighbour_prompts and not set(preset.forget_prompts) & set(preset.neighbour_prompts), name


def test_demo_shape_preset_holds_out_a_synonym():
    circle = load_preset("circle")
    assert any("disc" in p for p in circle.forget_prompts)
    assert not any("round shape" in p for p in circle.forget_prompts)  # kept for concept-level evaluation
    assert not any("circle" in p or "disc" in p for p in circle.preserve_prompts)


def test_substitutes_pair_each_forget_prompt_with_each_of_its_substitutes(tmp_path):
    path = tmp_path / "subs.yaml"
    path.write_text(
        "name: subs\nforget: [a red circle, a red square]\npreserve: [a cross]\nanchor: [a circle, a square]\n"
        "substitutes: [[a blue circle, a green circle], a blue square]\n"
    )
    preset = resolve_concept(str(path))
    assert preset.training_pairs("substitute") == (
        ("a red circle", "a red circle", "a red square"),
        ("a blue circle", "a green circle", "a blue square"),
    )
    for loss in ("esd", "anchored_esd", "anchor"):  # the other targets keep the anchors
        assert preset.training_pairs(loss) == (("a red circle", "a red square"), ("a circle", "a square"))
    plain = tmp_path / "plain.yaml"
    plain.write_text("name: plain\nforget: [a red circle]\nanchor: a circle\n")
    assert resolve_concept(str(plain)).training_pairs("substitute") == (("a red circle",), ("a circle",))
    overridden = ErasureTrainingConfig(
        concepts=[str(tmp_path / "subs.yaml")], output_dir=tmp_path / "run", anchor_prompt="an object"
    ).concepts[0]
    assert overridden.training_pairs("substitute")[1] == ("an object", "an object")  # a named anchor wins


def test_erasing_two_concepts_composes_their_substitutes(tmp_path):
    """red + circle under ``substitute``: red's "a blue circle" is circle's forget prompt, so "a red circle" is
    replaced by circle's substitutes of red's substitutes (every colour-but-red x shape-but-circle), and no
    substitute left is a forget prompt of either concept; other targets and a single concept are untouched."""
    together = ErasureTrainingConfig(
        concepts=["red", "circle"], output_dir=tmp_path / "run", forget_loss="substitute"
    ).concepts
    red, circle = ({f: set(s) for f, s in zip(c.forget_prompts, c.substitute_prompts)} for c in together)
    both = {
        f"a {colour} {shape}" for colour in ("green", "blue", "yellow") for shape in ("square", "triangle", "cross")
    }
    assert red["a red circle"] == both == circle["a red circle"]
    assert red["a red square"] == {"a green square", "a blue square", "a yellow square"}  # no circle to compose
    assert circle["a blue circle"] == {"a blue square", "a blue triangle", "a blue cross"}
    forget = {p for c in together for p in c.forget_prompts}
    assert not forget & {s for c in together for subs in c.substitute_prompts for s in subs}
    alone = ErasureTrainingConfig(concepts=["red"], output_dir=tmp_path / "one", forget_loss="substitute").concepts
    assert alone == [load_preset("red")]
    esd = ErasureTrainingConfig(concepts=["red", "circle"], output_dir=tmp_path / "esd").concepts
    assert esd == [load_preset("red"), load_preset("circle")]


def test_free_text_and_yaml_concepts(tmp_path):
    text = resolve_concept("text:a teddy bear")
    assert text.forget_prompts[0] == "a teddy bear" and text.source == "text"
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\nforget: [a thing]\npreserve: [another thing]\nanchor: an object\n")
    mine = resolve_concept(str(path))
    assert mine.anchor_prompts == ("an object",)
    path.write_text("name: broken\n")
    with pytest.raises(ValueError, match="not a concept preset"):
        resolve_concept(str(path))


def test_neighbours_are_preserved_or_their_own_player():
    folded = ErasureTrainingConfig(concepts=["red"], output_dir="unused")
    own = ErasureTrainingConfig(concepts=["red"], output_dir="unused", neighbour_player=True)
    neighbours = load_preset("red").neighbour_prompts
    assert neighbours and set(neighbours) <= set(folded.preserve_prompts())
    assert folded.player_names() == ["preserve", "forget"]
    assert own.player_names() == ["preserve", "neighbours", "forget"]
    assert own.neighbour_prompts() == list(neighbours) and not set(neighbours) & set(own.preserve_prompts())
    with pytest.raises(ValueError, match="needs neighbours"):
        ErasureTrainingConfig(concepts=["text:a teddy bear"], output_dir="unused", neighbour_player=True)


def test_anchored_esd_target_removes_only_what_the_concept_adds():
    """With predictions known in closed form: eps(anchor)=a, eps(concept)=a+delta -> target a - eta*delta, so only
    the concept's own contribution delta is reversed; esd reverses everything the prompt adds to the empty one."""
    uncond, anchor, delta = torch.tensor([0.0, 0.0]), torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.0])
    concept = anchor + delta
    torch.testing.assert_close(esd_target(anchor, concept, 2.0), anchor - 2.0 * delta)  # anchored_esd
    torch.testing.assert_close(esd_target(uncond, concept, 2.0), -2.0 * concept)  # esd: the anchor's part goes too


def test_preserve_prompts_of_several_concepts_drops_what_another_forgets():
    circle, square = load_preset("circle"), load_preset("square")
    preserve = ErasureTrainingConfig(concepts=[circle, square], output_dir="unused").preserve_prompts()
    assert "a red square" not in preserve and "a red circle" not in preserve
    assert "a red triangle" in preserve


@pytest.mark.parametrize(
    "target,inside,outside",
    [
        ("xattn", ["attn2.to_k"], ["attn1.", "resnets", "time_embedding"]),
        ("attn", ["attn1.to_q", "attn2.to_v"], ["resnets", "proj_in"]),
        ("noxattn", ["attn1.to_q", "resnets"], ["attn2.", "time_embedding"]),
        ("full", ["attn2.to_k", "resnets", "time_embedding"], []),
    ],
)
def test_lora_target_sets(pipe, target, inside, outside):
    names = target_module_names(pipe.unet, target)
    for part in inside:
        assert any(part in n for n in names), (target, part)
    for part in outside:
        assert not any(part in n for n in names), (target, part)


def test_lora_starts_as_identity_and_adapters_disabled_is_the_frozen_model():
    pipe = build_tiny_sd_pipeline(seed=1)
    unet = pipe.unet
    x, t, ctx = torch.randn(2, 4, 16, 16), torch.tensor([10, 500]), torch.randn(2, 8, unet.config.cross_attention_dim)
    with torch.no_grad():
        original = unet(x, t, ctx).sample
    params = add_erasure_lora(unet, ErasureLoraConfig(rank=2, target="attn"))
    assert params and all(p.requires_grad and p.dtype == torch.float32 for p in params)
    assert not any(p.requires_grad for n, p in unet.named_parameters() if "lora" not in n)
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, ctx).sample, original)  # B = 0 at init
        for p in params:
            p.add_(0.1 * torch.randn_like(p))
        changed = unet(x, t, ctx).sample
        with adapters_disabled(unet):
            frozen = unet(x, t, ctx).sample
    assert (changed - original).abs().max() > 1e-4
    torch.testing.assert_close(frozen, original, rtol=0, atol=0)
    assert all(p.requires_grad for p in params)  # re-enabled afterwards


def test_unknown_target_set_is_a_one_line_error():
    with pytest.raises(ValueError, match="choose one of xattn, noxattn, attn, full"):
        ErasureLoraConfig(target="everything")


def test_esd_target_is_negative_guidance():
    uncond, concept = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 1.0])
    torch.testing.assert_close(esd_target(uncond, concept, eta=1.0), torch.tensor([-1.0, 3.0]))
    torch.testing.assert_close(esd_target(uncond, concept, eta=0.0), uncond)
    student = torch.zeros(2, requires_grad=True)
    loss = forget_loss(student, esd_target(uncond, concept, 1.0))
    loss.backward()
    torch.testing.assert_close(student.grad, torch.tensor([1.0, -3.0]))  # d/ds mean((s - target)^2)


@pytest.mark.parametrize("loss", ["esd", "anchored_esd", "anchor", "substitute"])
def test_player_gradients_match_the_losses_written_out(loss):
    """Four players (preserve, neighbours, two concepts), each with its own rows: the trainer's per-player forwards
    give every player the gradient of its loss as the losses module defines it, computed here from plain forwards."""
    unet = build_tiny_sd_pipeline(seed=2).unet
    params = add_erasure_lora(unet, ErasureLoraConfig(rank=2, target="attn"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # off the zero LoRA, so that no player's gradient is ~0
        for p in params:
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    dim = unet.config.cross_attention_dim

    def rows(b):
        return LatentBatch(
            torch.zeros(b, dtype=torch.long),
            torch.randn(b, 4, 16, 16, generator=gen),
            torch.randint(0, 1000, (b,), generator=gen),
        )

    def ctx(b):
        return torch.randn(b, 8, dim, generator=gen)

    batch = ErasureBatch(
        forget=[(rows(2), ctx(2), ctx(2)), (rows(1), ctx(1), ctx(1))],
        preserve=(rows(3), ctx(3)),
        neighbours=(rows(2), ctx(2)),
    )
    uncond = ctx(1)
    names = ["preserve", "neighbours", "forget:a", "forget:b"]
    grads, values = erasure_player_gradients(
        unet, batch, uncond, loss, 0.5, names, params, torch.device("cpu"), torch.float32, loss_scale=3.0
    )

    def eps(lat, c):
        return unet(lat.latents, lat.timesteps, encoder_hidden_states=c).sample

    for i, name in enumerate(names):
        if name in ("preserve", "neighbours"):
            lat, c = batch.preserve if name == "preserve" else batch.neighbours
            with torch.no_grad(), adapters_disabled(unet):
                target = eps(lat, c)
            expected = preservation_loss(eps(lat, c), target)
        else:
            lat, c, anchor_ctx = batch.forget[i - 2]
            with torch.no_grad(), adapters_disabled(unet):
                reference = {"esd": uncond.expand_as(c), "anchored_esd": anchor_ctx, "substitute": anchor_ctx}.get(loss)
                target = (
                    esd_target(eps(lat, reference), eps(lat, c), 0.5) if reference is not None else eps(lat, anchor_ctx)
                )
            expected = forget_loss(eps(lat, c), target)
        assert values[name] == pytest.approx(float(expected.detach()), rel=1e-4)
        for got, want in zip(grads[i], torch.autograd.grad(3.0 * expected, params, allow_unused=True)):
            torch.testing.assert_close(got, torch.zeros_like(got) if want is None else want, rtol=1e-3, atol=1e-7)
    assert all(any(g.abs().max() > 0 for g in player) for player in grads)


def test_substitute_draws_each_forget_rows_x_t_from_its_own_anchors_trajectories(pipe, tmp_path):
    """``substitute``: the forget pool is the anchors' trajectories, row for row (prompt i's x_t come from anchor i),
    while the LoRA model still sees the forget prompt; ``anchor`` keeps the forget prompts' own trajectories."""
    from munba_diffusion.diffusion.data import build_erasure_data

    preset = tmp_path / "pair.yaml"
    preset.write_text(
        "name: pair\nforget: [a red circle, a red circle]\npreserve: [a square]\n"
        "anchor: [a blue circle, a green circle]\n"
    )

    def data(loss: str, concept: str):
        config = ErasureTrainingConfig(
            concepts=[concept], output_dir=tmp_path / loss, forget_loss=loss, sampler_steps=3, pool_trajectories=2
        )
        return build_erasure_data(config, pipe, pipe.unet, torch.device("cpu"), torch.float32, (4, 16, 16), 32)

    substitute = data("substitute", str(preset))
    ablated = data("anchor", str(preset))
    anchors_as_concept = tmp_path / "anchors.yaml"
    anchors_as_concept.write_text("name: anchors\nforget: [a blue circle, a green circle]\npreserve: [a square]\n")
    reference = data("anchor", str(anchors_as_concept))
    torch.testing.assert_close(substitute.forget_sources[0].latents, reference.forget_sources[0].latents)
    assert not torch.allclose(substitute.forget_sources[0].latents, ablated.forget_sources[0].latents)
    torch.testing.assert_close(substitute.forget_contexts[0], ablated.forget_contexts[0])  # what the LoRA model sees
    torch.testing.assert_close(substitute.anchor_contexts[0], reference.forget_contexts[0])


def test_trajectory_pool_holds_the_sampler_states(pipe):
    from diffusers import DDIMScheduler

    unet = pipe.unet
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    settings = SamplerSettings(steps=4, guidance_scale=3.0, latent_shape=(4, 16, 16))
    contexts = torch.randn(3, 8, unet.config.cross_attention_dim)
    uncond = torch.zeros(1, 8, unet.config.cross_attention_dim)

    def denoise(x, t, ctx):
        return unet(x, t, encoder_hidden_states=ctx).sample

    pool = TrajectoryPool.build(
        denoise,
        scheduler,
        contexts,
        uncond,
        settings,
        per_prompt=2,
        generator=torch.Generator().manual_seed(0),
        device=torch.device("cpu"),
        dtype=torch.float32,
        batch_size=4,
    )
    assert pool.latents.shape == (3, 2, 4, 4, 16, 16)
    assert pool.timesteps.tolist() == [int(t) for t in scheduler.timesteps]
    # the pool's trajectory of prompt 1 equals a direct DDIM run from the same noise
    noise = torch.randn((6, 4, 16, 16), generator=torch.Generator().manual_seed(0))[2:3]
    direct, _ = ddim_trajectory(denoise, scheduler, noise, contexts[1:2], uncond, settings)
    torch.testing.assert_close(pool.latents[1, 0], direct[:, 0], rtol=1e-4, atol=1e-5)
    batch = pool.sample(5, torch.Generator().manual_seed(1))
    assert batch.latents.shape == (5, 4, 16, 16) and set(batch.timesteps.tolist()) <= set(pool.timesteps.tolist())


def _sd14_layout(path):
    """A tiny folder laid out like CompVis/stable-diffusion-v1-4: safety checker and feature extractor included."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    pipe = build_tiny_sd_pipeline(seed=0)
    checker = StableDiffusionSafetyChecker(
        CLIPConfig(
            text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2),
            vision_config=dict(
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                image_size=32,
                patch_size=16,
            ),
            projection_dim=16,
        )
    )
    pipe.safety_checker, pipe.feature_extractor = (
        checker,
        CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
    )
    pipe.register_modules(safety_checker=checker, feature_extractor=pipe.feature_extractor)
    pipe.register_to_config(requires_safety_checker=True)
    pipe.save_pretrained(path)
    return path


def test_sd14_layout_goes_through_the_real_loading_path(tmp_path):
    import json

    from munba_diffusion.diffusion.base_model import load_base_pipeline

    folder = _sd14_layout(tmp_path / "sd-v1-4")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["safety_checker"][1] == "StableDiffusionSafetyChecker" and (folder / "safety_checker").is_dir()
    pipe = load_base_pipeline(str(folder))
    assert pipe.safety_checker is None  # the field's protocol: generation without the safety checker
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size


def test_erasure_runs_on_the_sd14_layout(tmp_path):
    import json

    import train_erase

    folder = _sd14_layout(tmp_path / "sd-v1-4")
    out = tmp_path / "erased"
    train_erase.main(
        [
            "--pretrained_model_name_or_path",
            str(folder),
            "--concept",
            "text:a red circle",
            "--output_dir",
            str(out),
            "--max_train_steps",
            "2",
            "--sampler_steps",
            "3",
            "--pool_trajectories",
            "1",
            "--validation_inference_steps",
            "2",
            "--validation_seeds",
            "1",
            "--lora_target",
            "noxattn",
        ]
    )
    config = json.loads((out / "erasure_config.json").read_text())
    assert config["pretrained_model_name_or_path"] == str(folder) and config["lora_target"] == "noxattn"
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"


def test_a_run_that_never_moves_says_so(tmp_path, caplog):
    """MGDA at the identity-LoRA start: the preservation gradient is exactly 0, so its min-norm direction is 0."""
    from safetensors.torch import load_file

    import train_erase

    out = tmp_path / "erased"
    with caplog.at_level("WARNING", logger="munba_diffusion.diffusion.train"):
        train_erase.main(
            [
                "--pretrained_model_name_or_path",
                "munba-demo",
                "--concept",
                "circle",
                "--output_dir",
                str(out),
                "--max_train_steps",
                "2",
                "--combiner",
                "mgda",
                "--sampler_steps",
                "2",
                "--pool_trajectories",
                "1",
                "--validation_inference_steps",
                "1",
                "--validation_seeds",
                "1",
                "--no_evaluation",
            ]
        )
    warnings = [r.getMessage() for r in caplog.records if "update directions" in r.getMessage()]
    assert len(warnings) == 1 and "first 2 update directions of --combiner mgda" in warnings[0]
    assert "use --combiner nash" in warnings[0]
    lora = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert all(float(v.abs().max()) == 0 for k, v in lora.items() if "lora_B" in k)  # B never left 0
