"""The generation manifest (one JSON object per image) and how metrics find their images.

Every metric takes ``source``: a generation folder (its ``manifest.jsonl`` gives the order and the prompts), a
manifest file, or a plain folder of images (searched recursively, sorted by path; no prompts).

A metric that judges images one by one (demo judge, NudeNet, the ImageNet classifier) keeps each image's verdict in
its manifest line, under ``judgements.<metric>`` (:func:`record_judgements`), so a report's rates can be traced to
the images behind them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..io import write_jsonl_atomic

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.jsonl"
JUDGEMENTS_KEY = "judgements"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class ImageEntry:
    """One image and, when it came from a manifest, its record (prompt, seed, settings, extra columns)."""

    path: Path
    record: dict | None = None

    def field(self, name: str) -> str | None:
        """A prompt-set column of this image (``label``, ``shape``, ...), or None when it is not known."""
        if self.record is None:
            return None
        value = self.record.get(name, self.record.get("extra", {}).get(name))
        return None if value is None or value == "" else str(value)


def read_manifest(path: str | Path) -> list[dict]:
    """The records of a manifest, one per image file (a later line for the same file wins)."""
    by_file: dict[str, dict] = {}
    with Path(path).open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{path} line {number} is not JSON; delete that line and rerun") from None
            by_file[record["file"]] = record
    return sorted(by_file.values(), key=lambda r: r["index"])


def manifest_path(source: str | Path) -> Path | None:
    """The manifest a ``source`` reads its images from (None for a plain folder of images)."""
    source = Path(source)
    if source.is_dir():
        return source / MANIFEST_NAME if (source / MANIFEST_NAME).is_file() else None
    return source if source.is_file() else None


def record_judgements(source: str | Path, metric: str, verdicts: Mapping[str, dict]) -> Path | None:
    """Put each image's verdict (image file name -> JSON-able dict) into its manifest line as
    ``judgements[metric]`` (replacing an earlier verdict of the same metric) and rewrite the manifest atomically.

    Returns the manifest, or None when ``source`` has none (a plain folder of images) or it cannot be written (a
    warning says so; the metric's numbers do not depend on it).
    """
    path = manifest_path(source)
    if path is None:
        return None
    records = read_manifest(path)
    for record in records:
        if record["file"] in verdicts:
            record[JUDGEMENTS_KEY] = {**record.get(JUDGEMENTS_KEY, {}), metric: verdicts[record["file"]]}
    try:
        return write_jsonl_atomic(path, records)
    except OSError as error:
        logger.warning("cannot write the %s verdicts into %s (%s); the report still has the rates", metric, path, error)
        return None


def collect_images(source: str | Path) -> list[ImageEntry]:
    """The images of a generation folder, a manifest file, or a plain folder of images."""
    source = Path(source)
    if source.is_dir() and (source / MANIFEST_NAME).is_file():
        source = source / MANIFEST_NAME
    if source.is_file():
        entries = [ImageEntry(source.parent / r["file"], r) for r in read_manifest(source)]
        missing = [e.path for e in entries if not e.path.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} images listed in {source} are missing (first: {missing[0]}); "
                "rerun the generation to remake them"
            )
    elif source.is_dir():  # recursive, like clean-fid
        entries = [
            ImageEntry(p)
            for p in sorted(source.rglob("*"))
            if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
        ]
    else:
        raise FileNotFoundError(f"{source} is neither a folder of images nor a manifest; pass the generation folder")
    if not entries:
        raise ValueError(f"no images found in {source}; generate them first")
    return entries


def load_rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def images_to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL images of one size -> float tensor (B, 3, H, W) in [0, 1]."""
    arrays = np.stack([np.asarray(image, dtype=np.float32) for image in images])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2) / 255.0


def require_field(entries: list[ImageEntry], name: str, metric: str, *, every_row: bool = True) -> list[str | None]:
    """Column ``name`` of every entry (None where empty unless ``every_row``), or a one-line error naming the fix."""
    if any(e.record is None for e in entries):
        raise ValueError(
            f"{metric} needs a generation manifest (prompt-set columns); pass the generation folder, not bare images"
        )
    values = [e.field(name) for e in entries]
    missing = [e.path.name for e, v in zip(entries, values) if v is None]
    if missing and (every_row or len(missing) == len(values)):
        raise ValueError(
            f"{metric} needs a '{name}' column in the prompt set ({len(missing)} images lack it, "
            f"first {missing[0]}); add it to the CSV"
        )
    return values
