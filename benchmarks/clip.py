"""The CLIP zero-shot class-unlearning benchmark (``munba-unlearn-clip``): data, runs over settings x seeds x
methods, reports and the command line. The library it measures is :mod:`munba_diffusion.classifiers.clip_unlearn`.

Data:

- ``munba-demo`` (offline): the demo world's renders (:func:`munba_diffusion.demo.render_scene`), every
  (shape, colour) pair equally often, from fixed seeds (train 1000, test 2000). The task is zero-shot shape
  classification; the held-out task, which measures general knowledge the unlearning should keep, is zero-shot
  colour classification of all test renders.
- any ``datasets`` name or folder with an ``Image`` column and a ``ClassLabel`` column (e.g. ``timm/oxford-iiit-pet``):
  the class names (``_`` read as a space) fill the prompt templates; the ``train`` split trains, ``test`` (else
  ``validation``) measures. A held-out task is optional: another such dataset, its test split.

Images go through the model's own ``CLIPImageProcessor`` (resize, crop, CLIP mean/std). For every
(parameter set, adapter) setting, seed and method, :func:`~munba_diffusion.classifiers.clip_unlearn.unlearn_clip`
runs from the same original model; the report gives mean ± std over seeds of forget/retain/held-out accuracy and
wall-clock time.

The offline demo (the bundled tiny CLIP forgets "circle"; held-out task: colours)::

    munba-unlearn-clip --threads 1 --output_dir benchmarks/results/clip_demo

A real CLIP and dataset (needs the Hub once)::

    munba-unlearn-clip --model openai/clip-vit-base-patch32 \\
        --dataset timm/oxford-iiit-pet --forget "abyssinian" "bengal" "birman" \\
        --templates "a photo of a {label}, a type of pet." --heldout_dataset uoft-cs/cifar10 \\
        --params text-attention --adapters direct --steps 200 --device cuda --output_dir runs/clip_pets
"""

from __future__ import annotations

import platform
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from munba_diffusion.classifiers.clip_unlearn import (
    ADAPTERS,
    CLIP_METHODS,
    PARAM_SETS,
    ClipUnlearnConfig,
    LabelledImages,
    ZeroShotTask,
    check_templates,
    evaluate_clip_unlearning,
    unlearn_clip,
)
from munba_diffusion.classifiers.data import _find_columns
from munba_diffusion.config import check_options, option, parse_config, same_option
from munba_diffusion.demo import COLOURS, SHAPES, render_scene
from munba_diffusion.models import DEMO_MODEL

from ._common import check_device, check_results, options_of, tuples, write_results

PROG = "munba-unlearn-clip"
DEMO_DATASET = "munba-demo"  # the demo world's renders as a dataset (the benchmark's own data, not a model)
DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of a {label}.",)
DEMO_SHAPE_TEMPLATES: tuple[str, ...] = ("a {label}", "a photo of a {label}", "an image of a {label}")
DEMO_COLOUR_TEMPLATES: tuple[str, ...] = ("a {label} object", "something {label}", "a photo of something {label}")
DEMO_TRAIN_SEED, DEMO_TEST_SEED = 1000, 2000
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
REPORT_COLUMNS: tuple[str, ...] = ("forget_acc", "retain_acc", "heldout_acc", "time_s")
RETAIN_TOLERANCE = 5.0  # points of retain / held-out accuracy the acceptance check allows to lose
PER_RUN = ("method", "params", "adapter")  # the ClipUnlearnConfig fields a run sets; the others are options here


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class ClipBenchmarkData:
    """The unlearning task with its train/test images, and an optional held-out task with its images."""

    name: str
    task: ZeroShotTask
    train: LabelledImages
    test: LabelledImages
    heldout_name: str | None = None
    heldout: tuple[ZeroShotTask, LabelledImages] | None = None


@dataclass(frozen=True)
class ClipBenchmarkConfig:
    """Everything that defines a benchmark run (written next to the results as its protocol)."""

    model: str = option(DEMO_MODEL, "CLIP Hub id or folder, or a bundled CLIP (munba-demo)")
    dataset: str = option(
        DEMO_DATASET, f"{DEMO_DATASET} (rendered shapes) or a datasets name/folder with Image and ClassLabel columns"
    )
    forget: tuple[str, ...] = option(("circle",), "class name(s) to forget")
    templates: tuple[str, ...] | None = option(
        None, "prompt templates with {label} (default: the demo's, else 'a photo of a {label}.')"
    )
    heldout_dataset: str | None = option(
        None, "datasets name/folder of a held-out zero-shot task (default: colours for the demo, none otherwise)"
    )
    heldout_templates: tuple[str, ...] = option(DEFAULT_TEMPLATES, "prompt templates of the held-out task")
    methods: tuple[str, ...] = option(CLIP_METHODS, "the methods compared", choices=CLIP_METHODS)
    params: tuple[str, ...] = option(
        ("text-attention", "all-attention"),
        "which attention projections train, one setting each",
        choices=tuple(PARAM_SETS),
    )
    adapters: tuple[str, ...] = option(
        ("direct", "lora"), "train the projections directly or through LoRA, one setting each", choices=ADAPTERS
    )
    seeds: tuple[int, ...] = option((0, 1, 2), "seeds of every setting and method (batches, random labels, LoRA init)")
    combiner: str = same_option(ClipUnlearnConfig, "combiner")
    lora_rank: int = same_option(ClipUnlearnConfig, "lora_rank")
    lora_alpha: float = same_option(ClipUnlearnConfig, "lora_alpha")
    steps: int = same_option(ClipUnlearnConfig, "steps")
    batch_size: int = same_option(ClipUnlearnConfig, "batch_size")
    lr: float = same_option(ClipUnlearnConfig, "lr")
    momentum: float = same_option(ClipUnlearnConfig, "momentum")
    weight_decay: float = same_option(ClipUnlearnConfig, "weight_decay")
    max_grad_norm: float | None = same_option(ClipUnlearnConfig, "max_grad_norm")
    nonfinite_gradients: str = same_option(ClipUnlearnConfig, "nonfinite_gradients")
    dtype: str = option("float32", "model dtype (trained parameters and losses stay float32)", choices=tuple(DTYPES))
    device: str = option(default_factory=_default_device, help="torch device (default: cuda when available)")
    demo_train_per_pair: int = option(48, "demo training renders per (shape, colour) pair", low=1)
    demo_test_per_pair: int = option(40, "demo test renders per (shape, colour) pair", low=1)
    max_train_samples: int | None = option(None, "use a random subset of the training split this large", low=1)
    max_test_samples: int | None = option(None, "use a random subset of the test split this large", low=1)

    def __post_init__(self) -> None:
        tuples(self)
        check_options(self)
        self.validate()

    def validate(self) -> None:
        """Check what the options' rules do not (class names are checked once the data is loaded)."""
        if not (self.seeds and self.methods and self.params and self.adapters and self.forget):
            raise ValueError("seeds, methods, params, adapters and forget each need at least one value")
        check_templates(self.shape_templates)
        check_templates(self.heldout_templates)
        check_device(self.device)
        if self.dataset == DEMO_DATASET:  # the demo's class names are known before any model or data loads
            ZeroShotTask(SHAPES, self.shape_templates).class_ids(self.forget)

    @property
    def shape_templates(self) -> tuple[str, ...]:
        if self.templates is not None:
            return self.templates
        return DEMO_SHAPE_TEMPLATES if self.dataset == DEMO_DATASET else DEFAULT_TEMPLATES

    def settings(self) -> list[tuple[str, str]]:
        return [(params, adapter) for params in self.params for adapter in self.adapters]

    def unlearn_options(self) -> dict[str, Any]:
        """The :class:`ClipUnlearnConfig` options every run shares (all but method, params and adapter)."""
        return {k: v for k, v in options_of(self, ClipUnlearnConfig).items() if k not in PER_RUN}

    def unlearn_config(self, method: str, params: str, adapter: str) -> ClipUnlearnConfig:
        return ClipUnlearnConfig(method=method, params=params, adapter=adapter, **self.unlearn_options())


@dataclass(frozen=True, kw_only=True)
class ClipCommand(ClipBenchmarkConfig):
    """Make a CLIP zero-shot classifier forget classes with MUNBa and compare with fine-tuning (ft) and random
    labels (rl)."""

    output_dir: Path = option(help="folder for results.json and results.md")
    overwrite: bool = option(False, "replace results already in --output_dir")
    threads: int | None = option(None, "torch CPU threads (default: torch's choice)", low=1)
    quiet: bool = option(False, "no progress bars")


# ----------------------------------------------------------------------------------------------- data
def preprocess_images(
    processor, images: Sequence, batch_size: int = 256, desc: str = "images", progress: bool = True
) -> torch.Tensor:
    """``(N, 3, H, W)`` pixel values from CLIP's own image processor (RGB, resize, crop, CLIP mean/std)."""
    chunks = []
    for start in tqdm(
        range(0, len(images), batch_size), desc=desc, leave=False, disable=not progress or len(images) <= batch_size
    ):
        batch = [image.convert("RGB") for image in images[start : start + batch_size]]
        chunks.append(processor.image_processor(images=batch, return_tensors="pt")["pixel_values"])
    return torch.cat(chunks)


def render_demo_split(per_pair: int, seed: int) -> tuple[list, torch.Tensor, torch.Tensor]:
    """``per_pair`` renders of every (shape, colour) pair from ``numpy.random.default_rng(seed)``:
    (PIL images, shape ids, colour ids)."""
    rng = np.random.default_rng(seed)
    pairs = [(s, c) for _ in range(per_pair) for s in range(len(SHAPES)) for c in range(len(COLOURS))]
    images = [render_scene(rng, SHAPES[s], COLOURS[c]) for s, c in pairs]
    return images, torch.tensor([s for s, _ in pairs]), torch.tensor([c for _, c in pairs])


def load_demo_data(
    processor, templates: Sequence[str], train_per_pair: int, test_per_pair: int, progress: bool = True
) -> ClipBenchmarkData:
    """Shapes to unlearn (train seed 1000, test seed 2000); colours of the test renders as the held-out task."""
    train_images, train_shapes, _ = render_demo_split(train_per_pair, DEMO_TRAIN_SEED)
    test_images, test_shapes, test_colours = render_demo_split(test_per_pair, DEMO_TEST_SEED)
    test_pixels = preprocess_images(processor, test_images, progress=progress)
    return ClipBenchmarkData(
        name=DEMO_DATASET,
        task=ZeroShotTask(SHAPES, tuple(templates)),
        train=LabelledImages(preprocess_images(processor, train_images, progress=progress), train_shapes),
        test=LabelledImages(test_pixels, test_shapes),
        heldout_name="demo colours",
        heldout=(ZeroShotTask(COLOURS, DEMO_COLOUR_TEMPLATES), LabelledImages(test_pixels, test_colours)),
    )


def _evaluation_split(splits, name: str):
    for split in ("test", "validation"):
        if split in splits:
            return splits[split]
    raise ValueError(f"dataset {name!r} has no 'test' or 'validation' split (it has {', '.join(splits)})")


def _labelled_split(
    split, processor, max_samples: int | None, desc: str, progress: bool = True
) -> tuple[tuple[str, ...], LabelledImages]:
    """(class names, images) of one ``datasets`` split; the label column must be a ``ClassLabel`` (names needed)."""
    from datasets import ClassLabel

    image_column, label_column = _find_columns(split.features)
    feature = split.features[label_column]
    if not isinstance(feature, ClassLabel):
        raise ValueError(f"column {label_column!r} is not a ClassLabel, so there are no class names for the prompts")
    if max_samples is not None and max_samples < len(split):
        split = split.shuffle(seed=0).select(range(max_samples))
    names = tuple(name.replace("_", " ") for name in feature.names)
    pixels = preprocess_images(processor, split[image_column], desc=desc, progress=progress)
    return names, LabelledImages(pixels, torch.tensor(list(split[label_column]), dtype=torch.long))


def load_heldout_task(
    name: str, templates: Sequence[str], processor, max_samples: int | None = None, progress: bool = True
) -> tuple[ZeroShotTask, LabelledImages]:
    """A held-out zero-shot task: the test (else validation) split of the ``datasets`` name or folder ``name``."""
    from datasets import load_dataset

    split = _evaluation_split(load_dataset(name), name)
    names, images = _labelled_split(split, processor, max_samples, "held-out images", progress)
    return ZeroShotTask(names, tuple(templates)), images


def load_hf_data(config: ClipBenchmarkConfig, processor, progress: bool = True) -> ClipBenchmarkData:
    """The unlearning task from ``config.dataset`` via ``datasets.load_dataset`` (train split / test split)."""
    from datasets import load_dataset

    splits = load_dataset(config.dataset)
    if "train" not in splits:
        raise ValueError(f"dataset {config.dataset!r} has no 'train' split (it has {', '.join(splits)})")
    names, train = _labelled_split(splits["train"], processor, config.max_train_samples, "train images", progress)
    test_split = _evaluation_split(splits, config.dataset)
    _, test = _labelled_split(test_split, processor, config.max_test_samples, "test images", progress)
    return ClipBenchmarkData(config.dataset, ZeroShotTask(names, config.shape_templates), train, test)


def load_benchmark_data(config: ClipBenchmarkConfig, processor, progress: bool = True) -> ClipBenchmarkData:
    """The demo or a ``datasets`` task; ``config.heldout_dataset`` (when set) replaces the held-out task."""
    if config.dataset == DEMO_DATASET:
        data = load_demo_data(
            processor, config.shape_templates, config.demo_train_per_pair, config.demo_test_per_pair, progress
        )
    else:
        data = load_hf_data(config, processor, progress)
    if config.heldout_dataset is not None:
        data.heldout_name = config.heldout_dataset
        data.heldout = load_heldout_task(
            config.heldout_dataset, config.heldout_templates, processor, config.max_test_samples, progress
        )
    return data


def load_clip_model(name_or_path: str, dtype: str, device: str):
    """(CLIPModel in ``dtype`` on ``device``, eval mode; CLIPProcessor) from a Hub id, a folder or a bundled CLIP
    name (resolved by :func:`munba_diffusion.models.resolve_model_path`)."""
    from munba_diffusion.evaluation.clip_score import load_clip

    model, processor = load_clip(name_or_path, device)
    return model.to(DTYPES[dtype]), processor


# ----------------------------------------------------------------------------------------------- runs
def run_clip_benchmark(config: ClipBenchmarkConfig, progress: bool = True) -> dict[str, Any]:
    """Run every setting x seed x method; returns ``{"protocol", "runs", "summary"}`` (JSON-ready)."""
    config.validate()
    model, processor = load_clip_model(config.model, config.dtype, config.device)
    data = load_benchmark_data(config, processor, progress)
    forget_ids = data.task.class_ids(config.forget)
    tokenizer = processor.tokenizer

    def evaluate(candidate) -> dict[str, float | None]:
        return evaluate_clip_unlearning(candidate, tokenizer, data.task, data.test, forget_ids, data.heldout)

    runs = [{"setting": None, "method": "original", "seed": None, **evaluate(model), "time_s": None}]
    jobs = [(s, seed, m) for s in config.settings() for seed in config.seeds for m in config.methods]
    for (params, adapter), seed, method in tqdm(jobs, desc="runs", disable=not progress):
        start = time.perf_counter()
        unlearned, record = unlearn_clip(
            model,
            tokenizer,
            data.task,
            data.train,
            forget_ids,
            config.unlearn_config(method, params, adapter),
            seed=seed,
        )
        elapsed = time.perf_counter() - start
        row = {
            "setting": f"{params}/{adapter}",
            "method": method,
            "seed": seed,
            **evaluate(unlearned),
            "time_s": elapsed,
            "training": record,
        }
        runs.append(row)
        if progress:
            heldout = "–" if row["heldout_acc"] is None else f"{row['heldout_acc']:.1f}"
            tqdm.write(
                f"{row['setting']} seed {seed} {method}: forget {row['forget_acc']:.1f}, retain "
                f"{row['retain_acc']:.1f}, held-out {heldout}, {elapsed:.1f} s"
            )
    return {"protocol": _protocol(config, data, forget_ids, model), "runs": runs, "summary": summarize(runs)}


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """``summary[setting][method][column] = {"mean", "std", "n"}`` (population std); ``original`` in every setting."""
    original = next(r for r in runs if r["method"] == "original")
    summary: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    for setting in dict.fromkeys(r["setting"] for r in runs if r["setting"] is not None):
        rows_by_method = {"original": [original]}
        for r in runs:
            if r["setting"] == setting:
                rows_by_method.setdefault(r["method"], []).append(r)
        summary[setting] = {
            method: {
                column: {"mean": float(np.mean(values)), "std": float(np.std(values)), "n": len(values)}
                for column in REPORT_COLUMNS
                if (values := [r[column] for r in rows if r[column] is not None])
            }
            for method, rows in rows_by_method.items()
        }
    return summary


def acceptance(
    summary_for_setting: Mapping[str, Mapping[str, Mapping[str, float]]], method: str, chance: float
) -> dict[str, bool]:
    """Whether ``method``'s mean forget accuracy is at most ``chance`` and its mean retain and held-out accuracies
    are within :data:`RETAIN_TOLERANCE` points of the original's."""
    cells, original = summary_for_setting[method], summary_for_setting["original"]
    checks = {"forget_at_most_chance": cells["forget_acc"]["mean"] <= chance}
    for column in ("retain_acc", "heldout_acc"):
        if column in cells:
            drop = original[column]["mean"] - cells[column]["mean"]
            checks[f"{column}_within_{RETAIN_TOLERANCE:g}"] = drop <= RETAIN_TOLERANCE
    return checks


def _protocol(config: ClipBenchmarkConfig, data: ClipBenchmarkData, forget_ids: list[int], model) -> dict[str, Any]:
    return {
        "model": config.model,
        "dtype": config.dtype,
        "model_parameters": sum(p.numel() for p in model.parameters()),
        "dataset": data.name,
        "classes": list(data.task.class_names),
        "templates": list(data.task.templates),
        "forget": list(config.forget),
        "forget_ids": forget_ids,
        "chance_acc": 100.0 / len(data.task.class_names),
        "train_size": len(data.train),
        "test_size": len(data.test),
        "heldout": None
        if data.heldout is None
        else {
            "name": data.heldout_name,
            "classes": list(data.heldout[0].class_names),
            "templates": list(data.heldout[0].templates),
            "size": len(data.heldout[1]),
        },
        "demo_seeds": {"train": DEMO_TRAIN_SEED, "test": DEMO_TEST_SEED} if data.name == DEMO_DATASET else None,
        "seeds": list(config.seeds),
        "methods": list(config.methods),
        "settings": [f"{p}/{a}" for p, a in config.settings()],
        "unlearn": config.unlearn_options(),
        "device": config.device,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


# ----------------------------------------------------------------------------------------------- reports
def _format(cell: Mapping[str, float] | None, digits: int) -> str:
    return "–" if cell is None else f"{cell['mean']:.{digits}f} ± {cell['std']:.{digits}f}"


def results_markdown(results: Mapping[str, Any]) -> str:
    """Protocol, one table per setting (method x forget/retain/held-out accuracy, time), acceptance of ``munba``."""
    protocol, summary = results["protocol"], results["summary"]
    unlearn = protocol["unlearn"]
    heldout = protocol["heldout"]
    heldout_title = f"Held-out acc ({heldout['name']})" if heldout else "Held-out acc"
    lines = [
        f"# CLIP zero-shot class unlearning: {protocol['dataset']} / {protocol['model']}",
        "",
        "## Protocol",
        "",
        f"- model: `{protocol['model']}` ({protocol['model_parameters']:,} parameters, {protocol['dtype']}), zero-shot "
        f"logits = exp(logit_scale) * cos(image, mean of unit template embeddings)",
        f"- task: {len(protocol['classes'])} classes ({', '.join(protocol['classes'][:12])}"
        f"{', ...' if len(protocol['classes']) > 12 else ''}), templates {protocol['templates']}; "
        f"{protocol['train_size']} train / {protocol['test_size']} test images"
        + (
            f" (demo renders, seeds {protocol['demo_seeds']['train']} / {protocol['demo_seeds']['test']})"
            if protocol["demo_seeds"]
            else ""
        ),
        f"- forget: {', '.join(protocol['forget'])} (chance {protocol['chance_acc']:.1f}%); forget acc and retain acc "
        "are zero-shot accuracies on the test images of the forgotten / retained classes, over all classes",
        "- held-out task: "
        + (
            f"{heldout['name']}, {len(heldout['classes'])} classes, templates "
            f"{heldout['templates']}, {heldout['size']} images"
            if heldout
            else "none"
        ),
        f"- methods: ft (retain CE), rl (retain CE + random-label CE on the forget classes, summed), munba (the same "
        f"two players, combiner `{unlearn['combiner']}`); each {unlearn['steps']} SGD steps, lr {unlearn['lr']}, "
        f"momentum {unlearn['momentum']}, weight decay {unlearn['weight_decay']}, batch {unlearn['batch_size']} retain "
        f"(+ {unlearn['batch_size']} forget), max grad norm {unlearn['max_grad_norm']}; LoRA rank "
        f"{unlearn['lora_rank']}, alpha {unlearn['lora_alpha']} on q/k/v/out projections",
        f"- seeds: {', '.join(map(str, protocol['seeds']))} (batches, random labels, LoRA init; mean ± std over seeds)",
        f"- time: wall-clock seconds of the unlearning alone, {protocol['device']}, {protocol['torch_threads']} torch "
        f"thread(s), torch {protocol['torch']}",
        "",
    ]
    titles = ("Forget acc ↓", "Retain acc", heldout_title, "Time (s)")
    row_names = {"original": "Original (no unlearning)", "munba": f"munba ({unlearn['combiner']})"}
    for setting, methods in summary.items():
        lines += [f"## Trained: {setting}", "", "| Method | " + " | ".join(titles) + " |", "|---" * 5 + "|"]
        for method, cells in methods.items():
            cells_text = [_format(cells.get(c), 1 if c == "time_s" else 2) for c in REPORT_COLUMNS]
            lines.append(f"| {row_names.get(method, method)} | " + " | ".join(cells_text) + " |")
        if "munba" in methods:
            checks = acceptance(methods, "munba", protocol["chance_acc"])
            verdicts = ", ".join(f"{name} {'yes' if passed else 'NO'}" for name, passed in checks.items())
            lines += ["", f"munba acceptance (means): {verdicts}"]
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    command = parse_config(ClipCommand, argv, prog=PROG)
    if command.threads is not None:
        torch.set_num_threads(command.threads)
    if command.quiet:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    try:
        check_results(command.output_dir, command.overwrite)
        results = run_clip_benchmark(command, progress=not command.quiet)
        paths = write_results(command.output_dir, results, results_markdown, overwrite=command.overwrite)
    except (ValueError, FileExistsError, FileNotFoundError, FloatingPointError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    print("wrote " + ", ".join(map(str, paths)))


if __name__ == "__main__":
    main()
