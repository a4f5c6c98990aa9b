"""CLIP score: the clamp rule, pairing across batches, and the demo CLIP preferring the right captions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from munba_diffusion.demo import (
    COLOURS,
    SHAPES,
    canonical_caption,
    demo_clip_path,
    render_scene,
)
from munba_diffusion.evaluation.clip_score import (
    clip_score_metrics,
    clip_scores,
    clip_scores_from_embeddings,
    load_clip,
)
from tests.eval_helpers import save_tiny_clip, write_generation_folder


def test_score_is_100_cosine_clamped_at_zero():
    image = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [3.0, 0.0]])
    text = torch.tensor([[2.0, 0.0], [0.5, 0.5 * 3**0.5], [-1.0, 0.1], [0.0, 1.0]])
    assert clip_scores_from_embeddings(image, text).tolist() == pytest.approx([100.0, 50.0, 0.0, 0.0], abs=1e-4)


def test_each_image_is_scored_against_its_own_prompt_across_batches(tmp_path):
    clip = save_tiny_clip(tmp_path / "clip")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(5)]
    prompts = ["a red circle", "a dog", "a blue square", "a house in the style of a painting", "a cat"]
    folder = write_generation_folder(tmp_path / "gen", images, prompts)
    result = clip_score_metrics(folder, model_name_or_path=clip, batch_size=2)
    model, processor = load_clip(clip, "cpu")
    one_by_one = torch.cat([clip_scores([im], [p], model, processor) for im, p in zip(images, prompts)])
    assert result["clip_score"] == pytest.approx(float(one_by_one.mean()), abs=1e-4)
    assert result["num_images"] == 5 and result["clip_model"] == str(clip)
    shifted = clip_scores(images, prompts[1:] + prompts[:1], model, processor, batch_size=2)
    assert not torch.allclose(shifted, one_by_one)


def test_demo_clip_scores_matching_captions_above_shuffled_ones():
    rng = np.random.default_rng(0)
    pairs = [(s, c) for s in SHAPES for c in COLOURS] * 2
    images = [render_scene(rng, s, c) for s, c in pairs]
    captions = [canonical_caption(s, c) for s, c in pairs]
    shuffled = [
        canonical_caption(SHAPES[(SHAPES.index(s) + 1) % 4], COLOURS[(COLOURS.index(c) + 2) % 4]) for s, c in pairs
    ]
    model, processor = load_clip(demo_clip_path(), "cpu")
    matching = clip_scores(images, captions, model, processor)
    wrong = clip_scores(images, shuffled, model, processor)
    assert matching.mean() > wrong.mean() + 1.0
    assert (matching > wrong).float().mean() > 0.8
