"""Specificity on the demo world: does an erasure remove exactly the concept and keep the rest of the prompt?

For each concept set (red, circle, red + circle), forget target (``esd``, ``anchored_esd``, ``anchor``), combiner
(``nash``, ``sum``, ``sequential``), neighbour setting and seed: erase with the library's trainer at the quick start's
settings, generate the demo prompt set, judge it, and record

- the concept rate (share of the concept's prompts whose image still shows it; lower is better),
- the kept attribute (the other attribute those prompts ask for, e.g. the shape of "a red circle"),
- the other prompts' accuracy and the neighbours' accuracy (prompts that ask for another value of the concept's
  kind: the other colours when erasing a colour),
- what replaces the concept: the distribution of the judged value on the concept's prompts (is it always the same
  substitute?),
- each other prompt's tally of images judged right (where the other prompts' accuracy is lost),

each with a 95% Wilson interval over the images, and mean +- std over seeds, and the run's wall time (training and
generation). ``sequential`` erases a concept set one concept after another, each a two-player ``nash`` erasure of the
previous stage's output folder with the full number of steps (what a user without a K-player bargain would do): the
multi-concept comparison of issue 17 is ``--concept_sets red+blue red+blue+green circle+square --combiners nash sum
sequential``.

    python -m benchmarks.specificity --output_dir benchmarks/results/specificity
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from munba_diffusion.config import option, parse_config  # noqa: E402
from munba_diffusion.demo import COLOURS, SHAPES, load_demo_judge  # noqa: E402
from munba_diffusion.diffusion.losses import FORGET_LOSSES  # noqa: E402
from munba_diffusion.evaluation.demo import concept_kind  # noqa: E402
from munba_diffusion.evaluation.intervals import wilson_interval  # noqa: E402
from munba_diffusion.evaluation.manifest import collect_images, images_to_tensor, load_rgb, require_field  # noqa: E402
from munba_diffusion.io import write_json_atomic  # noqa: E402
from munba_diffusion.presets import PRESET_KEYS, ConceptPreset, resolve_concept  # noqa: E402

from ._common import (  # noqa: E402
    RESULTS_ROOT,
    DemoBenchmarkOptions,
    check_results,
    check_run_settings,
    generate_for_eval,
    markdown_table,
    run_erasure,
    run_script,
    save_figure,
    select_runs,
    work_folder,
    write_results,
)

COMBINERS = ("nash", "sum", "sequential")


@dataclass(frozen=True, kw_only=True)
class SpecificityConfig(DemoBenchmarkOptions):
    """Erase each concept set with each forget target and combiner (and optionally the neighbour player)."""

    concept_sets: tuple[str, ...] = option(
        ("red", "circle", "red+circle"), "concept sets to erase ('+' joins concepts erased together)"
    )
    forget_losses: tuple[str, ...] = option(("esd", "anchored_esd", "anchor"), "forget targets", choices=FORGET_LOSSES)
    combiners: tuple[str, ...] = option(
        ("nash", "sum"),
        "nash / sum: one erasure of all the set's concepts (one forget player each under nash); sequential: one "
        "two-player nash erasure per concept, each from the previous one's folder",
        choices=COMBINERS,
    )
    neighbour_settings: tuple[str, ...] = option(
        ("folded",),
        "folded: neighbours inside the preservation player; player: their own player",
        choices=("folded", "player"),
    )
    one_substitute: str | None = option(
        None,
        "under the substitute target, replace each forget prompt by its one substitute that names this colour or "
        "shape (e.g. blue) instead of the preset's mixture of substitutes",
        choices=(*COLOURS, *SHAPES),
    )
    seeds: tuple[int, ...] = option((0, 1, 2), "training seeds")
    runs_limit: int | None = option(None, "stop after this many runs (the rest is reported as missing)", low=1)
    report_only: bool = option(False, "write the results of the runs already finished in runs/ and train nothing")
    output_dir: Path = option(
        RESULTS_ROOT / "specificity",
        "folder for runs/ (one JSON per finished run: a rerun with the same settings continues; runs/settings.json "
        "records them and other settings are refused), results.json, results.md and results.png",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.one_substitute is None:
            return
        if set(self.forget_losses) != {"substitute"}:
            raise ValueError(
                "--one_substitute applies to --forget_losses substitute only; drop the other targets or the flag"
            )
        for concept in {c for s in self.concept_sets for c in s.split("+")}:  # refused before training, not during
            one_substitute_preset(resolve_concept(concept), self.one_substitute)

    def run_settings(self) -> dict[str, Any]:
        """The shared run settings, and ``one_substitute`` when it is set (runs with the presets' own substitutes
        record nothing new, so their folders stay valid)."""
        settings = super().run_settings()
        if self.one_substitute is not None:
            settings["erasure"]["one_substitute"] = self.one_substitute
        return settings


def one_substitute_preset(preset: ConceptPreset, value: str) -> ConceptPreset:
    """``preset`` with each forget prompt's substitutes cut to the one that names ``value`` (a word of it): "a red
    circle" -> ("a blue circle",) for ``value`` "blue", where the red preset has the green, blue and yellow circles."""
    if not preset.substitute_prompts:
        raise ValueError(f"concept {preset.name!r} names no substitutes; --one_substitute needs a preset that does")
    kept = []
    for prompt, substitutes in zip(preset.forget_prompts, preset.substitute_prompts):
        naming = [s for s in substitutes if value in s.split()]
        if len(naming) != 1:
            raise ValueError(
                f"concept {preset.name!r}: {len(naming)} substitutes of {prompt!r} name {value!r}, "
                "--one_substitute needs exactly one in every concept it erases; pick a value each of them names once"
            )
        kept.append((naming[0],))
    return replace(preset, substitute_prompts=tuple(kept))


def erasure_concepts(config: SpecificityConfig, concepts: list[str], folder: Path) -> list[str]:
    """What the trainer's ``--concept`` gets: the preset names, or under ``--one_substitute`` each preset cut to one
    substitute per forget prompt, written as a preset file beside ``folder`` (its name, hence its scoring, kept)."""
    if config.one_substitute is None:
        return concepts
    specs = []
    for name in concepts:
        preset = one_substitute_preset(resolve_concept(name), config.one_substitute)
        path = folder.with_name(f"{folder.name}-{name}-one-substitute.yaml")
        fields = {k: v for k, v in preset.to_dict().items() if k in PRESET_KEYS and v not in (None, "", [])}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(fields, sort_keys=False))
        specs.append(str(path))
    return specs


def specificity_scores(folder: Path, concepts: list[str], judge) -> dict:
    """Per concept: concept rate, kept attribute, neighbours' accuracy and substitutes; and the other prompts."""
    entries = collect_images(folder)
    asked = {
        "shape": require_field(entries, "shape", "specificity", every_row=False),
        "colour": require_field(entries, "colour", "specificity", every_row=False),
    }
    with torch.no_grad():
        judged_index = judge.classify(images_to_tensor([load_rgb(e.path) for e in entries]))
    judged = {
        "shape": [SHAPES[i] for i in judged_index.shape.tolist()],
        "colour": [COLOURS[i] for i in judged_index.colour.tolist()],
    }
    rows = range(len(entries))
    result: dict = {"concepts": {}}
    for concept in concepts:
        kind = concept_kind(concept)
        other_kind = "shape" if kind == "colour" else "colour"
        own = [i for i in rows if asked[kind][i] == concept]
        # in a set like red+circle, "a red circle" keeps no attribute for red and "a blue circle" still is a
        # colour neighbour; in red+blue, blue prompts are erased, not neighbours
        kept_rows = [i for i in own if asked[other_kind][i] and asked[other_kind][i] not in concepts]
        neighbours = [i for i in rows if asked[kind][i] and asked[kind][i] not in concepts]
        result["concepts"][concept] = {
            "concept_rate": wilson_interval(sum(judged[kind][i] == concept for i in own), len(own)),
            "kept_attribute": wilson_interval(
                sum(judged[other_kind][i] == asked[other_kind][i] for i in kept_rows), len(kept_rows)
            ),
            "neighbour_accuracy": wilson_interval(
                sum(judged[kind][i] == asked[kind][i] for i in neighbours), len(neighbours)
            ),
            "substitutes": dict(Counter(judged[kind][i] for i in own if judged[kind][i] != concept).most_common()),
        }
    others = [i for i in rows if all(asked[concept_kind(c)][i] != c for c in concepts)]
    right = {i: all(judged[k][i] == asked[k][i] for k in ("shape", "colour") if asked[k][i]) for i in others}
    result["other_accuracy"] = wilson_interval(sum(right.values()), len(others))
    by_prompt: dict[str, list[int]] = {}
    for i in others:
        tally = by_prompt.setdefault(entries[i].field("prompt") or str(entries[i].path.name), [0, 0])
        tally[0] += right[i]
        tally[1] += 1
    result["other_by_prompt"] = {prompt: {"right": r, "n": n} for prompt, (r, n) in sorted(by_prompt.items())}
    return result


def run_name(concept_set: str, loss: str, combiner: str, neighbours: str, seed: int) -> str:
    return f"{concept_set}-{loss}-{combiner}-{neighbours}-seed{seed}"


def mean_std(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "n": len(values)}


def summarize(runs: list[dict]) -> list[dict]:
    """One row per (concept set, target, combiner, neighbours, concept): means and stds over seeds."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        for concept, scores in run["scores"]["concepts"].items():
            key = (run["concept_set"], run["forget_loss"], run["combiner"], run["neighbours"], concept)
            groups.setdefault(key, []).append({**scores, "other_accuracy": run["scores"]["other_accuracy"], **run})
    rows = []
    for (concept_set, loss, combiner, neighbours, concept), members in groups.items():
        substitutes: Counter = Counter()
        for m in members:
            substitutes.update(m["substitutes"])
        rows.append(
            {
                "concept_set": concept_set,
                "forget_loss": loss,
                "combiner": combiner,
                "neighbours": neighbours,
                "concept": concept,
                "seeds": [m["seed"] for m in members],
                **{
                    key: mean_std([m[key]["rate"] for m in members])
                    for key in ("concept_rate", "kept_attribute", "neighbour_accuracy", "other_accuracy")
                },
                "substitutes": dict(substitutes.most_common()),
                "wall_seconds": mean_std([m["wall_seconds"] for m in members]),
                "train_seconds": mean_std([m.get("train_seconds") for m in members]),
            }
        )
    return rows


def original_row(scores: dict, concept: str) -> dict:
    own = scores["concepts"][concept]
    return {k: own[k]["rate"] for k in ("concept_rate", "kept_attribute", "neighbour_accuracy")} | {
        "other_accuracy": scores["other_accuracy"]["rate"]
    }


def _cell(stat: dict) -> str:
    if stat["mean"] is None:
        return "-"
    return f"{100 * stat['mean']:.1f}" + (f" ± {100 * stat['std']:.1f}" if stat["n"] > 1 else "")


def results_markdown(results: dict) -> str:
    header = [
        "concepts",
        "target",
        "combiner",
        "neighbours",
        "concept",
        "seeds",
        "concept rate %",
        "kept attr. %",
        "neighbours %",
        "other %",
        "substitutes (counts)",
        "training min",
    ]
    rows = [
        ["original", "-", "-", "-", c, "-", *(f"{100 * v:.1f}" for v in o.values()), "-", "-"]
        for c, o in results["original"].items()
    ]
    for r in results["summary"]:
        rows.append(
            [
                r["concept_set"],
                r["forget_loss"],
                r["combiner"],
                r["neighbours"],
                r["concept"],
                len(r["seeds"]),
                _cell(r["concept_rate"]),
                _cell(r["kept_attribute"]),
                _cell(r["neighbour_accuracy"]),
                _cell(r["other_accuracy"]),
                ", ".join(f"{k} {v}" for k, v in r["substitutes"].items()) or "-",
                "-" if r["train_seconds"]["mean"] is None else f"{r['train_seconds']['mean'] / 60:.1f}",
            ]
        )
    missing = results.get("missing", [])
    return (
        "# Specificity on the demo world\n\n"
        "Rates are means ± std over training seeds; each run's rates carry 95% Wilson intervals in results.json. "
        "Substitutes: what the judge sees instead of the concept on the concept's prompts (all seeds). Verdicts are "
        "the judge's raw shape and colour (its unrecognisable rule is not applied here). Training minutes: the erasure "
        "alone (all stages for sequential), on a machine whose load the run does not control.\n\n"
        + markdown_table(header, rows)
        + (f"\n\nNot run: {', '.join(missing)}\n" if missing else "\n")
    )


def plot(results: dict, path: Path) -> None:
    """Concept rate against kept attribute, colours left and shapes right: one point per run setting (colour: the
    combiner, marker: the target, hollow: the neighbour player), each named by its concept (and set) beside it."""
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    markers = {"esd": "o", "anchored_esd": "s", "anchor": "^", "substitute": "D"}
    colours = {"nash": "tab:blue", "sum": "tab:orange", "sequential": "tab:green"}
    several_sets = len({row["concept_set"] for row in results["summary"]}) > 1

    def name(concept_set: str, concept: str) -> str:
        return f"{concept_set}: {concept}" if several_sets and "+" in concept_set else concept

    for row in results["summary"]:
        if row["concept_rate"]["mean"] is None:
            continue
        ax = axes[0] if row["concept"] in COLOURS else axes[1]
        x, y = 100 * row["concept_rate"]["mean"], 100 * row["kept_attribute"]["mean"]
        colour = colours[row["combiner"]]
        ax.errorbar(
            x,
            y,
            xerr=100 * (row["concept_rate"]["std"] or 0),
            yerr=100 * (row["kept_attribute"]["std"] or 0),
            marker=markers[row["forget_loss"]],
            color=colour,
            markerfacecolor="none" if row["neighbours"] == "player" else colour,
            linestyle="none",
            label=f"{row['forget_loss']} {row['combiner']}" + (" + neighbour player" * (row["neighbours"] == "player")),
        )
        ax.annotate(
            name(row["concept_set"], row["concept"]), (x, y), xytext=(4, 3), textcoords="offset points", fontsize=6
        )
    named = set()
    for concept, original in results["original"].items():
        concept = concept.split(": ")[-1]  # the same original point in every set that holds the concept
        ax = axes[0] if concept in COLOURS else axes[1]
        x, y = 100 * original["concept_rate"], 100 * original["kept_attribute"]
        ax.scatter(x, y, marker="*", s=150, color="black", label="original")
        if (concept, x, y) not in named:
            named.add((concept, x, y))
            ax.annotate(concept, (x, y), xytext=(-4, -10), textcoords="offset points", fontsize=6, ha="right")
    for ax, title in zip(axes, ("colour concepts", "shape concepts")):
        ax.set_xlabel("concept rate % (lower: erased)")
        ax.set_ylabel("kept attribute % (higher: specific)")
        ax.set_title(title, fontsize=10)
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles))  # one entry per setting, not per concept
        if unique:
            ax.legend(unique.values(), unique.keys(), fontsize=7)
        else:  # a benchmark of colours only (or shapes only) measured nothing here
            ax.text(0.5, 0.5, f"no {title} in these runs", ha="center", va="center", transform=ax.transAxes)
        ax.grid(alpha=0.3)
    figure.tight_layout()
    save_figure(figure, path)
    plt.close(figure)


def erase(
    config: SpecificityConfig, folder: Path, concepts: list[str], combiner: str, seed: int, loss: str, neighbours: str
) -> Path:
    """Train the run's erasure under ``folder``; returns the erased model's folder."""
    options = {"seed": seed, "forget_loss": loss, "neighbour_player": neighbours == "player"}
    specs = erasure_concepts(config, concepts, folder)
    if combiner != "sequential":
        run_erasure(config, specs, folder, combiner=combiner, **options)
        return folder
    stage_settings = config
    for index, (concept, spec) in enumerate(zip(concepts, specs)):
        stage = folder / f"stage{index}-{concept}"
        run_erasure(stage_settings, [spec], stage, combiner="nash", **options)
        stage_settings = replace(config, model=str(stage))
    return stage


def run(config: SpecificityConfig) -> dict:
    torch.set_num_threads(config.threads)
    check_results(config.output_dir, config.overwrite)
    evaluation = config.evaluation
    runs_dir = config.output_dir / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    check_run_settings(runs_dir / "settings.json", config.run_settings())
    judge = load_demo_judge()
    plan = [
        (concept_set, loss, combiner, neighbours, seed)
        for concept_set in config.concept_sets
        for loss in config.forget_losses
        for combiner in config.combiners
        for neighbours in config.neighbour_settings
        for seed in config.seeds
    ]
    plan, skipped = select_runs(
        plan, lambda run: (runs_dir / f"{run_name(*run)}.json").is_file(), config.report_only, config.runs_limit
    )
    with work_folder(config.work_dir, "munba-specificity-") as work:
        # the original scored as each concept set's runs are (its "other prompts" exclude that set's prompts only)
        original_path = runs_dir / "original.json"
        scored = json.loads(original_path.read_text()) if original_path.is_file() else {}
        if "concepts" in scored:  # the earlier layout: one scoring, valid for the set of exactly its concepts
            scored = {s: scored for s in config.concept_sets if set(s.split("+")) == set(scored["concepts"])}
        missing_sets = [s for s in config.concept_sets if not isinstance(scored.get(s), dict)]
        if missing_sets and config.report_only:
            raise ValueError(f"--report_only needs finished runs in {runs_dir}; run without it first")
        if missing_sets:
            folder = generate_for_eval(config.model, evaluation, work / "eval", "original")
            scored = {s: v for s, v in scored.items() if isinstance(v, dict) and "concepts" in v}
            scored.update({s: specificity_scores(folder, s.split("+"), judge) for s in missing_sets})
            write_json_atomic(original_path, scored)
        for concept_set, loss, combiner, neighbours, seed in plan:
            name = run_name(concept_set, loss, combiner, neighbours, seed)
            if (runs_dir / f"{name}.json").is_file():
                continue
            start = time.time()
            model_dir = erase(config, work / name, concept_set.split("+"), combiner, seed, loss, neighbours)
            train_seconds = time.time() - start
            folder = generate_for_eval(str(model_dir), evaluation, work / "eval", name)
            record = {
                "concept_set": concept_set,
                "forget_loss": loss,
                "combiner": combiner,
                "neighbours": neighbours,
                "seed": seed,
                "wall_seconds": time.time() - start,
                "train_seconds": train_seconds,
                "scores": specificity_scores(folder, concept_set.split("+"), judge),
            }
            write_json_atomic(runs_dir / f"{name}.json", record)
            shutil.rmtree(work / name, ignore_errors=True)
            shutil.rmtree(folder, ignore_errors=True)
    original_scores = {s: scored[s] for s in config.concept_sets}
    runs = [json.loads((runs_dir / f"{run_name(*p)}.json").read_text()) for p in plan]
    results = {
        "benchmark": "specificity",
        "settings": config.run_settings(),
        "original": {
            f"{s}: {c}" if "+" in s else c: original_row(original_scores[s], c)
            for s in config.concept_sets
            for c in s.split("+")
        },
        "original_scores": original_scores,
        "runs": runs,
        "summary": summarize(runs),
        "missing": [run_name(*p) for p in skipped],
    }
    write_results(config.output_dir, results, results_markdown, plot=plot, overwrite=config.overwrite)
    return results


def main(argv: list[str] | None = None) -> dict:
    return run(parse_config(SpecificityConfig, argv, description=__doc__, prog="python -m benchmarks.specificity"))


if __name__ == "__main__":
    run_script(main, "specificity")
