"""The one owner of an erased model's output folder: check, lock, staging, one swap.

Layout of ``output_dir`` (see ``pipelines/munba.py`` for how it loads)::

    model_index.json                    a plain StableDiffusion(XL/3)Pipeline or FluxPipeline index (stock diffusers
                                        loads it silently)
    unet/ vae/ text_encoder/ tokenizer/ scheduler/      the base pipeline with the LoRA fused into unet (and into
                                        text_encoder, when it carries one: --lora_on text_encoder|both); SDXL adds
                                        text_encoder_2/ tokenizer_2/
    transformer/ ...                    SD3 and FLUX: the LoRA fused into transformer/ instead of unet/; SD3 adds
                                        text_encoder_2/ tokenizer_2/ text_encoder_3/ tokenizer_3/ (the T5 pair is
                                        null in model_index.json for a model without T5), FLUX text_encoder_2/
                                        tokenizer_2/ (its T5)
    munba.py                            the family's Munba pipeline file (MunbaPipeline; SDXL: MunbaXLPipeline, SD3:
                                        MunbaSD3Pipeline, FLUX: MunbaFluxPipeline), for custom_pipeline="munba"
    app.py                              the comparison app (munba_diffusion/app.py): `python app.py`, a Space
    munba_erasure.json                  what MunbaPipeline reads: erased concepts, fused, LoRA file, base model
    pytorch_lora_weights.safetensors    diffusers-format LoRA with peft adapter metadata (unet.* / transformer.* and
                                        text_encoder.* keys; the stock pipeline's load_lora_weights loads it)
    munba_erasure_comfyui_a1111.safetensors   the same LoRA in kohya keys (ComfyUI, AUTOMATIC1111, Forge); SD 1.x/2.x
                                        and SDXL only: kohya names SD3's and FLUX's transformer modules differently
                                        (FLUX after the original checkpoint's double/single blocks), which
                                        kohya.py does not write, so no such file is written for them
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
from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.utils.peft_utils import recurse_remove_peft_layers
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from PIL import Image

from munba_diffusion import app as comparison_app
from munba_diffusion.pipelines.munba import (
    ERASURE_CONFIG_NAME,
    ERASURE_FILE_NAME,
    KOHYA_LORA_WEIGHT_NAME,
    LORA_WEIGHT_NAME,
    PIPELINE_FILE_NAME,
    MunbaPipeline,
)
from munba_diffusion.pipelines.munba_flux import MunbaFluxPipeline
from munba_diffusion.pipelines.munba_sd3 import MunbaSD3Pipeline
from munba_diffusion.pipelines.munba_xl import MunbaXLPipeline

from ...io import save_image_atomic, write_json_atomic
from .kohya import save_kohya_lora

PIPELINE_COMPONENTS = (
    "unet",
    "transformer",  # SD3, FLUX
    "vae",
    "text_encoder",
    "tokenizer",
    "text_encoder_2",  # SDXL, SD3, FLUX (its T5)
    "tokenizer_2",
    "text_encoder_3",  # SD3's T5 (null in model_index.json without it)
    "tokenizer_3",
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
        comparison_app.APP_FILE_NAME,
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
DENOISERS = ("unet", "transformer")  # the component the erasure LoRA is trained on: the UNet, or SD3's / FLUX's MMDiT
ADAPTED_COMPONENTS = (*DENOISERS, "text_encoder", "text_encoder_2", "text_encoder_3")
"""The components that may carry the LoRA (export refuses one that the pipeline's LoRA loader cannot load)."""
MUNBA_CLASSES = (  # (stock class, its Munba pipeline, the stock settings to carry over): subclasses first
    (StableDiffusionXLPipeline, MunbaXLPipeline, ("force_zeros_for_empty_prompt",)),
    (StableDiffusion3Pipeline, MunbaSD3Pipeline, ()),
    (FluxPipeline, MunbaFluxPipeline, ()),
    (StableDiffusionPipeline, MunbaPipeline, ("requires_safety_checker",)),
)


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
    """Write the fused pipeline, the LoRA (diffusers and, for SD 1.x/2.x and SDXL, kohya layouts), munba.py, app.py,
    the erasure record, the run record and the images into ``directory`` (a staging folder); returns the model
    card's widget entries. The caller's models keep their adapters and weights."""
    adapter_name = single_adapter_name(pipeline)
    loadable = set(getattr(type(pipeline), "_lora_loadable_modules", ()))
    unloadable = sorted(set(_adapted_models(pipeline)) - loadable)
    if unloadable:
        raise ValueError(
            f"the LoRA is on {', '.join(unloadable)}, which {type(pipeline).__name__}.load_lora_weights cannot load; "
            f"train it on {' and/or '.join(sorted(loadable))}."
        )
    for component, title, targets in (
        ("unet", "UNet", "target_modules"),
        ("transformer", "transformer", "target_modules"),
        ("text_encoder", "text encoder", "text_encoder_target_modules"),
        ("text_encoder_2", "second text encoder", "text_encoder_target_modules"),
    ):
        if getattr(pipeline, component, None) is None:
            continue
        adapted = _adapters(getattr(pipeline, component))
        if adapted or record["run"].get(targets):
            check_record_matches_adapter(record, adapted.get(adapter_name), title, targets)
    _save_fused_pipeline(pipeline, adapter_name, record, directory)
    _save_lora(pipeline, adapter_name, directory)
    if getattr(pipeline, "unet", None) is not None:  # no kohya naming of SD3's / FLUX's transformer here (see above)
        save_kohya_lora(_adapted_models(pipeline), adapter_name, record, directory / KOHYA_LORA_WEIGHT_NAME)
    write_json_atomic(directory / ERASURE_CONFIG_NAME, dict(record))
    shutil.copyfile(comparison_app.__file__, directory / comparison_app.APP_FILE_NAME)  # runs beside munba.py
    return _save_images(directory, before_after, widget_images)


def _adapters(model) -> dict[str, Any]:
    return dict(getattr(model, "peft_config", None) or {})


def _adapted_models(pipeline: StableDiffusionPipeline) -> dict[str, torch.nn.Module]:
    """The pipeline's models that carry the LoRA, by component name (``unet`` or ``transformer``, ``text_encoder``,
    ``text_encoder_2``, ``text_encoder_3``)."""
    return {name: getattr(pipeline, name) for name in ADAPTED_COMPONENTS if _adapters(getattr(pipeline, name, None))}


def single_adapter_name(pipeline: StableDiffusionPipeline) -> str:
    """The one LoRA adapter the denoiser (UNet or transformer) and/or the text encoder carry (the same name on
    both)."""
    names = {name: list(_adapters(model)) for name, model in _adapted_models(pipeline).items()}
    found = {adapter for adapters in names.values() for adapter in adapters}
    if len(found) != 1 or any(len(adapters) != 1 for adapters in names.values()):
        raise ValueError(
            f"export needs exactly one LoRA adapter (on pipeline.unet or pipeline.transformer and/or "
            f"pipeline.text_encoder, the same name on both), found {names or 'none'}; attach the trained one with "
            "add_adapter(LoraConfig(...))."
        )
    return found.pop()


def check_record_matches_adapter(
    record: Mapping[str, Any], peft_config: Any, component: str = "UNet", targets_key: str = "target_modules"
) -> None:
    """The card and erasure_config.json must describe the adapter that is actually saved."""
    expected = (record["rank"], float(record["lora_alpha"] or record["rank"]), set(record["run"].get(targets_key, [])))
    if peft_config is None:
        raise ValueError(
            f"the run record lists {component} target modules but the {component} has no such adapter; build the "
            "record from the LoRA you trained."
        )
    targets = peft_config.target_modules
    actual = (peft_config.r, float(peft_config.lora_alpha), {targets} if isinstance(targets, str) else set(targets))
    if actual != expected:
        raise ValueError(
            f"the run record's LoRA (rank={expected[0]}, alpha={expected[1]}) or target modules do not match the "
            f"{component} adapter (r={actual[0]}, lora_alpha={actual[1]}); build the record from the LoraConfig you "
            "trained."
        )


def _save_fused_pipeline(
    pipeline: StableDiffusionPipeline, adapter_name: str, record: Mapping[str, Any], directory: Path
) -> None:
    """Save the pipeline with the LoRA fused into copies of the denoiser (UNet or transformer) and the text encoder
    (those that carry it), as a folder of its family's Munba pipeline (MunbaPipeline for SD 1.x / 2.x,
    MunbaXLPipeline for SDXL, MunbaSD3Pipeline for SD3, MunbaFluxPipeline for FLUX)."""
    dtype = SAVE_DTYPES[record.get("save_dtype", "float32")]
    components = {
        name: _fused(part, adapter_name, dtype) if isinstance(part, torch.nn.Module) else part
        for name, part in pipeline.components.items()
    }
    cls, settings = next(
        ((munba, keys) for stock, munba, keys in MUNBA_CLASSES if isinstance(pipeline, stock)), MUNBA_CLASSES[-1][1:]
    )
    erased = cls(
        **components,
        **{key: pipeline.config[key] for key in settings},
        erasure={
            "concepts": [concept["name"] for concept in record["concepts"]],
            "fused": True,
            "lora_weight_name": LORA_WEIGHT_NAME,
            "base_model": record["pretrained_model_name_or_path"],
        },
    )
    erased.save_pretrained(directory)  # _class_name the stock class, munba.py and munba_erasure.json


def _fused(model: torch.nn.Module, adapter_name: str, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of ``model`` in ``dtype`` with its LoRA merged into the weights and the adapter removed (``model``
    itself when it carries no adapter and has that dtype already)."""
    if not _adapters(model):
        return _in_dtype(model, dtype)
    fused = copy.deepcopy(model).to(dtype)  # fused in the saved dtype (float32: no half rounding)
    for layer in fused.modules():
        if isinstance(layer, BaseTunerLayer):
            layer.merge(adapter_names=[adapter_name])
    recurse_remove_peft_layers(fused)
    if "peft_config" in vars(fused):
        del fused.peft_config
    fused._hf_peft_config_loaded = False  # what diffusers' and transformers' unload leave
    return fused


def _in_dtype(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``module`` in ``dtype``, copied when it has to change (the caller's pipeline is never cast)."""
    return module if module.dtype == dtype else copy.deepcopy(module).to(dtype)


def _save_lora(pipeline: StableDiffusionPipeline, adapter_name: str, directory: Path) -> None:
    """The diffusers LoRA file, keys in peft's naming (``unet.<module>.lora_A.weight``; SD3 and FLUX:
    ``transformer.<module>...``, saved through their ``transformer_lora_layers``). Not
    ``convert_state_dict_to_diffusers``: it renames only attention projections (``to_q.lora.down``), and diffusers'
    loader, which decides from the first key whether to convert back, then drops the attention half of a LoRA that
    also adapts convolutions (the ``noxattn`` and ``full`` target sets)."""
    layers = {}
    for component, model in _adapted_models(pipeline).items():
        state = get_peft_model_state_dict(model, adapter_name=adapter_name)
        if component not in DENOISERS:  # CLIP's layout in files (transformers 4); diffusers strips it where absent
            state = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()}
        layers[f"{component}_lora_layers"] = state
        layers[f"{component}_lora_adapter_metadata"] = model.peft_config[adapter_name].to_dict()
    type(pipeline).save_lora_weights(directory, weight_name=LORA_WEIGHT_NAME, safe_serialization=True, **layers)


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
