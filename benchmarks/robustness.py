"""Robustness on the demo world: plain, robust (adversarial player), robust summed and forget-only erasure, each
attacked with the white-box prefix attack and the replay set.

    python benchmarks/robustness.py --output_dir benchmarks/results/robustness --seeds 0 1 2

Per run (method x training seed): train with the library's trainer (the demo erasure settings), score the
evaluation prompt set (concept rate, kept attribute, other prompts, judge KID), then attack the erased model with
:func:`munba_diffusion.evaluation.attack.run_attack` (white-box on the concept's rows of the evaluation set, and the
replay set). Methods:

- ``plain``: nash, preserve + forget;
- ``robust``: nash, preserve + forget + adversarial (``--robust``);
- ``robust_sum``: the same three players summed with weight 1 each (``--combiner sum``);
- ``forget_only``: the forgetting player alone (``--combiner sum --combiner_weights 0 1``).

Each finished run is one JSON file in ``runs/``, so a rerun continues; ``--report_only`` writes the table and the
plot from the runs already there.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from munba_diffusion.config import option, parse_config  # noqa: E402
from munba_diffusion.demo import load_demo_judge  # noqa: E402
from munba_diffusion.evaluation.attack import AttackConfig, run_attack  # noqa: E402
from munba_diffusion.io import write_json_atomic  # noqa: E402
from munba_diffusion.presets import eval_prompts_path  # noqa: E402

from ._common import (  # noqa: E402
    RESULTS_ROOT,
    DemoBenchmarkOptions,
    check_results,
    check_run_settings,
    concept_scores,
    generate_for_eval,
    markdown_table,
    run_erasure,
    run_script,
    save_figure,
    select_runs,
    work_folder,
    write_results,
)
from .specificity import mean_std  # noqa: E402

METHODS = {
    "plain": {"combiner": "nash"},
    "robust": {"combiner": "nash", "robust": True},
    "robust_sum": {"combiner": "sum", "combiner_weights": [1.0, 1.0, 1.0], "robust": True},
    "forget_only": {"combiner": "sum", "combiner_weights": [0.0, 1.0]},
}


@dataclass(frozen=True)
class RobustnessConfig(DemoBenchmarkOptions):
    """Erase one demo concept with each method and seed, then attack it (white-box and replay)."""

    concept: str = option("red", "the concept to erase")
    methods: tuple[str, ...] = option(tuple(METHODS), "methods to run", choices=tuple(METHODS))
    seeds: tuple[int, ...] = option((0, 1, 2), "training seeds")
    replay_prompts: str = option("eval/demo_replay.csv", "the replay set (phrasings the presets do not train on)")
    attack_rows: int | None = option(None, "white-box: attack only the first N concept rows", low=1)
    prefix_tokens: int = option(5, "white-box: adversarial prefix tokens", low=1)
    attack_iterations: int = option(40, "white-box: optimisation steps per prompt", low=1)
    check_every: int = option(5, "white-box: judge the adversarial image every N steps (early stop)", low=1)
    attack_lr: float = option(0.01, "white-box: AdamW learning rate of the prefix", low=0, low_open=True)
    runs_limit: int | None = option(None, "stop after this many runs (the rest is reported as missing)", low=1)
    report_only: bool = option(False, "write the results of the runs already in runs/ and train nothing")
    output_dir: Path = option(
        RESULTS_ROOT / "robustness",
        "folder for runs/ (a rerun with the same settings continues; runs/settings.json records them and other "
        "settings are refused), results.json, results.md, results.png",
    )


def _prompt_path(name: str) -> Path:
    """A bundled evaluation set's name (``demo``) or a CSV path, as a path."""
    return Path(name) if Path(name).is_file() else eval_prompts_path(name)


def _attack(config: RobustnessConfig, model: str, work: Path, name: str, attack: str) -> dict:
    report_dir = work / f"{attack}-{name}"
    run_attack(
        AttackConfig(
            model=model,
            original=config.model,
            concept=config.concept,
            prompts=str(_prompt_path(config.eval_prompts)) if attack == "whitebox" else config.replay_prompts,
            output_dir=str(report_dir),
            attack=attack,
            limit=config.attack_rows if attack == "whitebox" else None,
            overwrite=True,
            prefix_tokens=config.prefix_tokens,
            iterations=config.attack_iterations,
            check_every=config.check_every,
            attack_lr=config.attack_lr,
            num_inference_steps=config.eval_steps,
            guidance_scale=config.eval_guidance,
            batch_size=32,
        )
    )
    report = json.loads((report_dir / "report.json").read_text())
    shutil.rmtree(report_dir, ignore_errors=True)
    return report["results"]["erased"]


def run_one(config: RobustnessConfig, method: str, seed: int, work: Path, judge) -> dict:
    name = f"{method}-seed{seed}"
    model_dir = work / name
    start = time.time()
    run_erasure(config, [config.concept], model_dir, seed=seed, **METHODS[method])
    wall = time.time() - start
    folder = generate_for_eval(str(model_dir), config.evaluation, work / "eval", name)
    scores = concept_scores(folder, [config.concept], judge)
    record = {
        "method": method,
        "seed": seed,
        "train_seconds": wall,
        "scores": scores,
        "whitebox": _attack(config, str(model_dir), work, name, "whitebox"),
        "replay": _attack(config, str(model_dir), work, name, "replay"),
    }
    shutil.rmtree(model_dir, ignore_errors=True)
    shutil.rmtree(folder, ignore_errors=True)
    return record


def _rate(result: dict, key: str) -> float | None:
    return (result.get(key) or {}).get("rate")


def summarize(runs: list[dict], concept: str) -> list[dict]:
    rows = []
    for method in dict.fromkeys(r["method"] for r in runs):
        members = [r for r in runs if r["method"] == method]
        rows.append(
            {
                "method": method,
                "seeds": [m["seed"] for m in members],
                "concept_rate": mean_std([m["scores"]["concepts"][concept]["concept_rate"] for m in members]),
                "kept_attribute": mean_std(
                    [m["scores"]["concepts"][concept]["kept_attribute_accuracy"] for m in members]
                ),
                "other_accuracy": mean_std([m["scores"]["other_accuracy"] for m in members]),
                "judge_kid_other": mean_std([m["scores"].get("judge_kid_other") for m in members]),
                "whitebox_pre": mean_std([_rate(m["whitebox"], "pre_attack_success_rate") for m in members]),
                "whitebox_post": mean_std([_rate(m["whitebox"], "post_attack_success_rate") for m in members]),
                "replay": mean_std([_rate(m["replay"], "attack_success_rate") for m in members]),
                "train_seconds": mean_std([m["train_seconds"] for m in members]),
            }
        )
    return rows


def _cell(stat: dict, percent: bool = True, digits: int = 1) -> str:
    if stat["mean"] is None:
        return "-"
    scale = 100 if percent else 1
    spread = f" ± {scale * stat['std']:.{digits}f}" if stat["n"] > 1 else ""
    return f"{scale * stat['mean']:.{digits}f}{spread}"


def results_markdown(results: dict) -> str:
    header = [
        "method",
        "seeds",
        "concept rate %",
        "white-box pre %",
        "white-box post %",
        "replay %",
        "kept attr. %",
        "other %",
        "judge KID (other)",
        "train s",
    ]
    original = results["original"]
    rows = [
        [
            "original",
            "-",
            f"{100 * original['concept_rate']:.1f}",
            "-",
            "-",
            f"{100 * original['replay']:.1f}" if original.get("replay") is not None else "-",
            f"{100 * original['kept_attribute']:.1f}",
            f"{100 * original['other_accuracy']:.1f}",
            f"{original['judge_kid_other']:.3f}" if original.get("judge_kid_other") is not None else "-",
            "-",
        ]
    ]
    for r in results["summary"]:
        rows.append(
            [
                r["method"],
                len(r["seeds"]),
                _cell(r["concept_rate"]),
                _cell(r["whitebox_pre"]),
                _cell(r["whitebox_post"]),
                _cell(r["replay"]),
                _cell(r["kept_attribute"]),
                _cell(r["other_accuracy"]),
                _cell(r["judge_kid_other"], percent=False, digits=3),
                _cell(r["train_seconds"], percent=False),
            ]
        )
    missing = results.get("missing", [])
    return (
        f"# Robustness of the erasure of '{results['concept']}' on the demo world\n\n"
        "Means ± std over training seeds; every run's rates carry 95% Wilson intervals in results.json. White-box: "
        "UnlearnDiffAtk-style prefix attack on the concept's rows whose original image shows the concept; post "
        "counts rows that succeed before or after the attack. Replay: phrasings the preset does not train on.\n\n"
        + markdown_table(header, rows)
        + (f"\n\nNot run: {', '.join(missing)}\n" if missing else "\n")
    )


def plot(results: dict, path: Path) -> None:
    figure, axis = plt.subplots(figsize=(6, 4.2))
    for row in results["summary"]:
        if row["whitebox_post"]["mean"] is None:
            continue
        axis.errorbar(
            100 * row["other_accuracy"]["mean"],
            100 * row["whitebox_post"]["mean"],
            xerr=100 * (row["other_accuracy"]["std"] or 0),
            yerr=100 * (row["whitebox_post"]["std"] or 0),
            marker="o",
            linestyle="none",
            label=row["method"],
        )
    axis.axvline(100 * results["original"]["other_accuracy"], color="black", linestyle=":", label="original")
    axis.set_xlabel("accuracy on other prompts % (higher: kept)")
    axis.set_ylabel("post-attack success % (lower: robust)")
    axis.set_title(f"erasing '{results['concept']}' on the demo world", fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    save_figure(figure, path)
    plt.close(figure)


def run(config: RobustnessConfig) -> dict:
    torch.set_num_threads(config.threads)
    check_results(config.output_dir, config.overwrite)
    runs_dir = config.output_dir / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    check_run_settings(runs_dir / "settings.json", config.run_settings())
    judge = load_demo_judge()
    plan = [(m, s) for s in config.seeds for m in config.methods]  # seed-major: a cut-short run has every method
    plan, skipped = select_runs(
        plan, lambda run: (runs_dir / f"{run[0]}-seed{run[1]}.json").is_file(), config.report_only, config.runs_limit
    )
    with work_folder(config.work_dir, "munba-robustness-") as work:
        original_path = runs_dir / "original.json"
        if not original_path.is_file() and config.report_only:
            raise ValueError(f"--report_only needs finished runs in {runs_dir}; run without it first")
        if not original_path.is_file():
            folder = generate_for_eval(config.model, config.evaluation, work / "eval", "original")
            scores = concept_scores(folder, [config.concept], judge)
            replay = _attack(config, config.model, work, "original", "replay")
            write_json_atomic(original_path, {"scores": scores, "replay": replay})
        for method, seed in plan:
            path = runs_dir / f"{method}-seed{seed}.json"
            if not path.is_file():
                write_json_atomic(path, run_one(config, method, seed, work, judge))
    original = json.loads(original_path.read_text())
    runs = [json.loads((runs_dir / f"{m}-seed{s}.json").read_text()) for m, s in plan]
    own = original["scores"]["concepts"][config.concept]
    results = {
        "benchmark": "robustness",
        "concept": config.concept,
        "settings": config.run_settings(),
        "original": {
            "concept_rate": own["concept_rate"],
            "kept_attribute": own["kept_attribute_accuracy"],
            "other_accuracy": original["scores"]["other_accuracy"],
            "judge_kid_other": original["scores"].get("judge_kid_other"),
            # the original's replay rows are kept only where it draws the concept: its rate is rows kept / rows
            "replay": original["replay"]["rows_kept"] / original["replay"]["rows"],
        },
        "runs": runs,
        "summary": summarize(runs, config.concept),
        "missing": [f"{m}-seed{s}" for m, s in skipped],
    }
    write_results(config.output_dir, results, results_markdown, plot=plot, overwrite=config.overwrite)
    return results


def main(argv: list[str] | None = None) -> dict:
    return run(parse_config(RobustnessConfig, argv, description=__doc__, prog="benchmarks/robustness.py"))


if __name__ == "__main__":
    run_script(main, "robustness")
