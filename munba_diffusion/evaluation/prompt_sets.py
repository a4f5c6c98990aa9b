"""Prompt sets for evaluation: CSV files in the I2P layout, the packaged sets, and the replay sets.

A CSV needs a ``prompt`` column and a seed column (``seed``, ``evaluation_seed`` or ``sd_seed``, first found
wins). Optional: ``guidance_scale``/``evaluation_guidance``/``sd_guidance_scale``, ``width``/``sd_image_width``,
``height``/``sd_image_height``. Every other column (``concept``, ``label``, ``shape``, ``colour``,
``categories``, ``nudity_percentage``, ...) is kept verbatim in :attr:`PromptRecord.extra` and copied into the
generation manifest, where the metrics read it.

A registered replay set (:mod:`.replay_sets`: ``i2p``, ``unlearndiffatk-nudity``, ``ring-a-bell-nudity``, ...) is
read by name, online through ``datasets`` (``"i2p"``), or from a local copy of its published file
(``"i2p=path/to/i2p_benchmark.csv"``), with the set's own column mapping and seed policy.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .replay_sets import REPLAY_SETS, ReplaySet, fetch_published_csv, load_hub_rows, split_source

I2P_SOURCE = "i2p"
I2P_DATASET = REPLAY_SETS[I2P_SOURCE].hub_id
SEED_COLUMNS = ("seed", "evaluation_seed", "sd_seed")
GUIDANCE_COLUMNS = ("guidance_scale", "evaluation_guidance", "sd_guidance_scale")
WIDTH_COLUMNS = ("width", "sd_image_width")
HEIGHT_COLUMNS = ("height", "sd_image_height")
_KNOWN_COLUMNS = ("prompt", *SEED_COLUMNS, *GUIDANCE_COLUMNS, *WIDTH_COLUMNS, *HEIGHT_COLUMNS)


@dataclass(frozen=True)
class PromptRecord:
    """One image to make: its prompt, its seed and the set's other columns.

    ``index`` is the row's position in the full set (before filters and limits); it names the image file, so
    the same row always lands in the same file.
    """

    index: int
    prompt: str
    seed: int
    guidance_scale: float | None = None
    width: int | None = None
    height: int | None = None
    extra: Mapping[str, str] = field(default_factory=dict)

    def as_json(self) -> dict:
        return {
            "index": self.index,
            "prompt": self.prompt,
            "seed": self.seed,
            "guidance_scale": self.guidance_scale,
            "width": self.width,
            "height": self.height,
            "extra": dict(self.extra),
        }


@dataclass(frozen=True)
class PromptSet:
    """A named, hashed list of prompt records.

    ``sha256`` hashes the selected records (canonical JSON lines), so it changes with filters and limits;
    ``source_sha256`` hashes the source file when there is one (what ``sha256sum FILE`` prints); ``replay_set``
    describes a registered replay set (source, licence, column mapping, seed policy; :meth:`.ReplaySet.protocol`).
    """

    name: str
    records: tuple[PromptRecord, ...]
    sha256: str
    source_sha256: str | None = None
    replay_set: Mapping | None = None

    def __len__(self) -> int:
        return len(self.records)

    def protocol(self) -> dict:
        """What a report states about this set."""
        protocol = {"name": self.name, "size": len(self), "sha256": self.sha256, "source_sha256": self.source_sha256}
        if self.replay_set is not None:
            protocol["replay_set"] = dict(self.replay_set)
        return protocol


def records_sha256(records: Iterable[PromptRecord]) -> str:
    digest = hashlib.sha256()
    for record in records:
        digest.update(json.dumps(record.as_json(), sort_keys=True).encode() + b"\n")
    return digest.hexdigest()


def _first_value(row: Mapping[str, object], columns: Sequence[str]) -> object | None:
    for column in columns:
        value = row.get(column)
        if value is not None and str(value).strip() != "":
            return value
    return None


def _number(value: object | None, kind: type, column: str, where: str) -> int | float | None:
    if value is None:
        return None
    try:
        number = float(value)
        if math.isnan(number):
            return None
        if kind is int and not number.is_integer():
            raise ValueError
        return kind(number)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {column} must be a {kind.__name__}, got {value!r}; fix that cell") from None


def record_from_row(row: Mapping[str, object], index: int, where: str) -> PromptRecord:
    """Turn one CSV/dataset row into a :class:`PromptRecord` (``where`` names the row in error messages)."""
    prompt = row.get("prompt")
    if prompt is None or str(prompt).strip() == "":
        raise ValueError(f"{where}: empty prompt; every row needs a prompt")
    seed = _number(_first_value(row, SEED_COLUMNS), int, "seed", where)
    if seed is None:
        raise ValueError(f"{where}: no seed; give each row a seed in one of the columns {', '.join(SEED_COLUMNS)}")
    extra = {k: "" if v is None else str(v) for k, v in row.items() if k not in _KNOWN_COLUMNS and k is not None}
    return PromptRecord(
        index=index,
        prompt=str(prompt).strip(),
        seed=seed,
        guidance_scale=_number(_first_value(row, GUIDANCE_COLUMNS), float, "guidance scale", where),
        width=_number(_first_value(row, WIDTH_COLUMNS), int, "width", where),
        height=_number(_first_value(row, HEIGHT_COLUMNS), int, "height", where),
        extra=extra,
    )


def select_records(
    records: Iterable[PromptRecord],
    *,
    nudity_only: bool = False,
    category: str | None = None,
    limit: int | None = None,
) -> list[PromptRecord]:
    """Filter records the way the I2P subsets are defined, then keep the first ``limit``.

    ``nudity_only`` keeps rows with ``nudity_percentage > 0`` (854 of I2P's 4,703); ``category`` keeps rows whose
    comma-separated ``categories`` contain it (I2P's "sexual": 931 rows).
    """
    selected = []
    for record in records:
        if nudity_only:
            if "nudity_percentage" not in record.extra:
                raise ValueError("nudity_only needs a nudity_percentage column (the I2P layout); drop the filter")
            value = _number(
                record.extra["nudity_percentage"] or None, float, "nudity_percentage", f"row {record.index}"
            )
            if not value or value <= 0:
                continue
        if category is not None:
            if "categories" not in record.extra:
                raise ValueError("a category filter needs a categories column (the I2P layout); drop the filter")
            categories = {c.strip().lower() for c in record.extra["categories"].split(",")}
            if category.strip().lower() not in categories:
                continue
        selected.append(record)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        selected = selected[:limit]
    return selected


def _resolve_csv(source: str | Path) -> Path:
    """A path as given, else one inside the packaged prompts (``eval/artists.csv``)."""
    path = Path(source)
    if path.is_file():
        return path
    packaged = resources.files("munba_diffusion.prompts").joinpath(*Path(source).parts)
    if packaged.is_file():
        return Path(str(packaged))
    raise FileNotFoundError(
        f"prompt set {source} not found; pass a CSV path, a packaged set like eval/artists.csv, or a replay set "
        f"({', '.join(REPLAY_SETS)}; NAME=FILE.csv for a local copy)"
    )


def read_csv_table(path: Path) -> tuple[list[str], list[dict]]:
    """The header and rows of a CSV file; a file that is not UTF-8 CSV text is one line that names it."""
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            return list(reader.fieldnames or []), list(reader)
    except UnicodeDecodeError as error:
        raise ValueError(
            f"prompt set {path} is not UTF-8 text (byte {error.object[error.start]:#04x} at offset {error.start}); "
            "save it as UTF-8 CSV"
        ) from None
    except csv.Error as error:
        raise ValueError(f"prompt set {path} is not a CSV file ({error}); save it as CSV with a header row") from None
    except OSError as error:
        raise ValueError(
            f"cannot read prompt set {path} ({error.strerror or type(error).__name__}); pass a CSV file you can read"
        ) from None


def load_csv_records(path: Path) -> list[PromptRecord]:
    """The rows of a prompt-set CSV; a file that is not UTF-8 CSV text is one line that names it."""
    columns, rows = read_csv_table(path)
    if "prompt" not in columns:
        raise ValueError(f"{path} has no 'prompt' column; the header needs prompt and a seed column")
    return [record_from_row(row, i, f"{path} row {i + 2}") for i, row in enumerate(rows)]


def load_replay_records(spec: ReplaySet, path: str | Path | None = None) -> tuple[list[PromptRecord], dict, str | None]:
    """A replay set's records, its report entry and its file's sha256 (None when read from the Hub).

    ``path``: a local copy of the published file (read with the set's column mapping); None reads the set online
    (the Hub dataset, or the published CSV fetched once into the replay cache) or its packaged CSV. Hub rows without
    a prompt are skipped (they keep their index, which names the image file); in a CSV file an empty prompt is an
    error, as in any prompt-set CSV.
    """
    if path is None and spec.packaged is not None:
        path = _resolve_csv(spec.packaged)
    elif path is None and spec.hub_id is None:
        path = fetch_published_csv(spec)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{spec.name} copy {path} not found; download {spec.download} and pass its path")
        columns, rows = read_csv_table(path)
        prompt_column = spec.prompt_column(columns, str(path))
        records = [
            record_from_row(spec.map_row(row, i, prompt_column), i, f"{path} row {i + 2}") for i, row in enumerate(rows)
        ]
        return records, spec.protocol(columns), hashlib.sha256(path.read_bytes()).hexdigest()
    rows, columns = load_hub_rows(spec)
    prompt_column = spec.prompt_column(columns, spec.online_source)
    records = [
        record_from_row(spec.map_row(row, i, prompt_column), i, f"{spec.online_source} row {i}")
        for i, row in enumerate(rows)
        if str(row.get(prompt_column) or "").strip()
    ]
    return records, spec.protocol(columns), None


def load_i2p_records(split: str = "train") -> list[PromptRecord]:
    """I2P from the Hub (``datasets.load_dataset("AIML-TUDA/i2p")``); needs a connection or a local cache."""
    return load_replay_records(dataclasses.replace(REPLAY_SETS[I2P_SOURCE], hub_split=split))[0]


def load_prompt_set(
    source: str | Path,
    *,
    nudity_only: bool = False,
    category: str | None = None,
    limit: int | None = None,
) -> PromptSet:
    """Load ``source``: a replay set by name (``"i2p"``, ``"unlearndiffatk-nudity"``, ...; online), a replay set
    from a local copy (``"i2p=path/to/i2p_benchmark.csv"``), a CSV path, or a packaged set (``eval/artists.csv``)."""
    replay, about = split_source(str(source)), None
    if replay is not None:
        spec, path = replay
        records, about, source_sha256 = load_replay_records(spec, path)
        name = spec.hub_id if spec.hub_id is not None and path is None else spec.name
    else:
        path = _resolve_csv(source)
        name, records = str(source), load_csv_records(path)
        source_sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    selected = select_records(records, nudity_only=nudity_only, category=category, limit=limit)
    if not selected:
        raise ValueError(f"prompt set {name} has no rows left after the filters; loosen them")
    return PromptSet(name, tuple(selected), records_sha256(selected), source_sha256, about)
