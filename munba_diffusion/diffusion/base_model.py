"""Load the base Stable Diffusion pipeline an erasure starts from: a Hub id, a local folder or ``munba-demo``."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..demo import DEMO_MODEL_NAME, resolve_model_path


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in {"1", "true", "yes", "on"}


def looks_like_local_path(name_or_path: str) -> bool:
    return Path(name_or_path).exists() or name_or_path.startswith((".", "/", "~")) or len(Path(name_or_path).parts) > 2


def load_base_pipeline(name_or_path: str, *, revision: str | None = None, variant: str | None = None,
                       torch_dtype: torch.dtype = torch.float32):
    """A ``StableDiffusionPipeline`` without safety checker, or a one-line error that names the fix."""
    from diffusers import StableDiffusionPipeline

    path = resolve_model_path(name_or_path)
    if looks_like_local_path(path):
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} does not exist; pass a diffusers pipeline folder, a Hub id, or {DEMO_MODEL_NAME}")
        if not (folder / "model_index.json").is_file():
            raise FileNotFoundError(f"{folder} is not a diffusers pipeline folder (no model_index.json); pass the "
                                    f"folder that holds model_index.json, unet/, vae/, ... or {DEMO_MODEL_NAME}")
        path = str(folder)
    elif hub_offline():
        raise OSError(f"offline (HF_HUB_OFFLINE=1): cannot download {name_or_path!r}; pass a local diffusers folder "
                      f"(e.g. a snapshot of it) or --pretrained_model_name_or_path {DEMO_MODEL_NAME}")
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            path, revision=revision, variant=variant, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
    except OSError as error:  # unreachable Hub, missing files, wrong revision
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise OSError(f"could not load {name_or_path!r} ({first}); check the id/revision and your connection, or "
                      f"pass a local diffusers folder or {DEMO_MODEL_NAME}") from None
    # cast after loading: the load-time dtype keyword was renamed across diffusers versions
    return pipe if torch_dtype == torch.float32 else pipe.to(dtype=torch_dtype)
