"""One-GPU check at Stable Diffusion 1.5 scale: erasure steps per second and peak GPU memory.

SD 1.5's UNet is built from its config with random weights (no download), runs in bfloat16 under autocast with
float32 LoRA weights (xattn, rank 4), exactly as the trainer does with ``--mixed_precision bf16``; the text
contexts are random (B, 77, 768) tensors. For each attention backend (PyTorch SDPA; xformers when it imports),
batch size per player (1 and 4) and step variant (``benchmarks._common.STEP_VARIANTS``), it times ``--steps``
optimizer steps after ``--warmup`` and records ``torch.cuda.max_memory_allocated``. At batch 1 it also measures
the ESD way's peak memory (a second bf16 UNet as teacher, the cross-attention layers fully fine-tuned in float32
with AdamW) for the memory comparison at 512 px. Prints one table; writes ``results.json`` / ``results.md``.

    bash benchmarks/gpu_check.sh                                   # on the GPU machine (see the script)
    python -m benchmarks.gpu_check --device cpu --tiny --output-dir /tmp/gpu-dry-run   # CPU dry run
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks._common import (RESULTS_ROOT, build_unet, erasure_step, machine_info, markdown_table,
                                random_erasure_batch, run_script, write_results)

VARIANTS = ("nash", "sum_plain", "single_backward")


def move_batch(batch, uncond, device: torch.device):
    """The random ``ErasureBatch`` and unconditional context on ``device``."""
    def move(lat):
        return replace(lat, latents=lat.latents.to(device), timesteps=lat.timesteps.to(device),
                       prompt_index=lat.prompt_index.to(device))

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
    from benchmarks.memory import esd_step, trained_layer_parameters

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
    result = {"seconds_per_step": (time.perf_counter() - start) / steps, "peak_bytes": peak_bytes(device),
              "trainable_parameters": sum(p.numel() for p in params)}
    del student, teacher, optimizer, params
    reset_peak(device)
    return result


def gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def markdown(results: dict) -> str:
    rows = [[r["attention"], r["batch_size"], r["variant"], f"{r['steps_per_second']:.2f}",
             f"{r['seconds_per_step'] * 1e3:.0f}", gib(r["peak_bytes"])] for r in results["rows"]]
    for r in results["esd_way"]:
        rows.append([r["attention"], r["batch_size"], "ESD way (teacher copy, full xattn FT, +preserve)", "-",
                     f"{r['seconds_per_step'] * 1e3:.0f}", gib(r["peak_bytes"])])
    table = markdown_table(["attention", "batch/player", "variant", "steps/s", "ms/step", "peak GiB"], rows)
    s, m = results["settings"], results["machine"]
    return (f"# GPU check: {s['architecture']} UNet, {s['resolution']} px ({s['latent_size']}x{s['latent_size']} "
            f"latents), {s['dtype']}, LoRA xattn r4\n\n{table}\n"
            f"{m['gpu'] or m['cpu']}; torch {m['libraries']['torch']}; {m['date_utc']}.\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true",
                   help="SD 1.5's block structure at a tiny width, 8x8 latents (dry run)")
    p.add_argument("--latent-size", type=int, default=None, help="default 64 (512 px), 8 with --tiny")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--attention", nargs="+", choices=["sdpa", "xformers"], default=["sdpa", "xformers"],
                   help="xformers is skipped (and said so) when it does not import")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-esd", dest="esd", action="store_false", help="skip the ESD way's memory measurement")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--output-dir", type=Path, default=RESULTS_ROOT / "gpu_check")
    p.add_argument("--overwrite", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    from munba_diffusion.diffusion.lora import ErasureLoraConfig, add_erasure_lora

    from benchmarks._common import prepare_results_dir

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("no CUDA device is visible; run on a GPU machine or pass --device cpu --tiny for a dry run")
    out = prepare_results_dir(args.output_dir, args.overwrite)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    architecture = "sd15-tiny" if args.tiny else "sd15"
    latent_size = args.latent_size or (8 if args.tiny else 64)
    backends = [b for b in args.attention if b != "xformers" or xformers_available()]
    skipped = [b for b in args.attention if b not in backends]
    start = time.time()
    unet = build_unet(architecture).to(device, dtype)
    params = add_erasure_lora(unet, ErasureLoraConfig(rank=4, target="xattn"))
    print(f"built {architecture} ({sum(p.numel() for p in unet.parameters()) / 1e6:.0f}M parameters) in "
          f"{time.time() - start:.0f} s; attention backends {backends}"
          + (f" (skipped: {skipped}, not importable)" if skipped else ""),
          flush=True)
    rows, esd_rows = [], []
    batches = {b: move_batch(*random_erasure_batch(unet, b, latent_size, torch.Generator().manual_seed(0)), device)
               for b in args.batch_sizes}
    for backend in backends:
        set_attention(unet, backend)
        for batch_size, (batch, uncond) in batches.items():
            for variant in args.variants:
                row = {"attention": backend, "batch_size": batch_size, "variant": variant,
                       **time_steps(variant, unet, batch, uncond, params, device, dtype, args.steps, args.warmup)}
                rows.append(row)
                print(f"{backend:8s} batch {batch_size} {variant:16s} {row['steps_per_second']:7.2f} steps/s "
                      f"peak {gib(row['peak_bytes'])} GiB", flush=True)
    del unet, params
    if args.esd:  # SDPA, smallest batch: the memory comparison with our rows above
        batch_size = min(args.batch_sizes)
        esd_rows.append({"attention": "sdpa", "batch_size": batch_size,
                         **esd_peak(architecture, *batches[batch_size], device, dtype, steps=2)})
        print(f"sdpa     batch {batch_size} ESD way peak {gib(esd_rows[-1]['peak_bytes'])} GiB", flush=True)
    results = {"benchmark": "gpu_check", "machine": machine_info(),
               "settings": {"architecture": architecture, "latent_size": latent_size, "resolution": latent_size * 8,
                            "dtype": args.dtype, "steps": args.steps, "warmup": args.warmup, "device": str(device),
                            "attention_skipped": skipped, "lora": {"rank": 4, "target": "xattn"}},
               "rows": rows, "esd_way": esd_rows, "total_seconds": time.time() - start}
    write_results(out, results, markdown)
    return results


if __name__ == "__main__":
    run_script(main, "gpu_check")
