"""Where x_t comes from: the trajectory pool (built once) vs fresh trajectories every step (the ESD way).

Both runs use the library's trainer with identical settings (Nash, same seed, same steps) and differ only in
``latent_source``. ``fresh`` samples each player's batch from noise down to a random timestep at every step
(on average about half of the sampler's steps, each a guided UNet call); ``pool`` runs the frozen model's DDIM
sampler once per (prompt, trajectory) before training and draws stored x_t. We report the training loop's time
per step, the pool's one-off build time (separately and amortised over the run), and the concept rate and
preservation scores each erased model reaches on the demo prompt set (equal quality check).

    python -m benchmarks.sampling --output-dir benchmarks/results/sampling
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

import torch

from benchmarks._common import (RESULTS_ROOT, ErasureSettings, EvalSettings, concept_scores, generate_for_eval,
                                machine_info, markdown_table, prepare_results_dir, run_erasure, run_script,
                                save_figure_atomic, single_concept_scores, work_folder, write_results)

SOURCES = ("pool", "fresh")


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
    left.set_title(f"{erasure['steps']} steps, batch {erasure['batch_size']} per player: "
                   f"fresh / pool = {results['speedup_loop']:.1f}x")
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
    save_figure_atomic(fig, path)
    plt.close(fig)


def markdown(results: dict) -> str:
    runs = results["runs"]
    rows = [["original", "-", "-", "-", f"{results['original']['concept_rate']:.3f}",
             f"{results['original']['other_accuracy']:.3f}", f"{results['original']['judge_fid_other']:.2f}"]]
    for s in SOURCES:
        r = runs[s]
        rows.append([s, f"{r['step_seconds']:.3f}", f"{r['setup_seconds']:.1f}",
                     f"{r['setup_seconds'] / results['settings']['erasure']['steps'] + r['step_seconds']:.3f}",
                     f"{r['scores']['concept_rate']:.3f}", f"{r['scores']['other_accuracy']:.3f}",
                     f"{r['scores']['judge_fid_other']:.2f}"])
    table = markdown_table(["latent source", "s/step (loop)", "setup s (pool build)", "s/step incl. setup",
                            "concept rate", "other accuracy", "judge FID (other)"], rows)
    m = results["machine"]
    return (f"# Trajectory pool vs fresh trajectories ({results['settings']['erasure']['model']}, "
            f"'{results['settings']['concept']}')\n\n{table}\n"
            f"fresh / pool per step: {results['speedup_loop']:.2f}x (loop only), "
            f"{results['speedup_amortised']:.2f}x (pool build amortised over "
            f"{results['settings']['erasure']['steps']} steps).\n\n"
            f"{m['cpu']}, {m['nproc']} cores, {m['torch_threads']} torch thread(s), load average at start "
            f"{m['load_average_1_5_15']}, {m['date_utc']}.\n\n![pool vs fresh](sampling.png)\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d, e = ErasureSettings(), EvalSettings()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=d.model)
    p.add_argument("--concept", default="circle")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--learning-rate", type=float, default=d.learning_rate)
    p.add_argument("--lora-target", default=d.lora_target)
    p.add_argument("--sampler-steps", type=int, default=d.sampler_steps,
                   help="DDIM steps of the frozen model's sampler")
    p.add_argument("--sampler-guidance", type=float, default=d.sampler_guidance_scale)
    p.add_argument("--pool-trajectories", type=int, default=d.pool_trajectories)
    p.add_argument("--grid-steps", type=int, default=d.grid_steps, help="sampler steps of each run's before/after grid")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-prompts", default=e.prompts, help="bundled prompt set name or CSV with shape/colour columns")
    p.add_argument("--eval-steps", type=int, default=e.steps)
    p.add_argument("--eval-guidance", type=float, default=e.guidance_scale)
    p.add_argument("--max-eval-prompts", type=int, default=None,
                   help="score only the first N prompts of each (shape, colour)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work-dir", type=Path, default=None,
                   help="new or empty folder that keeps the erased models and images (default: a temporary folder)")
    p.add_argument("--output-dir", type=Path, default=RESULTS_ROOT / "sampling")
    p.add_argument("--overwrite", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = prepare_results_dir(args.output_dir, args.overwrite)
    machine = machine_info()
    settings = ErasureSettings(model=args.model, steps=args.steps, batch_size=args.batch_size,
                               learning_rate=args.learning_rate, lora_target=args.lora_target,
                               sampler_steps=args.sampler_steps, sampler_guidance_scale=args.sampler_guidance,
                               pool_trajectories=args.pool_trajectories,
                               grid_steps=args.grid_steps)
    evaluation = EvalSettings(prompts=args.eval_prompts, steps=args.eval_steps, guidance_scale=args.eval_guidance,
                              max_prompts=args.max_eval_prompts)
    with work_folder(args.work_dir, "munba-sampling-") as work:
        original = concept_scores(generate_for_eval(args.model, evaluation, work / "eval", "original"), [args.concept])
        runs = {}
        for source in SOURCES:
            timing = run_erasure(settings, [args.concept], work / source, seed=args.seed, combiner="nash",
                                 latent_source=source)
            scores = concept_scores(generate_for_eval(str(work / source), evaluation, work / "eval", source),
                                    [args.concept])
            runs[source] = {**timing, "scores": single_concept_scores(scores, args.concept)}
    pool, fresh = runs["pool"], runs["fresh"]
    amortised = pool["step_seconds"] + pool["setup_seconds"] / args.steps
    results = {
        "benchmark": "sampling", "machine": machine,
        "settings": {"concept": args.concept, "seed": args.seed, "erasure": asdict(settings),
                     "evaluation": asdict(evaluation), "combiner": "nash", "threads": args.threads},
        "original": single_concept_scores(original, args.concept), "runs": runs,
        "pool_step_seconds_amortised": amortised,
        "speedup_loop": fresh["step_seconds"] / pool["step_seconds"],
        "speedup_amortised": fresh["step_seconds"] / amortised,
    }
    write_results(out, results, markdown, plot, "sampling.png")
    return results


if __name__ == "__main__":
    run_script(main, "sampling")
