"""Where x_t comes from: the trajectory pool (built once) vs fresh trajectories every step (the ESD way).

Both runs use the library's trainer with identical settings (Nash, same seed, same steps) and differ only in
``latent_source``. ``fresh`` samples each player's batch from noise down to a random timestep at every step
(on average about half of the sampler's steps, each a guided UNet call); ``pool`` runs the frozen model's DDIM
sampler once per (prompt, trajectory) before training and draws stored x_t. We report the training loop's time
per step, the pool's one-off build time (separately and amortised over the run), and the concept rate and
preservation scores each erased model reaches on the demo prompt set (equal quality check).

    python -m benchmarks.sampling --output_dir benchmarks/results/sampling
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from munba_diffusion.config import option, parse_config
from munba_diffusion.io import machine_record

from ._common import (
    RESULTS_ROOT,
    DemoBenchmarkOptions,
    check_results,
    concept_scores,
    generate_for_eval,
    markdown_table,
    run_erasure,
    run_script,
    save_figure,
    single_concept_scores,
    work_folder,
    write_results,
)

SOURCES = ("pool", "fresh")


@dataclass(frozen=True, kw_only=True)
class SamplingConfig(DemoBenchmarkOptions):
    """Options of ``python -m benchmarks.sampling`` (the erasure and scoring options are shared with tradeoff)."""

    seed: int = option(0, "seed of both erasures")
    output_dir: Path = option(RESULTS_ROOT / "sampling", "folder for results.json, results.md and sampling.png")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    labels = ["pool (loop only)", "pool (build amortised)", "fresh (ESD way)"]
    values = [runs["pool"]["step_seconds"], results["pool_step_seconds_amortised"], runs["fresh"]["step_seconds"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    bars = left.bar(labels, values, color=["tab:blue", "tab:cyan", "tab:orange"])
    left.bar_label(bars, fmt="%.3f s")
    left.set_ylabel("seconds per training step")
    erasure = results["settings"]["erasure"]
    left.set_title(
        f"{erasure['steps']} steps, batch {erasure['batch_size']} per player: "
        f"fresh / pool = {results['speedup_loop']:.1f}x"
    )
    left.tick_params(axis="x", labelsize=8)
    names = ["original", "pool", "fresh"]
    rates = [results["original"]["concept_rate"]] + [runs[s]["scores"]["concept_rate"] for s in SOURCES]
    others = [results["original"]["other_accuracy"]] + [runs[s]["scores"]["other_accuracy"] for s in SOURCES]
    x = range(len(names))
    right.bar([i - 0.2 for i in x], rates, width=0.4, label="concept rate (lower = erased)")
    right.bar([i + 0.2 for i in x], others, width=0.4, label="other accuracy (higher = kept)")
    right.set_xticks(list(x), names)
    right.set_ylim(0, 1.05)
    right.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2)
    right.set_title(f"erasing '{results['settings']['concept']}' (demo judge)")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def markdown(results: dict) -> str:
    runs = results["runs"]
    rows = [
        [
            "original",
            "-",
            "-",
            "-",
            f"{results['original']['concept_rate']:.3f}",
            f"{results['original']['other_accuracy']:.3f}",
            f"{results['original']['judge_kid_other']:.2f}",
        ]
    ]
    for s in SOURCES:
        r = runs[s]
        rows.append(
            [
                s,
                f"{r['step_seconds']:.3f}",
                f"{r['setup_seconds']:.1f}",
                f"{r['setup_seconds'] / results['settings']['erasure']['steps'] + r['step_seconds']:.3f}",
                f"{r['scores']['concept_rate']:.3f}",
                f"{r['scores']['other_accuracy']:.3f}",
                f"{r['scores']['judge_kid_other']:.2f}",
            ]
        )
    table = markdown_table(
        [
            "latent source",
            "s/step (loop)",
            "setup s (pool build)",
            "s/step incl. setup",
            "concept rate",
            "other accuracy",
            "judge KID (other)",
        ],
        rows,
    )
    m = results["machine"]
    return (
        f"# Trajectory pool vs fresh trajectories ({results['settings']['erasure']['model']}, "
        f"'{results['settings']['concept']}')\n\n{table}\n"
        f"fresh / pool per step: {results['speedup_loop']:.2f}x (loop only), "
        f"{results['speedup_amortised']:.2f}x (pool build amortised over "
        f"{results['settings']['erasure']['steps']} steps).\n\n"
        f"{m['cpu']}, {m['nproc']} cores, {m['torch_threads']} torch thread(s), load average at start "
        f"{m['load_average_1_5_15']}, {m['date_utc']}.\n\n![pool vs fresh](sampling.png)\n"
    )


def run(config: SamplingConfig) -> dict:
    torch.set_num_threads(config.threads)
    check_results(config.output_dir, config.overwrite)
    machine = machine_record()
    evaluation = config.evaluation
    with work_folder(config.work_dir, "munba-sampling-") as work:
        original = concept_scores(
            generate_for_eval(config.model, evaluation, work / "eval", "original"), [config.concept]
        )
        runs = {}
        for source in SOURCES:
            timing = run_erasure(
                config, [config.concept], work / source, seed=config.seed, combiner="nash", latent_source=source
            )
            scores = concept_scores(
                generate_for_eval(str(work / source), evaluation, work / "eval", source), [config.concept]
            )
            runs[source] = {**timing, "scores": single_concept_scores(scores, config.concept)}
    pool, fresh = runs["pool"], runs["fresh"]
    amortised = pool["step_seconds"] + pool["setup_seconds"] / config.steps
    results = {
        "benchmark": "sampling",
        "machine": machine,
        "settings": {
            "concept": config.concept,
            "seed": config.seed,
            "erasure": config.erasure_record(),
            "evaluation": asdict(evaluation),
            "combiner": "nash",
            "threads": config.threads,
        },
        "original": single_concept_scores(original, config.concept),
        "runs": runs,
        "pool_step_seconds_amortised": amortised,
        "speedup_loop": fresh["step_seconds"] / pool["step_seconds"],
        "speedup_amortised": fresh["step_seconds"] / amortised,
    }
    write_results(
        config.output_dir, results, markdown, overwrite=config.overwrite, plot=plot, plot_name="sampling.png", echo=True
    )
    return results


def main(argv: list[str] | None = None) -> dict:
    return run(parse_config(SamplingConfig, argv, description=__doc__, prog="python -m benchmarks.sampling"))


if __name__ == "__main__":
    run_script(main, "sampling")
