"""Load an erased model folder as its family's Munba pipeline (MunbaPipeline; MunbaXLPipeline for SDXL,
MunbaSD3Pipeline for SD3, MunbaFluxPipeline for FLUX), with one-line errors for folders that cannot work."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from diffusers import DiffusionPipeline

from munba_diffusion.io import is_local_path
from munba_diffusion.pipelines.munba import ERASURE_FILE_NAME, LORA_WEIGHT_NAME, PIPELINE_FILE_NAME, MunbaPipeline
from munba_diffusion.pipelines.munba_flux import MunbaFluxPipeline
from munba_diffusion.pipelines.munba_sd3 import MunbaSD3Pipeline
from munba_diffusion.pipelines.munba_xl import MunbaXLPipeline

MUNBA_CLASSES = {
    cls._class_name_on_disk: cls for cls in (MunbaPipeline, MunbaXLPipeline, MunbaSD3Pipeline, MunbaFluxPipeline)
}
"""Each family's Munba pipeline, by the stock class its folders name in ``model_index.json``."""


def munba_pipeline_class(path_or_repo_id: str | os.PathLike, **kwargs: Any) -> type:
    """The Munba pipeline of the folder's or repo's family (``model_index.json``'s class): MunbaXLPipeline for
    SDXL, MunbaSD3Pipeline for SD3, MunbaFluxPipeline for FLUX, MunbaPipeline otherwise."""
    hub = {k: kwargs[k] for k in ("revision", "cache_dir", "token", "local_files_only") if k in kwargs}
    try:
        index = DiffusionPipeline.load_config(str(path_or_repo_id), **hub)
    except (OSError, ValueError):  # unreachable: from_pretrained then names the problem
        return MunbaPipeline
    return MUNBA_CLASSES.get(index.get("_class_name"), MunbaPipeline)


def load_erased_pipeline(
    path_or_repo_id: str | os.PathLike, *, trust_remote_code: bool = False, **kwargs: Any
) -> MunbaPipeline | MunbaXLPipeline | MunbaSD3Pipeline | MunbaFluxPipeline:
    """Load an erased model (folder or Hub repo) as its family's Munba pipeline.

    By default the installed class (:func:`munba_pipeline_class`) loads it and no code from the folder runs. With
    `trust_remote_code=True` the folder's own munba.py is used, as `DiffusionPipeline.from_pretrained(...,
    custom_pipeline="munba", trust_remote_code=True)` does. `kwargs` go to `from_pretrained` (torch_dtype, ...).
    Local folders are checked first, so a wrong folder fails at once with what to do.
    """
    if is_local_path(path_or_repo_id):
        check_erased_model_folder(path_or_repo_id, need_pipeline_file=trust_remote_code)
    if trust_remote_code:
        custom_pipeline = Path(PIPELINE_FILE_NAME).stem
        return DiffusionPipeline.from_pretrained(
            str(path_or_repo_id), custom_pipeline=custom_pipeline, trust_remote_code=True, **kwargs
        )
    return munba_pipeline_class(path_or_repo_id, **kwargs).from_pretrained(str(path_or_repo_id), **kwargs)


def check_erased_model_folder(path: str | os.PathLike, *, need_pipeline_file: bool = False) -> Path:
    """Raise a one-line error naming the fix unless `path` is an erased model folder."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a folder; pass the erased model folder (the trainer's --output_dir).")
    if not (path / "model_index.json").is_file():
        if (path / LORA_WEIGHT_NAME).is_file():
            raise FileNotFoundError(
                f"{path} holds only a LoRA (no model_index.json); load the base model and add it: "
                f"MunbaPipeline.from_pretrained(base).load_erasure('{path}')."
            )
        raise FileNotFoundError(
            f"{path} is not a diffusers pipeline folder (no model_index.json); pass the folder the trainer wrote "
            "(its --output_dir)."
        )
    model_index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
    if not (path / ERASURE_FILE_NAME).is_file() and not model_index.get("erasure"):  # "erasure": earlier folders
        raise ValueError(
            f"{path} is a pipeline without an erasure (no {ERASURE_FILE_NAME}); load it with "
            "MunbaPipeline.from_pretrained(path) and add one with load_erasure(lora_folder)."
        )
    if need_pipeline_file and not (path / PIPELINE_FILE_NAME).is_file():
        raise FileNotFoundError(
            f"{path} has no {PIPELINE_FILE_NAME}; load it with MunbaPipeline.from_pretrained('{path}') or copy "
            f"pipelines/{PIPELINE_FILE_NAME} into it."
        )
    return path
