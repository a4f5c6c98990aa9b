"""One-GPU check at Stable Diffusion 1.5 scale (SDXL's with ``--architecture sdxl``, FLUX.1-dev's with ``--architecture
flux``): erasure steps per second and peak GPU memory, the white-box attack's cost per prompt and the robust mode's
step time (:func:`robustness_costs`).

SD 1.5's UNet is built from its config with random weights (no download), runs in bfloat16 under autocast with
float32 LoRA weights (xattn, rank 4), exactly as the trainer does with ``--mixed_precision bf16``; the text
contexts are random (B, 77, 768) tensors. For each attention backend (PyTorch SDPA; xformers when it imports),
batch size per player (1 and 4) and step variant (``benchmarks._common.STEP_VARIANTS``), it times ``--steps``
optimizer steps after ``--warmup`` and records ``torch.cuda.max_memory_allocated``. At batch 1 it also measures
the ESD way's peak memory (a second bf16 UNet as teacher, the cross-attention layers fully fine-tuned in float32
with AdamW) for the memory comparison at 512 px. Prints one table; writes ``results.json`` / ``results.md``.

``--architecture flux``: FLUX.1-dev's transformer (12B parameters, guidance embedding) from its config, random
weights initialised on the device (float32, then cast to bf16), float32 LoRA on every attention projection and
the prompt's embeddings (``attn``: text stream, image stream, single-stream blocks; rank 4), called through the
trainer's ``denoise`` (latents (B, 16, H, W) packed into 2x2-patch tokens inside it; per row 512 random T5 states
plus the packed row ``[pooled 768, guidance 3.5, 0...]``; float timesteps, sigma x 1000). The default latent size
is 128 (1024 px). Only the bargained steps are timed here (its default attention processor, PyTorch SDPA): the ESD
way's memory and the robustness costs are measured on UNets only.

    bash benchmarks/gpu_check.sh                                   # on the GPU machine (see the script)
    python -m benchmarks.gpu_check --device cpu --tiny --output_dir /tmp/gpu-dry-run   # CPU dry run
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from munba_diffusion.config import check_options, option, parse_config
from munba_diffusion.io import machine_record

from ._common import (
    FLUX_TEXT_LENGTHS,
    RESULTS_ROOT,
    build_flux_transformer,
    build_unet,
    check_results,
    erasure_step,
    markdown_table,
    random_erasure_batch,
    random_flux_erasure_batch,
    run_script,
    tuples,
    write_results,
)

VARIANTS = ("nash", "sum_plain", "single_backward")
ARCHITECTURES = ("sd15", "sdxl", "flux")
NATIVE_LATENT_SIZES = {"sd15": 64, "sdxl": 128, "flux": 128}
# flux: the text and image streams, the single blocks and the prompt's embeddings
LORA_TARGETS = {"sd15": "xattn", "sdxl": "xattn", "flux": "attn"}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class GpuCheckConfig:
    """Options of ``python -m benchmarks.gpu_check``."""

    device: str = option("cuda", "torch device (cpu with --tiny for a dry run)")
    architecture: str = option(
        "sd15",
        "the denoiser: SD 1.5's UNet (512 px), SDXL base's UNet (1024 px) or FLUX.1-dev's transformer (1024 px)",
        choices=ARCHITECTURES,
    )
    tiny: bool = option(False, "the architecture's block structure at a tiny width, 8x8 latents (dry run)")
    latent_size: int | None = option(
        None, "latent height/width (default: the native size, 64 for sd15, 128 for sdxl and flux; 8 with --tiny)", low=1
    )
    gradient_checkpointing: bool = option(
        False, "recompute the denoiser's activations in the backward (a memory lever)"
    )
    batch_sizes: tuple[int, ...] = option((1, 4), "x_t per player", low=1)
    variants: tuple[str, ...] = option(VARIANTS, "step variants timed", choices=VARIANTS)
    attention: tuple[str, ...] = option(
        ("sdpa", "xformers"),
        "attention backends (xformers is skipped, and said so, when it does not import)",
        choices=("sdpa", "xformers"),
    )
    dtype: str = option("bf16", "UNet dtype (autocast; LoRA weights stay float32)", choices=tuple(DTYPES))
    steps: int = option(10, "timed optimizer steps per row", low=1)
    warmup: int = option(3, "untimed steps first", low=0)
    esd: bool = option(True, "skip the ESD way's memory measurement", flag="no_esd")
    robustness: bool = option(
        True, "skip the white-box attack's cost per prompt and the robust mode's step time", flag="no_robustness"
    )
    threads: int | None = option(None, "torch CPU threads (default: torch's choice)", low=1)
    output_dir: Path = option(RESULTS_ROOT / "gpu_check", "folder for results.json and results.md")
    overwrite: bool = option(False, "replace results already in --output_dir")

    def __post_init__(self) -> None:
        tuples(self)
        check_options(self)


def move_batch(batch, uncond, device: torch.device):
    """The random ``ErasureBatch`` and unconditional context on ``device``."""

    def move(lat):
        return replace(
            lat,
            latents=lat.latents.to(device),
            timesteps=lat.timesteps.to(device),
            prompt_index=lat.prompt_index.to(device),
        )

    (lat, ctx, anchor), (plat, pctx) = batch.forget[0], batch.preserve
    moved = type(batch)(forget=[(move(lat), ctx.to(device), anchor.to(device))], preserve=(move(plat), pctx.to(device)))
    return moved, uncond.to(device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def set_attention(unet, backend: str) -> None:
    if backend == "xformers":
        unet.enable_xformers_memory_efficient_attention()
    else:
        from diffusers.models.attention_processor import AttnProcessor2_0

        unet.set_attn_processor(AttnProcessor2_0())


def xformers_available() -> bool:
    try:
        import xformers.ops  # noqa: F401
    except Exception:  # an import of a mismatched build can fail with any error
        return False
    return True


def time_steps(variant: str, unet, batch, uncond, params, device, dtype, steps: int, warmup: int) -> dict:
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    reset_peak(device)
    for _ in range(warmup):
        erasure_step(variant, unet, batch, uncond, params, optimizer, device, dtype, autocast=dtype != torch.float32)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        erasure_step(variant, unet, batch, uncond, params, optimizer, device, dtype, autocast=dtype != torch.float32)
    synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    del optimizer
    return {"seconds_per_step": seconds, "steps_per_second": 1 / seconds, "peak_bytes": peak_bytes(device)}


def esd_peak(architecture: str, batch, uncond, device, dtype, steps: int) -> dict:
    """Peak memory of the ESD way: a fresh UNet in ``dtype`` whose cross-attention layers train fully in float32
    with AdamW, a second copy as frozen teacher; one backward of forget + preservation loss per step."""
    from .memory import esd_step, trained_layer_parameters

    student = build_unet(architecture).to(device, dtype).requires_grad_(False)
    teacher = copy.deepcopy(student)
    params = trained_layer_parameters(student, "xattn")
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    reset_peak(device)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            esd_step(student, teacher, batch, uncond, params, optimizer, preserve=True)
    synchronize(device)
    result = {
        "seconds_per_step": (time.perf_counter() - start) / steps,
        "peak_bytes": peak_bytes(device),
        "trainable_parameters": sum(p.numel() for p in params),
    }
    del student, teacher, optimizer, params
    reset_peak(device)
    return result


def robustness_costs(unet, batch, uncond, params, device, dtype, steps: int, warmup: int) -> dict:
    """The white-box attack's and the robust mode's costs at this scale (defaults of both):

    - one attack iteration: UNet forward + backward at batch 1 with the gradient taken with respect to the prompt
      context (the prefix's path; the text encoder's share is left out: CLIP-L's text tower is ~1/7 of SD 1.5's
      UNet and runs on 77 tokens);
    - one generation check: 2 x 50 UNet forwards at batch 1 (classifier-free guidance, 50 steps; VAE decode left
      out); the attack's cost per prompt is ``40 x iteration + checks x generation`` (up to 40 checks);
    - the robust mode's step: a nash step of three players (preserve, forget, adversarial) plus a tenth of a prefix
      search (``--adversarial_steps 10`` every ``--adversarial_every 5`` steps = 2 search iterations per step, each a
      UNet forward + backward with respect to the context at the training batch size).
    """
    from munba_diffusion.bargaining import get_combiner
    from munba_diffusion.diffusion.players import erasure_players
    from munba_diffusion.step import BargainedUpdate

    autocast = dtype != torch.float32

    def context_grad(lat, ctx) -> None:
        leaf = ctx.detach().clone().requires_grad_(True)
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            loss = unet(lat.latents, lat.timesteps, encoder_hidden_states=leaf).sample.float().pow(2).mean()
        torch.autograd.grad(loss, [leaf])

    def timed(function, repeats: int) -> float:
        for _ in range(warmup):
            function()
        synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            function()
        synchronize(device)
        return (time.perf_counter() - start) / repeats

    lat, ctx, anchor = batch.forget[0]
    one = replace(lat, latents=lat.latents[:1], timesteps=lat.timesteps[:1])
    reset_peak(device)
    iteration = timed(lambda: context_grad(one, ctx[:1]), steps)
    attack_peak = peak_bytes(device)

    @torch.no_grad()
    def generation() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            for _ in range(50):
                unet(
                    one.latents.repeat(2, 1, 1, 1),
                    one.timesteps.repeat(2),
                    encoder_hidden_states=ctx[:1].repeat(2, 1, 1),
                )

    check = timed(generation, max(1, steps // 5))

    names = ["preserve", "forget", "adversarial"]
    robust_batch = replace(batch, adversarial=[(lat, ctx, anchor, ctx + 0.01)])
    update = BargainedUpdate(params, get_combiner("nash"))
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def robust_step() -> None:
        def autocast_context():
            return torch.autocast(device.type, dtype=dtype, enabled=autocast)

        players = erasure_players(
            unet, robust_batch, uncond, "esd", 1.0, names, device, dtype, autocast=autocast_context
        )
        update.accumulate_players(players)
        update.write_gradients()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for _ in range(2):
            context_grad(lat, ctx)

    reset_peak(device)
    robust = timed(robust_step, steps)
    return {
        "attack_iteration_seconds": iteration,
        "attack_generation_seconds": check,
        "attack_seconds_per_prompt_max": 40 * iteration + 40 * check,
        "attack_seconds_per_prompt_min": iteration + check,
        "attack_peak_bytes": attack_peak,
        "robust_step_seconds": robust,
        "robust_step_peak_bytes": peak_bytes(device),
    }


def gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def markdown(results: dict) -> str:
    rows = [
        [
            r["attention"],
            r["batch_size"],
            r["variant"],
            f"{r['steps_per_second']:.2f}",
            f"{r['seconds_per_step'] * 1e3:.0f}",
            gib(r["peak_bytes"]),
        ]
        for r in results["rows"]
    ]
    for r in results["esd_way"]:
        rows.append(
            [
                r["attention"],
                r["batch_size"],
                "ESD way (teacher copy, full xattn FT, +preserve)",
                "-",
                f"{r['seconds_per_step'] * 1e3:.0f}",
                gib(r["peak_bytes"]),
            ]
        )
    robust = results.get("robustness")
    if robust:
        rows.append(
            [
                "sdpa",
                results["robustness_batch_size"],
                "robust mode (3 players + prefix search)",
                "-",
                f"{robust['robust_step_seconds'] * 1e3:.0f}",
                gib(robust["robust_step_peak_bytes"]),
            ]
        )
    table = markdown_table(["attention", "batch/player", "variant", "steps/s", "ms/step", "peak GiB"], rows)
    if robust:
        table += (
            f"\n\nWhite-box attack per prompt (40 iterations, 5 prefix tokens): one iteration "
            f"{robust['attack_iteration_seconds'] * 1e3:.0f} ms, one check generation (50 steps, guidance) "
            f"{robust['attack_generation_seconds']:.2f} s; per prompt {robust['attack_seconds_per_prompt_min']:.1f} s "
            f"(success at the first check) to {robust['attack_seconds_per_prompt_max']:.0f} s (all 40 checks); peak "
            f"{gib(robust['attack_peak_bytes'])} GiB.\n"
        )
    s, m = results["settings"], results["machine"]
    lora = s.get("lora", {"rank": 4, "target": "xattn"})
    flux = s["architecture"].startswith("flux")
    return (
        f"# GPU check: {s['architecture']} {'transformer' if flux else 'UNet'}, {s['resolution']} px "
        f"({s['latent_size']}x{s['latent_size']} latents), {s['dtype']} frozen weights, float32 LoRA "
        f"{lora['target']} r{lora['rank']}"
        + (f", {s['text_length']} T5 tokens + 1 packed row" if flux else "")
        + (", gradient checkpointing" if s.get("gradient_checkpointing") else "")
        + f"\n\n{table}\n"
        f"{m['gpu'] or m['cpu']}; torch {m['libraries']['torch']}; {m['date_utc']}.\n"
    )


def run(config: GpuCheckConfig) -> dict:
    from munba_diffusion.diffusion.lora import ErasureLoraConfig, add_erasure_lora

    if config.threads:
        torch.set_num_threads(config.threads)
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("no CUDA device is visible; run on a GPU machine or pass --device cpu --tiny for a dry run")
    check_results(config.output_dir, config.overwrite)
    dtype = DTYPES[config.dtype]
    flux = config.architecture == "flux"
    architecture = config.architecture + ("-tiny" if config.tiny else "")
    latent_size = config.latent_size or (8 if config.tiny else NATIVE_LATENT_SIZES[config.architecture])
    if flux and latent_size % 2:
        raise ValueError(f"FLUX packs 2x2 latent patches: --latent_size must be even; got {latent_size}")
    if flux:  # FLUX's attention processor calls PyTorch SDPA; the xformers switch is the UNets'
        backends = ["sdpa"]
        why = "the FLUX transformer runs its own SDPA processor"
    else:
        backends = [b for b in config.attention if b != "xformers" or xformers_available()]
        why = "not importable"
    skipped = [b for b in config.attention if b not in backends]
    target = LORA_TARGETS[config.architecture]
    text_length = FLUX_TEXT_LENGTHS[architecture] if flux else None
    start = time.time()
    if flux:
        unet = build_flux_transformer(architecture, device=device, dtype=dtype)
    else:
        unet = build_unet(architecture).to(device, dtype)
    params = add_erasure_lora(unet, ErasureLoraConfig(rank=4, target=target))
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    print(
        f"built {architecture} ({sum(p.numel() for p in unet.parameters()) / 1e6:.0f}M parameters, LoRA {target} "
        f"{sum(p.numel() for p in params) / 1e6:.1f}M) in {time.time() - start:.0f} s; attention backends {backends}"
        + (f" (skipped: {skipped}, {why})" if skipped else ""),
        flush=True,
    )
    rows, esd_rows = [], []

    def random_batch(model, batch_size: int):
        generator = torch.Generator().manual_seed(0)
        if flux:
            return random_flux_erasure_batch(model, batch_size, latent_size, generator, text_length=text_length)
        return random_erasure_batch(model, batch_size, latent_size, generator)

    batches = {b: move_batch(*random_batch(unet, b), device) for b in config.batch_sizes}
    for backend in backends:
        if not flux:
            set_attention(unet, backend)
        for batch_size, (batch, uncond) in batches.items():
            for variant in config.variants:
                row = {
                    "attention": backend,
                    "batch_size": batch_size,
                    "variant": variant,
                    **time_steps(variant, unet, batch, uncond, params, device, dtype, config.steps, config.warmup),
                }
                rows.append(row)
                print(
                    f"{backend:8s} batch {batch_size} {variant:16s} {row['steps_per_second']:7.2f} steps/s "
                    f"peak {gib(row['peak_bytes'])} GiB",
                    flush=True,
                )
    robustness = None
    if flux and (config.robustness or config.esd):
        print("flux: the ESD way's memory and the robustness costs are measured on UNets only (skipped)", flush=True)
    if config.robustness and not flux:
        set_attention(unet, "sdpa")
        batch_size = min(config.batch_sizes)
        robustness = robustness_costs(unet, *batches[batch_size], params, device, dtype, config.steps, config.warmup)
        print(
            f"attack iteration {robustness['attack_iteration_seconds'] * 1e3:.0f} ms, check generation "
            f"{robustness['attack_generation_seconds']:.2f} s; robust step {robustness['robust_step_seconds'] * 1e3:.0f} ms",
            flush=True,
        )
    del unet, params
    if config.esd and not flux:  # SDPA, smallest batch: the memory comparison with our rows above
        batch_size = min(config.batch_sizes)
        esd_rows.append(
            {
                "attention": "sdpa",
                "batch_size": batch_size,
                **esd_peak(architecture, *batches[batch_size], device, dtype, steps=2),
            }
        )
        print(f"sdpa     batch {batch_size} ESD way peak {gib(esd_rows[-1]['peak_bytes'])} GiB", flush=True)
    results = {
        "benchmark": "gpu_check",
        "machine": machine_record(),
        "settings": {
            "architecture": architecture,
            "gradient_checkpointing": config.gradient_checkpointing,
            "latent_size": latent_size,
            "resolution": latent_size * 8,
            "dtype": config.dtype,
            "steps": config.steps,
            "warmup": config.warmup,
            "device": str(device),
            "attention_skipped": skipped,
            "lora": {"rank": 4, "target": target},
            "text_length": text_length,
        },
        "rows": rows,
        "esd_way": esd_rows,
        "robustness": robustness,
        "robustness_batch_size": min(config.batch_sizes),
        "total_seconds": time.time() - start,
    }
    write_results(config.output_dir, results, markdown, overwrite=config.overwrite, echo=True)
    return results


def main(argv: list[str] | None = None) -> dict:
    return run(parse_config(GpuCheckConfig, argv, description=__doc__, prog="python -m benchmarks.gpu_check"))


if __name__ == "__main__":
    run_script(main, "gpu_check")
