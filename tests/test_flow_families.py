"""SD3 and FLUX.1 (dev, schnell) behind the family interface, on tiny configs built here (tokenizers built locally).

What is checked against diffusers' own code: the latent pool's sampler reproduces each pipeline's own sampling
step by step (so the conditioning, the packing and position ids, the timesteps, the shift and the guidance are
the pipeline's), and the velocity-space targets equal the ones formed by hand from the transformer's outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

import train_erase
from munba_diffusion.diffusion.config import ErasureTrainingConfig
from munba_diffusion.diffusion.family import (
    FLUX,
    GUIDANCE_ATTRIBUTE,
    STABLE_DIFFUSION_3,
    denoise,
    family_of_pipeline,
    pack_flux_latents,
    unpack_flux_latents,
)
from munba_diffusion.diffusion.latents import FreshTrajectories, LatentBatch, SamplerSettings, ddim_trajectory
from munba_diffusion.diffusion.lora import (
    ErasureLoraConfig,
    add_erasure_lora,
    load_lora_state_dict,
    lora_state_dict,
    transformer_module_names,
)
from munba_diffusion.diffusion.losses import esd_target
from munba_diffusion.diffusion.players import ErasureBatch, frozen_targets
from munba_diffusion.diffusion.train import _prepare_denoiser
from tests.tiny_flow import build_tiny_flux_pipeline, build_tiny_sd3_pipeline, tiny_sd3_transformer

CPU = torch.device("cpu")
BUILDERS = {
    "sd3": lambda: build_tiny_sd3_pipeline(0),
    "sd3-without-t5": lambda: build_tiny_sd3_pipeline(0, t5=False),
    "flux-dev": lambda: build_tiny_flux_pipeline(0, guidance_embeds=True),
    "flux-schnell": lambda: build_tiny_flux_pipeline(0, guidance_embeds=False),
}


def test_flux_packing_round_trips_and_matches_the_pipelines_layout():
    latents = torch.randn(2, 4, 6, 8, generator=torch.Generator().manual_seed(0))
    packed = pack_flux_latents(latents)
    assert packed.shape == (2, 12, 16)
    torch.testing.assert_close(packed, build_tiny_flux_pipeline(0)._pack_latents(latents, 2, 4, 6, 8), rtol=0, atol=0)
    torch.testing.assert_close(unpack_flux_latents(packed, 6, 8), latents, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_the_pool_sampler_is_the_pipelines_own_sampling(name):
    """From the same noise, every x_t of the latent pool's trajectory equals the pipeline's latents after each of
    its steps (SD3: classifier-free guidance with the empty prompt; FLUX: the prompt alone, dev at guidance 3.5)."""
    pipe = BUILDERS[name]()
    family = family_of_pipeline(pipe)
    assert family is (FLUX if name.startswith("flux") else STABLE_DIFFUSION_3)
    steps, guidance = 3, 3.0
    shape = family.latent_shape(pipe, 32)
    noise = torch.randn(1, *shape, generator=torch.Generator().manual_seed(1))
    scheduler, kwargs = family.trajectory_scheduler(pipe, shape, steps)
    cond = family.encode_prompts(pipe, ["a red circle"], CPU)
    uncond = family.null_conditioning(pipe, CPU) if family.classifier_free_guidance else None
    with torch.no_grad():
        states, times = ddim_trajectory(
            lambda x, t, c: denoise(pipe.transformer, x, t, c),
            scheduler,
            noise,
            cond,
            uncond,
            SamplerSettings(steps, guidance, shape, kwargs),
        )
    seen = []

    def keep(pipeline, step, timestep, tensors):
        seen.append(tensors["latents"].clone())
        return tensors

    packed = name.startswith("flux")
    pipe(
        "a red circle",
        num_inference_steps=steps,
        guidance_scale=guidance if not packed else 3.5,
        **({"max_sequence_length": 256} if name == "flux-schnell" else {}),  # as schnell's model card runs it
        height=32,
        width=32,
        latents=pack_flux_latents(noise) if packed else noise,
        output_type="latent",
        callback_on_step_end=keep,
    )
    ours = states[1:, 0]
    theirs = torch.stack([unpack_flux_latents(x, 16, 16)[0] if packed else x[0] for x in seen[:-1]])
    assert len(times) == steps and ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["sd3", "flux-dev"])
def test_velocity_targets_are_formed_from_the_transformers_own_velocities(name):
    """The esd, anchored_esd and anchor targets on a batch equal the combinations formed by hand from direct
    transformer calls; and in velocity space the ESD target is the velocity of the ESD target formed in noise (or
    clean-image) space, since v = eps - x0 is affine in each prediction at fixed x_t and sigma."""
    pipe = BUILDERS[name]()
    family = family_of_pipeline(pipe)
    concept, anchor = (family.encode_prompts(pipe, [p] * 2, CPU) for p in ("a red circle", "a circle"))
    null = family.null_conditioning(pipe, CPU)
    x_t = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([250.0, 750.0])
    rows = LatentBatch(torch.zeros(2, dtype=torch.long), x_t, t)
    batch = ErasureBatch([(rows, concept, anchor)], (rows, anchor))
    with torch.no_grad():
        v = {
            k: denoise(pipe.transformer, x_t, t, c)
            for k, c in (("c", concept), ("a", anchor), ("0", null.expand_as(concept)))
        }
        for loss, expected in (
            ("esd", v["0"] - 0.5 * (v["c"] - v["0"])),
            ("anchored_esd", v["a"] - 0.5 * (v["c"] - v["a"])),
            ("anchor", v["a"]),
        ):
            targets = frozen_targets(
                pipe.transformer, batch, null, loss, 0.5, ["preserve", "forget"], CPU, torch.float32
            )
            torch.testing.assert_close(targets["forget"], expected, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(targets["preserve"], v["a"], rtol=1e-5, atol=1e-6)
    sigma = (t / 1000).view(-1, 1, 1, 1)

    def as_noise(velocity):  # eps = x_t + (1 - sigma) v
        return x_t + (1 - sigma) * velocity

    torch.testing.assert_close(
        as_noise(esd_target(v["0"], v["c"], 0.5)), esd_target(as_noise(v["0"]), as_noise(v["c"]), 0.5)
    )


@pytest.mark.parametrize(("name", "tokens"), [("flux-dev", 512), ("flux-schnell", 256)])
def test_flux_prompts_have_the_t5_length_each_model_takes(name, tokens):
    """FLUX-dev's prompts are T5-encoded to 512 tokens, as FluxPipeline pads them; FLUX-schnell's to 256, the most
    it takes; the empty prompt alike (then the packed pooled row)."""
    pipe = BUILDERS[name]()
    family = family_of_pipeline(pipe)
    assert family.encode_prompts(pipe, ["a red circle"], CPU).shape[1] == tokens + 1
    assert family.null_conditioning(pipe, CPU).shape[1] == tokens + 1


@pytest.mark.parametrize(("name", "dtype"), [("sd3", torch.float32), ("flux-dev", torch.bfloat16)])
def test_the_transformer_gets_its_pipelines_timestep_dtype(name, dtype):
    """StableDiffusion3Pipeline passes float32 timesteps to a bf16 transformer (in bf16, t = 985.73 would be 984 or
    988: another sigma than x_t's); FluxPipeline casts them to the latents' dtype."""
    pipe = BUILDERS[name]().to(dtype=torch.bfloat16)
    family = family_of_pipeline(pipe)
    seen = {}
    pipe.transformer.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    cond = family.encode_prompts(pipe, ["a red circle"], CPU).to(torch.bfloat16)
    x_t = torch.randn(1, *family.latent_shape(pipe, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        denoise(pipe.transformer, x_t.to(torch.bfloat16), torch.tensor([985.73]), cond)
    assert seen["timestep"].dtype == dtype
    if dtype == torch.float32:
        assert seen["timestep"].item() == pytest.approx(985.73, abs=1e-3)


def test_fresh_trajectories_keep_the_flow_timesteps_of_their_x_t():
    """``--latent_source fresh`` on a flow model: each x_t comes with the sampler's own timestep (sigma x 1000, not
    an integer), as the pool's do."""
    pipe = BUILDERS["sd3"]()
    family = family_of_pipeline(pipe)
    shape = family.latent_shape(pipe, 32)
    scheduler, kwargs = family.trajectory_scheduler(pipe, shape, 3)
    source = FreshTrajectories(
        lambda x, t, c: denoise(pipe.transformer, x, t, c),
        scheduler,
        family.encode_prompts(pipe, ["a red circle"], CPU),
        family.null_conditioning(pipe, CPU),
        SamplerSettings(3, 3.0, shape, kwargs),
        CPU,
        torch.float32,
    )
    with torch.no_grad():
        batches = [source.sample(2, torch.Generator().manual_seed(seed)) for seed in range(6)]
    times = torch.cat([batch.timesteps for batch in batches])
    assert times.is_floating_point() and torch.isin(times, scheduler.timesteps).all()
    assert (times != times.round()).any()  # every step after the first (t = 1000) is at a fractional t


def test_image_folders_are_noised_at_the_timesteps_each_training_script_draws():
    """diffusers' SD3 script draws logit-normal positions in the training schedule (its default weighting scheme),
    the FLUX script uniform ones (``none``): of 4,000 draws, about 20% fall in the schedule's outer fifth for FLUX
    and under 3% for SD3 (a logit-normal position is there with probability 2.8%)."""
    x0 = torch.zeros(4000, 4, 2, 2)
    outer = {}
    for name in ("sd3", "flux-dev"):
        pipe = BUILDERS[name]()
        _, t = family_of_pipeline(pipe).forward_process(pipe)(x0, torch.Generator().manual_seed(0))
        schedule = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config).timesteps
        position = (schedule[None, :] == t[:, None]).float().argmax(dim=1) / len(schedule)
        outer[name] = float(((position < 0.1) | (position >= 0.9)).float().mean())
    assert outer["sd3"] < 0.05 and 0.17 < outer["flux-dev"] < 0.23


def test_flux_dev_guidance_zero_is_a_guidance_and_schnell_validates_without_one(tmp_path):
    """``--flux_guidance 0`` is the input 0, not the default 3.5; FLUX-dev's validation images use the guidance it
    is erased at, FLUX-schnell's none."""
    pipe = BUILDERS["flux-dev"]()
    width = pipe.transformer.config.pooled_projection_dim
    for value, expected in ((None, 3.5), (0.0, 0.0), (2.0, 2.0)):
        setattr(pipe, GUIDANCE_ATTRIBUTE, value)
        assert FLUX.encode_prompts(pipe, ["a red circle"], CPU)[0, -1, width].item() == expected
        assert FLUX.validation_guidance(pipe) == expected
    assert FLUX.validation_guidance(BUILDERS["flux-schnell"]()) == 0.0
    assert STABLE_DIFFUSION_3.validation_guidance(BUILDERS["sd3"]()) == 7.5
    config = ErasureTrainingConfig(concepts=["text:a red circle"], output_dir=tmp_path / "out", flux_guidance=0.0)
    _prepare_denoiser(config, pipe, CPU)  # what --flux_guidance 0 does to the loaded pipeline
    assert FLUX.embedded_guidance(pipe) == 0.0


def test_the_image_sets_reach_sd35_mediums_second_attention():
    """SD3.5 Medium's ``dual_attention_layers`` hold a second image self-attention (``attn2``): ``image`` and
    ``attn`` adapt its projections as the first's; ``xattn`` does not."""
    transformer = tiny_sd3_transformer(dual_attention_layers=(0,))
    second = {f"transformer_blocks.0.attn2.{p}" for p in ("to_q", "to_k", "to_v", "to_out.0")}
    assert second <= set(transformer_module_names(transformer, "image"))
    assert second <= set(transformer_module_names(transformer, "attn"))
    assert not second & set(transformer_module_names(transformer, "xattn"))
    add_erasure_lora(transformer, ErasureLoraConfig(rank=2, target="attn"))
    before = {k: v for k, v in lora_state_dict(transformer).items() if ".attn2." not in k}  # a checkpoint made before
    with pytest.raises(ValueError, match="^checkpoint LoRA has no weights for SD3.5 Medium's second attention"):
        load_lora_state_dict(transformer, before)
    older = {k: v for k, v in before.items() if not k.startswith(("context_embedder.", "time_text_embed."))}
    with pytest.raises(ValueError, match="^checkpoint LoRA has no weights for the prompt's embeddings"):
        load_lora_state_dict(transformer, older)  # made before revision 2: the older cause is named


def _erase(base, out, *extra):
    train_erase.main(
        [
            *("--pretrained_model_name_or_path", str(base), "--concept", "text:a red circle"),
            *("--output_dir", str(out), "--max_train_steps", "12", "--train_batch_size", "2", "--resolution", "32"),
            *("--lora_target", "full", "--learning_rate", "5e-3", "--sampler_steps", "3", "--pool_trajectories", "2"),
            *("--validation_inference_steps", "1", "--validation_seeds", "1", "--no_evaluation", *extra),
        ]
    )
    return [json.loads(line) for line in (out / "logs" / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", ["sd3", "flux-dev", "flux-schnell"])
def test_flow_erasure_lowers_the_forget_loss_and_keeps_preservation_near_zero(tmp_path, name):
    """Erase "a red circle" with the trainer (every Linear: in these random tiny models the prompt acts mostly
    through the pooled vector's modulation), bargained (nash) and forgetting alone: at step 0 the identity LoRA's
    preservation loss is exactly 0; the bargained preservation loss stays under half of forgetting alone's; the
    forget loss at fixed rows (random x_t at the pool's timesteps), against the base's ESD target, falls from the
    base to each erased folder (by more than 20% when forgetting alone); the folders load as the stock class, with
    the record naming the family."""
    base = tmp_path / "base"
    BUILDERS[name]().save_pretrained(base)
    log = _erase(base, tmp_path / "nash")
    alone = _erase(base, tmp_path / "alone", "--combiner", "sum", "--combiner_weights", "0", "1")
    assert log[0]["loss/preserve"] == 0.0
    assert np.mean([r["loss/preserve"] for r in log]) < 0.5 * np.mean([r["loss/preserve"] for r in alone])
    cls = type(BUILDERS[name]())
    base_pipe = cls.from_pretrained(base)
    family = family_of_pipeline(base_pipe)
    record = json.loads((tmp_path / "nash" / "erasure_config.json").read_text())
    assert record["run"]["family"] == family.describe(base_pipe)
    assert record["validation_guidance_scale"] == {"sd3": 7.5, "flux-dev": 3.5, "flux-schnell": 0.0}[name]
    scheduler, kwargs = family.trajectory_scheduler(base_pipe, (4, 16, 16), 3)
    scheduler.set_timesteps(3, **kwargs)
    x_t = torch.randn(6, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    t = scheduler.timesteps.repeat(2)
    with torch.no_grad():
        concept = family.encode_prompts(base_pipe, ["a red circle"] * 6, CPU)
        empty = family.null_conditioning(base_pipe, CPU).expand_as(concept)
        before = denoise(base_pipe.transformer, x_t, t, concept)
        target = esd_target(denoise(base_pipe.transformer, x_t, t, empty), before, 1.0)
        loss = {
            run: float(
                (denoise(cls.from_pretrained(tmp_path / run).transformer, x_t, t, concept) - target).pow(2).mean()
            )
            for run in ("nash", "alone")
        }
    base_loss = float((before - target).pow(2).mean())
    assert loss["nash"] < 0.95 * base_loss and loss["alone"] < 0.8 * base_loss


@pytest.mark.parametrize(
    ("name", "flags", "message"),
    [
        ("sd3", ("--lora_target", "single"), "--lora_target single does not exist for Stable Diffusion 3"),
        ("sd3", ("--flux_guidance", "3.5"), "--flux_guidance is for guidance-distilled FLUX-dev"),
        ("flux-schnell", ("--flux_guidance", "3.5"), "this FLUX model has no guidance embedding"),
        ("sd3", ("--robust",), "--robust is not supported on Stable Diffusion 3 yet"),
        ("flux-dev", ("--lora_on", "text_encoder"), "--lora_on text_encoder is not supported on FLUX.1 yet"),
    ],
)
def test_options_a_flow_family_cannot_take_get_one_line(tmp_path, name, flags, message):
    base = tmp_path / "base"
    BUILDERS[name]().save_pretrained(base)
    with pytest.raises(SystemExit) as error:
        _erase(base, tmp_path / "out", *flags)
    assert message in str(error.value.code) and "\n" not in str(error.value.code)
    assert not (tmp_path / "out" / "erasure_config.json").exists()


def test_a_flux_folder_without_its_t5_encoder_is_refused_before_any_weight_loads(tmp_path):
    base = tmp_path / "flux"
    build_tiny_flux_pipeline(0).save_pretrained(base)
    index = json.loads((base / "model_index.json").read_text())
    index["text_encoder_2"] = [None, None]
    (base / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(SystemExit) as error:
        _erase(base, tmp_path / "out")
    assert "has no T5 text encoder (text_encoder_2/), which FLUX needs" in str(error.value.code)


def test_unet_families_refuse_the_transformer_target_sets(tmp_path):
    from tests.tiny_sd import save_tiny_sd

    base = save_tiny_sd(tmp_path / "sd", seed=0)
    with pytest.raises(SystemExit) as error:
        _erase(base, tmp_path / "out", "--lora_target", "image")
    assert "--lora_target image does not exist for Stable Diffusion; choose one of xattn, noxattn, attn, full" in (
        str(error.value.code)
    )


def test_unet_families_refuse_sharding_before_any_weight_loads(tmp_path, monkeypatch):
    from tests.tiny_sd import save_tiny_sd

    base = save_tiny_sd(tmp_path / "sd", seed=0)
    monkeypatch.setenv("WORLD_SIZE", "2")  # past the one-process check: the family's own line comes first
    monkeypatch.setattr("munba_diffusion.diffusion.train.load_base_pipeline", _no_loading)
    with pytest.raises(SystemExit) as error:
        _erase(base, tmp_path / "out", "--shard_base")
    assert "--shard_base shards SD3 and FLUX transformers; a Stable Diffusion base fits one GPU" in str(
        error.value.code
    )


def _no_loading(*args, **kwargs):
    raise AssertionError("a model was loaded")


@pytest.mark.parametrize("name", ["sd3", "flux-dev"])
def test_xattn_adapts_the_prompts_embeddings_and_the_text_stream_only(name):
    """xattn on a transformer is the prompt's own layers: the text stream's attention projections and both
    embeddings of the prompt (its tokens' ``context_embedder``, its pooled vector's ``text_embedder``, which
    conditions every block through the timestep embedding); never the image stream, the timestep (or FLUX
    guidance) embedding or a block's modulation. ``attn`` holds it, ``noxattn`` none of it."""
    transformer = BUILDERS[name]().transformer
    xattn = set(transformer_module_names(transformer, "xattn"))
    embeddings = {
        "context_embedder",
        "time_text_embed.text_embedder.linear_1",
        "time_text_embed.text_embedder.linear_2",
    }
    assert embeddings <= xattn
    assert {"transformer_blocks.0.attn.add_k_proj", "transformer_blocks.0.attn.add_v_proj"} <= xattn
    assert all(n in embeddings or ".attn.add_" in n or ".attn.to_add_out" in n for n in xattn)
    assert xattn <= set(transformer_module_names(transformer, "attn"))
    assert not xattn & set(transformer_module_names(transformer, "noxattn"))


def test_resuming_a_transformer_run_from_before_the_embeddings_were_targets_names_the_cause(tmp_path, monkeypatch):
    """A checkpoint saved when xattn on SD3 / FLUX was the text stream alone (target sets revision 1) lacks the
    prompt's embeddings' LoRA weights: resuming it says so in one line and names the fix, instead of calling the
    checkpoint damaged or asking for "the same --lora_target"; the same run's own checkpoints resume."""
    import munba_diffusion.diffusion.lora as lora

    base = tmp_path / "base"
    build_tiny_sd3_pipeline().save_pretrained(base)
    flags = ("--lora_target", "xattn", "--checkpointing_steps", "2")
    monkeypatch.setattr(lora, "_PROMPT_LAYERS", r"attn\.(add_q_proj|add_k_proj|add_v_proj|to_add_out)$")  # revision 1
    _erase(base, tmp_path / "old", "--max_train_steps", "3", *flags)  # checkpoint-2 stays
    monkeypatch.undo()

    with pytest.raises(SystemExit) as error:
        _erase(base, tmp_path / "old", "--max_train_steps", "3", "--resume_from_checkpoint", "latest", *flags)
    message = str(error.value.code)
    assert "\n" not in message and "damaged" not in message
    assert "error: checkpoint LoRA has no weights for the prompt's embeddings" in message
    assert message.endswith("start a new run (a new --output_dir, or --overwrite_output_dir)")

    now = tmp_path / "now"
    _erase(base, now, "--max_train_steps", "3", *flags)
    log = _erase(base, now, "--max_train_steps", "3", "--resume_from_checkpoint", "latest", *flags)
    assert [r["step"] for r in log][-1] == 3


def test_load_lora_state_dict_blames_the_target_sets_only_when_just_the_embeddings_are_missing():
    """The revision message is for a state missing exactly the embeddings' weights; a state missing other weights
    too gets the generic hint; a full state loads back exactly (into a LoRA whose weights were changed first)."""
    transformer = build_tiny_sd3_pipeline().transformer
    add_erasure_lora(transformer, ErasureLoraConfig(rank=2, target="xattn"))
    state = {k: torch.randn_like(v) for k, v in lora_state_dict(transformer).items()}
    load_lora_state_dict(transformer, state)
    assert all(torch.equal(state[k], v) for k, v in lora_state_dict(transformer).items())

    old = {k: v for k, v in state.items() if not k.startswith(("context_embedder.", "time_text_embed."))}
    with pytest.raises(ValueError, match="^checkpoint LoRA has no weights for the prompt's embeddings"):
        load_lora_state_dict(transformer, old)
    other = {k: v for k, v in old.items() if not k.startswith("transformer_blocks.0.")}
    with pytest.raises(ValueError, match="was it made with the same --lora_target, --lora_on and --rank"):
        load_lora_state_dict(transformer, other)


def test_the_sharded_export_reloads_the_base_the_run_loaded_not_a_newer_hub_commit(tmp_path, monkeypatch):
    """--shard_base's export reloads the base whole from the files the run loaded. When the Hub's main moves to a new
    commit during the run (here: a second snapshot in the cache and refs/main pointing at it, as a download by any
    other program would leave them), the exported transformer is still the base the LoRA trained on."""
    import huggingface_hub.constants as constants

    from munba_diffusion.config import parse_config
    from munba_diffusion.diffusion.base_model import load_base_pipeline, load_base_transformer
    from munba_diffusion.diffusion.config import ErasureTrainingConfig
    from munba_diffusion.diffusion.sharding import reloaded_transformer

    cache = tmp_path / "hub"
    repo = cache / "models--someone--tiny-flux"
    started_on, pushed_later = "0" * 40, "1" * 40
    for seed, commit in enumerate((started_on, pushed_later)):
        build_tiny_flux_pipeline(seed).save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(started_on)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    argv = ["--pretrained_model_name_or_path", "someone/tiny-flux", "--concept", "text:a red circle"]
    config = parse_config(
        ErasureTrainingConfig, [*argv, "--output_dir", str(tmp_path / "out"), "--lora_target", "attn"]
    )
    pipe = load_base_pipeline(config.pretrained_model_name_or_path)
    add_erasure_lora(pipe.transformer, config.lora)
    with torch.no_grad():
        for name, param in pipe.transformer.named_parameters():
            if "lora_" in name:
                param.normal_()  # a trained LoRA

    (repo / "refs" / "main").write_text(pushed_later)
    newer = load_base_transformer(config.pretrained_model_name_or_path).state_dict()
    reloaded = reloaded_transformer(config, pipe.transformer, torch.float32).state_dict()
    trained = pipe.transformer.state_dict()
    assert reloaded.keys() == trained.keys()
    assert all(torch.equal(reloaded[k], trained[k]) for k in trained)  # the run's base and its LoRA, exactly
    assert any(not torch.equal(newer[k], trained[k]) for k in newer)  # what re-resolving the id would have given
