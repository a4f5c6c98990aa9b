"""MunbaXLPipeline: a Stable Diffusion XL pipeline that knows which concepts were erased from it (MUNBa).

The SDXL twin of MunbaPipeline (``pipelines/munba.py`` in munba-diffusion), with the same folder layout, record
and behaviour. What differs:
- the class derives from ``StableDiffusionXLPipeline`` and takes SDXL's components (vae, text_encoder,
  text_encoder_2, tokenizer, tokenizer_2, unet, scheduler, image_encoder, feature_extractor,
  force_zeros_for_empty_prompt, add_watermarker) plus ``erasure``; there is no safety checker;
- ``model_index.json`` stays a plain ``StableDiffusionXLPipeline`` index;
- the erasure LoRA is on the UNet; SDXL's own ``load_lora_weights`` loads it (it also takes text_encoder and
  text_encoder_2 keys, should a LoRA carry them).
Everything from ``register_to_config`` down is the same as in munba.py (only the class names and the stock class
name in messages differ; diff the two files): diffusers' dynamic-module loader refuses a file that defines or
imports a second DiffusionPipeline subclass, so the logic is duplicated rather than shared.

An erased SDXL model folder holds the base model with the LoRA fused in, the LoRA itself
(``pytorch_lora_weights.safetensors``), ``erasure_config.json`` (the run record), this file (copied in as
``munba.py``, the same name as for SD, so ``custom_pipeline="munba"`` loads either) and ``munba_erasure.json``,
the small record this class reads::

    {"concepts": ["nudity"], "fused": true, "lora_weight_name": "pytorch_lora_weights.safetensors",
     "base_model": "stabilityai/stable-diffusion-xl-base-1.0"}

The folder loads three ways: ``DiffusionPipeline.from_pretrained(folder)`` (a plain StableDiffusionXLPipeline,
erasure baked in, no warning), ``DiffusionPipeline.from_pretrained(folder, custom_pipeline="munba",
trust_remote_code=True)`` (this class, from the folder's copy of this file) and
``MunbaXLPipeline.from_pretrained(folder)`` (this class, installed with munba-diffusion); both MunbaXLPipeline
ways read ``munba_erasure.json`` beside ``model_index.json`` once the pipeline is built.
``MunbaXLPipeline.from_pretrained(base).load_erasure(folder)`` puts the LoRA on the base model instead.

Erasure strength. With base weights W0 and the LoRA's update dW = (alpha / r) B A, the UNet runs with
W0 + s dW at ``erasure_scale = s``: 0 is the original model, 1 the erased one, values in between interpolate.
- base + LoRA: the LoRA adapter runs with weight s; s = 0 disables it, so the base model's output is exact.
- fused folder (W0 + dW): the folder's own LoRA is loaded on demand with weight s - 1, giving
  W0 + dW + (s - 1) dW = W0 + s dW; s = 1 disables it (exact fused output), s = 0 equals the base model up to
  float rounding.
``erasure_scale`` switches LoRA layers on and off for the whole pipeline: combine it with other LoRAs with care.

This file imports only the standard library, torch, diffusers and transformers (it is copied into every saved
folder and loaded there by diffusers' dynamic-module loader) and defines exactly one DiffusionPipeline subclass.
"""

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import make_image_grid
from transformers import (
    CLIPImageProcessor,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
)
from transformers.utils import cached_file

# diffusers' dynamic-module loader executes every local folder's munba.py into one module object
# (diffusers_modules.local.munba) and keeps what an earlier file defined there; it wants exactly one
# DiffusionPipeline subclass in it, so drop the classes a previous file (MunbaPipeline of an SD folder,
# MunbaXLPipeline of an SDXL one) left behind.
for _stale_name in [
    name for name, value in globals().items() if isinstance(value, type) and value.__module__ == __name__
]:
    del globals()[_stale_name]

ERASURE_ADAPTER_NAME = "munba_erasure"
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
KOHYA_LORA_WEIGHT_NAME = "munba_erasure_comfyui_a1111.safetensors"  # the same LoRA in kohya keys (ComfyUI, A1111)
ERASURE_FILE_NAME = "munba_erasure.json"
ERASURE_CONFIG_NAME = "erasure_config.json"
PIPELINE_FILE_NAME = "munba.py"
PIPELINE_CLASS_NAME_ON_DISK = "StableDiffusionXLPipeline"


@dataclass
class MunbaComparison:
    """Same-seed images of the original and the erased model."""

    original: list  # PIL images at erasure_scale 0
    erased: list  # PIL images at the requested erasure_scale
    grid: Any  # one PIL image: originals on the top row, erased images below


class MunbaXLPipeline(StableDiffusionXLPipeline):
    """StableDiffusionXLPipeline plus what was erased: `erased_concepts`, `erasure_scale`, `load_erasure`, `compare`.

    `__call__` is Stable Diffusion XL's, unchanged. `erasure` is the content of munba_erasure.json (see the
    module docstring); it round-trips through `save_pretrained` / `from_pretrained`.
    """

    # this file as it was when the class was defined: diffusers runs every folder's munba.py into one shared module
    # (and one cached file), so the module's globals and file may since hold another folder's pipeline
    _class_name_on_disk = PIPELINE_CLASS_NAME_ON_DISK
    _pipeline_file_text = Path(__file__).read_text(encoding="utf-8")

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        tokenizer_2: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        image_encoder: CLIPVisionModelWithProjection = None,
        feature_extractor: CLIPImageProcessor = None,
        force_zeros_for_empty_prompt: bool = True,
        add_watermarker: bool | None = None,
        erasure: dict | None = None,
    ):
        super().__init__(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=scheduler,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
            force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
            add_watermarker=add_watermarker,
        )
        self.register_to_config(erasure=_checked_erasure(erasure))
        self._erasure_scale = 1.0 if erasure else 0.0

    def register_to_config(self, **kwargs) -> None:
        """diffusers' register_to_config; when from_pretrained records where the pipeline came from
        (`_name_or_path`, set on both MunbaXLPipeline ways of loading, after the pipeline is built), the erasure
        record munba_erasure.json beside model_index.json is read."""
        super().register_to_config(**kwargs)
        source = kwargs.get("_name_or_path")
        if source is None or self.config.get("erasure"):
            return
        erasure = _read_erasure_file(str(source), getattr(self, "unet", None))
        if erasure is not None:
            super().register_to_config(erasure=_checked_erasure(erasure))
            self._erasure_scale = 1.0

    @property
    def erased_concepts(self) -> list[str]:
        """Names of the erased concepts ([] when nothing was erased or the names are unknown)."""
        return list(self.config.erasure["concepts"]) if self.config.erasure else []

    @property
    def erasure_scale(self) -> float:
        """Erasure strength s: the erased weights run as W0 + s dW (0 = original model, 1 = erased)."""
        return self._erasure_scale

    @erasure_scale.setter
    def erasure_scale(self, scale: float) -> None:
        scale = float(scale)
        if not math.isfinite(scale):
            raise ValueError(f"erasure_scale must be a finite number, got {scale}; use 0 (original) to 1 (erased).")
        erasure = self.config.erasure
        if not erasure:
            raise ValueError("this pipeline has no erasure; load one with pipe.load_erasure(path_or_repo_id).")
        adapter_weight = scale - 1.0 if erasure["fused"] else scale
        if adapter_weight == 0.0:
            if self._has_erasure_adapter():
                self.disable_lora()
        else:
            if not self._has_erasure_adapter():
                self._load_erasure_lora_of_fused_folder()
            self.enable_lora()
            self.set_adapters([ERASURE_ADAPTER_NAME], adapter_weights=[adapter_weight])
        self._erasure_scale = scale

    def load_erasure(
        self, path_or_repo_id: str | os.PathLike, weight_name: str = LORA_WEIGHT_NAME, **kwargs
    ) -> "MunbaXLPipeline":
        """Put an erasure LoRA on this (base) pipeline at erasure_scale 1 and return the pipeline.

        `path_or_repo_id` is an erased model folder or Hub repo (or any folder holding a diffusers-format LoRA
        named `weight_name`); concept names come from the `erasure_config.json` beside it when there is one.
        `kwargs` (revision, token, cache_dir, local_files_only, ...) go to `load_lora_weights`.
        """
        if self.config.erasure and self.config.erasure["fused"]:
            raise ValueError(
                "this pipeline already has an erasure fused in; load the base model with "
                "MunbaXLPipeline.from_pretrained(base) and call load_erasure on that."
            )
        if self._has_erasure_adapter():
            self.delete_adapters(ERASURE_ADAPTER_NAME)
        self.load_lora_weights(path_or_repo_id, weight_name=weight_name, adapter_name=ERASURE_ADAPTER_NAME, **kwargs)
        erasure_config = _read_erasure_config(path_or_repo_id, **kwargs)
        self.register_to_config(
            erasure={
                "concepts": [concept["name"] for concept in erasure_config.get("concepts", [])],
                "fused": False,
                "lora_weight_name": weight_name,
                "base_model": erasure_config.get("pretrained_model_name_or_path", erasure_config.get("base_model")),
            }
        )
        self.erasure_scale = 1.0
        return self

    @torch.no_grad()
    def compare(
        self, prompt: str | list[str], *, seed: int = 0, erasure_scale: float = 1.0, **kwargs
    ) -> MunbaComparison:
        """Generate `prompt` with the original model (scale 0) and at `erasure_scale` from the same seed.

        Both runs start from `torch.Generator("cpu").manual_seed(seed)`; `kwargs` go to `__call__`
        (negative_prompt, num_inference_steps, guidance_scale, num_images_per_prompt, height, width, ...).
        The pipeline's own erasure_scale is restored afterwards. A FLUX-schnell model (no guidance embedding) reads
        the prompt's first 256 T5 tokens unless `max_sequence_length` is given: the most it takes, and how it was erased.
        """
        for reserved in ("generator", "output_type", "return_dict"):
            if reserved in kwargs:
                raise ValueError(f"compare() sets {reserved} itself; pass seed= to choose the noise.")
        if self.unet.config.get("guidance_embeds") is False:
            kwargs.setdefault("max_sequence_length", 256)
        previous_scale = self.erasure_scale
        runs = []
        try:
            for scale in (0.0, erasure_scale):
                self.erasure_scale = scale
                generator = torch.Generator(device="cpu").manual_seed(seed)
                runs.append(self(prompt, generator=generator, output_type="pil", **kwargs).images)
        finally:
            self.erasure_scale = previous_scale
        original, erased = runs
        grid = make_image_grid(original + erased, rows=2, cols=len(original))
        return MunbaComparison(original=original, erased=erased, grid=grid)

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        variant: str | None = None,
        max_shard_size: int | str | None = None,
        push_to_hub: bool = False,
        **kwargs,
    ) -> None:
        """Save a folder that loads the same three ways as the one this pipeline came from.

        Unlike DiffusionPipeline.save_pretrained, `_class_name` stays "StableDiffusionXLPipeline", the erasure
        record goes to munba_erasure.json (not model_index.json, so stock diffusers loads the folder silently),
        this file is copied in as munba.py and, for a fused pipeline loaded from a local folder, so are its LoRA
        files (diffusers and kohya layouts).
        """
        if push_to_hub:
            raise ValueError("save_pretrained(push_to_hub=True) is not supported here; call pipe.push_to_hub(repo_id).")
        adapters = {name for names in self.get_list_adapters().values() for name in names}
        if adapters == {ERASURE_ADAPTER_NAME} and self.config.erasure["fused"] and self.erasure_scale == 1.0:
            self.unload_lora_weights()  # only a runtime view of the fused folder's own LoRA; reloaded on demand
        elif adapters:
            raise ValueError(
                f"LoRA adapters {sorted(adapters)} are attached and would be saved as adapter keys inside the UNet; "
                "set erasure_scale = 1 on a fused pipeline, or write an erased folder with "
                "munba_diffusion.diffusion.export.export_erased_model."
            )
        super().save_pretrained(
            save_directory,
            safe_serialization=safe_serialization,
            variant=variant,
            max_shard_size=max_shard_size,
            **kwargs,
        )
        save_directory = Path(save_directory)
        index_path = save_directory / self.config_name
        model_index = json.loads(index_path.read_text(encoding="utf-8"))
        model_index["_class_name"] = self._class_name_on_disk
        erasure = model_index.pop("erasure", None)
        index_path.write_text(json.dumps(model_index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        erasure_path = save_directory / ERASURE_FILE_NAME
        if erasure:
            erasure_path.write_text(json.dumps(erasure, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        else:
            erasure_path.unlink(missing_ok=True)
        (save_directory / PIPELINE_FILE_NAME).write_text(self._pipeline_file_text, encoding="utf-8")
        lora_file = self._local_lora_file_of_fused_folder()
        if lora_file is not None and lora_file.is_file() and lora_file.parent.resolve() != save_directory.resolve():
            for source in (lora_file, lora_file.parent / KOHYA_LORA_WEIGHT_NAME):
                if source.is_file():
                    shutil.copyfile(source, save_directory / source.name)

    def _has_erasure_adapter(self) -> bool:
        return any(ERASURE_ADAPTER_NAME in adapters for adapters in self.get_list_adapters().values())

    def _local_lora_file_of_fused_folder(self) -> Path | None:
        erasure = self.config.erasure
        source = self.name_or_path
        if not (erasure and erasure["fused"] and erasure.get("lora_weight_name") and source):
            return None
        if not os.path.isdir(source):
            return None
        return Path(source) / erasure["lora_weight_name"]

    def _load_erasure_lora_of_fused_folder(self) -> None:
        """Load the fused folder's own LoRA (the only way to reach scales other than 1 from fused weights)."""
        erasure = self.config.erasure
        if not erasure["fused"]:
            raise ValueError("the erasure LoRA was removed from this pipeline; call pipe.load_erasure(path) again.")
        source = self.name_or_path
        weight_name = erasure.get("lora_weight_name")
        local_file = self._local_lora_file_of_fused_folder()
        if not (source and weight_name) or (local_file is not None and not local_file.is_file()):
            raise ValueError(
                f"erasure_scale other than 1 needs the erasure LoRA, which {source or 'this pipeline'} does not "
                "carry; load the base model and call pipe.load_erasure(lora_folder_or_repo)."
            )
        self.load_lora_weights(source, weight_name=weight_name, adapter_name=ERASURE_ADAPTER_NAME)


def _checked_erasure(erasure: dict | None) -> dict | None:
    """Validate the erasure record (munba_erasure.json; None = nothing erased)."""
    if erasure is None:
        return None
    concepts = erasure.get("concepts")
    if not isinstance(concepts, list) or not all(isinstance(name, str) for name in concepts):
        raise ValueError(f'{ERASURE_FILE_NAME} needs "concepts": a list of names, got {concepts!r}.')
    if not isinstance(erasure.get("fused"), bool):
        raise ValueError(f'{ERASURE_FILE_NAME} needs "fused": true or false, got {erasure.get("fused")!r}.')
    return dict(erasure)


def _read_erasure_file(source: str, unet: Any = None) -> dict | None:
    """munba_erasure.json beside model_index.json of `source` (local folder or Hub repo), or None.

    diffusers' snapshot download fetches only the files it needs, so for a Hub repo the file is looked up in the
    snapshot the UNet was loaded from and otherwise fetched at that snapshot's revision (skipped when offline).
    """
    if os.path.isdir(source):
        path = os.path.join(source, ERASURE_FILE_NAME)
        return _read_json(path) if os.path.isfile(path) else None
    hub_kwargs = {}
    unet_path = unet.config.get("_name_or_path") if unet is not None else None
    if unet_path and os.path.isdir(unet_path):
        snapshot = Path(unet_path).parent if Path(unet_path).name == "unet" else None
        repo_folder = "models--" + source.replace("/", "--")
        if snapshot is not None and snapshot.parent.name == "snapshots" and snapshot.parent.parent.name == repo_folder:
            if (snapshot / ERASURE_FILE_NAME).is_file():
                return _read_json(snapshot / ERASURE_FILE_NAME)
            hub_kwargs = {"revision": snapshot.name, "cache_dir": str(snapshot.parent.parent.parent)}
    try:
        path = cached_file(
            source,
            ERASURE_FILE_NAME,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
            **hub_kwargs,
        )
    except OSError:
        return None
    return _read_json(path) if path is not None else None


def _read_json(path: str | os.PathLike) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _read_erasure_config(path_or_repo_id: str | os.PathLike, **kwargs) -> dict:
    """erasure_config.json beside a LoRA (local folder or Hub repo), or {} when there is none."""
    hub_kwargs = {
        key: kwargs[key]
        for key in ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision", "subfolder")
        if key in kwargs and kwargs[key] is not None
    }
    config_file = cached_file(
        str(path_or_repo_id),
        ERASURE_CONFIG_NAME,
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
        **hub_kwargs,
    )
    if config_file is None:
        return {}
    with open(config_file, encoding="utf-8") as handle:
        return json.load(handle)
