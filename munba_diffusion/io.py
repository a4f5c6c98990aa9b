"""Files and the environment, once: atomic writes, the results guard, library versions, offline mode, local vs Hub.

- Atomic writes (:func:`atomic_write` and the helpers built on it): the data goes to a temporary file in the
  destination's folder, is flushed and fsynced, then ``os.replace`` moves it over the destination, so a reader
  sees the old file or the new one, never half of one; the temporary file is removed when the write fails.
  A new file gets the mode a plain ``open()`` would give it (``0o666`` minus the umask: ``0o644`` under the usual
  umask, as ``save_pretrained`` writes); a replaced file keeps its mode.
- JSON (:func:`write_json_atomic`) is always strict JSON: non-finite floats (NaN, inf) become ``null``.
- :func:`check_results_dir`: the one-line refusal to overwrite results unless the user passes a flag.
- :func:`library_versions`, :func:`machine_record`: what a result depends on.
- :func:`is_offline`, :func:`is_local_path`: the Hugging Face offline switch and the one "local folder or Hub id"
  rule.

"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import secrets
import subprocess
import sys
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import IO, Any

import torch
from PIL import Image

DEFAULT_LIBRARIES: tuple[str, ...] = (
    "munba-diffusion",
    "torch",
    "diffusers",
    "transformers",
    "peft",
    "accelerate",
    "huggingface_hub",
)
"""The libraries whose versions a run record names by default."""

TEMPORARY_GLOB = ".*.munba-tmp"
"""What the temporary files of an interrupted atomic write look like (a folder's owner may delete them)."""

_TRUE = {"1", "true", "yes", "on"}
_HUB_ID_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


# ------------------------------------------------------------------------------------------ atomic writes
def _open_temporary(path: Path, binary: bool) -> tuple[Path, IO]:
    """A new, uniquely named file beside ``path``, opened for writing (created with 0o666 minus the umask)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.munba-tmp")
        try:
            fd = os.open(temporary, flags, 0o666)
        except FileExistsError:
            continue
        return temporary, os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"}))


@contextmanager
def atomic_write(path: str | os.PathLike, *, binary: bool = True) -> Iterator[IO]:
    """A file handle whose content replaces ``path`` in one step when the ``with`` block ends without error.

    Example::

        with atomic_write("plot.png") as handle:
            figure.savefig(handle, format="png")

    On an error inside the block (or while writing) ``path`` is left as it was and the temporary file is removed.
    A new ``path`` gets the mode of a plain ``open()`` (0o644 under umask 022); an existing one keeps its mode.
    """
    path = Path(path)
    temporary, handle = _open_temporary(path, binary)
    try:
        with handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        if path.exists():
            os.chmod(temporary, path.stat().st_mode & 0o7777)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Replace ``path`` with ``data`` atomically (see :func:`atomic_write`); returns the path."""
    with atomic_write(path) as handle:
        handle.write(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Replace ``path`` with ``text`` (UTF-8) atomically; returns the path."""
    with atomic_write(path, binary=False) as handle:
        handle.write(text)
    return Path(path)


def json_safe(value: Any) -> Any:
    """``value`` as plain JSON data: non-finite floats -> None, tuples -> lists, paths -> strings, keys -> strings,
    numpy / torch scalars -> Python numbers. Other types are left for ``json.dumps`` to refuse."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # numpy / torch scalars
        return json_safe(value.item())
    return value


def json_text(data: Any, *, indent: int | None = 2, sort_keys: bool = False) -> str:
    """Strict JSON text of ``data`` (after :func:`json_safe`; ``allow_nan=False``), with a final newline when
    indented."""
    text = json.dumps(json_safe(data), indent=indent, sort_keys=sort_keys, allow_nan=False, ensure_ascii=False)
    return text + "\n" if indent is not None else text


def write_json_atomic(path: str | os.PathLike, data: Any, *, indent: int | None = 2, sort_keys: bool = False) -> Path:
    """Write ``data`` as strict JSON (NaN and inf become ``null``) atomically; returns the path."""
    return write_text_atomic(path, json_text(data, indent=indent, sort_keys=sort_keys))


def write_jsonl_atomic(path: str | os.PathLike, records: Iterable[Any], *, sort_keys: bool = True) -> Path:
    """Write one strict-JSON line per record atomically; returns the path."""
    return write_text_atomic(path, "".join(json_text(r, indent=None, sort_keys=sort_keys) + "\n" for r in records))


def save_image_atomic(path: str | os.PathLike, image: Any, format: str | None = None) -> Path:
    """Save a PIL image atomically; the format comes from the suffix unless given (``"PNG"``, ...)."""
    path = Path(path)
    if format is None:
        format = Image.registered_extensions().get(path.suffix.lower())
        if format is None:
            raise ValueError(f"cannot tell the image format of {path}; give it a suffix such as .png")
    with atomic_write(path) as handle:
        image.save(handle, format=format)
    return path


# ------------------------------------------------------------------------------------------ results guard
def check_results_dir(
    folder: str | os.PathLike, markers: Iterable[str], *, overwrite: bool, flag: str = "--overwrite"
) -> Path:
    """Refuse (one-line ``FileExistsError`` naming ``flag``) a folder that holds any of ``markers``.

    ``markers`` are names relative to ``folder`` (glob patterns such as ``checkpoint-*`` allowed). Nothing is
    created or deleted; with ``overwrite`` the check passes. Returns ``folder`` as a Path.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder} is a file; pass a folder")
    found = []
    if folder.is_dir():
        for marker in markers:
            hits = sorted(folder.glob(marker)) if any(c in marker for c in "*?[") else [folder / marker]
            found += [p.relative_to(folder).as_posix() for p in hits if p.exists()]
    if found and not overwrite:
        raise FileExistsError(
            f"{folder} already holds {', '.join(found)}; pass {flag} to replace it or choose another folder"
        )
    return folder


# ------------------------------------------------------------------------------------------ records
def library_versions(names: Iterable[str] = DEFAULT_LIBRARIES) -> dict[str, str]:
    """Installed versions of ``names`` (distribution names); libraries that are not installed are left out."""
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _first_line_value(path: str, key: str) -> str | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def machine_record(libraries: Iterable[str] = DEFAULT_LIBRARIES) -> dict[str, Any]:
    """What a measured result depends on: date (UTC), command line, CPU and cores, memory, load, torch threads,
    GPU, platform, Python, library versions and the git commit (None outside a checkout)."""
    memory_kib = _first_line_value("/proc/meminfo", "MemTotal")
    return {
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", *getattr(sys, "orig_argv", sys.argv)[1:]]),
        "cpu": _first_line_value("/proc/cpuinfo", "model name") or platform.processor() or "unknown",
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": round(int(memory_kib.split()[0]) / 2**20, 1) if memory_kib else None,
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "libraries": library_versions(libraries),
        "git_commit": _git_commit(),
    }


# ------------------------------------------------------------------------------------------ Hub
def is_offline() -> bool:
    """Whether downloads are off: ``HF_HUB_OFFLINE`` (else ``TRANSFORMERS_OFFLINE``) is 1/true/yes/on, as
    ``huggingface_hub`` reads it."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().lower() in _TRUE


def is_local_path(name_or_path: str | os.PathLike) -> bool:
    """Whether ``name_or_path`` means a local file or folder rather than a Hugging Face Hub id.

    The rule: a Hub id is ``name`` or ``owner/name`` (each part letters, digits, ``_``, ``-``, ``.``, not
    starting with ``-`` or ``.``, without ``--`` or ``..``). So it is local when it is a ``Path`` object, exists
    on disk, is absolute, starts with ``.`` or ``~``, has more than two ``/``-separated parts, a backslash, an
    empty part (``a//b``, a trailing ``/``) or any character a Hub id cannot have; otherwise it is a Hub id.
    Bundled model names look like Hub ids: resolve them first (``munba_diffusion.models``).

    ``"CompVis/stable-diffusion-v1-4"`` -> Hub; ``"./x"``, ``"/abs"``, ``"a/b/c"``, ``"~/m"``, ``"C:\\\\m"``,
    an existing folder ``"outputs"`` -> local.
    """
    if isinstance(name_or_path, os.PathLike):
        return True
    text = str(name_or_path)
    if not text:
        return False
    if text.startswith((".", "~")) or "\\" in text or os.path.isabs(text) or Path(text).exists():
        return True
    parts = text.split("/")
    if len(parts) > 2 or "--" in text or ".." in text:
        return True
    return not all(_HUB_ID_PART.fullmatch(part) for part in parts)
