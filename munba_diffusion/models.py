"""Where a model id becomes a folder: bundled model names, local folders and Hub ids (one rule, one place).

This is the only module that knows the bundled models' names. Everywhere a model is accepted
(``--pretrained_model_name_or_path``, ``--model``, ``--clip_model``, a benchmark's model), the value goes through
:func:`resolve_model_path`:

- a bundled name (:data:`BUNDLED_MODELS`, e.g. ``"munba-demo"``) becomes the packaged folder of the asked ``kind``
  (``"pipeline"``: a diffusers pipeline folder; ``"clip"``: a ``CLIPModel`` folder with its processor);
- anything else (a local folder, a Hub id, a path that does not exist yet) is returned unchanged.

Example::

    resolve_model_path("munba-demo")                 # '.../munba_diffusion/demo/weights/pipeline'
    resolve_model_path("munba-demo", kind="clip")    # '.../munba_diffusion/demo/weights/clip'
    resolve_model_path("munba-demo-clip", kind="clip")  # the same CLIP folder, by its own name
    resolve_model_path("munba-demo-flow")            # '.../munba_diffusion/demo/weights/flow_pipeline' (SD3-style)
    resolve_model_path("CompVis/stable-diffusion-v1-4")  # unchanged
    model_license("munba-demo")                      # 'apache-2.0' (from the folder's README.md model card)
    model_folder_sha256("munba-demo")                # sha256 of its weights, configs and tokenizer files
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from huggingface_hub import ModelCard, try_to_load_from_cache

from .demo import bundled_folder  # the packaged weights live with the demo world

__all__ = [
    "BUNDLED_MODELS",
    "DEMO_MODEL",
    "MODEL_KINDS",
    "bundled_model_names",
    "is_bundled_model",
    "model_folder_sha256",
    "model_license",
    "resolve_model_path",
    "same_world",
]

MODEL_KINDS = ("pipeline", "clip")
DEMO_MODEL = "munba-demo"  # the demo world's text-to-image model (and, where a CLIP is expected, its CLIP)

# Bundled name -> {kind: folder under munba_diffusion/demo/weights}. A new bundled model is one line here.
BUNDLED_MODELS: dict[str, dict[str, str]] = {
    DEMO_MODEL: {"pipeline": "pipeline", "clip": "clip"},
    "munba-demo-flow": {"pipeline": "flow_pipeline", "clip": "clip"},  # the same world, an SD3-style flow model
    "munba-demo-clip": {"clip": "clip"},
}


def bundled_model_names(kind: str | None = None) -> tuple[str, ...]:
    """The bundled names usable where a model of ``kind`` is expected (all of them when ``kind`` is None)."""
    _check_kind(kind)
    return tuple(name for name, folders in BUNDLED_MODELS.items() if kind is None or kind in folders)


def is_bundled_model(name_or_path: str | Path, kind: str | None = None) -> bool:
    """Whether ``name_or_path`` is a bundled model name (that has a folder of ``kind``, when given)."""
    return str(name_or_path) in bundled_model_names(kind)


def same_world(model: str | Path, written_for: str | Path) -> bool:
    """Whether ``model`` draws the world that something ``written_for`` a model (a preset's evaluation set, its
    judge) can judge: the same id, or two bundled text-to-image models, which all draw the one demo world."""
    pipelines = bundled_model_names("pipeline")
    return str(model) == str(written_for) or (str(model) in pipelines and str(written_for) in pipelines)


def _check_kind(kind: str | None) -> None:
    if kind is not None and kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {', '.join(MODEL_KINDS)}")


def resolve_model_path(name_or_path: str | Path, kind: str = "pipeline") -> str:
    """A bundled model name -> its packaged folder of ``kind``; any other id or path, unchanged (as a string).

    Raises ``ValueError`` for a bundled name that has no folder of ``kind`` (e.g. a CLIP-only name where a pipeline is
    expected) and ``FileNotFoundError`` when the bundled folder is missing from the installation.
    """
    _check_kind(kind)
    name = str(name_or_path)
    folders = BUNDLED_MODELS.get(name)
    if folders is None:
        return name
    if kind not in folders:
        raise ValueError(
            f"{name!r} is a bundled {'/'.join(folders)} model, not a {kind}; bundled {kind} models: "
            f"{', '.join(bundled_model_names(kind)) or 'none'}"
        )
    return str(bundled_folder(folders[kind]))


MODEL_FILE_SUFFIXES = (".safetensors", ".json", ".txt", ".model")
"""The files of a model folder its outputs depend on: weights (only safetensors are ever loaded), configs, tokenizer
vocabularies and merges."""


def model_folder_sha256(name_or_path: str | Path) -> str | None:
    """sha256 over the relative path, size and bytes of every weight, config and tokenizer file
    (:data:`MODEL_FILE_SUFFIXES`) of a local model folder or a bundled model's: for a pipeline folder, its
    ``model_index.json`` and the folders of the components it names (not single-file checkpoints beside them), else
    the whole folder; symlinked folders followed. None for a Hub id (its commit names its content). What names the
    content of a model whose name stays when its files change: a folder retrained in place, a bundled demo retrained
    between releases. Reads every byte it hashes (a few seconds per GB)."""
    folder = Path(resolve_model_path(name_or_path)).expanduser()
    if not folder.is_dir():
        return None
    index = folder / "model_index.json"
    try:
        components = [name for name in json.loads(index.read_text()) if not name.startswith("_")]
    except (OSError, ValueError, TypeError):  # not a pipeline folder (or a broken index, which the load names)
        components = None
    roots = [folder] if components is None else [folder / name for name in components if (folder / name).is_dir()]
    files = [] if components is None else [index]
    for root in roots:
        for directory, _, names in os.walk(root, followlinks=True):
            files += [Path(directory) / name for name in names if name.endswith(MODEL_FILE_SUFFIXES)]
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(f"{path.relative_to(folder).as_posix()}\0{path.stat().st_size}\0".encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def model_license(folder_or_id: str | Path, revision: str | None = None) -> str | None:
    """The licence a model declares in its own data: ``license:`` of its model card's (README.md) front matter.

    ``folder_or_id``: a local folder, a bundled name, or a Hub id, whose card is read from the local Hugging Face
    cache when it is there (never from the network; ``revision`` picks the cached revision). None when there is no
    card, the card has no front matter, or it names no licence.
    """
    try:
        resolved = resolve_model_path(folder_or_id, kind=_kind_of(folder_or_id))
    except (ValueError, FileNotFoundError):
        return None
    card_path: str | Path | None = Path(resolved).expanduser() / "README.md"
    if not Path(resolved).expanduser().is_dir():
        card_path = _cached_hub_card(resolved, revision)
    if card_path is None or not Path(card_path).is_file():
        return None
    try:
        card = ModelCard.load(card_path)
    except Exception:  # a README that is not a model card (broken front matter) declares nothing
        return None
    value = getattr(card.data, "license", None)
    return str(value) if value else None


def _cached_hub_card(repo_id: str, revision: str | None) -> str | None:
    """The path of ``repo_id``'s README.md in the local Hugging Face cache, or None (no download)."""
    try:
        found = try_to_load_from_cache(repo_id, "README.md", revision=revision)
    except Exception:  # not a valid repo id
        return None
    return found if isinstance(found, str) else None


def _kind_of(name_or_path: str | Path) -> str:
    folders = BUNDLED_MODELS.get(str(name_or_path), {})
    return "pipeline" if not folders or "pipeline" in folders else next(iter(folders))
