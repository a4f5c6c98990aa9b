"""Forgetting vs preserving on the demo world: every combiner at the same settings, several seeds.

Each run erases ``--concept`` from the demo model with the library's trainer; only the combiner (and its fixed
weights) changes between methods, never the learning rate, steps, batch, LoRA or seed list. Each erased model
generates the demo prompt set and the demo judge scores it: concept rate (share of the concept's prompts judged
as the concept, lower = erased), other accuracy (share of the other prompts judged right on shape and colour,
higher = kept) and the judge KID of the other prompts' images against true renders (lower = kept).

Methods: ``nash`` (MUNBa), ``sum`` with forget weight 0.1 / 1 / 10 (preserve weight 1), ``normalized``,
``mgda``, ``pcgrad``, and ``forget_only`` (sum with weights 0, 1). Two concepts at once (K = 3 players:
preserve + one forgetting player per concept): ``nash`` (iterative Nash bargaining) vs ``sum``.

Runs are written one JSON file each into ``<output_dir>/runs/``; ``--resume`` skips the runs already there, so a
long run that was stopped can go on. The summary is ``results.json``, ``results.md`` and ``pareto.png``.

    python -m benchmarks.tradeoff --seeds 0 1 2 --output_dir benchmarks/results/tradeoff
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from munba_diffusion.config import option, parse_config
from munba_diffusion.io import machine_record, write_json_atomic

from ._common import (
    RESULTS_JSON,
    RESULTS_MD,
    RESULTS_ROOT,
    DemoBenchmarkOptions,
    ErasureSettings,
    EvalSettings,
    check_run_settings,
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

METHODS: dict[str, tuple[str, list[float] | None]] = {
    # name -> (combiner, fixed weights [preserve, forget])
    "nash": ("nash", None),
    "sum_f0.1": ("sum", [1.0, 0.1]),
    "sum_f1": ("sum", [1.0, 1.0]),
    "sum_f10": ("sum", [1.0, 10.0]),
    "normalized": ("normalized", None),
    "mgda": ("mgda", None),
    "pcgrad": ("pcgrad", None),
    "forget_only": ("sum", [0.0, 1.0]),
}
TWO_CONCEPT_METHODS: dict[str, tuple[str, list[float] | None]] = {"nash": ("nash", None), "sum": ("sum", None)}
METRICS = ("concept_rate", "kept_attribute_accuracy", "other_accuracy", "judge_kid_other", "step_seconds")


@dataclass(frozen=True, kw_only=True)
class TradeoffConfig(DemoBenchmarkOptions):
    """Options of ``python -m benchmarks.tradeoff`` (the erasure and scoring options are shared with sampling)."""

    methods: tuple[str, ...] = option(tuple(METHODS), "the single-concept methods", choices=tuple(METHODS))
    two_concepts: tuple[str, ...] = option(
        ("circle", "red"), "concepts erased together by each --two_concept_methods (K = 1 + their number players)"
    )
    two_concept_methods: tuple[str, ...] = option(
        tuple(TWO_CONCEPT_METHODS), "the methods of the multi-concept runs", choices=tuple(TWO_CONCEPT_METHODS)
    )
    run_two_concepts: bool = option(True, "skip the multi-concept runs", flag="no_two_concepts")
    seeds: tuple[int, ...] = option((0, 1, 2), "seeds of every method")
    output_dir: Path = option(RESULTS_ROOT / "tradeoff", "folder for runs/, results.json, results.md and pareto.png")
    resume: bool = option(False, "keep the runs already in --output_dir/runs and do the rest")
    overwrite: bool = option(False, "discard earlier results in --output_dir")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite exclude each other; pass one")
        if self.run_two_concepts and len(self.two_concepts) < 2:
            raise ValueError(
                f"two_concepts (--two_concepts) needs at least two concepts, got "
                f"{list(self.two_concepts)}; pass --no_two_concepts to skip those runs"
            )

    @property
    def concept_sets(self) -> list[str]:
        """The concepts of the multi-concept runs (empty when they are skipped)."""
        return list(self.two_concepts) if self.run_two_concepts else []


def run_name(method: str, seed: int, two_concepts: bool) -> str:
    return f"{'two_concepts-' if two_concepts else ''}{method}-seed{seed}"


def score_run(model: str, concepts: list[str], evaluation: EvalSettings, work: Path, label: str) -> dict:
    return concept_scores(generate_for_eval(model, evaluation, work / "eval", label), concepts)


def one_run(
    settings: ErasureSettings,
    evaluation: EvalSettings,
    concepts: list[str],
    method: str,
    spec: tuple[str, list[float] | None],
    seed: int,
    work: Path,
) -> dict:
    """Erase, score, delete the erased model; return the run's record."""
    combiner, weights = spec
    if weights is not None and len(concepts) > 1:
        weights = [weights[0]] + [weights[1]] * len(concepts)
    model_dir = work / run_name(method, seed, len(concepts) > 1)
    start = time.time()
    timing = run_erasure(settings, concepts, model_dir, seed=seed, combiner=combiner, combiner_weights=weights)
    scores = score_run(str(model_dir), concepts, evaluation, work, model_dir.name)
    record = {
        "method": method,
        "combiner": combiner,
        "combiner_weights": weights,
        "seed": seed,
        "concepts": concepts,
        **timing,
        "wall_seconds": time.time() - start,
        "scores": scores,
    }
    shutil.rmtree(model_dir, ignore_errors=True)
    shutil.rmtree(work / "eval" / "images" / model_dir.name, ignore_errors=True)
    return record


def mean_std(values: list[float | None]) -> dict:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def flat_metrics(record: dict, concept: str) -> dict:
    s = record["scores"]
    return {
        "concept_rate": s["concepts"][concept]["concept_rate"],
        "kept_attribute_accuracy": s["concepts"][concept]["kept_attribute_accuracy"],
        "other_accuracy": s["other_accuracy"],
        "judge_kid_other": s["judge_kid_other"],
        "step_seconds": record.get("step_seconds"),
    }


def pareto_front(points: dict[str, tuple[float, float]]) -> dict[str, list[str]]:
    """For each method, the methods whose mean point dominates it (concept rate <= and other accuracy >=, one
    strictly); an empty list = on the front."""
    dominated_by = {}
    for name, (rate, acc) in points.items():
        dominated_by[name] = [
            o for o, (r, a) in points.items() if o != name and r <= rate and a >= acc and (r < rate or a > acc)
        ]
    return dominated_by


def summarise(records: list[dict], original: dict, concept: str, two_concepts: list[str]) -> dict:
    single = {}
    for method in dict.fromkeys(r["method"] for r in records if len(r["concepts"]) == 1):
        runs = [flat_metrics(r, concept) for r in records if r["method"] == method and len(r["concepts"]) == 1]
        single[method] = {m: mean_std([run[m] for run in runs]) for m in METRICS}
        single[method]["seeds"] = [r["seed"] for r in records if r["method"] == method and len(r["concepts"]) == 1]
    points = {m: (v["concept_rate"]["mean"], v["other_accuracy"]["mean"]) for m, v in single.items()}
    dominated = pareto_front(points)
    multi = {}
    for method in dict.fromkeys(r["method"] for r in records if len(r["concepts"]) > 1):
        runs = [r for r in records if r["method"] == method and len(r["concepts"]) > 1]
        entry = {
            f"{metric}/{c}": mean_std([r["scores"]["concepts"][c][metric] for r in runs])
            for c in two_concepts
            for metric in ("concept_rate", "kept_attribute_accuracy")
        }
        entry["other_accuracy"] = mean_std([r["scores"]["other_accuracy"] for r in runs])
        entry["judge_kid_other"] = mean_std([r["scores"]["judge_kid_other"] for r in runs])
        entry["step_seconds"] = mean_std([r["step_seconds"] for r in runs])
        entry["seeds"] = [r["seed"] for r in runs]
        multi[method] = entry
    return {
        "single_concept": single,
        "dominated_by": dominated,
        "nash_on_front": "nash" in dominated and not dominated["nash"],
        "two_concepts": multi,
        "original": original,
    }


def fmt(stat: dict, digits: int = 3) -> str:
    if stat["mean"] is None:
        return "-"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def markdown(results: dict) -> str:
    s = results["summary"]
    concept = results["settings"]["concept"]
    o = s["original"]["single"]
    rows = [
        [
            "original (no erasure)",
            f"{o['concept_rate']:.3f}",
            f"{o['kept_attribute_accuracy']:.3f}",
            f"{o['other_accuracy']:.3f}",
            f"{o['judge_kid_other']:.2f}",
            "-",
            "-",
        ]
    ]
    for method, v in s["single_concept"].items():
        rows.append(
            [
                f"**{method}**" if method == "nash" else method,
                fmt(v["concept_rate"]),
                fmt(v["kept_attribute_accuracy"]),
                fmt(v["other_accuracy"]),
                fmt(v["judge_kid_other"], 2),
                fmt(v["step_seconds"]),
                ", ".join(s["dominated_by"][method]) or "on the front",
            ]
        )
    single = markdown_table(
        [
            "method",
            f"concept rate ({concept}) ↓",
            "kept attribute acc ↑",
            "other accuracy ↑",
            "judge KID (other) ↓",
            "s/step",
            "dominated by (means)",
        ],
        rows,
    )
    text = (
        f"# Forgetting vs preserving on the demo world: erasing '{concept}'\n\n"
        f"Mean ± std over seeds {results['settings']['seeds']} (sample std); same settings for every method: "
        f"{json.dumps(results['settings']['erasure'])}.\n\n{single}\n![Pareto plot](pareto.png)\n"
    )
    if s["two_concepts"]:
        two = results["settings"]["two_concepts"]
        o2 = s["original"]["two"]
        metrics = ("concept_rate", "kept_attribute_accuracy")
        rows = [
            ["original"]
            + [f"{o2['concepts'][c][m]:.3f}" for c in two for m in metrics]
            + [f"{o2['other_accuracy']:.3f}", f"{o2['judge_kid_other']:.2f}", "-"]
        ]
        for method, v in s["two_concepts"].items():
            rows.append(
                [method]
                + [fmt(v[f"{m}/{c}"]) for c in two for m in metrics]
                + [fmt(v["other_accuracy"]), fmt(v["judge_kid_other"], 2), fmt(v["step_seconds"])]
            )
        header = [h for c in two for h in (f"concept rate ({c}) ↓", f"kept attribute ({c}) ↑")]
        text += f"\n## Two concepts at once ({' + '.join(two)}; 3 players)\n\n" + markdown_table(
            ["method", *header, "other accuracy (neither) ↑", "judge KID (neither) ↓", "s/step"], rows
        )
    m = results["machine"]
    text += (
        f"\n{m['cpu']}, {m['nproc']} cores, {m['torch_threads']} torch thread(s), started {m['date_utc']}, "
        f"finished {results['finished_utc']}.\n"
    )
    return text


def plot(results: dict, path: Path) -> None:
    """Concept rate against each preservation metric (mean ± std per method); coinciding means share one label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = results["summary"]
    o = s["original"]["single"]
    panels = [
        ("other_accuracy", "other prompts: shape and colour right (higher = kept)"),
        ("kept_attribute_accuracy", "concept prompts: asked-for other attribute kept"),
        ("judge_kid_other", "judge KID on other prompts (lower = kept; renders score about -0.1)"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(16, 4.8))

    def draw(ax, metric: str, annotate: bool) -> None:
        labels: dict[tuple[float, float], list[str]] = {}
        for i, (method, v) in enumerate(s["single_concept"].items()):
            x, y = v["concept_rate"], v[metric]
            if x["mean"] is None or y["mean"] is None:
                continue
            nash = method == "nash"
            ax.errorbar(
                x["mean"],
                y["mean"],
                xerr=x["std"],
                yerr=y["std"],
                fmt="*" if nash else "o",
                markersize=14 if nash else 7,
                capsize=3,
                color="crimson" if nash else f"C{i % 10}",
                label=method,
                zorder=3 if nash else 2,
            )
            labels.setdefault((round(x["mean"], 6), round(y["mean"], 6)), []).append(method)
        ax.scatter([o["concept_rate"]], [o[metric]], marker="x", color="black", label="original", zorder=3)
        labels.setdefault((round(o["concept_rate"], 6), round(o[metric], 6)), []).append("original")
        for (x, y), names in labels.items():
            if annotate or len(names) > 1:  # always name points hidden under another one
                ax.annotate(" = ".join(names), (x, y), textcoords="offset points", xytext=(6, 6), fontsize=7)
        if metric == "other_accuracy":
            front = sorted(
                (v["concept_rate"]["mean"], v["other_accuracy"]["mean"])
                for m, v in s["single_concept"].items()
                if not s["dominated_by"][m]
            )
            ax.plot(*zip(*front), "--", color="gray", linewidth=1, label="Pareto front (means)")

    for ax, (metric, label) in zip(axes, panels):
        draw(ax, metric, annotate=False)
        ax.set_xlabel(f"concept rate of '{results['settings']['concept']}' (lower = erased)")
        ax.set_ylabel(label, fontsize=9)
        ax.grid(alpha=0.3)
    axes[-1].legend(*axes[0].get_legend_handles_labels(), fontsize=7, loc="upper right")
    zoom = axes[0].inset_axes([0.45, 0.3, 0.52, 0.44])  # the crowded corner, every point named
    draw(zoom, "other_accuracy", annotate=True)
    zoom.set_xlim(0.1, 0.36)
    zoom.set_ylim(0.76, 0.89)
    zoom.tick_params(labelsize=7)
    zoom.grid(alpha=0.3)
    fig.suptitle(
        f"demo world, seeds {results['settings']['seeds']}, mean ± std, "
        f"{results['settings']['erasure']['steps']} steps each"
    )
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def prepare(out: Path, resume: bool, overwrite: bool) -> Path:
    runs = out / "runs"
    if runs.is_dir() and any(runs.iterdir()) and not (resume or overwrite):
        raise FileExistsError(f"{out} holds earlier runs; pass --resume to continue them or --overwrite to start over")
    if overwrite:
        for f in runs.glob("*.json") if runs.is_dir() else []:
            f.unlink()
        for name in (RESULTS_JSON, RESULTS_MD, "pareto.png"):
            (out / name).unlink(missing_ok=True)
    runs.mkdir(parents=True, exist_ok=True)
    return runs


def run(config: TradeoffConfig) -> dict:
    torch.set_num_threads(config.threads)
    runs_dir = prepare(config.output_dir, config.resume, config.overwrite)
    machine = machine_record()
    evaluation = config.evaluation
    two = config.concept_sets
    settings = config.run_settings()
    check_run_settings(runs_dir.parent / "settings.json", settings, runs=runs_dir, replace=not config.resume)
    jobs = [(m, METHODS[m], s, [config.concept]) for s in config.seeds for m in config.methods]
    if two:
        jobs += [(m, TWO_CONCEPT_METHODS[m], s, two) for s in config.seeds for m in config.two_concept_methods]
    with work_folder(config.work_dir, "munba-tradeoff-") as work:
        original_path = runs_dir / "original.json"
        if not original_path.exists():
            folder = generate_for_eval(config.model, evaluation, work / "eval", "original")
            original = {
                "single": concept_scores(folder, [config.concept]),
                "two": concept_scores(folder, two) if two else None,
            }
            write_json_atomic(original_path, original)
        for method, spec, seed, concepts in tqdm(jobs, desc="tradeoff runs"):
            path = runs_dir / f"{run_name(method, seed, len(concepts) > 1)}.json"
            if path.exists():
                continue
            write_json_atomic(path, one_run(config, evaluation, concepts, method, spec, seed, work))
    original = json.loads(original_path.read_text())
    records = [json.loads((runs_dir / f"{run_name(m, s, len(c) > 1)}.json").read_text()) for m, _, s, c in jobs]
    summary = summarise(records, original, config.concept, two)
    summary["original"] = {"single": single_concept_scores(original["single"], config.concept), "two": original["two"]}
    results = {
        "benchmark": "tradeoff",
        "machine": machine,
        "finished_utc": machine_record()["date_utc"],
        "settings": {
            "concept": config.concept,
            "seeds": list(config.seeds),
            "methods": {m: METHODS[m] for m in config.methods},
            "two_concepts": two,
            "threads": config.threads,
            **settings,
        },
        "summary": summary,
    }
    # --resume re-summarises a finished run: its results are replaced (the runs themselves are kept)
    write_results(
        config.output_dir,
        results,
        markdown,
        overwrite=config.overwrite or config.resume,
        plot=plot,
        plot_name="pareto.png",
        echo=True,
    )
    return results


def main(argv: list[str] | None = None) -> dict:
    return run(parse_config(TradeoffConfig, argv, description=__doc__, prog="python -m benchmarks.tradeoff"))


if __name__ == "__main__":
    run_script(main, "tradeoff")
