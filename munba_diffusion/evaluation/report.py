"""Evaluation reports: ``report.json`` (machines), ``report.md`` (people) and a comparison grid PNG.

The Markdown states the full protocol next to the numbers (models, prompt set and its sha256, seeds, scheduler,
steps, guidance, resolution, detector version, threshold and classes, library versions), because numbers from
different harnesses are not comparable otherwise. Every rate is shown with its 95% Wilson interval
(``12.5% [6.1, 23.9]``; the model tables add its image count), and a demo concept rate broken down by the name the
prompt used for the concept gets its own table.
"""

from __future__ import annotations

import platform
import textwrap
from collections.abc import Mapping
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .. import io
from .intervals import format_rate, interval_of, is_interval_field
from .manifest import MANIFEST_NAME, read_manifest

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
GRID_PNG = "grid.png"
LIBRARIES = (
    "munba-diffusion",
    "torch",
    "torchvision",
    "diffusers",
    "transformers",
    "accelerate",
    "peft",
    "nudenet",
    "clean-fid",
    "onnxruntime",
    "numpy",
    "pillow",
)

# (metric, key in its result, column title, kind): kind "rate" prints as a percentage with its 95% interval.
HEADLINE_COLUMNS: tuple[tuple[str, str, str, str], ...] = (
    ("nudenet", "nudity_rate", "Nudity rate", "rate"),
    ("nudenet", "total_detections", "Exposed detections", "count"),
    ("nudenet", "attack_success_rate", "Attack success", "rate"),
    ("objects", "unlearning_accuracy", "UA (erased class)", "rate"),
    ("objects", "other_accuracy", "Acc. other classes", "rate"),
    ("objects", "accuracy", "Accuracy", "rate"),
    ("demo", "concept_rate", "Concept rate", "rate"),
    ("demo", "kept_attribute_accuracy", "Kept-attribute acc.", "rate"),
    ("demo", "other_accuracy", "Acc. other prompts", "rate"),
    ("demo", "unrecognisable_rate", "Unrecognisable", "rate"),
    ("demo", "judge_kid_other", "Judge KID (other)", "float"),
    ("demo", "judge_kid_other_renders", "Judge KID of renders", "float"),
    ("demo", "clip_score_concept", "Demo CLIP (concept)", "float"),
    ("demo", "clip_score_other", "Demo CLIP (other)", "float"),
    ("fid", "fid", "FID", "float"),
    ("clip", "clip_score", "CLIP score", "float"),
)


def library_versions() -> dict[str, str]:
    """Python's version and those of the installed :data:`LIBRARIES` (the report's protocol)."""
    return {"python": platform.python_version(), **io.library_versions(LIBRARIES)}


def format_value(value: object, kind: str, ci95: list[float] | None = None) -> str:
    """A headline cell; a rate shows as a percentage, with its 95% interval when given (``12.5% [6.1, 23.9]``)."""
    if value is None:
        return "-"
    if kind == "rate":
        return format_rate(value, ci95)
    if kind == "float":
        return f"{float(value):.2f}"
    return str(value)


def _headline_columns(results: Mapping[str, Mapping[str, Mapping]]) -> list[tuple[str, str, str, str]]:
    return [c for c in HEADLINE_COLUMNS if any(c[1] in m.get(c[0], {}) for m in results.values())]


def results_table(results: Mapping[str, Mapping[str, Mapping]]) -> str:
    """The headline Markdown table: one row per model, one column per headline number any model has."""
    columns = _headline_columns(results)
    lines = ["| Model | " + " | ".join(c[2] for c in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for label, metrics in results.items():
        cells = []
        for metric, key, _, kind in columns:
            values = metrics.get(metric, {})
            interval = interval_of(values, key)
            cells.append(format_value(values.get(key), kind, interval[0] if interval else None))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _is_rate_entry(value: object) -> bool:
    return isinstance(value, Mapping) and set(value) == {"rate", "ci95", "n"}


def by_name_table(results: Mapping[str, Mapping[str, Mapping]], key: str = "concept_rate_by_name") -> str | None:
    """The demo concept rate per name used in the prompt: one row per name, one column per model (None when no
    model's result has ``key``)."""
    models = {label: m["demo"][key] for label, m in results.items() if key in m.get("demo", {})}
    if not models:
        return None
    names = list(dict.fromkeys(name for by_name in models.values() for name in by_name))
    lines = ["| Name in the prompt | " + " | ".join(models) + " |", "|---" * (len(models) + 1) + "|"]
    for name in names:
        cells = [
            format_rate(e["rate"], e["ci95"], e["n"]) if (e := by_name.get(name)) else "-"
            for by_name in models.values()
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _flatten(prefix: str, value: object) -> list[tuple[str, object]]:
    """(dotted key, shown value) of every scalar; a rate (``K`` with ``K_ci95``/``K_n``, or a ``{"rate", "ci95",
    "n"}`` entry) is one row showing its interval and count."""
    if _is_rate_entry(value):
        return [(prefix, format_rate(value["rate"], value["ci95"], value["n"]))]
    if isinstance(value, Mapping):
        items = []
        for k, v in value.items():
            if is_interval_field(k, value):
                continue
            key = f"{prefix}.{k}" if prefix else str(k)
            interval = interval_of(value, k)
            items += [(key, format_rate(v, *interval))] if interval else _flatten(key, v)
        return items
    if isinstance(value, (list, tuple)):
        return []  # lists (file names, class lists) live in report.json
    return [(prefix, value)]


def model_table(metrics: Mapping[str, Mapping]) -> str:
    """Every scalar a model's metrics returned, one row each (nested keys joined with dots; a rate as
    ``12.5% [6.1, 23.9], n = 24``)."""
    lines = ["| Metric | Value |", "|---|---|"]
    for name, values in metrics.items():
        for key, value in _flatten(name, values):
            shown = f"{value:.4g}" if isinstance(value, float) else str(value)
            lines.append(f"| {key} | {shown} |")
    return "\n".join(lines)


def protocol_bullets(value: object, indent: int = 0) -> list[str]:
    """A nested protocol (dicts, lists, values) as an indented Markdown bullet list."""
    pad = "  " * indent
    if isinstance(value, Mapping):
        lines = []
        for k, v in value.items():
            if isinstance(v, (Mapping, list)) and v:
                lines += [f"{pad}- {k}:", *protocol_bullets(v, indent + 1)]
            else:
                lines.append(f"{pad}- {k}: {v}")
        return lines
    if isinstance(value, list):
        return [f"{pad}- {', '.join(map(str, value))}"]
    return [f"{pad}- {value}"]


def report_markdown(report: Mapping) -> str:
    """``report.md``: headline table, one table per model, then the protocol."""
    parts = ["# Evaluation report", "", results_table(report["results"]), ""]
    if any(kind == "rate" for *_, kind in _headline_columns(report["results"])):
        parts += ["Rates: percentage of images [95% Wilson interval].", ""]
    names = by_name_table(report["results"])
    if names:
        parts += ["## Concept rate by the name used in the prompt", "", names, ""]
    for label, metrics in report["results"].items():
        parts += [f"## {label}", "", model_table(metrics), ""]
    parts += ["## Protocol", "", *protocol_bullets(report["protocol"]), ""]
    return "\n".join(parts)


def check_no_report(output_dir: Path, overwrite: bool) -> None:
    """Refuse to replace an earlier report unless ``overwrite`` (``--overwrite`` on the command line)."""
    io.check_results_dir(output_dir, (REPORT_JSON,), overwrite=overwrite)


def write_report(output_dir: Path, report: Mapping, overwrite: bool = False) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.md`` atomically (refusing to replace a report unless ``overwrite``)."""
    check_no_report(output_dir, overwrite)
    output_dir.mkdir(parents=True, exist_ok=True)
    io.write_json_atomic(output_dir / REPORT_JSON, report)
    io.write_text_atomic(output_dir / REPORT_MD, report_markdown(report))
    return output_dir / REPORT_JSON, output_dir / REPORT_MD


def comparison_grid(
    manifests: Mapping[str, str | Path],
    output: str | Path,
    *,
    max_prompts: int = 6,
    cell_size: int = 192,
    caption_width: int = 220,
) -> Path:
    """A PNG with one row per prompt (same prompt and seed in every column) and one column per model.

    Rows are spread evenly over the images all models have; images are resized to ``cell_size`` (nearest
    neighbour when enlarging, so small demo images stay sharp).
    """
    manifests = {label: Path(p) / MANIFEST_NAME if Path(p).is_dir() else Path(p) for label, p in manifests.items()}
    records = {label: {r["index"]: r for r in read_manifest(path)} for label, path in manifests.items()}
    common = sorted(set.intersection(*(set(r) for r in records.values()))) if records else []
    if not common:
        raise ValueError("the models share no generated image; generate the same prompt set for each")
    step = max(1, len(common) // max_prompts)
    rows = common[::step][:max_prompts]
    font = ImageFont.load_default()
    header, gap = 28, 4
    pitch = cell_size + gap
    grid = Image.new("RGB", (caption_width + pitch * len(records), header + pitch * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for column, label in enumerate(records):
        draw.text((caption_width + column * pitch + 4, 8), label[: cell_size // 6], fill="black", font=font)
    for row, index in enumerate(rows):
        top = header + row * pitch
        first = next(iter(records.values()))[index]
        caption = textwrap.fill(f"{first['prompt']} (seed {first['seed']})", width=caption_width // 7)
        draw.multiline_text((4, top + 4), caption, fill="black", font=font)
        for column, (label, by_index) in enumerate(records.items()):
            with Image.open(manifests[label].parent / by_index[index]["file"]) as image:
                resample = Image.Resampling.NEAREST if image.width < cell_size else Image.Resampling.LANCZOS
                grid.paste(
                    image.convert("RGB").resize((cell_size, cell_size), resample), (caption_width + column * pitch, top)
                )
    return io.save_image_atomic(output, grid, format="PNG")
