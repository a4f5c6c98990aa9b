"""Time per erasure step: Nash bargaining vs a plain sum vs one ordinary backward pass.

Every variant runs the trainer's forwards (frozen forwards with adapters disabled, one LoRA forward per
player on that player's rows) on the same random batch, then clips and takes an AdamW step; they differ only in
how the two losses become ``.grad`` (``_common.STEP_VARIANTS``). Rounds interleave the variants in a shuffled
order so that load from other processes hits them alike; we report medians over rounds and the median of
per-round ratios.
The Gram matrix + weights are also timed alone on fixed gradients (``gram_and_weights``), which is the whole
difference between ``nash`` and ``sum_plain``.

    python -m benchmarks.overhead --models munba-demo sd15 --output_dir benchmarks/results/overhead
"""

from __future__ import annotations

import os
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from munba_diffusion.config import check_options, config_record, option, parse_config
from munba_diffusion.diffusion.lora import TARGET_SETS
from munba_diffusion.io import machine_record
from munba_diffusion.models import DEMO_MODEL

from ._common import (
    PLAYERS,
    RESULTS_ROOT,
    STEP_VARIANTS,
    check_results,
    erasure_step,
    load_unet,
    markdown_table,
    quantiles,
    random_erasure_batch,
    run_script,
    save_figure,
    tuples,
    write_results,
)


@dataclass(frozen=True)
class OverheadConfig:
    """Options of ``python -m benchmarks.overhead``."""

    models: tuple[str, ...] = option(
        (DEMO_MODEL, "sd15"),
        "a bundled model, a pipeline folder, sd15 (SD 1.5's UNet config, random weights), sd15-small or sd15-tiny",
    )
    latent_size: int = option(16, "latent height/width of the sd15 architectures (a pipeline uses its own size)", low=1)
    batch_size: int = option(1, "x_t per player", low=1)
    rank: int = option(4, "LoRA rank", low=1)
    lora_target: str = option("xattn", "which UNet layers the LoRA adapts", choices=TARGET_SETS)
    rounds: int = option(15, "timed rounds (every variant once per round, in a shuffled order)", low=1)
    warmup: int = option(2, "untimed rounds first", low=0)
    threads: int = option(1, "torch CPU threads", low=1)
    seed: int = option(0, "seed of the weights, the batch and the round order")
    output_dir: Path = option(RESULTS_ROOT / "overhead", "folder for results.json, results.md and overhead.png")
    overwrite: bool = option(False, "replace results already in --output_dir")

    def __post_init__(self) -> None:
        tuples(self)
        check_options(self)


def time_variants(unet, params, batch, uncond, rounds: int, warmup: int, seed: int) -> dict[str, list[float]]:
    """Seconds per step of each variant, ``rounds`` interleaved rounds after ``warmup`` untimed ones."""
    device = torch.device("cpu")
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    order = list(STEP_VARIANTS)
    shuffle = random.Random(seed)
    times: dict[str, list[float]] = {v: [] for v in order}
    for r in range(warmup + rounds):
        shuffle.shuffle(order)
        for variant in order:
            start = time.perf_counter()
            erasure_step(variant, unet, batch, uncond, params, optimizer, device)
            elapsed = time.perf_counter() - start
            if r >= warmup:
                times[variant].append(elapsed)
    return times


def time_gram_and_weights(unet, params, batch, uncond, repeats: int) -> dict:
    """Seconds of the bargained update (nash) vs adding the same per-player gradients (no Gram)."""
    from munba_diffusion.bargaining import get_combiner
    from munba_diffusion.diffusion.players import erasure_player_gradients
    from munba_diffusion.step import BargainedUpdate

    grads, values = erasure_player_gradients(
        unet, batch, uncond, "esd", 1.0, PLAYERS, params, torch.device("cpu"), torch.float32
    )
    update = BargainedUpdate(params, get_combiner("nash"))
    bargained, added = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        update.accumulate_gradients(dict(zip(PLAYERS, grads)), values)
        update.write_gradients()
        bargained.append(time.perf_counter() - start)
        for p in params:
            p.grad = None
        start = time.perf_counter()
        for p, g_r, g_f in zip(params, *grads):
            p.grad = g_r + g_f
        added.append(time.perf_counter() - start)
        for p in params:
            p.grad = None
    return {
        "nash_apply_seconds": quantiles(bargained),
        "plain_add_seconds": quantiles(added),
        "gram_and_weights_seconds": statistics.median(bargained) - statistics.median(added),
    }


def benchmark_model(
    model: str, *, latent_size: int | None, batch_size: int, rank: int, target: str, rounds: int, warmup: int, seed: int
) -> dict:
    from munba_diffusion.diffusion.lora import ErasureLoraConfig, add_erasure_lora

    unet = load_unet(model, seed)
    latent_size = latent_size or unet.config.sample_size
    params = add_erasure_lora(unet, ErasureLoraConfig(rank=rank, target=target))
    batch, uncond = random_erasure_batch(unet, batch_size, latent_size, torch.Generator().manual_seed(seed))
    times = time_variants(unet, params, batch, uncond, rounds, warmup, seed)
    stats = {v: quantiles(t) for v, t in times.items()}

    def paired(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    return {
        "model": model,
        "unet_parameters": sum(p.numel() for p in unet.parameters()) - sum(p.numel() for p in params),
        "lora_parameters": sum(p.numel() for p in params),
        "lora": {"rank": rank, "target": target},
        "latent_size": latent_size,
        "batch_size_per_player": batch_size,
        "seconds_per_step": stats,
        "ratios": {
            "nash_over_sum_plain": stats["nash"]["median"] / stats["sum_plain"]["median"],
            "nash_over_sum_plain_paired": paired("nash", "sum_plain"),
            "nash_over_sum": stats["nash"]["median"] / stats["sum"]["median"],
            "nash_over_single_backward": stats["nash"]["median"] / stats["single_backward"]["median"],
            "nash_over_single_backward_paired": paired("nash", "single_backward"),
            "sum_plain_over_single_backward": stats["sum_plain"]["median"] / stats["single_backward"]["median"],
        },
        "gram_and_weights": time_gram_and_weights(unet, params, batch, uncond, repeats=max(5, rounds)),
    }


VARIANT_LABELS = {
    "nash": "nash",
    "sum": "sum (trainer path)",
    "sum_plain": "sum (no Gram)",
    "single_backward": "single backward",
}


def plot(results: dict, path: Path) -> None:
    """Median seconds per step of every variant (bars) with the interquartile range, one panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = results["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 3.8), squeeze=False)
    for ax, model in zip(axes[0], models):
        stats = model["seconds_per_step"]
        names = [v for v in STEP_VARIANTS if v in stats]
        med = [stats[v]["median"] for v in names]
        err = [
            [stats[v]["median"] - stats[v]["p25"] for v in names],
            [stats[v]["p75"] - stats[v]["median"] for v in names],
        ]
        bars = ax.bar(
            [VARIANT_LABELS[v] for v in names],
            med,
            yerr=err,
            capsize=3,
            color=["crimson" if v == "nash" else "tab:gray" for v in names],
        )
        ax.bar_label(bars, labels=[f"{m / med[names.index('sum_plain')]:.3f}x" for m in med], fontsize=8)
        ax.set_ylabel("seconds per step (median, IQR)")
        ax.set_title(
            f"{Path(model['model']).name}: latents {model['batch_size_per_player']}x4x{model['latent_size']}"
            f"x{model['latent_size']}",
            fontsize=10,
        )
        ax.tick_params(axis="x", labelsize=8, rotation=20)
    fig.suptitle("erasure step time; labels: ratio to sum (no Gram)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def markdown(results: dict) -> str:
    header = [
        "model",
        "latents",
        "nash s/step",
        "sum (plain) s/step",
        "single backward s/step",
        "nash / sum",
        "nash / single backward",
        "Gram + weights alone",
    ]
    rows = []
    for r in results["models"]:
        s, q = r["seconds_per_step"], r["ratios"]
        gram = r["gram_and_weights"]["gram_and_weights_seconds"]
        rows.append(
            [
                f"{r['model']} ({r['unet_parameters'] / 1e6:.1f}M, LoRA {r['lora']['target']} r{r['lora']['rank']}: "
                f"{r['lora_parameters'] / 1e6:.2f}M)",
                f"{r['batch_size_per_player']}x4x{r['latent_size']}x{r['latent_size']}",
                f"{s['nash']['median']:.3f}",
                f"{s['sum_plain']['median']:.3f}",
                f"{s['single_backward']['median']:.3f}",
                f"{q['nash_over_sum_plain']:.3f}x (paired {q['nash_over_sum_plain_paired']:.3f}x)",
                f"{q['nash_over_single_backward']:.3f}x",
                f"{gram * 1e3:.2f} ms = {gram / s['sum_plain']['median'] * 100:.2f}% of a step",
            ]
        )
    m = results["machine"]
    return (
        f"# Erasure step time: nash vs sum\n\n{markdown_table(header, rows)}\n"
        f"Medians over {results['settings']['rounds']} interleaved rounds; {m['cpu']}, {m['nproc']} cores, "
        f"{m['torch_threads']} torch thread(s), load average at start {m['load_average_1_5_15']}, "
        f"{m['date_utc']}.\n\n![step time](overhead.png)\n"
    )


def run(config: OverheadConfig) -> dict:
    torch.set_num_threads(config.threads)
    check_results(config.output_dir, config.overwrite)
    machine = machine_record()
    models = [
        benchmark_model(
            m,
            latent_size=config.latent_size if m.startswith("sd15") else None,
            batch_size=config.batch_size,
            rank=config.rank,
            target=config.lora_target,
            rounds=config.rounds,
            warmup=config.warmup,
            seed=config.seed,
        )
        for m in config.models
    ]
    machine["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    results = {
        "benchmark": "overhead",
        "machine": machine,
        "settings": config_record(config),
        "variants": list(STEP_VARIANTS),
        "models": models,
    }
    write_results(
        config.output_dir, results, markdown, overwrite=config.overwrite, plot=plot, plot_name="overhead.png", echo=True
    )
    return results


def main(argv: list[str] | None = None) -> dict:
    return run(parse_config(OverheadConfig, argv, description=__doc__, prog="python -m benchmarks.overhead"))


if __name__ == "__main__":
    run_script(main, "overhead")
