"""Load the base Stable Diffusion pipeline an erasure starts from: a Hub id, a local folder or a bundled name
(:mod:`munba_diffusion.models`)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from ..io import is_local_path, is_offline
from ..models import bundled_model_names, resolve_model_path

_BUNDLED = " / ".join(bundled_model_names("pipeline"))  # for error messages: what works offline, out of the box


def check_base_model(name_or_path: str, *, revision: str | None = None) -> Path | str:
    """Check that the base model can load, reading only ``model_index.json`` (from the local Hugging Face cache
    when offline); returns the folder or Hub id to load. Raises a one-line error that names the fix."""
    path = resolve_model_path(name_or_path)
    if is_local_path(path):
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(
                f"{folder} does not exist; pass a diffusers pipeline folder, a Hub id, or {_BUNDLED}"
            )
        if not (folder / "model_index.json").is_file():
            raise FileNotFoundError(
                f"{folder} is not a diffusers pipeline folder (no model_index.json); pass the "
                f"folder that holds model_index.json, unet/, vae/, ... or {_BUNDLED}"
            )
        return str(folder)
    if is_offline():
        try:
            with warnings.catch_warnings():  # huggingface_hub's deprecation notices about diffusers' own arguments
                warnings.simplefilter("ignore")
                StableDiffusionPipeline.load_config(path, revision=revision, local_files_only=True)
        except (OSError, ValueError):
            raise OSError(
                f"offline (HF_HUB_OFFLINE=1) and {name_or_path!r} is not in the local Hugging Face cache; download "
                f"it once online, pass a local diffusers folder, or --pretrained_model_name_or_path {_BUNDLED}"
            ) from None
    return path


def load_base_pipeline(
    name_or_path: str,
    *,
    revision: str | None = None,
    variant: str | None = None,
    torch_dtype: torch.dtype = torch.float32,
):
    """A ``StableDiffusionPipeline`` without safety checker, or a one-line error that names the fix."""
    path = check_base_model(name_or_path, revision=revision)
    offline = is_offline() and not is_local_path(path)  # a Hub id: only the local Hugging Face cache can serve it
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            path,
            revision=revision,
            variant=variant,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            local_files_only=offline,
        )
    except OSError as error:  # unreachable Hub, missing files, wrong revision
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise OSError(
            f"could not load {name_or_path!r} ({first}); check the id/revision and your connection, or "
            f"pass a local diffusers folder or {_BUNDLED}"
        ) from None
    # cast after loading: the load-time dtype keyword was renamed across diffusers versions
    return pipe if torch_dtype == torch.float32 else pipe.to(dtype=torch_dtype)
