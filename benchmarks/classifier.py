"""The classifier unlearning benchmark (``munba-unlearn-classifier``): runner, report and command line.

For every seed: train the original model on the full training set once; then, for every forget setting, split
forget/retain (random subsets depend on the seed), train ``retrain`` from scratch on the retain set, run each
other method from the original model, and measure UA/RA/TA/MIA, the Avg. Gap to that seed's Retrain and the
method's wall-clock time. The report gives mean ± std over seeds. The library it measures is
:mod:`munba_diffusion.classifiers`.

Example::

    munba-unlearn-classifier --seeds 0 1 2 --forget random:0.1 class:3 \\
        --methods retrain ft ga rl munba --output_dir benchmarks/results/classifier_digits
"""

from __future__ import annotations

import platform
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from munba_diffusion.classifiers.data import (
    ClassificationData,
    ForgetSpec,
    load_classification_data,
    parse_forget_spec,
    split_forget,
)
from munba_diffusion.classifiers.metrics import METRIC_NAMES, UnlearningMetrics, average_gap, evaluate_unlearning
from munba_diffusion.classifiers.models import MODELS, build_model
from munba_diffusion.classifiers.unlearn import METHODS, TrainConfig, UnlearnConfig, train_classifier, unlearn
from munba_diffusion.config import check_options, option, parse_config, same_option

from ._common import check_device, check_results, tuples, write_results

PROG = "munba-unlearn-classifier"
# Learning rates per forget kind and method, chosen once by `--lr_grid` on seed 100 (never a reported seed):
# the grid 1e-4 ... 1e-1 (half-decades) for every method, the same 5-epoch budget, lowest Avg. Gap to Retrain on
# digits / small-resnet, ties to the smaller rate (benchmarks/results/classifier_digits/lr_sweep.md).
DEFAULT_UNLEARN_LR: Mapping[str, Mapping[str, float]] = {
    "random": {"ft": 0.03, "ga": 0.03, "rl": 0.0003, "munba": 0.0001},
    "class": {"ft": 0.1, "ga": 0.0003, "rl": 0.003, "munba": 0.03},
}
REPORT_COLUMNS = (*METRIC_NAMES, "avg_gap", "time_s")
COLUMN_TITLES = {"UA": "UA", "RA": "RA", "TA": "TA", "MIA": "MIA-Eff.", "avg_gap": "Avg. Gap ↓", "time_s": "Time (s)"}


def _default_learning_rates() -> dict[str, dict[str, float]]:
    return {kind: dict(lrs) for kind, lrs in DEFAULT_UNLEARN_LR.items()}


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def parse_method_lr(text: str) -> tuple[str | None, str, float]:
    """``[KIND:]METHOD=LR`` -> ``(kind or None for every kind, method, lr)``; a one-line ValueError otherwise."""
    target, sep, value = text.partition("=")
    kind, _, method = target.rpartition(":")
    try:
        lr = float(value) if sep else float("nan")
    except ValueError:
        lr = float("nan")
    if kind not in ("", *DEFAULT_UNLEARN_LR) or method not in METHODS or method == "retrain" or not lr > 0:
        raise ValueError(
            f"--unlearn_lr expects [KIND:]METHOD=LR with KIND in {', '.join(DEFAULT_UNLEARN_LR)}, "
            f"METHOD in ft, ga, rl, munba and LR > 0, such as class:munba=0.03; got {text!r}"
        )
    return kind or None, method, lr


@dataclass(frozen=True)
class BenchmarkConfig:
    """Everything that defines a benchmark run (the protocol written next to the results)."""

    dataset: str = option("digits", "'digits' (scikit-learn, offline) or a datasets name/folder, e.g. cifar10")
    model: str = option("small-resnet", "the classifier", choices=MODELS)
    image_size: int | None = option(None, "resize images (digits default: 16)", low=1)
    seeds: tuple[int, ...] = option((0, 1, 2), "one original model and one run of every method per seed")
    forget: tuple[str, ...] = option(("random:0.1", "class:3"), "what to forget: random:FRACTION and/or class:ID")
    methods: tuple[str, ...] = option(METHODS, "the methods compared", choices=METHODS)
    epochs: int = same_option(TrainConfig, "epochs")
    lr: float = same_option(TrainConfig, "lr")
    batch_size: int = same_option(TrainConfig, "batch_size")
    unlearn_epochs: int = option(5, "epochs of every unlearning method", low=1)
    unlearn_lr: tuple[str, ...] = option(
        (),
        "override unlearning learning rates, for one forget kind (random, class) or both; defaults: "
        + ", ".join(f"{k}:{m}={lr:g}" for k, lrs in DEFAULT_UNLEARN_LR.items() for m, lr in lrs.items()),
        metavar="[KIND:]METHOD=LR",
    )
    combiner: str = same_option(UnlearnConfig, "combiner")
    max_grad_norm: float | None = same_option(UnlearnConfig, "max_grad_norm")
    nonfinite_gradients: str = same_option(UnlearnConfig, "nonfinite_gradients")
    device: str = option(default_factory=_default_device, help="torch device (default: cuda when available)")
    max_train_samples: int | None = option(None, "use a random subset of the training set this large", low=1)
    max_test_samples: int | None = option(None, "use a random subset of the test set this large", low=1)

    def __post_init__(self) -> None:
        tuples(self)
        check_options(self)
        self.validate()

    def validate(self) -> list[ForgetSpec]:
        """Check names and specs before any work; returns the parsed forget specs."""
        if not self.seeds:
            raise ValueError("no seeds given; pass e.g. --seeds 0 1 2")
        check_device(self.device)
        specs = [parse_forget_spec(text) for text in self.forget]
        rates = self.learning_rates
        missing = sorted(
            {
                f"{spec.kind}:{m}"
                for spec in specs
                for m in self.methods
                if m != "retrain" and m not in rates.get(spec.kind, {})
            }
        )
        if missing:
            raise ValueError(f"no learning rate for {', '.join(missing)}; set one with --unlearn_lr KIND:METHOD=LR")
        return specs

    @property
    def train(self) -> TrainConfig:
        """How the original and Retrain models are trained."""
        return TrainConfig(epochs=self.epochs, lr=self.lr, batch_size=self.batch_size)

    @property
    def learning_rates(self) -> dict[str, dict[str, float]]:
        """``learning_rates[kind][method]``: :data:`DEFAULT_UNLEARN_LR` with the ``unlearn_lr`` overrides."""
        rates = _default_learning_rates()
        for kind, method, lr in map(parse_method_lr, self.unlearn_lr):
            for target in [kind] if kind else rates:
                rates[target][method] = lr
        return rates

    def unlearn_config(self, method: str, kind: str) -> UnlearnConfig:
        """The unlearning config of ``method`` for a forget setting of ``kind`` (``random`` or ``class``)."""
        return UnlearnConfig(
            method=method,
            epochs=self.unlearn_epochs,
            lr=self.learning_rates[kind][method],
            batch_size=self.batch_size,
            combiner=self.combiner,
            max_grad_norm=self.max_grad_norm,
            nonfinite_gradients=self.nonfinite_gradients,
        )


@dataclass(frozen=True, kw_only=True)
class ClassifierCommand(BenchmarkConfig):
    """Unlearn random data or a class from an image classifier and compare methods with UA/RA/TA/MIA-efficacy/Avg.
    Gap (SalUn convention)."""

    output_dir: Path = option(
        help="folder for results.json and results.md (lr_sweep.json and lr_sweep.md with --lr_grid)"
    )
    overwrite: bool = option(False, "replace results already in --output_dir")
    lr_grid: tuple[float, ...] | None = option(
        None,
        "instead of the table, sweep every method over these learning rates and write lr_sweep.json/md (use "
        "seeds you will not report)",
        low=0,
        low_open=True,
        metavar="LR",
    )
    threads: int | None = option(None, "torch CPU threads (default: torch's choice)", low=1)
    quiet: bool = option(False, "no progress bars")


def _fresh_model(config: BenchmarkConfig, data: ClassificationData, seed: int) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(config.model, data.num_classes, data.in_channels)


def _evaluate(model, data: ClassificationData, forget, retain, seed: int, device: str) -> UnlearningMetrics:
    return evaluate_unlearning(
        model,
        data.train_images,
        data.train_labels,
        data.test_images,
        data.test_labels,
        forget,
        retain,
        torch.Generator().manual_seed(seed),
        device,
    )


def _run_setting(
    config: BenchmarkConfig,
    data: ClassificationData,
    original: torch.nn.Module,
    original_time: float,
    spec: ForgetSpec,
    seed: int,
    variants: Sequence[UnlearnConfig | None],
    progress: bool,
) -> list[dict[str, Any]]:
    """Rows for the original model and each variant (``None`` is Retrain), with Avg. Gap to Retrain if present."""
    forget, retain = split_forget(data.train_labels, spec, data.num_classes, torch.Generator().manual_seed(seed))
    rows = [
        {
            "method": "original",
            "lr": None,
            "metrics": _evaluate(original, data, forget, retain, seed, config.device),
            "time_s": original_time,
            "skipped_steps": 0,
        }
    ]
    for variant in variants:
        generator = torch.Generator().manual_seed(seed)  # the same batches and labels for every method
        start = time.perf_counter()
        skipped = 0
        if variant is None:
            model = _fresh_model(config, data, seed)
            train_classifier(
                model, data.train_images, data.train_labels, retain, config.train, generator, config.device
            )
        else:
            model, record = unlearn(
                original,
                data.train_images,
                data.train_labels,
                forget,
                retain,
                data.num_classes,
                variant,
                generator,
                config.device,
            )
            skipped = record["skipped_steps"]
        elapsed = time.perf_counter() - start
        method = "retrain" if variant is None else variant.method
        metrics = _evaluate(model, data, forget, retain, seed, config.device)
        rows.append(
            {
                "method": method,
                "lr": None if variant is None else variant.lr,
                "metrics": metrics,
                "time_s": elapsed,
                "skipped_steps": skipped,
            }
        )
        if progress:
            tqdm.write(f"seed {seed} {spec} {method}: {metrics} ({elapsed:.1f} s)")
    reference = next((row["metrics"] for row in rows if row["method"] == "retrain"), None)
    return [
        {
            "seed": seed,
            "forget": str(spec),
            "forget_size": len(forget),
            "method": row["method"],
            "lr": row["lr"],
            **row["metrics"].as_dict(),
            "avg_gap": average_gap(row["metrics"], reference) if reference is not None else None,
            "time_s": row["time_s"],
            "skipped_steps": row["skipped_steps"],
        }
        for row in rows
    ]


def _runs(
    config: BenchmarkConfig,
    data: ClassificationData,
    specs: list[ForgetSpec],
    variants: Callable[[ForgetSpec], list[UnlearnConfig | None]],
    progress: bool,
) -> list[dict[str, Any]]:
    runs = []
    for seed in tqdm(config.seeds, desc="seeds", disable=not progress):
        original = _fresh_model(config, data, seed)
        start = time.perf_counter()
        train_classifier(
            original,
            data.train_images,
            data.train_labels,
            torch.arange(len(data.train_labels)),
            config.train,
            torch.Generator().manual_seed(seed),
            config.device,
            progress=progress,
        )
        original_time = time.perf_counter() - start
        for spec in specs:
            runs.extend(_run_setting(config, data, original, original_time, spec, seed, variants(spec), progress))
    return runs


def _load_checked_data(config: BenchmarkConfig) -> tuple[ClassificationData, list[ForgetSpec]]:
    specs = config.validate()
    data = load_classification_data(
        config.dataset,
        config.image_size,
        max_train_samples=config.max_train_samples,
        max_test_samples=config.max_test_samples,
    )
    for spec in specs:  # checks class ids before any training
        split_forget(data.train_labels, spec, data.num_classes, torch.Generator().manual_seed(0))
    return data, specs


def run_benchmark(config: BenchmarkConfig, progress: bool = True) -> dict[str, Any]:
    """Run the whole benchmark; returns ``{"protocol", "runs", "summary"}`` (JSON-ready)."""
    data, specs = _load_checked_data(config)

    def variants(spec: ForgetSpec) -> list[UnlearnConfig | None]:
        return [None if m == "retrain" else config.unlearn_config(m, spec.kind) for m in config.methods]

    runs = _runs(config, data, specs, variants, progress)
    protocol = _protocol(config, data, specs, _fresh_model(config, data, 0))
    return {"protocol": protocol, "runs": runs, "summary": summarize(runs)}


def sweep_unlearn_lr(config: BenchmarkConfig, grid: Sequence[float], progress: bool = True) -> dict[str, Any]:
    """Every non-retrain method of ``config`` at every learning rate in ``grid`` (same epochs), against Retrain.

    Returns ``{"protocol", "grid", "runs", "mean_gap", "best_lr"}`` with ``mean_gap[kind][method][str(lr)]``
    averaged over ``config.seeds`` and the forget settings of that kind, and ``best_lr[kind][method]`` (the first
    lowest in grid order, so an ascending grid breaks ties towards the smaller learning rate), ready to
    be used as :attr:`BenchmarkConfig.unlearn_lr`. Use seeds that are not reported afterwards.
    """
    data, specs = _load_checked_data(config)
    methods = [m for m in config.methods if m != "retrain"]

    def variants(spec: ForgetSpec) -> list[UnlearnConfig | None]:
        return [None] + [replace(config.unlearn_config(m, spec.kind), lr=lr) for m in methods for lr in grid]

    runs = _runs(config, data, specs, variants, progress)
    kinds = sorted({spec.kind for spec in specs})
    mean_gap = {
        kind: {
            m: {
                str(lr): float(
                    np.mean(
                        [
                            r["avg_gap"]
                            for r in runs
                            if r["method"] == m and r["lr"] == lr and r["forget"].startswith(kind + ":")
                        ]
                    )
                )
                for lr in grid
            }
            for m in methods
        }
        for kind in kinds
    }
    best_lr = {
        kind: {m: float(min(gaps, key=gaps.get)) for m, gaps in by_method.items()}
        for kind, by_method in mean_gap.items()
    }
    protocol = _protocol(config, data, [], _fresh_model(config, data, 0))
    return {"protocol": protocol, "grid": list(grid), "runs": runs, "mean_gap": mean_gap, "best_lr": best_lr}


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """``summary[forget][method][column] = {"mean", "std", "n"}`` over seeds (population std, ``ddof=0``)."""
    summary: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    for run in runs:
        summary.setdefault(run["forget"], {}).setdefault(run["method"], {})
    for forget, methods in summary.items():
        for method in methods:
            rows = [r for r in runs if r["forget"] == forget and r["method"] == method]
            for column in REPORT_COLUMNS:
                values = [r[column] for r in rows if r[column] is not None]
                if values:
                    methods[method][column] = {
                        "mean": float(np.mean(values)),
                        "std": float(np.std(values)),
                        "n": len(values),
                    }
    return summary


def best_unlearning_methods(summary_for_setting: Mapping[str, Mapping[str, Mapping[str, float]]]) -> list[str]:
    """The methods other than original/retrain with the lowest mean Avg. Gap (several on an exact tie; empty
    without a Retrain)."""
    gaps = {
        m: c["avg_gap"]["mean"]
        for m, c in summary_for_setting.items()
        if m not in ("original", "retrain") and "avg_gap" in c
    }
    if not gaps:
        return []
    lowest = min(gaps.values())
    return [m for m, gap in gaps.items() if gap <= lowest + 1e-9]


def _protocol(
    config: BenchmarkConfig, data: ClassificationData, specs: list[ForgetSpec], model: torch.nn.Module
) -> dict[str, Any]:
    return {
        "dataset": data.name,
        "image_size": data.image_size,
        "in_channels": data.in_channels,
        "num_classes": data.num_classes,
        "train_size": len(data.train_labels),
        "test_size": len(data.test_labels),
        "model": config.model,
        "model_parameters": sum(p.numel() for p in model.parameters()),
        "seeds": list(config.seeds),
        "forget": list(config.forget),
        "methods": list(config.methods),
        "train": asdict(config.train),
        "unlearn": {
            str(spec): {m: asdict(config.unlearn_config(m, spec.kind)) for m in config.methods if m != "retrain"}
            for spec in specs
        },
        "unlearn_epochs": config.unlearn_epochs,
        "unlearn_lr_is_default": config.learning_rates == _default_learning_rates(),
        "mia": "SVC(rbf, C=3, gamma=auto) on true-class confidence; members = random retain subset of test size, "
        "non-members = test set; MIA-Eff. = % of forget samples called non-members",
        "avg_gap": "mean |metric - Retrain| over UA, RA, TA, MIA, per seed against that seed's Retrain",
        "device": config.device,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def _format(cell: Mapping[str, float] | None, digits: int = 2) -> str:
    if cell is None:
        return "–"
    return f"{cell['mean']:.{digits}f} ± {cell['std']:.{digits}f}"


def _unlearn_protocol_lines(unlearn_by_setting: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> list[str]:
    """One line per unlearning method: the shared optimiser settings and the learning rate per forget setting."""
    lines = []
    methods = next(iter(unlearn_by_setting.values()), {})
    for method, cfg in methods.items():
        lrs = ", ".join(f"{setting}: {by_method[method]['lr']:g}" for setting, by_method in unlearn_by_setting.items())
        extra = f", combiner `{cfg['combiner']}`" if method == "munba" else ""
        lines.append(
            f"- {method}: SGD constant lr ({lrs}), momentum {cfg['momentum']}, weight decay "
            f"{cfg['weight_decay']}, {cfg['epochs']} epochs, batch {cfg['batch_size']}, "
            f"max grad norm {cfg['max_grad_norm']}{extra}"
        )
    return lines


def results_markdown(results: Mapping[str, Any]) -> str:
    """A human-readable report: protocol, one table per forget setting, the best non-retrain method."""
    protocol, summary = results["protocol"], results["summary"]
    train = protocol["train"]
    lines = [
        f"# Classifier unlearning: {protocol['dataset']} / {protocol['model']}",
        "",
        "## Protocol",
        "",
        (
            f"- dataset: `{protocol['dataset']}`, {protocol['train_size']} train / {protocol['test_size']} test "
            f"images, {protocol['in_channels']}x{protocol['image_size']}x{protocol['image_size']}, "
            f"{protocol['num_classes']} classes"
        ),
        f"- model: `{protocol['model']}` ({protocol['model_parameters']:,} parameters)",
        (
            f"- original and Retrain: SGD lr {train['lr']} (cosine), momentum {train['momentum']}, weight decay "
            f"{train['weight_decay']}, {train['epochs']} epochs, batch {train['batch_size']}"
        ),
    ]
    lines += _unlearn_protocol_lines(protocol["unlearn"])
    if protocol.get("unlearn_lr_is_default"):
        lines.append(
            "- unlearning learning rates: the package defaults, chosen per forget kind and method from the same "
            "grid (1e-4 ... 1e-1) on held-out seed 100 with `--lr-grid` (digits / small-resnet; lr_sweep.md)"
        )
    lines += [
        (
            f"- seeds: {', '.join(map(str, protocol['seeds']))} (mean ± std over seeds); forget settings: "
            f"{', '.join(protocol['forget'])}"
        ),
        f"- MIA: {protocol['mia']}",
        f"- Avg. Gap: {protocol['avg_gap']}",
        f"- device: {protocol['device']}, {protocol['torch_threads']} torch thread(s), torch {protocol['torch']}",
        "",
    ]
    for forget, methods in summary.items():
        sizes = sorted({r["forget_size"] for r in results["runs"] if r["forget"] == forget})
        lines += [f"## Forget `{forget}` ({'/'.join(map(str, sizes))} training images)", ""]
        lines.append("| Method | " + " | ".join(COLUMN_TITLES[c] for c in REPORT_COLUMNS) + " |")
        lines.append("|---" * (len(REPORT_COLUMNS) + 1) + "|")
        for method, cells in methods.items():
            name = "Original (no unlearning)" if method == "original" else method
            lines.append(
                f"| {name} | "
                + " | ".join(_format(cells.get(c), 1 if c == "time_s" else 2) for c in REPORT_COLUMNS)
                + " |"
            )
        best = best_unlearning_methods(methods)
        if best:
            lowest = methods[best[0]]["avg_gap"]["mean"]
            names = ", ".join(f"**{m}**" for m in best) + (" (tied)" if len(best) > 1 else "")
            lines += ["", f"Lowest Avg. Gap among unlearning methods (excluding Retrain): {names} ({lowest:.2f})."]
            untouched = methods.get("original", {}).get("avg_gap")
            if untouched is not None and untouched["mean"] <= lowest + 1e-9:
                lines.append(
                    f"The original model without unlearning is as close or closer to Retrain "
                    f"({untouched['mean']:.2f}): here no method improves on doing nothing."
                )
        lines.append("")
    lines.append("Original's time is its training time on the full training set; Retrain's is training from scratch.")
    return "\n".join(lines) + "\n"


def sweep_markdown(sweep: Mapping[str, Any]) -> str:
    """Mean Avg. Gap per forget kind, method and learning rate of a :func:`sweep_unlearn_lr` result."""
    protocol, grid = sweep["protocol"], sweep["grid"]
    lines = [
        f"# Unlearning learning-rate sweep: {protocol['dataset']} / {protocol['model']}",
        "",
        (
            f"Mean Avg. Gap to Retrain on seed(s) {', '.join(map(str, protocol['seeds']))}, which the reported "
            f"tables do not use; every method gets the same grid and the same {protocol['unlearn_epochs']} epochs; "
            "lower is better."
        ),
        "",
    ]
    for kind, by_method in sweep["mean_gap"].items():
        settings = [f for f in protocol["forget"] if f.startswith(kind + ":")]
        lines += [
            f"## Forget {', '.join(f'`{f}`' for f in settings)}",
            "",
            "| Method | " + " | ".join(f"lr {lr:g}" for lr in grid) + " | best lr |",
            "|---" * (len(grid) + 2) + "|",
        ]
        for method, gaps in by_method.items():
            lines.append(
                f"| {method} | "
                + " | ".join(f"{gaps[str(lr)]:.2f}" for lr in grid)
                + f" | {sweep['best_lr'][kind][method]:g} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    command = parse_config(ClassifierCommand, argv, prog=PROG)
    if command.threads is not None:
        torch.set_num_threads(command.threads)
    progress = not command.quiet
    try:
        if command.lr_grid is not None:
            check_results(command.output_dir, command.overwrite, stem="lr_sweep")
            sweep = sweep_unlearn_lr(command, command.lr_grid, progress=progress)
            paths = write_results(
                command.output_dir, sweep, sweep_markdown, overwrite=command.overwrite, stem="lr_sweep"
            )
        else:
            check_results(command.output_dir, command.overwrite)
            paths = write_results(
                command.output_dir,
                run_benchmark(command, progress=progress),
                results_markdown,
                overwrite=command.overwrite,
            )
    except (ValueError, FileExistsError, FileNotFoundError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    print("wrote " + ", ".join(map(str, paths)))


if __name__ == "__main__":
    main()
