"""Train the demo world's models from scratch on a CPU (about an hour on 2 cores), in four stages:

1. ``clip``:  a tiny ``CLIPModel`` trained contrastively on captioned renders. Because many captions in a batch
   describe the same thing, the target of caption i for image j is uniform over the images it truly describes
   (a supervised-contrastive variant of CLIP's loss).
2. ``judge``: the shape/colour classifier (``DemoJudge``).
3. ``vae``:   an ``AutoencoderKL`` with 2x downsampling (32x32x3 <-> 16x16x4), MSE + tiny KL.
4. ``unet``:  a ``UNet2DConditionModel`` on VAE latents, conditioned on the frozen CLIP text tower (as SD's UNet
   is on CLIP ViT-L/14), epsilon-prediction DDPM loss, 10% caption dropout for classifier-free guidance, EMA.

The result is a stock ``StableDiffusionPipeline`` folder plus the CLIP and judge folders (the ones packaged in
``munba_diffusion/demo/weights``, rebuilt from a checkout with)::

    python scripts/demo/train_demo.py --output_dir munba_diffusion/demo/weights --seed 0 --stage all

This script builds the demo; it is not part of the installed package (which only loads what it made).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from demo_tokenizer import MAX_LENGTH, write_clip_vocabulary
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    EulerAncestralDiscreteScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
)

from munba_diffusion.clip_features import clip_image_embeddings, clip_text_embeddings
from munba_diffusion.demo.judge import DemoJudge
from munba_diffusion.demo.world import (
    COLOURS,
    SHAPES,
    canonical_caption,
    caption,
    render_scene,
    scenes_to_tensor,
    vocabulary_corpus,
)

logger = logging.getLogger("train_demo")
CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)


# ----------------------------------------------------------------------------------------------- data
def render_dataset(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n renders with balanced labels: images (n,3,32,32) in [0,1], shape ids, colour ids."""
    rng = np.random.default_rng(seed)
    shapes = rng.integers(len(SHAPES), size=n)
    colours = rng.integers(len(COLOURS), size=n)
    images = [render_scene(rng, SHAPES[s], COLOURS[c]) for s, c in zip(shapes, colours)]
    return torch.from_numpy(scenes_to_tensor(images)), torch.from_numpy(shapes), torch.from_numpy(colours)


def sample_captions(rng: np.random.Generator, shapes: torch.Tensor, colours: torch.Tensor, p_drop: float):
    """Captions for labelled images; returns (captions, named_shape or -1, named_colour or -1)."""
    texts, named_s, named_c = [], [], []
    for s, c in zip(shapes.tolist(), colours.tolist()):
        u = rng.random()
        keep_s, keep_c = True, True
        if u < p_drop:
            keep_s = keep_c = False
        elif u < p_drop + 0.12:
            keep_c = False
        elif u < p_drop + 0.20:
            keep_s = False
        texts.append(caption(rng, SHAPES[s] if keep_s else None, COLOURS[c] if keep_c else None))
        named_s.append(s if keep_s else -1)
        named_c.append(c if keep_c else -1)
    return texts, torch.tensor(named_s), torch.tensor(named_c)


def tokenize(tokenizer, texts: list[str], pad_to_max: bool = False) -> torch.Tensor:
    return tokenizer(
        texts,
        padding="max_length" if pad_to_max else "longest",
        max_length=MAX_LENGTH,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def load_tokenizer(directory: Path):
    return CLIPTokenizer.from_pretrained(str(directory), model_max_length=MAX_LENGTH)


# ----------------------------------------------------------------------------------------------- clip
def clip_zero_shot_accuracy(model, tokenizer, images, shapes, colours) -> dict[str, float]:
    model.eval()
    with torch.no_grad():
        pixel = (images - CLIP_MEAN) / CLIP_STD
        img = F.normalize(clip_image_embeddings(model, pixel), dim=-1)
        out = {}
        for key, names, labels in (("shape", SHAPES, shapes), ("colour", COLOURS, colours)):
            prompts = [canonical_caption(n, None) if key == "shape" else canonical_caption(None, n) for n in names]
            txt = F.normalize(clip_text_embeddings(model, tokenize(tokenizer, prompts)), dim=-1)
            out[key] = ((img @ txt.T).argmax(-1) == labels).float().mean().item()
    model.train()
    return out


def train_clip(out: Path, seed: int, steps: int) -> None:
    torch.manual_seed(seed)
    tok_dir = write_clip_vocabulary(vocabulary_corpus(), out / "clip")
    tokenizer = load_tokenizer(tok_dir)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=MAX_LENGTH,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        ),
        vision_config=dict(
            image_size=32,
            patch_size=8,
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_channels=3,
        ),
        projection_dim=64,
    )
    model = CLIPModel(config)
    images, shapes, colours = render_dataset(40_000, seed)
    val = render_dataset(2_000, seed + 1)
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.05)
    batch = 128
    for step in range(steps):
        idx = torch.from_numpy(rng.integers(len(images), size=batch))
        texts, ns, nc = sample_captions(rng, shapes[idx], colours[idx], p_drop=0.0)
        pixel = (images[idx] - CLIP_MEAN) / CLIP_STD
        output = model(input_ids=tokenize(tokenizer, texts), pixel_values=pixel)
        logits = output.logits_per_text  # (text, image)
        s, c = shapes[idx], colours[idx]
        match = ((ns[:, None] < 0) | (ns[:, None] == s[None])) & ((nc[:, None] < 0) | (nc[:, None] == c[None]))
        target = match.float() / match.float().sum(-1, keepdim=True)
        loss_t = -(target * logits.log_softmax(-1)).sum(-1).mean()
        target_i = match.T.float() / match.T.float().sum(-1, keepdim=True)
        loss_i = -(target_i * logits.T.log_softmax(-1)).sum(-1).mean()
        loss = (loss_t + loss_i) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            logger.info(
                "clip step %d loss %.4f zero-shot %s",
                step,
                loss.item(),
                clip_zero_shot_accuracy(model, tokenizer, *val),
            )
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
    )
    model.save_pretrained(out / "clip")
    processor.save_pretrained(out / "clip")
    acc = clip_zero_shot_accuracy(model, tokenizer, *val)
    _write_metrics(
        out,
        "clip",
        {
            "zero_shot_shape": acc["shape"],
            "zero_shot_colour": acc["colour"],
            "val_images": len(val[0]),
            "steps": steps,
            "seed": seed,
        },
    )


# ----------------------------------------------------------------------------------------------- judge
def train_judge(out: Path, seed: int, steps: int) -> None:
    torch.manual_seed(seed)
    images, shapes, colours = render_dataset(40_000, seed + 10)
    val_images, val_shapes, val_colours = render_dataset(4_000, seed + 11)
    judge = DemoJudge(width=16)
    opt = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(len(images), (64,), generator=gen)
        shape_logits, colour_logits = judge(images[idx])
        loss = F.cross_entropy(shape_logits, shapes[idx]) + F.cross_entropy(colour_logits, colours[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0:
            logger.info("judge step %d loss %.4f", step, loss.item())
    judge.eval()
    pred = judge.classify(val_images)
    metrics = {
        "shape_accuracy": (pred.shape == val_shapes).float().mean().item(),
        "colour_accuracy": (pred.colour == val_colours).float().mean().item(),
        "fresh_renders": len(val_images),
        "steps": steps,
        "seed": seed,
    }
    judge.save(out / "judge")
    _write_metrics(out, "judge", metrics)
    logger.info("judge %s", metrics)


# ----------------------------------------------------------------------------------------------- vae
def train_vae(out: Path, seed: int, steps: int) -> None:
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=32,
    )
    images, _, _ = render_dataset(20_000, seed + 20)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        x = images[torch.randint(len(images), (16,), generator=gen)] * 2 - 1
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        loss = F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0:
            logger.info("vae step %d loss %.5f", step, loss.item())
    vae.eval()
    with torch.no_grad():
        latents = torch.cat(
            [vae.encode(images[i : i + 500] * 2 - 1).latent_dist.mean for i in range(0, min(5000, len(images)), 500)]
        )
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    vae.save_pretrained(out / "pipeline" / "vae")
    judge = DemoJudge.load(out / "judge")
    val, vs, vc = render_dataset(2_000, seed + 21)
    with torch.no_grad():
        recon = torch.cat(
            [vae.decode(vae.encode(val[i : i + 500] * 2 - 1).latent_dist.mean).sample for i in range(0, len(val), 500)]
        )
        pred = judge.classify(((recon + 1) / 2).clamp(0, 1))
    _write_metrics(
        out,
        "vae",
        {
            "recon_mse": F.mse_loss((recon + 1) / 2, val).item(),
            "judge_shape_on_recon": (pred.shape == vs).float().mean().item(),
            "judge_colour_on_recon": (pred.colour == vc).float().mean().item(),
            "scaling_factor": vae.config.scaling_factor,
            "steps": steps,
            "seed": seed,
        },
    )


# ----------------------------------------------------------------------------------------------- unet
def _build_unet(cross_attention_dim: int):
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(48, 96, 96),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=16,
    )


def _scheduler_config() -> dict:
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )


def demo_scheduler():
    """The shipped sampler: Euler ancestral (its fresh noise per step draws crisper shapes than DDIM here)."""
    return EulerAncestralDiscreteScheduler.from_config(_scheduler_config())


def assemble_pipeline(out: Path, unet):
    """A StableDiffusionPipeline from the trained parts (text encoder = the CLIP's text tower)."""
    clip = CLIPModel.from_pretrained(out / "clip")
    text_encoder = CLIPTextModel(CLIPTextConfig(**clip.config.text_config.to_dict()))
    text_encoder.load_state_dict(clip.text_model.state_dict())
    return StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(out / "pipeline" / "vae"),
        text_encoder=text_encoder.eval(),
        tokenizer=load_tokenizer(out / "clip"),
        unet=unet,
        scheduler=demo_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_demo_pipeline(pipe, directory: Path) -> None:
    """Save with the UNet's weights stored in float16 (half the package size; diffusers loads them as float32)."""
    unet = pipe.unet
    pipe.unet = copy.deepcopy(unet).to(torch.float16)
    try:
        pipe.save_pretrained(directory, safe_serialization=True)
    finally:
        pipe.unet = unet


def judge_pipeline(pipe, judge, seeds_per_caption: int = 2, steps: int = 25, guidance: float = 4.0) -> dict:
    """Generate every shape x colour canonical caption and measure how often the judge agrees."""
    prompts, shapes, colours = [], [], []
    for s, shape in enumerate(SHAPES):
        for c, colour in enumerate(COLOURS):
            for _ in range(seeds_per_caption):
                prompts.append(canonical_caption(shape, colour))
                shapes.append(s)
                colours.append(c)
    gens = [torch.Generator().manual_seed(1000 + i) for i in range(len(prompts))]
    images = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=gens, output_type="pt").images
    pred = judge.classify(images)
    return {
        "shape_accuracy": (pred.shape == torch.tensor(shapes)).float().mean().item(),
        "colour_accuracy": (pred.colour == torch.tensor(colours)).float().mean().item(),
        "images": len(prompts),
        "steps": steps,
        "guidance_scale": guidance,
    }


def train_unet(out: Path, seed: int, steps: int, batch: int = 32) -> None:
    torch.manual_seed(seed)
    vae = AutoencoderKL.from_pretrained(out / "pipeline" / "vae").eval()
    clip = CLIPModel.from_pretrained(out / "clip").eval()
    tokenizer = load_tokenizer(out / "clip")
    images, shapes, colours = render_dataset(60_000, seed + 30)
    with torch.no_grad():
        latents = (
            torch.cat([vae.encode(images[i : i + 1000] * 2 - 1).latent_dist.mean for i in range(0, len(images), 1000)])
            * vae.config.scaling_factor
        )
    del images
    unet = _build_unet(clip.config.text_config.hidden_size)
    logger.info("unet parameters: %.2fM", sum(p.numel() for p in unet.parameters()) / 1e6)
    ema = copy.deepcopy(unet).requires_grad_(False)
    noise_scheduler = DDPMScheduler(**{k: v for k, v in _scheduler_config().items() if k != "set_alpha_to_one"})
    opt = torch.optim.AdamW(unet.parameters(), lr=4e-4, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=4e-4, total_steps=steps, pct_start=0.03)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    judge = DemoJudge.load(out / "judge")
    start = time.time()
    for step in range(steps):
        idx = torch.from_numpy(rng.integers(len(latents), size=batch))
        texts, _, _ = sample_captions(rng, shapes[idx], colours[idx], p_drop=0.1)
        with torch.no_grad():
            context = clip.text_model(input_ids=tokenize(tokenizer, texts, pad_to_max=True)).last_hidden_state
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, 1000, (batch,), generator=gen)
        pred = unet(noise_scheduler.add_noise(x0, noise, t), t, context).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - decay)
        if step % 100 == 0:
            logger.info("unet step %d/%d loss %.4f (%.0f s)", step, steps, loss.item(), time.time() - start)
        if (step + 1) % 500 == 0:
            pipe = assemble_pipeline(out, ema)
            pipe.set_progress_bar_config(disable=True)
            save_demo_pipeline(pipe, out / "pipeline")
            logger.info("unet step %d judged %s", step + 1, judge_pipeline(pipe, judge, seeds_per_caption=1))
    pipe = assemble_pipeline(out, ema)
    pipe.set_progress_bar_config(disable=True)
    save_demo_pipeline(pipe, out / "pipeline")
    metrics = judge_pipeline(pipe, judge, seeds_per_caption=4)
    metrics.update(
        steps=steps,
        batch_size=batch,
        seed=seed,
        train_seconds=round(time.time() - start),
        parameters=sum(p.numel() for p in ema.parameters()),
    )
    _write_metrics(out, "unet", metrics)
    logger.info("final %s", metrics)


def _write_metrics(out: Path, stage: str, metrics: dict) -> None:
    path = out / "training_metrics.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data[stage] = metrics
    path.write_text(json.dumps(data, indent=2) + "\n")


STAGE_STEPS = {"clip": 1000, "judge": 1200, "vae": 1500, "unet": 3000}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", "--output-dir", type=Path, required=True)
    parser.add_argument("--stage", choices=["all", *STAGE_STEPS], default="all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="override the stage's step count")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    stages = list(STAGE_STEPS) if args.stage == "all" else [args.stage]
    for stage in stages:
        steps = args.steps or STAGE_STEPS[stage]
        logger.info("stage %s: %d steps", stage, steps)
        {"clip": train_clip, "judge": train_judge, "vae": train_vae, "unet": train_unet}[stage](
            args.output_dir, args.seed, steps
        )


if __name__ == "__main__":
    main()
