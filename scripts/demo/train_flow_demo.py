"""Train the demo world's flow-matching model (``munba-demo-flow``) from scratch on a CPU (about 4 hours).

An SD3-style MMDiT (``SD3Transformer2DModel``, joint attention over image patches and text tokens) trained with the
rectified-flow objective of diffusers' SD3 training script: x_t = (1 - s) x_0 + s eps with s drawn logit-normal,
the model predicts the velocity eps - x_0, unweighted MSE; 10% empty captions for classifier-free guidance; EMA.

Why SD3 and not FLUX: the demo's own CLIP text tower (trained on this world) fills both of SD3's CLIP slots as it
is (a ``CLIPTextModelWithProjection`` with an identity projection), and SD3 runs without its T5 encoder
(``text_encoder_3=None``, a documented SD3 mode), so the text side is the demo's trained encoder. FLUX reads its
token stream from T5 only (CLIP gives it just a pooled vector), so a FLUX demo would need a T5 trained here too.
The VAE is the demo's (its config gains ``shift_factor: 0.0``, which SD3's pipeline reads).

The transformer sees the 16x16 latent with patch 1 (256 image tokens of one latent pixel, each 2x2 image pixels):
with patch 2 (8x8 tokens of 4x4 pixels) a cross's arms, a few pixels wide, fall inside single tokens, and a
patch-2 model of width 96 drew crosses right only 53-72% of the time on held-out seeds (BENCHMARKS.md section 10).
Width 64 (4 heads of 16) keeps a patch-1 step within the CPU budget; 6 joint blocks (0.89M parameters) for the first
three stages, 8 (1.19M) for the last two, which met the per-caption bar at guidance 7 where 6 blocks did not.

The pipeline's CLIP tokenizer is saved with ``model_max_length`` 20 (``TEXT_TOKENS``): the world's captions take at
most 10 tokens, 15 with an attack's 5-token prefix, and 20 CLIP rows instead of 77 make every step cheaper, in
training and in a user's pipeline. Without T5, SD3's pipeline appends ``max_sequence_length`` (256 by default) zero
rows to the CLIP rows. Those rows are identical at every layer (same input, no position embedding on text), so
attending to 256 copies of one key and value is exactly attending to one copy with ``log 256`` added to its logit.
Training uses that one row and the logit offset (:class:`RepeatedLastRowAttention`): 21 text rows instead of 276;
the script checks the equivalence against the stock processor before training and the final quality is judged with
the stock pipeline as users call it. The result is a stock ``StableDiffusion3Pipeline`` folder::

    python scripts/demo/train_flow_demo.py --output_dir munba_diffusion/demo/weights

Training runs in stages, each a fresh OneCycle schedule that starts from the previous stage's saved EMA transformer,
on a fresh render of the world (:data:`SHIPPED_RECIPE`; ``--steps``, ``--learning_rate``, ``--seed`` and
``--num_layers`` give one value per stage, :func:`stage_settings`): the shipped model is 9,000 steps from scratch at
5e-4, then 5,000 at 3e-4 and 3,000 at 2e-4 (85, 30 and 31 minutes), then deepened from 6 to 8 blocks by zero-gated
copies of its middle blocks (:func:`deepen`, which change nothing until trained) and trained 7,000 steps at 3e-4 and
3,000 at 2e-4 (58 and 25 minutes): 27,000 steps, about 4 hours on one or two threads. ``--init_from FOLDER`` starts
the first stage from a saved flow pipeline's transformer instead of from scratch.

This script builds the demo; it is not part of the installed package (which only loads what it made).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.models.attention_processor import JointAttnProcessor2_0
from diffusers.training_utils import compute_density_for_timestep_sampling
from train_demo import SHAPES, _write_metrics, judge_pipeline, load_tokenizer, render_dataset, sample_captions
from transformers import CLIPModel, CLIPTextConfig, CLIPTextModelWithProjection

from munba_diffusion.demo.judge import DemoJudge

logger = logging.getLogger("train_flow_demo")
ZERO_ROWS = 256  # StableDiffusion3Pipeline's default max_sequence_length: the zero rows standing in for T5
TEXT_TOKENS = 20  # the flow pipeline's CLIP rows: the longest caption, an attack's prefix included, is 15 tokens


class RepeatedLastRowAttention:
    """Joint attention in which the last text row stands for ``copies`` identical rows: ``log(copies)`` is added to
    its attention logit, which is exactly softmax attention over that many copies of its key and value."""

    def __init__(self, copies: int):
        self.log_copies = math.log(copies)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        batch, image_rows = hidden_states.shape[:2]

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        query = heads(torch.cat([attn.to_q(hidden_states), attn.add_q_proj(encoder_hidden_states)], dim=1))
        key = heads(torch.cat([attn.to_k(hidden_states), attn.add_k_proj(encoder_hidden_states)], dim=1))
        value = heads(torch.cat([attn.to_v(hidden_states), attn.add_v_proj(encoder_hidden_states)], dim=1))
        bias = torch.zeros(1, key.shape[2], dtype=query.dtype, device=query.device)
        bias[:, -1] = self.log_copies
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias)
        out = out.transpose(1, 2).reshape(batch, -1, query.shape[1] * query.shape[3])
        image, text = out[:, :image_rows], out[:, image_rows:]
        if not attn.context_pre_only:
            text = attn.to_add_out(text)
        return attn.to_out[0](image), text


def build_transformer(num_layers: int = 6) -> SD3Transformer2DModel:
    return SD3Transformer2DModel(
        sample_size=16,
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=num_layers,
        attention_head_dim=16,
        num_attention_heads=4,
        joint_attention_dim=128,  # the two CLIP slots' penultimate states side by side (64 + 64)
        caption_projection_dim=64,
        pooled_projection_dim=128,  # the two CLIP slots' pooled projections (64 + 64)
        pos_embed_max_size=16,
    )


def deepen(transformer: SD3Transformer2DModel, num_layers: int) -> SD3Transformer2DModel:
    """The same model with ``num_layers`` joint blocks: each added block is a copy of an earlier one inserted after it,
    with the gates of its adaLN-Zero modulation zeroed (``gate_msa`` and ``gate_mlp``, chunks 2 and 5 of the six the
    modulation's linear layer gives, on both streams), so it adds nothing to either stream and the deeper model
    computes exactly what the shallower one did until training opens the gates. The copied blocks are the middle
    ones of those before the last (which sees the text stream for the last time and stays last): blocks 2 and 3 of
    6 for 8."""
    blocks = list(transformer.transformer_blocks)
    extra = num_layers - len(blocks)
    if not 0 <= extra < len(blocks):
        raise ValueError(
            f"num_layers {num_layers}: a model of {len(blocks)} blocks grows by 0 to {len(blocks) - 1} at once"
        )
    first = (len(blocks) - extra) // 2
    copied = range(first, first + extra)
    grown = []
    for index, block in enumerate(blocks):
        grown.append(block)
        if index in copied:
            twin = copy.deepcopy(block)
            for norm in (twin.norm1, twin.norm1_context):
                width = norm.linear.out_features // 6
                with torch.no_grad():
                    for chunk in (2, 5):
                        norm.linear.weight[chunk * width : (chunk + 1) * width] = 0
                        norm.linear.bias[chunk * width : (chunk + 1) * width] = 0
            grown.append(twin)
    transformer.transformer_blocks = torch.nn.ModuleList(grown)
    transformer.register_to_config(num_layers=num_layers)
    return transformer


def flow_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """Shift 1: at 32 px the logit-normal timesteps need no shift towards noise (SD3 uses 3 at 1024 px)."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


def text_encoder_with_projection(clip: CLIPModel) -> CLIPTextModelWithProjection:
    """The demo CLIP's text tower as SD3's CLIP slot expects it: the pooled output through an identity projection."""
    config = CLIPTextConfig(
        **{**clip.config.text_config.to_dict(), "projection_dim": clip.config.text_config.hidden_size}
    )
    encoder = CLIPTextModelWithProjection(config)
    encoder.text_model.load_state_dict(clip.text_model.state_dict())
    with torch.no_grad():
        encoder.text_projection.weight.copy_(torch.eye(config.hidden_size))
    return encoder.eval()


def assemble_pipeline(out: Path, transformer) -> StableDiffusion3Pipeline:
    clip = CLIPModel.from_pretrained(out / "clip")
    vae = AutoencoderKL.from_pretrained(out / "pipeline" / "vae")
    vae.register_to_config(shift_factor=0.0)
    encoder = text_encoder_with_projection(clip)
    tokenizer = load_tokenizer(out / "clip")
    tokenizer.model_max_length = TEXT_TOKENS
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=flow_scheduler(),
        vae=vae,
        text_encoder=encoder,
        tokenizer=tokenizer,
        text_encoder_2=copy.deepcopy(encoder),
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )


def save_flow_pipeline(pipe, directory: Path) -> None:
    """Save with the transformer's weights in float16 (half the package size; diffusers loads them as float32) and
    without the ``_name_or_path`` entries that record where this machine loaded each part from."""
    transformer = pipe.transformer
    pipe.transformer = copy.deepcopy(transformer).to(torch.float16)
    try:
        pipe.save_pretrained(directory, safe_serialization=True)
    finally:
        pipe.transformer = transformer
    for config in directory.glob("*/config.json"):
        entries = json.loads(config.read_text())
        if entries.pop("_name_or_path", None) is not None:
            config.write_text(json.dumps(entries, indent=2, sort_keys=True) + "\n")


def check_repeated_row_attention(transformer, pipe) -> float:
    """Largest difference between the stock model on the pipeline's 276 text rows and the training model on 21."""
    stock = copy.deepcopy(transformer)
    stock.set_attn_processor(JointAttnProcessor2_0())
    embeds, _, pooled, _ = pipe.encode_prompt("a red circle", None, None, do_classifier_free_guidance=False)
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([300.0, 800.0])
    with torch.no_grad():
        full = stock(x, embeds.expand(2, -1, -1), pooled.expand(2, -1), t).sample
        short = transformer(x, embeds[:, : TEXT_TOKENS + 1].expand(2, -1, -1), pooled.expand(2, -1), t).sample
    return (full - short).abs().max().item()


def train_flow(
    out: Path,
    seed: int,
    steps: int,
    batch: int = 32,
    learning_rate: float = 5e-4,
    init_from: Path | None = None,
    logit_mean: float = 0.0,
    shape_weights: dict[str, float] | None = None,
    num_layers: int | None = None,
) -> dict:
    """Train ``steps`` steps from scratch, or from the transformer of the flow pipeline folder ``init_from``, with
    timesteps drawn logit-normal around ``logit_mean`` (above 0: more of the noisy steps, where a shape's layout is
    decided) and each shape's images drawn in proportion to ``shape_weights`` (missing shapes: 1; None: uniformly,
    the shipped recipe), deepened to ``num_layers`` blocks first if given (:func:`deepen`); save the EMA weights as
    ``out/flow_pipeline`` and return the judge's verdict with the stage's settings."""
    torch.manual_seed(seed)
    if init_from is None:
        transformer = build_transformer(num_layers or 6)
    else:
        transformer = SD3Transformer2DModel.from_pretrained(init_from / "transformer", torch_dtype=torch.float32)
    if num_layers is not None and num_layers != transformer.config.num_layers:
        transformer = deepen(transformer, num_layers)
    transformer.set_attn_processor(RepeatedLastRowAttention(ZERO_ROWS))
    pipe = assemble_pipeline(out, transformer)
    gap = check_repeated_row_attention(transformer, pipe)
    logger.info("repeated-row attention vs stock: max |difference| %.2e", gap)
    if gap > 1e-4:
        raise RuntimeError(f"the training attention differs from the stock one by {gap}")
    images, shapes, colours = render_dataset(60_000, seed + 40)
    with torch.no_grad():
        latents = torch.cat(
            [pipe.vae.encode(images[i : i + 1000] * 2 - 1).latent_dist.mean for i in range(0, len(images), 1000)]
        )
    latents = (latents - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
    del images
    draw_probability = None
    if shape_weights:
        weight = torch.tensor([shape_weights.get(name, 1.0) for name in SHAPES], dtype=torch.float64)[shapes]
        draw_probability = (weight / weight.sum()).numpy()
    logger.info("transformer parameters: %.2fM", sum(p.numel() for p in transformer.parameters()) / 1e6)
    cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def encode(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        for text in set(texts) - set(cache):
            with torch.no_grad():
                embeds, _, pooled, _ = pipe.encode_prompt(
                    text, None, None, do_classifier_free_guidance=False, max_sequence_length=1
                )
            cache[text] = (embeds[0], pooled[0])
        return torch.stack([cache[t][0] for t in texts]), torch.stack([cache[t][1] for t in texts])

    ema = copy.deepcopy(transformer).requires_grad_(False)
    scheduler = flow_scheduler()
    opt = torch.optim.AdamW(transformer.parameters(), lr=learning_rate, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=learning_rate, total_steps=steps, pct_start=0.03)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    judge = DemoJudge.load(out / "judge")
    start = time.time()
    for step in range(steps):
        if draw_probability is None:
            idx = torch.from_numpy(rng.integers(len(latents), size=batch))
        else:
            idx = torch.from_numpy(rng.choice(len(latents), size=batch, p=draw_probability))
        texts, _, _ = sample_captions(rng, shapes[idx], colours[idx], p_drop=0.1)
        context, pooled = encode(texts)
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=gen)
        u = compute_density_for_timestep_sampling(
            "logit_normal", batch, logit_mean=logit_mean, logit_std=1.0, generator=gen
        )
        timesteps = scheduler.timesteps[(u * scheduler.config.num_train_timesteps).long()]
        sigma = (timesteps / scheduler.config.num_train_timesteps).view(-1, 1, 1, 1)
        pred = transformer((1 - sigma) * x0 + sigma * noise, context, pooled, timesteps).sample
        loss = F.mse_loss(pred, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
        sched.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), transformer.parameters()):
                pe.lerp_(p, 1 - decay)
        if step % 100 == 0:
            logger.info("flow step %d/%d loss %.4f (%.0f s)", step, steps, loss.item(), time.time() - start)
        if (step + 1) % 1000 == 0 or step + 1 == steps:
            judged = assemble_pipeline(out, _stock(ema))
            judged.set_progress_bar_config(disable=True)
            save_flow_pipeline(judged, out / "flow_pipeline")
            if step + 1 < steps:
                logger.info(
                    "flow step %d judged %s", step + 1, judge_pipeline(judged, judge, seeds_per_caption=2, steps=28)
                )
    metrics = judge_pipeline(judged, judge, seeds_per_caption=4, steps=28)
    metrics.update(
        steps=steps,
        batch_size=batch,
        seed=seed,
        learning_rate=learning_rate,
        init_from=None if init_from is None else str(init_from),
        logit_mean=logit_mean,
        shape_weights=shape_weights or {},
        num_layers=transformer.config.num_layers,
        train_seconds=round(time.time() - start),
        threads=torch.get_num_threads(),
        parameters=sum(p.numel() for p in ema.parameters()),
        sampler="FlowMatchEulerDiscreteScheduler, shift 1",
    )
    logger.info("stage done %s", metrics)
    return metrics


def _stock(transformer):
    """A copy with diffusers' own joint-attention processor, as the saved model runs in a user's pipeline."""
    stock = copy.deepcopy(transformer)
    stock.set_attn_processor(JointAttnProcessor2_0())
    return stock


SHIPPED_RECIPE = ((9000, 5e-4, 0, 6), (5000, 3e-4, 1, 6), (3000, 2e-4, 2, 6), (7000, 3e-4, 4, 8), (3000, 2e-4, 5, 8))
"""The shipped flow demo's stages: steps, OneCycle peak, seed, joint blocks (the fourth deepens the model to 8)."""


def stage_settings(
    steps: list[int] | None,
    learning_rates: list[float] | None,
    seeds: list[int] | None,
    num_layers: list[int] | None,
) -> list[tuple[int, float, int, int | None]]:
    """Each stage's (steps, learning rate, seed, joint blocks). Without ``steps``, the shipped recipe, whose other
    columns a given list replaces (one seed s: the recipe's seeds + s, so 0 is the recipe); with ``steps``, one stage
    per value, each other list giving one value per stage or one for all (one seed s: stage i uses s + i), and
    missing ones seed 0 + i and the model's own depth."""
    stages = "of --steps"
    if steps is None:
        stages = "of the shipped recipe"
        steps, recipe_rates, recipe_seeds, recipe_layers = (list(column) for column in zip(*SHIPPED_RECIPE))
        learning_rates = learning_rates or recipe_rates
        seeds = [seeds[0] + seed for seed in recipe_seeds] if seeds and len(seeds) == 1 else seeds or recipe_seeds
        num_layers = num_layers or recipe_layers
    count = len(steps)
    if learning_rates is None:
        raise ValueError(f"give --learning_rate: one per stage of --steps ({count}) or one for all")
    if seeds is not None and len(seeds) == 1:
        seeds = [seeds[0] + index for index in range(count)]
    columns = {
        "--learning_rate": learning_rates * count if len(learning_rates) == 1 else learning_rates,
        "--seed": seeds or list(range(count)),
        "--num_layers": (num_layers * count if len(num_layers) == 1 else num_layers) if num_layers else [None] * count,
    }
    for flag, values in columns.items():
        if len(values) != count:
            raise ValueError(f"give one {flag} per stage {stages} ({count}) or one for all, got {len(values)}")
    return list(zip(steps, columns["--learning_rate"], columns["--seed"], columns["--num_layers"]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", "--output-dir", type=Path, required=True)
    parser.add_argument(
        "--seed",
        type=int,
        nargs="+",
        default=None,
        help="each stage's seed, or one value s: the shipped recipe's seeds + s, or with --steps stage i's s + i "
        "(default: the shipped recipe's, 0 1 2 4 5; with --steps 0 + i)",
    )
    parser.add_argument(
        "--steps", type=int, nargs="+", default=None, help="steps of each stage (default: the shipped recipe)"
    )
    parser.add_argument(
        "--learning_rate",
        "--learning-rate",
        type=float,
        nargs="+",
        default=None,
        help="each stage's OneCycle peak, or one value for all (default: the shipped recipe's)",
    )
    parser.add_argument(
        "--init_from",
        "--init-from",
        type=Path,
        default=None,
        help="start the first stage from this flow pipeline folder's transformer (its EMA weights), not from scratch",
    )
    parser.add_argument(
        "--logit_mean",
        "--logit-mean",
        type=float,
        default=0.0,
        help="centre of the logit-normal timestep density of every stage (0: SD3's; above 0: noisier steps)",
    )
    parser.add_argument(
        "--oversample",
        nargs="+",
        default=[],
        metavar="SHAPE=FACTOR",
        help="draw this shape's images FACTOR times as often as the others' (e.g. cross=2; default: all alike)",
    )
    parser.add_argument(
        "--num_layers",
        "--num-layers",
        type=int,
        nargs="+",
        default=None,
        help="joint blocks of each stage's model, or one value for all: from scratch, its depth (6 if not given); "
        "a stage that starts from a saved model with fewer blocks deepens it first by zero-gated copies of its "
        "blocks, which change nothing until trained (default: the shipped recipe's, else the saved model's depth)",
    )
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    shape_weights = {}
    for entry in args.oversample:
        name, _, factor = entry.partition("=")
        try:
            shape_weights[name] = float(factor)
        except ValueError:
            parser.error(f"--oversample takes SHAPE=FACTOR, e.g. cross=2; got {entry!r}")
        if name not in SHAPES or not shape_weights[name] > 0:
            parser.error(f"--oversample {entry!r}: the shape must be one of {', '.join(SHAPES)} and the factor above 0")
    if args.init_from is not None and args.steps is None:
        parser.error("--init_from continues a saved model: give the stages to train on it with --steps")
    try:
        stages_settings = stage_settings(args.steps, args.learning_rate, args.seed, args.num_layers)
    except ValueError as error:
        parser.error(str(error))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    stages = []
    init_from = args.init_from
    for steps, learning_rate, seed, num_layers in stages_settings:
        stages.append(
            train_flow(
                args.output_dir,
                seed,
                steps,
                learning_rate=learning_rate,
                init_from=init_from,
                logit_mean=args.logit_mean,
                shape_weights=shape_weights,
                num_layers=num_layers,
            )
        )
        init_from = args.output_dir / "flow_pipeline"
    # the final stage's verdict, and every stage's settings and verdict
    total = sum(stage["steps"] for stage in stages)
    _write_metrics(args.output_dir, "flow", {**stages[-1], "steps": total, "stages": stages})


if __name__ == "__main__":
    main()
