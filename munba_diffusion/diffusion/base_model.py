"""Load the base pipeline an erasure starts from: a Hub id, a local folder or a bundled name
(:mod:`munba_diffusion.models`); its family (:mod:`.family`) is checked from ``model_index.json`` first."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import diffusers
import torch
from diffusers import DiffusionPipeline

from ..io import is_local_path, is_offline
from ..models import bundled_model_names, resolve_model_path
from .family import FLUX, STABLE_DIFFUSION, ModelFamily, absent_components, family_of_class

_BUNDLED = " / ".join(bundled_model_names("pipeline"))  # for error messages: what works offline, out of the box


def check_base_model(name_or_path: str, *, revision: str | None = None) -> Path | str:
    """Check that the base model can load, reading only ``model_index.json`` (from the local Hugging Face cache
    when offline); returns the folder or Hub id to load. Raises a one-line error that names the fix."""
    return _checked_base_model(name_or_path, revision)[0]


def base_model_family(name_or_path: str, *, revision: str | None = None) -> ModelFamily:
    """The family of the base model (:func:`check_base_model`'s checks first); the default family when the Hub
    cannot be reached online (the load then names the problem)."""
    return _checked_base_model(name_or_path, revision)[1]


def _checked_base_model(name_or_path: str, revision: str | None) -> tuple[str, ModelFamily]:
    path = resolve_model_path(name_or_path)
    if is_local_path(path):
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(
                f"{folder} does not exist; pass a diffusers pipeline folder, a Hub id, or {_BUNDLED}"
            )
        index = folder / "model_index.json"
        if not index.is_file():
            raise FileNotFoundError(
                f"{folder} is not a diffusers pipeline folder (no model_index.json); pass the "
                f"folder that holds model_index.json, unet/, vae/, ... or {_BUNDLED}"
            )
        try:
            entries = json.loads(index.read_text(encoding="utf-8"))
            class_name = entries.get("_class_name")
        except (ValueError, AttributeError):
            raise ValueError(
                f"{index} is not a readable model_index.json; restore it from the model's source"
            ) from None
        family = family_of_class(class_name)
        check_required_components(entries, family, folder)
        return str(folder), family
    try:
        with warnings.catch_warnings():  # huggingface_hub's deprecation notices about diffusers' own arguments
            warnings.simplefilter("ignore")
            index = DiffusionPipeline.load_config(path, revision=revision, local_files_only=is_offline())
    except (OSError, ValueError):
        if is_offline():
            raise OSError(
                f"offline (HF_HUB_OFFLINE=1) and {name_or_path!r} is not in the local Hugging Face cache; download "
                f"it once online, pass a local diffusers folder, or --pretrained_model_name_or_path {_BUNDLED}"
            ) from None
        return path, STABLE_DIFFUSION  # unreachable online: the load names the problem
    family = family_of_class(index.get("_class_name"))
    check_required_components(index, family)
    return path, family


def load_base_pipeline(
    name_or_path: str,
    *,
    revision: str | None = None,
    variant: str | None = None,
    torch_dtype: torch.dtype = torch.float32,
):
    """The base pipeline (its family's class, without safety checker), or a one-line error that names the fix."""
    path, family = _checked_base_model(name_or_path, revision)
    offline = is_offline() and not is_local_path(path)  # a Hub id: only the local Hugging Face cache can serve it
    cls = getattr(diffusers, family.pipeline_classes[0])
    try:
        extra = absent_components(cls.load_config(path, revision=revision, local_files_only=offline))
        if family is STABLE_DIFFUSION:
            extra.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe = cls.from_pretrained(path, revision=revision, variant=variant, local_files_only=offline, **extra)
    except OSError as error:  # unreachable Hub, missing files, wrong revision
        raise _load_error(name_or_path, error) from None
    # cast after loading: the load-time dtype keyword was renamed across diffusers versions
    return pipe if torch_dtype == torch.float32 else pipe.to(dtype=torch_dtype)


def loaded_folder(component: torch.nn.Module) -> Path | None:
    """The pipeline folder a loaded component was read from (for a Hub id, the cached snapshot of one commit:
    ``<cache>/models--owner--name/snapshots/<commit>``); None when its config does not name one."""
    loaded_from = getattr(component.config, "_name_or_path", None)
    return Path(loaded_from).parent if loaded_from else None


def base_commit(denoiser: torch.nn.Module) -> str | None:
    """The Hub commit a loaded base came from: the name of the cached snapshot folder its ``denoiser`` (UNet or
    transformer) was read from; None for a local folder or a bundled model."""
    return snapshot_commit(loaded_folder(denoiser))


def snapshot_commit(folder: str | Path | None) -> str | None:
    """The commit a Hub cache snapshot folder (``<cache>/models--owner--name/snapshots/<commit>``) holds; None for
    any other folder."""
    if folder is None:
        return None
    snapshot = Path(folder)
    in_cache = snapshot.parent.name == "snapshots" and snapshot.parent.parent.name.startswith("models--")
    return snapshot.name if in_cache and re.fullmatch(r"[0-9a-f]{40}", snapshot.name) else None


def hub_commit(name_or_path: str, *, revision: str | None = None) -> str | None:
    """The Hub commit ``name_or_path`` at ``revision`` resolves to now, read with its ``model_index.json`` before any
    weight loads; None for a local folder or a bundled model, or when it cannot be resolved (the load says why)."""
    path = resolve_model_path(name_or_path)
    if is_local_path(path):
        return None
    try:
        with warnings.catch_warnings():  # huggingface_hub's deprecation notices about diffusers' own arguments
            warnings.simplefilter("ignore")
            _, commit = DiffusionPipeline.load_config(
                path, revision=revision, local_files_only=is_offline(), return_commit_hash=True
            )
    except (OSError, ValueError):
        return None
    return commit


def load_base_transformer(
    name_or_path: str,
    *,
    revision: str | None = None,
    variant: str | None = None,
    torch_dtype: torch.dtype = torch.float32,
) -> torch.nn.Module:
    """An SD3 / FLUX base's ``transformer/`` alone, loaded and cast as :func:`load_base_pipeline` does, with the same
    one-line error."""
    path, _ = _checked_base_model(name_or_path, revision)
    offline = is_offline() and not is_local_path(path)
    try:
        index = DiffusionPipeline.load_config(path, revision=revision, local_files_only=offline)
        cls = getattr(diffusers, index["transformer"][1])
        model = cls.from_pretrained(
            path, subfolder="transformer", revision=revision, variant=variant, local_files_only=offline
        )
    except OSError as error:
        raise _load_error(name_or_path, error) from None
    return model if torch_dtype == torch.float32 else model.to(dtype=torch_dtype)


def _load_error(name_or_path: str, error: OSError) -> OSError:
    """One line for an unreachable Hub, missing files or a wrong revision."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return OSError(
        f"could not load {name_or_path!r} ({first}); check the id/revision and your connection, or "
        f"pass a local diffusers folder or {_BUNDLED}"
    )


def check_required_components(index: dict, family: ModelFamily, folder: Path | None = None) -> None:
    """A FLUX model needs its T5 encoder (``text_encoder_2``): one line before any weight loads when the index or
    the folder lacks it (SD3 runs without its T5, ``text_encoder_3``, by design)."""
    if family is not FLUX:
        return
    entry = index.get("text_encoder_2")
    missing = not entry or entry[0] is None or (folder is not None and not (folder / "text_encoder_2").is_dir())
    if missing:
        where = folder if folder is not None else "this model"
        raise ValueError(
            f"{where} has no T5 text encoder (text_encoder_2/), which FLUX needs for its prompt tokens; download the "
            "complete model (text_encoder_2/ and tokenizer_2/ included)"
        )
