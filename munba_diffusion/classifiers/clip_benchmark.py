"""The CLIP zero-shot class-unlearning benchmark: data, runs over settings x seeds x methods, reports.

Data:

- ``munba-demo`` (offline): the demo world's renders (:func:`munba_diffusion.demo.render_scene`), every
  (shape, colour) pair equally often, from fixed seeds (train 1000, test 2000). The task is zero-shot shape
  classification; the held-out task, which measures general knowledge the unlearning should keep, is zero-shot
  colour classification of all test renders.
- any ``datasets`` name or folder with an ``Image`` column and a ``ClassLabel`` column (e.g. ``timm/oxford-iiit-pet``):
  the class names (``_`` read as a space) fill the prompt templates; the ``train`` split trains, ``test`` (else
  ``validation``) measures. A held-out task is optional: another such dataset, its test split.

Images go through the model's own ``CLIPImageProcessor`` (resize, crop, CLIP mean/std). For every
(parameter set, adapter) setting, seed and method, :func:`~.clip_unlearn.unlearn_clip` runs from the same
original model; the report gives mean ± std over seeds of forget/retain/held-out accuracy and wall-clock time.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..demo import COLOURS, DEMO_MODEL_NAME, SHAPES, render_scene
from .benchmark import check_output_dir, write_text_atomically
from .clip_unlearn import (
    ADAPTERS,
    CLIP_METHODS,
    PARAM_SETS,
    ClipUnlearnConfig,
    LabelledImages,
    ZeroShotTask,
    check_choice,
    check_templates,
    evaluate_clip_unlearning,
    unlearn_clip,
)
from .data import _find_columns

DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of a {label}.",)
DEMO_SHAPE_TEMPLATES: tuple[str, ...] = ("a {label}", "a photo of a {label}", "an image of a {label}")
DEMO_COLOUR_TEMPLATES: tuple[str, ...] = ("a {label} object", "something {label}", "a photo of something {label}")
DEMO_TRAIN_SEED, DEMO_TEST_SEED = 1000, 2000
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
REPORT_COLUMNS: tuple[str, ...] = ("forget_acc", "retain_acc", "heldout_acc", "time_s")
RETAIN_TOLERANCE = 5.0  # points of retain / held-out accuracy the acceptance check allows to lose


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

    model: str = DEMO_MODEL_NAME
    dataset: str = DEMO_MODEL_NAME
    forget: tuple[str, ...] = ("circle",)
    templates: tuple[str, ...] | None = None  # None: DEMO_SHAPE_TEMPLATES for the demo, else DEFAULT_TEMPLATES
    heldout_dataset: str | None = None  # None: the colour task for the demo, no held-out task otherwise
    heldout_templates: tuple[str, ...] = DEFAULT_TEMPLATES
    methods: tuple[str, ...] = CLIP_METHODS
    params: tuple[str, ...] = ("text-attention", "all-attention")
    adapters: tuple[str, ...] = ("direct", "lora")
    seeds: tuple[int, ...] = (0, 1, 2)
    unlearn: ClipUnlearnConfig = ClipUnlearnConfig()  # its method/params/adapter are set per run
    dtype: str = "float32"
    device: str = "cpu"
    demo_train_per_pair: int = 48
    demo_test_per_pair: int = 40
    max_train_samples: int | None = None
    max_test_samples: int | None = None

    def validate(self) -> None:
        """Check every name before any work (class names are checked once the data is loaded)."""
        check_choice("dtype", self.dtype, tuple(DTYPES))
        for method in self.methods:
            check_choice("method", method, CLIP_METHODS)
        for params in self.params:
            check_choice("parameter set", params, tuple(PARAM_SETS))
        for adapter in self.adapters:
            check_choice("adapter", adapter, ADAPTERS)
        if not (self.seeds and self.methods and self.params and self.adapters and self.forget):
            raise ValueError("seeds, methods, params, adapters and forget each need at least one value")
        check_templates(self.shape_templates)
        check_templates(self.heldout_templates)

    @property
    def shape_templates(self) -> tuple[str, ...]:
        if self.templates is not None:
            return self.templates
        return DEMO_SHAPE_TEMPLATES if self.dataset == DEMO_MODEL_NAME else DEFAULT_TEMPLATES

    def settings(self) -> list[tuple[str, str]]:
        return [(params, adapter) for params in self.params for adapter in self.adapters]

    def unlearn_config(self, method: str, params: str, adapter: str) -> ClipUnlearnConfig:
        return replace(self.unlearn, method=method, params=params, adapter=adapter)


# ----------------------------------------------------------------------------------------------- data
def preprocess_images(processor, images: Sequence, batch_size: int = 256, desc: str = "images",
                      progress: bool = True) -> torch.Tensor:
    """``(N, 3, H, W)`` pixel values from CLIP's own image processor (RGB, resize, crop, CLIP mean/std)."""
    chunks = []
    for start in tqdm(range(0, len(images), batch_size), desc=desc, leave=False,
                      disable=not progress or len(images) <= batch_size):
        batch = [image.convert("RGB") for image in images[start:start + batch_size]]
        chunks.append(processor.image_processor(images=batch, return_tensors="pt")["pixel_values"])
    return torch.cat(chunks)


def render_demo_split(per_pair: int, seed: int) -> tuple[list, torch.Tensor, torch.Tensor]:
    """``per_pair`` renders of every (shape, colour) pair from ``numpy.random.default_rng(seed)``:
    (PIL images, shape ids, colour ids)."""
    rng = np.random.default_rng(seed)
    pairs = [(s, c) for _ in range(per_pair) for s in range(len(SHAPES)) for c in range(len(COLOURS))]
    images = [render_scene(rng, SHAPES[s], COLOURS[c]) for s, c in pairs]
    return images, torch.tensor([s for s, _ in pairs]), torch.tensor([c for _, c in pairs])


def load_demo_data(processor, templates: Sequence[str], train_per_pair: int, test_per_pair: int,
                   progress: bool = True) -> ClipBenchmarkData:
    """Shapes to unlearn (train seed 1000, test seed 2000); colours of the test renders as the held-out task."""
    train_images, train_shapes, _ = render_demo_split(train_per_pair, DEMO_TRAIN_SEED)
    test_images, test_shapes, test_colours = render_demo_split(test_per_pair, DEMO_TEST_SEED)
    test_pixels = preprocess_images(processor, test_images, progress=progress)
    return ClipBenchmarkData(
        name=DEMO_MODEL_NAME,
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


def _labelled_split(split, processor, max_samples: int | None, desc: str, progress: bool = True
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


def load_heldout_task(name: str, templates: Sequence[str], processor, max_samples: int | None = None,
                      progress: bool = True) -> tuple[ZeroShotTask, LabelledImages]:
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
    if config.dataset == DEMO_MODEL_NAME:
        data = load_demo_data(processor, config.shape_templates, config.demo_train_per_pair, config.demo_test_per_pair,
                              progress)
    else:
        data = load_hf_data(config, processor, progress)
    if config.heldout_dataset is not None:
        data.heldout_name = config.heldout_dataset
        data.heldout = load_heldout_task(config.heldout_dataset, config.heldout_templates, processor,
                                         config.max_test_samples, progress)
    return data


def load_clip_model(name_or_path: str, dtype: str, device: str):
    """(CLIPModel in ``dtype`` on ``device``, eval mode; CLIPProcessor) from a Hub id, folder or ``munba-demo``."""
    from ..evaluation.clip_score import load_clip

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
        unlearned, record = unlearn_clip(model, tokenizer, data.task, data.train, forget_ids,
                                         config.unlearn_config(method, params, adapter), seed=seed)
        elapsed = time.perf_counter() - start
        row = {"setting": f"{params}/{adapter}", "method": method, "seed": seed, **evaluate(unlearned),
               "time_s": elapsed, "training": record}
        runs.append(row)
        if progress:
            heldout = "–" if row["heldout_acc"] is None else f"{row['heldout_acc']:.1f}"
            tqdm.write(f"{row['setting']} seed {seed} {method}: forget {row['forget_acc']:.1f}, retain "
                       f"{row['retain_acc']:.1f}, held-out {heldout}, {elapsed:.1f} s")
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
            method: {column: {"mean": float(np.mean(values)), "std": float(np.std(values)), "n": len(values)}
                     for column in REPORT_COLUMNS
                     if (values := [r[column] for r in rows if r[column] is not None])}
            for method, rows in rows_by_method.items()
        }
    return summary


def acceptance(summary_for_setting: Mapping[str, Mapping[str, Mapping[str, float]]], method: str,
               chance: float) -> dict[str, bool]:
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
        "heldout": None if data.heldout is None else {
            "name": data.heldout_name, "classes": list(data.heldout[0].class_names),
            "templates": list(data.heldout[0].templates), "size": len(data.heldout[1]),
        },
        "demo_seeds": {"train": DEMO_TRAIN_SEED, "test": DEMO_TEST_SEED} if data.name == DEMO_MODEL_NAME else None,
        "seeds": list(config.seeds),
        "methods": list(config.methods),
        "settings": [f"{p}/{a}" for p, a in config.settings()],
        "unlearn": {k: v for k, v in asdict(config.unlearn).items() if k not in ("method", "params", "adapter")},
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
        + (f" (demo renders, seeds {protocol['demo_seeds']['train']} / {protocol['demo_seeds']['test']})"
           if protocol["demo_seeds"] else ""),
        f"- forget: {', '.join(protocol['forget'])} (chance {protocol['chance_acc']:.1f}%); forget acc and retain acc "
        "are zero-shot accuracies on the test images of the forgotten / retained classes, over all classes",
        "- held-out task: " + (f"{heldout['name']}, {len(heldout['classes'])} classes, templates "
                               f"{heldout['templates']}, {heldout['size']} images" if heldout else "none"),
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


def write_results(results: Mapping[str, Any], output_dir: str | Path, overwrite: bool = False) -> list[Path]:
    """Write ``results.json`` and ``results.md`` atomically into ``output_dir``; returns their paths."""
    output_dir = check_output_dir(output_dir, overwrite)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = [output_dir / "results.json", output_dir / "results.md"]
    write_text_atomically(paths[0], json.dumps(results, indent=2) + "\n")
    write_text_atomically(paths[1], results_markdown(results))
    return paths
