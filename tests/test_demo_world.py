"""The bundled demo world: renders, judge, CLIP and text-to-image model really know the concepts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from munba_diffusion.clip_features import clip_image_embeddings, clip_text_embeddings
from munba_diffusion.demo import (
    COLOURS,
    SHAPES,
    WEIGHTS_DIR,
    canonical_caption,
    demo_clip_path,
    load_demo_judge,
    render_scene,
)
from munba_diffusion.demo.world import SHAPE_NAMES, caption, scenes_to_tensor
from munba_diffusion.models import resolve_model_path


def _renders(n: int, seed: int):
    rng = np.random.default_rng(seed)
    shapes = rng.integers(len(SHAPES), size=n)
    colours = rng.integers(len(COLOURS), size=n)
    images = [render_scene(rng, SHAPES[s], COLOURS[c]) for s, c in zip(shapes, colours)]
    return torch.from_numpy(scenes_to_tensor(images)), torch.from_numpy(shapes), torch.from_numpy(colours)


def test_rendering_is_deterministic_and_varied():
    a = np.asarray(render_scene(np.random.default_rng(5), "circle", "red"))
    b = np.asarray(render_scene(np.random.default_rng(5), "circle", "red"))
    c = np.asarray(render_scene(np.random.default_rng(6), "circle", "red"))
    assert a.shape == (32, 32, 3) and (a == b).all() and not (a == c).all()
    with pytest.raises(ValueError, match="unknown shape 'hexagon'"):
        render_scene(np.random.default_rng(0), "hexagon", "red")


def test_captions_use_every_name_of_a_concept():
    rng = np.random.default_rng(0)
    texts = " | ".join(caption(rng, "circle", "blue") for _ in range(300))
    for name in SHAPE_NAMES["circle"]:
        assert name in texts
    assert all(len(SHAPE_NAMES[s]) >= 3 for s in SHAPES)


def test_judge_is_right_on_fresh_renders():
    images, shapes, colours = _renders(400, seed=12345)
    out = load_demo_judge().classify(images)
    assert (out.shape == shapes).float().mean() >= 0.99
    assert (out.colour == colours).float().mean() >= 0.99


def test_clip_zero_shot_knows_shapes_and_colours():
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(demo_clip_path()).eval()
    processor = CLIPProcessor.from_pretrained(demo_clip_path())
    images, shapes, colours = _renders(200, seed=999)
    pixels = processor(
        images=list(images.permute(0, 2, 3, 1).numpy()), return_tensors="pt", do_rescale=False
    ).pixel_values
    with torch.no_grad():
        img = F.normalize(clip_image_embeddings(model, pixels), dim=-1)
        for names, labels in ((SHAPES, shapes), (COLOURS, colours)):
            prompts = [canonical_caption(n, None) if names is SHAPES else canonical_caption(None, n) for n in names]
            tok = processor.tokenizer(prompts, padding=True, return_tensors="pt")
            txt = F.normalize(clip_text_embeddings(model, tok.input_ids, tok.attention_mask), dim=-1)
            assert ((img @ txt.T).argmax(-1) == labels).float().mean() >= 0.85


@pytest.mark.parametrize(
    ("model", "folder", "loading", "steps"),
    [
        ("munba-demo", "pipeline", {}, 20),
        ("munba-demo-flow", "flow_pipeline", {"text_encoder_3": None, "tokenizer_3": None}, 28),  # SD3 without T5
    ],
)
def test_bundled_pipeline_draws_what_it_is_asked(monkeypatch, model, folder, loading, steps):
    """Each bundled text-to-image model as a user loads it (the stock pipeline class): every caption once, on seeds
    no training script judged with, judged right on both shape and colour for at least 85% of them."""
    from diffusers import DiffusionPipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model_path(model) == str(WEIGHTS_DIR / folder)
    pipe = DiffusionPipeline.from_pretrained(resolve_model_path(model), **loading)
    pipe.set_progress_bar_config(disable=True)
    combos = [(s, c) for s in SHAPES for c in COLOURS]
    images = pipe(
        [canonical_caption(s, c) for s, c in combos],
        num_inference_steps=steps,
        guidance_scale=4.0,
        generator=[torch.Generator().manual_seed(100 + i) for i in range(len(combos))],
        output_type="pt",
    ).images
    assert images.shape == (16, 3, 32, 32)
    out = load_demo_judge().classify(images)
    correct = [(SHAPES[int(s)], COLOURS[int(c)]) == combo for s, c, combo in zip(out.shape, out.colour, combos)]
    assert sum(correct) / len(combos) >= 0.85


def test_bundled_files_are_safetensors_and_small():
    files = [p for p in WEIGHTS_DIR.rglob("*") if p.is_file()]
    weights = [p for p in files if p.suffix in {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".safetensors"}]
    assert weights and all(p.suffix == ".safetensors" for p in weights)
    assert sum(p.stat().st_size for p in files) < 20 * 2**20
    recipe = json.loads((WEIGHTS_DIR / "training_metrics.json").read_text())
    assert {"clip", "judge", "vae", "unet"} <= set(recipe)


def test_per_caption_judgement_reports_each_caption_with_its_interval_and_the_bar(monkeypatch):
    """measure_demo's per-caption judgement (the demos' quality bar) on a scripted pipeline and judge: a caption's
    rate is its own images' share, its interval is Wilson's, and a caption right 3 times of 4 is under the 90% bar."""
    import importlib
    from pathlib import Path
    from types import SimpleNamespace

    from munba_diffusion.evaluation.intervals import wilson_bounds

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "scripts" / "demo"))
    measure_demo = importlib.import_module("measure_demo")
    combos = [(s, c) for s in SHAPES for c in COLOURS]
    calls, seeds = [], []

    def pipe(prompts, generator, **kwargs):
        calls.append(prompts)
        seeds.append([g.initial_seed() for g in generator])
        return SimpleNamespace(images=torch.zeros(len(prompts), 3, 32, 32))

    def classify(images):
        k = len(calls) - 1  # the red cross is drawn as a square on the first seed only, the blue circle is green
        shape = [
            SHAPES.index("square") if (s, c) == ("cross", "red") and k == 0 else SHAPES.index(s) for s, c in combos
        ]
        colour = [COLOURS.index("green") if (s, c) == ("circle", "blue") else COLOURS.index(c) for s, c in combos]
        return SimpleNamespace(shape=torch.tensor(shape), colour=torch.tensor(colour))

    result = measure_demo.per_caption_judgement(pipe, SimpleNamespace(classify=classify), 4, steps=2, guidance=4.0)
    assert calls == [[canonical_caption(s, c) for s, c in combos]] * 4 and result["images"] == 64
    red_cross = result["per_caption"]["red cross"]
    assert red_cross["shape"]["rate"] == 0.75 and red_cross["shape"]["ci95"] == list(wilson_bounds(3, 4))
    assert red_cross["colour"]["rate"] == 1.0 and red_cross["shape"]["n"] == 4
    assert result["per_caption"]["blue circle"]["colour"]["rate"] == 0.0
    assert result["captions_under_bar"] == ["blue circle", "red cross"]
    assert result["shape_accuracy"] == 63 / 64 and result["colour_accuracy"] == 60 / 64
    assert seeds[1] == [5100 + i for i in range(16)]  # seed k of caption i is first_seed + 100 k + i

    calls.clear(), seeds.clear()  # a fresh set of seeds: none shared with the default set
    fresh = measure_demo.per_caption_judgement(pipe, SimpleNamespace(classify=classify), 2, 2, 7.0, first_seed=8200)
    assert seeds == [[8200 + i for i in range(16)], [8300 + i for i in range(16)]]
    assert fresh["seeds"].startswith("8200 + 100 k") and fresh["guidance_scale"] == 7.0


def test_deepening_the_flow_demo_changes_nothing_until_its_gates_train(monkeypatch):
    """train_flow_demo's --num_layers on a saved model: the added blocks are zero-gated copies, so the deeper model
    predicts exactly what the shallower one did, the last block stays last, and opening a gate changes the output."""
    import copy
    import importlib
    from pathlib import Path

    from diffusers import SD3Transformer2DModel

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "scripts" / "demo"))
    train_flow_demo = importlib.import_module("train_flow_demo")
    torch.manual_seed(0)
    shallow = SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8,
        pos_embed_max_size=8,
    ).eval()  # fmt: skip
    with torch.no_grad():  # random gates: a fresh model's zero-initialised ones would hide a block that is not copied
        for p in shallow.parameters():
            p.normal_(0, 0.3)
    inputs = (torch.randn(2, 4, 8, 8), torch.randn(2, 5, 16), torch.randn(2, 8), torch.tensor([200.0, 700.0]))
    deep = train_flow_demo.deepen(copy.deepcopy(shallow), 5)
    assert deep.config.num_layers == len(deep.transformer_blocks) == 5
    assert deep.transformer_blocks[-1].context_pre_only and not deep.transformer_blocks[-2].context_pre_only
    with torch.no_grad():
        assert torch.equal(deep(*inputs).sample, shallow(*inputs).sample)
        gates = [
            torch.cat(
                [b.norm1.linear.bias.view(6, -1)[[2, 5]].flatten(), b.norm1.linear.weight.view(6, -1)[[2, 5]].flatten()]
            )
            for b in deep.transformer_blocks
        ]
        assert [bool(g.abs().sum() == 0) for g in gates] == [False, True, False, True, False]  # blocks 0 and 1 copied
        assert torch.equal(deep.transformer_blocks[1].attn.to_q.weight, deep.transformer_blocks[0].attn.to_q.weight)
        deep.transformer_blocks[1].norm1.linear.bias.fill_(0.5)
        assert not torch.allclose(deep(*inputs).sample, shallow(*inputs).sample)
    with pytest.raises(ValueError, match="grows by 0 to 2"):
        train_flow_demo.deepen(copy.deepcopy(shallow), 6)


def test_the_flow_demo_recipe_reads_one_value_per_stage_or_one_for_all(monkeypatch):
    """train_flow_demo's stages: by default the shipped recipe (the fourth stage deepens to 8 blocks); given --steps,
    each other flag takes one value per stage or one for all, and a count that fits neither is refused."""
    import importlib
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "scripts" / "demo"))
    stage_settings = importlib.import_module("train_flow_demo").stage_settings
    shipped = stage_settings(None, None, None, None)
    assert [(steps, seed, layers) for steps, _, seed, layers in shipped] == [
        (9000, 0, 6), (5000, 1, 6), (3000, 2, 6), (7000, 4, 8), (3000, 5, 8)
    ]  # fmt: skip
    assert sum(steps for steps, *_ in shipped) == 27000
    assert stage_settings(None, None, [0], None) == shipped  # the rebuild command of earlier releases
    assert [seed for _, _, seed, _ in stage_settings(None, None, [7], None)] == [7, 8, 9, 11, 12]
    assert stage_settings([7000, 3000], [3e-4, 2e-4], [4], [8]) == [(7000, 3e-4, 4, 8), (3000, 2e-4, 5, 8)]
    assert stage_settings([3000], [2e-4], None, None) == [(3000, 2e-4, 0, None)]  # the saved model's own depth
    with pytest.raises(
        ValueError, match="give one --num_layers per stage of the shipped recipe \\(5\\) or one for all, got 2"
    ):
        stage_settings(None, None, None, [6, 8])
    with pytest.raises(ValueError, match="give --learning_rate"):
        stage_settings([1000, 1000], None, None, None)
