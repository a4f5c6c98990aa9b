"""Time per erasure step: Nash bargaining (per-player gradients from one backward, or from one pass per player) vs
a plain sum vs one ordinary backward pass, for K players (preserve + K-1 concepts).

Every variant runs the trainer's frozen forwards (adapters disabled) and LoRA forwards on the same random batch,
then clips and takes an AdamW step; they differ only in how the players' losses become ``.grad``
(``_common.STEP_VARIANTS``): ``nash`` is the trainer's default (gradient source ``fast``: one LoRA forward and one
backward over all players' rows), ``nash_per_player`` the reference source (one LoRA forward and backward per
player), ``single_backward`` an ordinary step. Rounds interleave the variants in a shuffled order so that load
from other processes hits them alike; we report medians over rounds and the median of per-round ratios.
The Gram matrix + weights are also timed alone on fixed gradients (``gram_and_weights``), which is the whole
difference between ``nash`` and ``sum_plain``.

    python -m benchmarks.overhead --models munba-demo sd15 --output_dir benchmarks/results/overhead
    python -m benchmarks.overhead --models munba-demo --players 2 3 5 9 --variants nash nash_per_player \
        single_backward --output_dir benchmarks/results/overhead_players_demo
"""

from __future__ import annotations

import os
import random
import statistics
import time
from dataclasses import dataclass
from functools import reduce
from pathlib import Path

import torch

from munba_diffusion.config import check_options, config_record, option, parse_config
from munba_diffusion.diffusion.lora import TARGET_SETS
from munba_diffusion.io import machine_record
from munba_diffusion.models import DEMO_MODEL

from ._common import (
    RESULTS_ROOT,
    STEP_VARIANTS,
    check_results,
    erasure_step,
    load_unet,
    markdown_table,
    player_names,
    quantiles,
    random_erasure_batch,
    run_script,
    save_figure,
    tuples,
    write_results,
)

CLOCKS = {"wall": time.perf_counter, "process": time.process_time}


@dataclass(frozen=True)
class OverheadConfig:
    """Options of ``python -m benchmarks.overhead``."""

    models: tuple[str, ...] = option(
        (DEMO_MODEL, "sd15"),
        "a bundled model, a pipeline folder, sd15 (SD 1.5's UNet config, random weights), sd15-small or sd15-tiny",
    )
    latent_size: int = option(16, "latent height/width of the sd15 architectures (a pipeline uses its own size)", low=1)
    batch_size: int = option(1, "x_t per player", low=1)
    players: tuple[int, ...] = option((2,), "numbers of players K measured (preserve + K-1 concepts)", low=2)
    variants: tuple[str, ...] = option(STEP_VARIANTS, "the step variants timed", choices=STEP_VARIANTS)
    rank: int = option(4, "LoRA rank", low=1)
    lora_target: str = option("xattn", "which UNet layers the LoRA adapts", choices=TARGET_SETS)
    rounds: int = option(15, "timed rounds (every variant once per round, in a shuffled order)", low=1)
    clock: str = option(
        "wall",
        "what a step's time is: wall (elapsed) or process (CPU time of this process: on a machine shared with other "
        "jobs it does not count the time spent waiting for a core)",
        choices=CLOCKS,
    )
    warmup: int = option(2, "untimed rounds first", low=0)
    threads: int = option(1, "torch CPU threads", low=1)
    seed: int = option(0, "seed of the weights, the batch and the round order")
    output_dir: Path = option(RESULTS_ROOT / "overhead", "folder for results.json, results.md and overhead.png")
    overwrite: bool = option(False, "replace results already in --output_dir")

    def __post_init__(self) -> None:
        tuples(self)
        check_options(self)


def time_variants(
    unet,
    params,
    batch,
    uncond,
    rounds: int,
    warmup: int,
    seed: int,
    variants: tuple[str, ...] = STEP_VARIANTS,
    clock: str = "wall",
) -> dict[str, list[float]]:
    """Seconds per step of each variant, ``rounds`` interleaved rounds after ``warmup`` untimed ones."""
    now = CLOCKS[clock]
    device = torch.device("cpu")
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    order = list(variants)
    shuffle = random.Random(seed)
    times: dict[str, list[float]] = {v: [] for v in order}
    for r in range(warmup + rounds):
        shuffle.shuffle(order)
        for variant in order:
            start = now()
            erasure_step(variant, unet, batch, uncond, params, optimizer, device)
            elapsed = now() - start
            if r >= warmup:
                times[variant].append(elapsed)
    return times


def time_gram_and_weights(unet, params, batch, uncond, repeats: int) -> dict:
    """Seconds of the bargained update (nash) vs adding the same per-player gradients (no Gram)."""
    from munba_diffusion.bargaining import get_combiner
    from munba_diffusion.diffusion.players import erasure_player_gradients
    from munba_diffusion.step import BargainedUpdate

    names = player_names(1 + len(batch.forget))
    grads, values = erasure_player_gradients(
        unet, batch, uncond, "esd", 1.0, names, params, torch.device("cpu"), torch.float32, source="fast"
    )
    update = BargainedUpdate(params, get_combiner("nash"))
    bargained, added = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        update.accumulate_gradients(dict(zip(names, grads)), values)
        update.write_gradients()
        bargained.append(time.perf_counter() - start)
        for p in params:
            p.grad = None
        start = time.perf_counter()
        for p, *player_grads in zip(params, *grads):
            p.grad = reduce(torch.add, player_grads)
        added.append(time.perf_counter() - start)
        for p in params:
            p.grad = None
    return {
        "nash_apply_seconds": quantiles(bargained),
        "plain_add_seconds": quantiles(added),
        "gram_and_weights_seconds": statistics.median(bargained) - statistics.median(added),
    }


def benchmark_model(
    model: str,
    *,
    latent_size: int | None,
    batch_size: int,
    rank: int,
    target: str,
    rounds: int,
    warmup: int,
    seed: int,
    players: tuple[int, ...] = (2,),
    variants: tuple[str, ...] = STEP_VARIANTS,
    clock: str = "wall",
) -> list[dict]:
    """One result per number of players (the UNet and its LoRA are built once)."""
    from munba_diffusion.diffusion.lora import ErasureLoraConfig, add_erasure_lora

    unet = load_unet(model, seed)
    latent_size = latent_size or unet.config.sample_size
    params = add_erasure_lora(unet, ErasureLoraConfig(rank=rank, target=target))
    return [
        benchmark_players(
            unet, params, model, k, latent_size, batch_size, rank, target, rounds, warmup, seed, variants, clock
        )
        for k in players
    ]


def benchmark_players(
    unet, params, model, players, latent_size, batch_size, rank, target, rounds, warmup, seed, variants, clock
) -> dict:
    generator = torch.Generator().manual_seed(seed)
    batch, uncond = random_erasure_batch(unet, batch_size, latent_size, generator, players=players)
    times = time_variants(unet, params, batch, uncond, rounds, warmup, seed, variants, clock)
    stats = {v: quantiles(t) for v, t in times.items()}

    def paired(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    pairs = [
        ("nash", "sum_plain"),
        ("nash", "sum"),
        ("nash", "single_backward"),
        ("nash_per_player", "single_backward"),
        ("nash", "nash_per_player"),
        ("sum_plain", "single_backward"),
    ]
    ratios = {}
    for a, b in pairs:
        if a in stats and b in stats:
            ratios[f"{a}_over_{b}"] = stats[a]["median"] / stats[b]["median"]
            ratios[f"{a}_over_{b}_paired"] = paired(a, b)
    return {
        "model": model,
        "players": players,
        "unet_parameters": sum(p.numel() for p in unet.parameters()) - sum(p.numel() for p in params),
        "lora_parameters": sum(p.numel() for p in params),
        "lora": {"rank": rank, "target": target},
        "latent_size": latent_size,
        "batch_size_per_player": batch_size,
        "seconds_per_step": stats,
        "ratios": ratios,
        "gram_and_weights": time_gram_and_weights(unet, params, batch, uncond, repeats=max(5, rounds)),
    }


VARIANT_LABELS = {
    "nash": "nash (fast)",
    "nash_per_player": "nash (per-player passes)",
    "sum": "sum (trainer path)",
    "sum_plain": "sum (no Gram)",
    "single_backward": "ordinary step",
}


def _baseline(stats: dict) -> str:
    return "single_backward" if "single_backward" in stats else next(iter(stats))


def plot(results: dict, path: Path) -> None:
    """Per model: with several K, each variant's median step time over the ordinary step's against K; with one K,
    bars of the median seconds per step with the interquartile range."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_model: dict[str, list[dict]] = {}
    for r in results["models"]:
        by_model.setdefault(r["model"], []).append(r)
    fig, axes = plt.subplots(1, len(by_model), figsize=(5.5 * len(by_model), 3.8), squeeze=False)
    for ax, (model, runs) in zip(axes[0], by_model.items()):
        first = runs[0]
        names = [v for v in STEP_VARIANTS if v in first["seconds_per_step"]]
        base = _baseline(first["seconds_per_step"])
        if len(runs) > 1:
            ks = [r["players"] for r in runs]
            for v in names:
                ratios = [r["seconds_per_step"][v]["median"] / r["seconds_per_step"][base]["median"] for r in runs]
                ax.plot(ks, ratios, marker="o", label=VARIANT_LABELS[v], color="crimson" if v == "nash" else None)
            ax.set_xticks(ks)
            ax.set_xlabel("players K")
            ax.set_ylabel(f"median step time / {VARIANT_LABELS[base]}")
            ax.legend(fontsize=7)
        else:
            stats = first["seconds_per_step"]
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
            ax.bar_label(bars, labels=[f"{m / stats[base]['median']:.3f}x" for m in med], fontsize=8)
            ax.set_ylabel("seconds per step (median, IQR)")
            ax.tick_params(axis="x", labelsize=8, rotation=20)
        ax.set_title(
            f"{Path(model).name}: latents {first['batch_size_per_player']}x4x{first['latent_size']}"
            f"x{first['latent_size']} per player",
            fontsize=10,
        )
    fig.suptitle("erasure step time; ratios to the ordinary step (single backward) where timed", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


RATIO_COLUMNS = {
    "nash_over_single_backward": "nash / ordinary",
    "nash_per_player_over_single_backward": "per-player / ordinary",
    "nash_over_nash_per_player": "nash / per-player",
    "nash_over_sum_plain": "nash / sum",
}


def markdown(results: dict) -> str:
    variants = [v for v in STEP_VARIANTS if v in results["models"][0]["seconds_per_step"]]
    ratios = [k for k in RATIO_COLUMNS if k in results["models"][0]["ratios"]]
    header = [
        "model",
        "K",
        "latents",
        *(f"{VARIANT_LABELS[v]} s/step" for v in variants),
        *(RATIO_COLUMNS[k] for k in ratios),
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
                r["players"],
                f"{r['batch_size_per_player']}x4x{r['latent_size']}x{r['latent_size']}",
                *(f"{s[v]['median']:.3f}" for v in variants),
                *(f"{q[k]:.3f}x (paired {q[k + '_paired']:.3f}x)" for k in ratios),
                f"{gram * 1e3:.2f} ms = {gram / s[variants[0]]['median'] * 100:.2f}% of a step",
            ]
        )
    m = results["machine"]
    return (
        f"# Erasure step time: nash (fast / per-player passes) vs sum vs an ordinary step\n\n"
        f"{markdown_table(header, rows)}\n"
        f"Medians over {results['settings']['rounds']} interleaved rounds of {results['settings'].get('clock', 'wall')}"
        f"-clock seconds; {m['cpu']}, {m['nproc']} cores, "
        f"{m['torch_threads']} torch thread(s), load average at start {m['load_average_1_5_15']}, at end "
        f"{m.get('load_average_at_end')}, {m['date_utc']}.\n\n![step time](overhead.png)\n"
    )


def run(config: OverheadConfig) -> dict:
    torch.set_num_threads(config.threads)
    check_results(config.output_dir, config.overwrite)
    machine = machine_record()
    models = [
        result
        for m in config.models
        for result in benchmark_model(
            m,
            latent_size=config.latent_size if m.startswith("sd15") else None,
            batch_size=config.batch_size,
            rank=config.rank,
            target=config.lora_target,
            rounds=config.rounds,
            warmup=config.warmup,
            seed=config.seed,
            players=config.players,
            variants=config.variants,
            clock=config.clock,
        )
    ]
    machine["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    results = {
        "benchmark": "overhead",
        "machine": machine,
        "settings": config_record(config),
        "variants": list(config.variants),
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
