"""The one owner of an erased model's output folder: check, lock, staging, one swap.

Layout of ``output_dir`` (see ``pipelines/munba.py`` for how it loads)::

    model_index.json                    a plain StableDiffusionPipeline index (stock diffusers loads it silently)
    unet/ vae/ text_encoder/ tokenizer/ scheduler/      the base pipeline with the LoRA fused into unet
    munba.py                            the MunbaPipeline file, for custom_pipeline="munba"
    munba_erasure.json                  what MunbaPipeline reads: erased concepts, fused, LoRA file, base model
    pytorch_lora_weights.safetensors    diffusers-format LoRA with peft adapter metadata
    munba_erasure_comfyui_a1111.safetensors   the same LoRA in kohya keys (ComfyUI, AUTOMATIC1111, Forge)
    erasure_config.json                 the run record (the training configuration + run statistics)
    README.md                           Hub model card
    images/                             before_after.png, widget_<i>.png
    evaluation/                         the end-of-run evaluation (reports, images), when one ran
    checkpoints/ logs/                  training state (kept across the swap)

The order: :func:`check_output_dir` before any work (a user's files are never replaced: only a folder that this
project wrote, recognisable by its ``erasure_config.json``, may be replaced, and only with ``--overwrite_output_dir``);
:class:`OutputDirLock` while the run writes; everything is written into a staging folder beside ``output_dir``
(:func:`staged_output_dir`), the evaluation and the final model card included; one swap puts it in place.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionPipeline
from peft.utils import get_peft_model_state_dict
from PIL import Image

from munba_diffusion.pipelines.munba import (
    ERASURE_CONFIG_NAME,
    ERASURE_FILE_NAME,
    KOHYA_LORA_WEIGHT_NAME,
    LORA_WEIGHT_NAME,
    PIPELINE_FILE_NAME,
    MunbaPipeline,
)

from ...io import save_image_atomic, write_json_atomic
from .kohya import save_kohya_lora

PIPELINE_COMPONENTS = (
    "unet",
    "vae",
    "text_encoder",
    "tokenizer",
    "scheduler",
    "safety_checker",
    "feature_extractor",
    "image_encoder",
)
RESULT_NAMES = frozenset(
    {
        "model_index.json",
        LORA_WEIGHT_NAME,
        KOHYA_LORA_WEIGHT_NAME,
        ERASURE_CONFIG_NAME,
        ERASURE_FILE_NAME,
        PIPELINE_FILE_NAME,
        "README.md",
        "images",
        "evaluation",
        *PIPELINE_COMPONENTS,
    }
)
"""Every top-level entry an export writes; anything else in output_dir (checkpoints, logs, the lock) is kept."""
LOCK_NAME = ".munba.lock"
SAVE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
FOLDER_MODE = 0o755  # what save_pretrained's folders get under the usual umask (mkdtemp would give 0o700)


def check_output_dir(output_dir: str | Path, overwrite_output_dir: bool = False) -> Path:
    """Refuse (one-line error) an ``output_dir`` whose results-named entries this project did not write, or that
    holds an earlier erased model when not overwriting. Call it before any work."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"--output_dir {output_dir} is a file; pass a folder.")
    if not output_dir.is_dir():
        return output_dir
    taken = sorted(entry.name for entry in output_dir.iterdir() if entry.name in RESULT_NAMES)
    if not taken:
        return output_dir
    if not (output_dir / ERASURE_CONFIG_NAME).is_file():
        raise FileExistsError(
            f"{output_dir} holds files this project did not write ({', '.join(taken)}); choose "
            "an empty or new --output_dir (your files are never replaced)."
        )
    if not overwrite_output_dir:
        raise FileExistsError(
            f"{output_dir} already holds an erased model ({', '.join(taken)}); pass "
            "--overwrite_output_dir (overwrite_output_dir=True) to replace it, or choose another "
            "--output_dir."
        )
    return output_dir


class OutputDirLock:
    """An exclusive lock on ``output_dir`` while a run writes it (a ``.munba.lock`` file holding the pid).

    A second run on the same folder refuses at once; a lock left by a process that no longer exists is taken over.
    """

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / LOCK_NAME
        self.created_folder = False

    def __enter__(self) -> OutputDirLock:
        self.created_folder = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is not None and _process_alive(owner):
                    raise FileExistsError(
                        f"{self.path.parent} is being written by another run (process {owner}); "
                        "wait for it to finish or choose another --output_dir"
                    ) from None
                self.path.unlink(missing_ok=True)  # left behind by a run that was killed
                continue
            with os.fdopen(descriptor, "w") as handle:
                handle.write(str(os.getpid()))
            return self
        raise FileExistsError(f"could not lock {self.path.parent}; remove {self.path} if no run is using it")

    def __exit__(self, *exc: object) -> None:
        if self._owner() == os.getpid():
            self.path.unlink(missing_ok=True)
        if self.created_folder and self.path.parent.is_dir() and not any(self.path.parent.iterdir()):
            self.path.parent.rmdir()  # a run that failed before writing anything leaves no empty folder behind

    def _owner(self) -> int | None:
        try:
            return int(self.path.read_text().strip())
        except (OSError, ValueError):
            return None


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def staged_output_dir(output_dir: str | Path) -> Iterator[Path]:
    """Yield a staging folder beside ``output_dir``; on success it becomes ``output_dir`` in one swap.

    Entries of an existing ``output_dir`` that an export does not write (checkpoints, logs, the lock) are moved
    over first; old results are discarded only after the new folder is in place. On any failure nothing changes.
    """
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.staging-", dir=output_dir.parent))
    os.chmod(staging, FOLDER_MODE & ~_umask())
    try:
        yield staging
        if output_dir.exists():
            _swap_keeping_foreign_entries(staging, output_dir)
        else:
            os.replace(staging, output_dir)
    finally:
        _discard_staging(staging)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def _discard_staging(staging: Path) -> None:
    """Remove a leftover staging folder, unless a failed rollback left user entries in it."""
    if not staging.exists():
        return
    if any(entry.name not in RESULT_NAMES for entry in staging.iterdir()):
        raise RuntimeError(f"export failed while moving files; your other files are in {staging}, move them back.")
    shutil.rmtree(staging)


def _swap_keeping_foreign_entries(staging: Path, output_dir: Path) -> None:
    foreign = [entry.name for entry in output_dir.iterdir() if entry.name not in RESULT_NAMES]
    retired = output_dir.with_name(f".{output_dir.name}.replaced-{uuid.uuid4().hex[:8]}")
    moved: list[str] = []
    try:
        for name in foreign:
            os.replace(output_dir / name, staging / name)
            moved.append(name)
        os.replace(output_dir, retired)
    except BaseException:
        for name in moved:
            os.replace(staging / name, output_dir / name)
        raise
    try:
        os.replace(staging, output_dir)
    except BaseException:
        os.replace(retired, output_dir)
        for name in moved:
            os.replace(staging / name, output_dir / name)
        raise
    shutil.rmtree(retired)


def write_erased_model(
    pipeline: StableDiffusionPipeline,
    directory: Path,
    record: Mapping[str, Any],
    *,
    before_after: Image.Image | None = None,
    widget_images: Sequence[tuple[str, Image.Image]] = (),
) -> list[dict[str, Any]]:
    """Write the fused pipeline, the LoRA (diffusers and kohya layouts), munba.py, the erasure record, the run
    record and the images into ``directory`` (a staging folder); returns the model card's widget entries. The
    caller's UNet keeps its adapter and weights."""
    adapter_name = single_adapter_name(pipeline)
    check_record_matches_adapter(record, pipeline.unet.peft_config[adapter_name])
    _save_fused_pipeline(pipeline, adapter_name, record, directory)
    _save_lora(pipeline, adapter_name, directory)
    save_kohya_lora(pipeline.unet, adapter_name, record, directory / KOHYA_LORA_WEIGHT_NAME)
    write_json_atomic(directory / ERASURE_CONFIG_NAME, dict(record))
    return _save_images(directory, before_after, widget_images)


def single_adapter_name(pipeline: StableDiffusionPipeline) -> str:
    adapters = list(getattr(pipeline.unet, "peft_config", {}) or {})
    if len(adapters) != 1:
        raise ValueError(
            f"export needs exactly one LoRA adapter on pipeline.unet, found {adapters}; attach the trained one "
            "with unet.add_adapter(LoraConfig(...))."
        )
    if getattr(pipeline.text_encoder, "peft_config", None):
        raise ValueError("export supports a UNet LoRA only; the text encoder carries adapters too.")
    return adapters[0]


def check_record_matches_adapter(record: Mapping[str, Any], peft_config: Any) -> None:
    """The card and erasure_config.json must describe the adapter that is actually saved."""
    expected = (record["rank"], float(record["lora_alpha"] or record["rank"]), set(record["run"]["target_modules"]))
    targets = peft_config.target_modules
    actual = (peft_config.r, float(peft_config.lora_alpha), {targets} if isinstance(targets, str) else set(targets))
    if actual != expected:
        raise ValueError(
            f"the run record's LoRA (rank={expected[0]}, alpha={expected[1]}) or target modules do not match the "
            f"UNet adapter (r={actual[0]}, lora_alpha={actual[1]}); build the record from the LoraConfig you trained."
        )


def _save_fused_pipeline(
    pipeline: StableDiffusionPipeline, adapter_name: str, record: Mapping[str, Any], directory: Path
) -> None:
    """Save the pipeline with the LoRA fused into a copy of the UNet, as a MunbaPipeline folder."""
    dtype = SAVE_DTYPES[record.get("save_dtype", "float32")]
    fused_unet = copy.deepcopy(pipeline.unet)
    if fused_unet.dtype != dtype:
        fused_unet.to(dtype)  # fused in the saved dtype (float32: no half rounding)
    fused_unet.fuse_lora(lora_scale=1.0, adapter_names=[adapter_name])
    fused_unet.unload_lora()
    erased = MunbaPipeline(
        vae=_in_dtype(pipeline.vae, dtype),
        text_encoder=_in_dtype(pipeline.text_encoder, dtype),
        tokenizer=pipeline.tokenizer,
        unet=fused_unet,
        scheduler=pipeline.scheduler,
        safety_checker=pipeline.safety_checker,
        feature_extractor=pipeline.feature_extractor,
        image_encoder=pipeline.image_encoder,
        requires_safety_checker=pipeline.config.requires_safety_checker,
        erasure={
            "concepts": [concept["name"] for concept in record["concepts"]],
            "fused": True,
            "lora_weight_name": LORA_WEIGHT_NAME,
            "base_model": record["pretrained_model_name_or_path"],
        },
    )
    erased.save_pretrained(directory)  # _class_name "StableDiffusionPipeline", munba.py and munba_erasure.json


def _in_dtype(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``module`` in ``dtype``, copied when it has to change (the caller's pipeline is never cast)."""
    return module if module.dtype == dtype else copy.deepcopy(module).to(dtype)


def _save_lora(pipeline: StableDiffusionPipeline, adapter_name: str, directory: Path) -> None:
    """The diffusers LoRA file, keys in peft's naming (``unet.<module>.lora_A.weight``). Not
    ``convert_state_dict_to_diffusers``: it renames only attention projections (``to_q.lora.down``), and diffusers'
    loader, which decides from the first key whether to convert back, then drops the attention half of a LoRA that
    also adapts convolutions (the ``noxattn`` and ``full`` target sets)."""
    unet = pipeline.unet
    lora_state = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    StableDiffusionPipeline.save_lora_weights(
        directory,
        unet_lora_layers=lora_state,
        unet_lora_adapter_metadata=unet.peft_config[adapter_name].to_dict(),
        weight_name=LORA_WEIGHT_NAME,
        safe_serialization=True,
    )


def _save_images(
    directory: Path, before_after: Image.Image | None, widget_images: Sequence[tuple[str, Image.Image]]
) -> list[dict[str, Any]]:
    """Write images/ and return the model card's widget entries."""
    if before_after is None and not widget_images:
        return []
    images_dir = directory / "images"
    images_dir.mkdir(exist_ok=True)
    if before_after is not None:
        save_image_atomic(images_dir / "before_after.png", before_after)
    widget = []
    for index, (prompt, image) in enumerate(widget_images):
        save_image_atomic(images_dir / f"widget_{index}.png", image)
        widget.append({"text": prompt, "output": {"url": f"images/widget_{index}.png"}})
    return widget
