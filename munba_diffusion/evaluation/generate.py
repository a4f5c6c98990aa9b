"""Generation harness: a pipeline and a prompt set -> one PNG per prompt row plus a JSONL manifest.

Each image has its own seed (a CPU ``torch.Generator`` per image, so an image's starting noise does not depend on
its batch, its process or the device). Runs are resumable: an image counts as made when the manifest lists it and
its file exists; PNGs and manifests are written atomically, so a run that is interrupted and restarted ends with
the same files, none twice. Work is split across processes with ``accelerate.PartialState``; each process appends to its
own manifest part, and the main process merges the parts into ``manifest.jsonl`` at the end.

Batches are cut from the whole prompt set (rows in order, ``batch_size`` rows of equal guidance and size per batch),
never from what is left to make, so every image is computed in the same batch whether the run is fresh, resumed,
split over processes or partly served from the image cache: float kernels may round differently for other batch
sizes (on GPUs they do), and an image is meant to be a function of its key alone.

The image cache (:class:`ImageCache`, on unless ``--no_image_cache``): every image is stored under a key made of
the model's content fingerprint (:func:`model_fingerprint`: its weights, configs, tokenizer, scheduler, LoRA file),
the exact pipeline call (prompts, steps, guidance, size, output type) of its batch, its seed and place in the
batch, the dtype, the device (GPU name, CUDA, TF32 switches; the CPU's instruction set) and the versions of the
libraries that shape pixels or PNG bytes (:data:`CACHE_LIBRARIES`). A later generation with the same key copies
the PNG instead of running the pipeline (the manifest line says ``"from_cache": true``), so the base model an
erasure is compared with is generated once. The cache folder is ``$MUNBA_CACHE_DIR``, else
``$XDG_CACHE_HOME/munba_diffusion/images`` (``~/.cache/munba_diffusion/images``); it holds only PNGs this module
wrote (``<key[:2]>/<key>.png``, written atomically) and may be deleted at any time. An entry that is not a complete
PNG of the expected size is removed and the image made again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from io import BytesIO
from itertools import groupby
from pathlib import Path

import diffusers
import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env
from diffusers import DiffusionPipeline
from PIL import Image
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from ..config import check_options, option
from ..diffusion.family import absent_components, family_of_pipeline
from ..io import (
    TEMPORARY_GLOB,
    is_local_path,
    is_offline,
    library_versions,
    write_bytes_atomic,
    write_json_atomic,
    write_jsonl_atomic,
)
from ..models import bundled_model_names, resolve_model_path
from .manifest import MANIFEST_NAME, read_manifest
from .prompt_sets import PromptRecord, PromptSet

RUN_CONFIG_NAME = "generation.json"
LORA_SEPARATOR = "::"
_PART_GLOB = "manifest.part-*.jsonl"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
CACHE_ENV = "MUNBA_CACHE_DIR"
CACHE_FORMAT = 1
"""Part of every cache key: raise it when this module changes how an image is made from the same key."""
CACHE_LIBRARIES = ("torch", "diffusers", "transformers", "peft", "numpy", "pillow")
"""The libraries whose versions shape an image's pixels (or its PNG bytes): part of every cache key."""
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"IEND\xaeB`\x82"
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    """A model to evaluate: a diffusers folder, a Hub id or a bundled name (:mod:`munba_diffusion.models`),
    optionally with a LoRA file."""

    path: str
    lora: str | None = None
    label: str | None = None
    final_path: str | None = None  # where the model lives once written, when it is evaluated from a staging folder

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        """``"PATH"`` or ``"BASE::LORA_FILE"`` (a base model plus a diffusers-format LoRA ``.safetensors``)."""
        path, _, lora = text.partition(LORA_SEPARATOR)
        if not path or (LORA_SEPARATOR in text and not lora):
            raise ValueError(f"bad model spec {text!r}; use PATH or BASE{LORA_SEPARATOR}LORA_FILE")
        return cls(path, lora or None)

    @property
    def name(self) -> str:
        """A short label for tables and folder names."""
        if self.label:
            return self.label
        name = Path(self.path.rstrip("/")).name or self.path
        return f"{name}+{Path(self.lora).stem}" if self.lora else name


@dataclass(frozen=True)
class GenerationSettings:
    """How images are made (the protocol a report states); each field's help, default and range are declared once
    here, and the evaluation command line's flags come from them (:class:`..evaluate.EvaluationConfig`).

    ``resolution`` None means the pipeline's native size (unet sample size x VAE scale: 512 for SD 1.x, 32 for the
    demo). ``scheduler`` None keeps the pipeline's own; otherwise a diffusers scheduler class name
    (e.g. ``"DDIMScheduler"``) built from the pipeline's scheduler config. ``use_prompt_settings`` takes guidance
    and size from the prompt set's columns where a row has them (I2P's ``sd_guidance_scale``, ...).
    """

    num_inference_steps: int = option(50, "denoising steps per image", low=1, high=1000, flag="steps", metavar="N")
    guidance_scale: float = option(
        7.5, "classifier-free guidance scale (1 turns guidance off)", low=0, high=100, flag="guidance", metavar="SCALE"
    )
    resolution: int | None = option(
        None, "image size in pixels, a multiple of 8 (default: the model's native size)", low=8, high=4096
    )
    batch_size: int = option(
        4, "images per pipeline call (changes at most float rounding; part of the image cache's key)", low=1, high=4096
    )
    scheduler: str | None = option(
        None, "diffusers scheduler class name, e.g. DDIMScheduler (default: the model's own)"
    )
    dtype: str = option("float32", f"dtype of the pipeline: {', '.join(_DTYPES)}", choices=tuple(_DTYPES))
    use_prompt_settings: bool = option(False, "take guidance and size from the prompt set's columns where given")

    def __post_init__(self) -> None:
        check_options(self)
        if self.resolution is not None and self.resolution % 8:
            raise ValueError(f"resolution (--resolution) must be a multiple of 8; got {self.resolution}")
        if self.scheduler is not None:
            scheduler_class(self.scheduler)


def scheduler_class(name: str):
    """The diffusers scheduler class called ``name``; a one-line error for anything else."""
    found = getattr(diffusers, name, None) if name.isidentifier() and name.endswith("Scheduler") else None
    if found is None or not hasattr(found, "from_config"):
        raise ValueError(
            f"scheduler (--scheduler) must be a diffusers scheduler class name such as DDIMScheduler; got {name!r}"
        )
    return found


def process_state() -> PartialState:
    """accelerate's process state; honours ``accelerate launch --cpu`` (ACCELERATE_USE_CPU) as Accelerator does."""
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
"""Weight files in Python's pickle format: never loaded (unpickling a file can run any code in it)."""
_PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04")  # pickle, torch.save's zip
_PIPELINES = ", ".join(bundled_model_names("pipeline"))


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


def check_lora_file(path: str | os.PathLike) -> Path:
    """``path`` as a Path when it is a readable, complete ``.safetensors`` file; otherwise a one-line error.

    A pickle (``.bin``, ``.pt``, ... or pickle bytes under any name) is refused without being unpickled; a torn or
    damaged file is refused by its header (``safetensors.safe_open`` reads only the header; no tensor is loaded).
    """
    lora = Path(path)
    fix = f"pass BASE{LORA_SEPARATOR}path/to/pytorch_lora_weights.safetensors"
    if not lora.is_file():
        raise FileNotFoundError(f"LoRA file {lora} {'is not a file' if lora.exists() else 'not found'}; {fix}")
    try:
        with lora.open("rb") as handle:
            head = handle.read(8)
    except OSError as error:
        raise PermissionError(f"cannot read LoRA file {lora} ({error.strerror or _first_line(error)}); {fix}") from None
    if lora.suffix.lower() in PICKLE_SUFFIXES or head.startswith(_PICKLE_MAGIC):
        raise ValueError(
            f"LoRA file {lora} is a pickle, which is never loaded here (unpickling can run code); convert it to "
            f".safetensors (safetensors.torch.save_file) and {fix}"
        )
    if lora.suffix.lower() != ".safetensors":
        raise ValueError(f"LoRA file {lora} must be a .safetensors file; {fix}")
    try:
        with safe_open(str(lora), framework="pt"):
            pass
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(
            f"LoRA file {lora} is damaged or not safetensors ({_first_line(error)}); write it again (the trainer's "
            f"output folder holds pytorch_lora_weights.safetensors) and {fix}"
        ) from None
    return lora


def check_model(spec: ModelSpec) -> dict:
    """Check that ``spec`` can load, reading only small files (its LoRA's header and ``model_index.json``, from the
    local Hugging Face cache when offline); returns the pipeline's config. Raises a one-line error naming the fix."""
    if spec.lora is not None:
        check_lora_file(spec.lora)
    path = resolve_model_path(spec.path)
    fix = f"pass a diffusers folder, a cached Hub id or a bundled model ({_PIPELINES})"
    if is_local_path(path):
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"model {spec.path} does not exist; {fix}")
        if not (folder / "model_index.json").is_file():
            raise FileNotFoundError(
                f"model {spec.path} is not a diffusers pipeline folder (no model_index.json); {fix}"
            )
    try:
        with warnings.catch_warnings():  # huggingface_hub's deprecation notices about diffusers' own arguments
            warnings.simplefilter("ignore")
            return DiffusionPipeline.load_config(path)
    except (OSError, ValueError) as error:
        if is_offline() and not is_local_path(path):
            raise FileNotFoundError(
                f"offline (HF_HUB_OFFLINE=1) and model {spec.path!r} is not in the local Hugging Face cache; "
                f"download it once online, or {fix}"
            ) from None
        raise FileNotFoundError(f"cannot load model {spec.path!r} ({_first_line(error)}); {fix}") from None


def load_pipeline(spec: ModelSpec, settings: GenerationSettings, device: str | torch.device):
    """Load the pipeline of ``spec`` with the safety checker off (the field's protocol), LoRA and scheduler applied.

    Everything that can be checked without loading weights is checked first (:func:`check_model`); a model or LoRA
    that fails while loading is one line too.
    """
    config = check_model(spec)
    path = resolve_model_path(spec.path)
    kwargs = absent_components(config)  # e.g. SD3 without its T5 encoder
    if "safety_checker" in config:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    if settings.dtype != "float32":
        kwargs["torch_dtype"] = _DTYPES[settings.dtype]
    try:
        pipe = DiffusionPipeline.from_pretrained(path, **kwargs)
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:  # missing or damaged weight files
        raise ValueError(
            f"cannot load model {spec.path!r} ({_first_line(error)}); its files are incomplete or damaged: "
            "download or export it again"
        ) from None
    if spec.lora is not None:
        lora = Path(spec.lora)
        try:
            pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
        except (OSError, ValueError, RuntimeError, KeyError, TypeError, SafetensorError) as error:
            raise ValueError(
                f"LoRA file {lora} does not load into {spec.path!r} ({_first_line(error)}); pass a diffusers-format "
                "LoRA trained on this base model"
            ) from None
    if settings.scheduler is not None:
        pipe.scheduler = scheduler_class(settings.scheduler).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def model_protocol(spec: ModelSpec, pipe) -> dict:
    """What a report states about a model."""
    return {
        "label": spec.name,
        "model": spec.final_path or spec.path,
        "resolved_path": spec.final_path or str(resolve_model_path(spec.path)),
        "lora": spec.lora,
        "lora_sha256": file_sha256(spec.lora) if spec.lora else None,
        "pipeline_class": type(pipe).__name__,
        "scheduler": type(pipe.scheduler).__name__,
    }


# ------------------------------------------------------------------------------------------ image cache
def default_cache_dir() -> Path:
    """The image cache's folder: ``$MUNBA_CACHE_DIR``, else ``$XDG_CACHE_HOME/munba_diffusion/images`` (by default
    ``~/.cache/munba_diffusion/images``)."""
    folder = os.environ.get(CACHE_ENV, "").strip()
    if folder:
        return Path(folder).expanduser()
    root = os.environ.get("XDG_CACHE_HOME", "").strip() or "~/.cache"
    return Path(root).expanduser() / "munba_diffusion" / "images"


def _json_default(value):
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    if isinstance(value, (torch.dtype, Path)):
        return str(value)
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return repr(value)


def _canonical(value) -> bytes:
    return json.dumps(value, sort_keys=True, default=_json_default, ensure_ascii=False).encode()


def _config_of(component) -> dict | None:
    """A component's configuration without its bookkeeping (``_name_or_path``, versions, the dtype it was saved
    in): two copies of the same model in different folders have the same configuration."""
    config = getattr(component, "config", None)
    if config is None:
        return None
    items = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    skip = {"transformers_version", "torch_dtype", "dtype"}
    return {k: v for k, v in items.items() if not k.startswith("_") and k not in skip}


def _tensor_sha256(tensor: torch.Tensor) -> str:
    data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(data).hexdigest()


_CALL_STATE = ("padding", "truncation")


def model_fingerprint(pipe, lora: str | os.PathLike | None = None) -> str:
    """sha256 of what a pipeline's images depend on: the pipeline's class; for each component (by name) its class,
    its configuration (:func:`_config_of`), a LoRA's peft configuration, and every ``state_dict`` tensor (sorted by
    name: name, dtype, shape and the sha256 of its bytes); the tokenizer's vocabulary, special tokens and its
    tokenizers-library serialisation (merges, normaliser) or BPE merges; the scheduler's class and configuration;
    and the sha256 of the LoRA file, when one was applied.

    Up to 8 tensors are hashed at once (hashlib releases the GIL; a GPU tensor is copied to the CPU for it). Cost:
    about 0.04 s for the demo model (17 MB); sha256 runs at about 1.3 GB/s per core, so a few seconds for Stable
    Diffusion 1.x in float32 (4.3 GB).
    """
    entries: list[tuple[str, object]] = [("pipeline", type(pipe).__name__)]
    tensors: list[tuple[str, torch.Tensor]] = []
    for name, component in sorted(pipe.components.items()):
        entries.append((f"{name}.class", None if component is None else type(component).__name__))
        if component is None:
            continue
        entries.append((f"{name}.config", _config_of(component)))
        if isinstance(component, torch.nn.Module):
            peft_config = getattr(component, "peft_config", None) or {}
            entries.append((f"{name}.peft", {k: v.to_dict() for k, v in sorted(peft_config.items())}))
            state = component.state_dict()
            tensors += [(f"{name}.{key}", state[key]) for key in sorted(state)]
        if hasattr(component, "get_vocab"):  # a tokenizer: its vocabulary, merges and special tokens
            entries.append((f"{name}.vocab", sorted(component.get_vocab().items())))
            backend = getattr(component, "backend_tokenizer", None)  # a tokenizers-backed one: merges, normalizer
            merges = getattr(component, "bpe_ranks", None)  # a pure-Python one
            if backend is not None:  # without the padding and truncation the last call left (the pipeline sets them)
                serialised = json.loads(backend.to_str())
                entries.append((f"{name}.backend", {k: v for k, v in serialised.items() if k not in _CALL_STATE}))
            elif merges:
                entries.append((f"{name}.merges", sorted(merges.items(), key=lambda item: item[1])))
            entries.append((f"{name}.special", component.special_tokens_map))
            entries.append((f"{name}.model_max_length", component.model_max_length))
    if lora is not None:
        entries.append(("lora_sha256", file_sha256(lora)))
    digest = hashlib.sha256()
    for label, value in entries:
        digest.update(label.encode() + b"=" + _canonical(value) + b"\n")
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        hashes = pool.map(_tensor_sha256, (tensor for _, tensor in tensors))
        for (label, tensor), tensor_hash in zip(tensors, hashes):
            digest.update(f"{label}:{tensor.dtype}:{list(tensor.shape)}:{tensor_hash}\n".encode())
    return digest.hexdigest()


def device_identity(device: str | torch.device) -> dict:
    """What about the device shapes an image's float rounding: its kind; a GPU's name, CUDA and cuDNN versions and
    TF32 switches; a CPU's instruction set as torch uses it."""
    device = torch.device(device)
    identity: dict = {"type": device.type, "float32_matmul_precision": torch.get_float32_matmul_precision()}
    if device.type == "cuda":
        identity.update(
            name=torch.cuda.get_device_name(device),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
            tf32_cudnn=torch.backends.cudnn.allow_tf32,
            reduced_precision_reduction=torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction,
        )
    elif device.type == "cpu":
        identity["capability"] = torch.backends.cpu.get_cpu_capability()
    return identity


class ImageCache:
    """Generated PNGs under ``folder/<key[:2]>/<key>.png``, keyed by what makes an image (see the module's
    docstring). Reads check that an entry is a complete PNG of the expected size (a torn or foreign file is removed
    and counts as a miss); writes are atomic; a folder that cannot be read or written costs a warning, never the
    evaluation.

        cache = ImageCache.for_pipeline(pipe, lora=spec.lora)   # folder: default_cache_dir()
        generate_images(pipe, prompt_set, out, settings, model=protocol, cache=cache)
    """

    def __init__(self, folder: str | os.PathLike, model_fingerprint: str, environment: dict) -> None:
        self.folder = Path(folder).expanduser()
        self.model_fingerprint = model_fingerprint
        self.environment = environment
        self._writable = True

    @classmethod
    def for_pipeline(
        cls, pipe, *, lora: str | os.PathLike | None = None, folder: str | os.PathLike | None = None
    ) -> ImageCache:
        """The cache for ``pipe`` as loaded (weights, LoRA, scheduler, dtype) on its device."""
        environment = {"device": device_identity(pipe.device), "libraries": library_versions(CACHE_LIBRARIES)}
        return cls(default_cache_dir() if folder is None else folder, model_fingerprint(pipe, lora), environment)

    def key(self, call: dict, seeds: Sequence[int], position: int, dtype: str) -> str:
        """The key of image ``position`` of the pipeline call ``call`` (its exact keyword arguments but the
        generators, which are CPU generators seeded with ``seeds``)."""
        material = {
            "format": CACHE_FORMAT,
            "model": self.model_fingerprint,
            "environment": self.environment,
            "dtype": dtype,
            "call": call,
            "generators": {"device": "cpu", "seeds": list(seeds)},
            "position": position,
        }
        return hashlib.sha256(_canonical(material)).hexdigest()

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.png"

    def read(self, key: str, width: int, height: int) -> bytes | None:
        """The PNG stored under ``key`` when it is a complete RGB PNG of ``width`` x ``height``; else None (a damaged
        entry is removed)."""
        path = self.path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as error:
            logger.warning("image cache: cannot read %s (%s); making the image", path, _first_line(error))
            return None
        if _is_png(data, width, height):
            return data
        logger.warning("image cache: %s is damaged or not ours; removing it and making the image again", path)
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass
        return None

    def write(self, key: str, data: bytes) -> None:
        """Store ``data`` (a PNG this module encoded) under ``key``, atomically; a failure turns writes off."""
        if not self._writable:
            return
        path = self.path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(path, data)
        except OSError as error:
            self._writable = False
            logger.warning(
                "image cache: cannot write %s (%s); images are not cached in this run (set %s to a writable "
                "folder, or pass --no_image_cache)",
                path,
                _first_line(error),
                CACHE_ENV,
            )


def _is_png(data: bytes, width: int, height: int) -> bool:
    """Whether ``data`` is one complete RGB PNG of ``width`` x ``height`` that decodes."""
    if not (data.startswith(_PNG_SIGNATURE) and data.endswith(_PNG_END)):
        return False
    try:
        with Image.open(BytesIO(data), formats=["PNG"]) as image:
            if image.size != (width, height) or image.mode != "RGB":
                return False
            image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return False
    return True


def png_bytes(image) -> bytes:
    """``image`` encoded as PNG, as :func:`save_png_atomic` writes it."""
    buffer = BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def native_resolution(pipe) -> int:
    """The family's native size (:meth:`munba_diffusion.diffusion.family.ModelFamily.native_resolution`); the
    UNet's sample size times the VAE's scale for a pipeline no family covers."""
    try:
        return family_of_pipeline(pipe).native_resolution(pipe)
    except ValueError:
        return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


def image_settings(record: PromptRecord, settings: GenerationSettings, default_size: int) -> tuple[float, int, int]:
    """(guidance, height, width) for one record."""
    guidance, size = settings.guidance_scale, settings.resolution or default_size
    height = width = size
    if settings.use_prompt_settings:
        guidance = record.guidance_scale if record.guidance_scale is not None else guidance
        height, width = record.height or height, record.width or width
    return guidance, height, width


def image_file_name(record: PromptRecord) -> str:
    return f"{record.index:05d}_{record.seed}.png"


def save_png_atomic(image, path: Path) -> None:
    """Put one generated image into place atomically (its own function, so that tests can interrupt a run here);
    the bytes are those the image cache stores (:func:`png_bytes`)."""
    write_bytes_atomic(path, png_bytes(image))


def _append_line(path: Path, record: dict) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _existing_records(output_dir: Path) -> list[dict]:
    """Manifest records of images that exist (merged manifest and leftover parts of an interrupted run)."""
    by_file: dict[str, dict] = {}
    for path in [output_dir / MANIFEST_NAME, *sorted(output_dir.glob(_PART_GLOB))]:
        if path.is_file():
            by_file.update({r["file"]: r for r in read_manifest(path)})
    return [r for r in by_file.values() if (output_dir / r["file"]).is_file()]


def _clear_generation(output_dir: Path) -> None:
    """Remove what an earlier generation wrote here (its listed images, manifests, run config), nothing else."""
    for record in _existing_records(output_dir):
        (output_dir / record["file"]).unlink(missing_ok=True)
    for path in [output_dir / MANIFEST_NAME, output_dir / RUN_CONFIG_NAME, *output_dir.glob(_PART_GLOB)]:
        path.unlink(missing_ok=True)


def _prepare_output(output_dir: Path, run_config: dict, overwrite: bool) -> None:
    """Check the folder holds the same run (or clear it when ``overwrite``), then merge what is already made."""
    config_path = output_dir / RUN_CONFIG_NAME
    if config_path.is_file():
        previous = json.loads(config_path.read_text(encoding="utf-8"))
        if previous != run_config:
            if not overwrite:
                changed = sorted(k for k in run_config if previous.get(k) != run_config[k])
                raise FileExistsError(
                    f"{output_dir} holds images of another run (differs in {', '.join(changed)}); "
                    "pass --overwrite (overwrite=True) to replace them"
                )
            _clear_generation(output_dir)
    elif any(output_dir.iterdir()):
        raise FileExistsError(
            f"{output_dir} is not empty and has no {RUN_CONFIG_NAME}; generate into a new or empty folder"
        )
    for leftover in output_dir.glob(TEMPORARY_GLOB):
        leftover.unlink()
    write_jsonl_atomic(output_dir / MANIFEST_NAME, sorted(_existing_records(output_dir), key=lambda r: r["index"]))
    for part in output_dir.glob(_PART_GLOB):
        part.unlink()
    write_json_atomic(config_path, run_config, sort_keys=True)


def generate_images(
    pipe,
    prompt_set: PromptSet,
    output_dir: str | Path,
    settings: GenerationSettings,
    *,
    model: dict,
    overwrite: bool = False,
    cache: ImageCache | None = None,
) -> Path:
    """Make one image per record of ``prompt_set`` into ``output_dir``; return the path of ``manifest.jsonl``.

    ``model`` is the model's protocol dict (see :func:`model_protocol`); it is written into every manifest line
    and into ``generation.json``, which ties the folder to one (model, prompt set, settings) run. With ``cache``
    (:meth:`ImageCache.for_pipeline` of ``pipe``), a batch whose missing images are all in the cache is copied
    from it, and every image made is stored in it.
    """
    state = process_state()
    output_dir = Path(output_dir)
    default_size = native_resolution(pipe)
    image_settings_only = {
        k: v for k, v in asdict(settings).items() if k != "batch_size"
    }  # batching changes at most float rounding: a folder's images stay valid under another batch size
    run_config = {"model": model, "prompt_set": prompt_set.protocol(), "settings": image_settings_only}
    if state.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        _prepare_output(output_dir, run_config, overwrite)
    state.wait_for_everyone()
    done = {r["file"] for r in read_manifest(output_dir / MANIFEST_NAME)}
    batches = [  # cut from the whole set, so that an image's batch never depends on what is left to make
        (key, group[start : start + settings.batch_size])
        for key, rows in groupby(prompt_set.records, key=lambda r: image_settings(r, settings, default_size))
        for group in [list(rows)]
        for start in range(0, len(group), settings.batch_size)
    ]
    pending = [(key, batch) for key, batch in batches if any(image_file_name(r) not in done for r in batch)]

    part = output_dir / f"manifest.part-{state.process_index}.jsonl"
    with state.split_between_processes(pending) as mine:
        progress = tqdm(
            total=sum(len(batch) for _, batch in mine),
            desc=f"generating {model['label']}",
            disable=not state.is_local_main_process,
        )
        for key, batch in mine:
            _make_batch(pipe, batch, key, settings, output_dir, part, model, done, cache)
            progress.update(len(batch))
        progress.close()
    state.wait_for_everyone()
    if state.is_main_process:
        write_jsonl_atomic(output_dir / MANIFEST_NAME, sorted(_existing_records(output_dir), key=lambda r: r["index"]))
        for path in output_dir.glob(_PART_GLOB):
            path.unlink()
    state.wait_for_everyone()
    return output_dir / MANIFEST_NAME


def _make_batch(
    pipe,
    records: Sequence[PromptRecord],
    image_key: tuple[float, int, int],
    settings: GenerationSettings,
    output_dir: Path,
    part: Path,
    model: dict,
    done: set[str],
    cache: ImageCache | None,
) -> None:
    """Put the images of ``records`` (one batch) that are not ``done`` into ``output_dir``: copied from the cache
    when all of them are there, else made by one pipeline call on the whole batch (and stored in the cache)."""
    guidance, height, width = image_key
    call = {
        "prompt": [r.prompt for r in records],
        "num_inference_steps": settings.num_inference_steps,
        "guidance_scale": guidance,
        "height": height,
        "width": width,
        "output_type": "pil",
        **family_of_pipeline(pipe).call_options(pipe),
    }
    seeds = [r.seed for r in records]
    keys = [cache.key(call, seeds, i, settings.dtype) if cache else None for i in range(len(records))]
    wanted = [i for i, r in enumerate(records) if image_file_name(r) not in done]
    cached = {}
    if cache is not None:
        for i in wanted:
            data = cache.read(keys[i], width, height)
            if data is None:
                break
            cached[i] = data
    if cache is not None and len(cached) == len(wanted):
        for i in wanted:
            write_bytes_atomic(output_dir / image_file_name(records[i]), cached[i])
            _append_line(part, _manifest_line(records[i], image_key, settings, model, keys[i], from_cache=True))
        return
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    images = pipe(**call, generator=generators).images
    for i, (record, image) in enumerate(zip(records, images)):
        if cache is not None:
            cache.write(keys[i], png_bytes(image))
        if i in wanted:
            save_png_atomic(image, output_dir / image_file_name(record))
            _append_line(part, _manifest_line(record, image_key, settings, model, keys[i], from_cache=False))


def _manifest_line(
    record: PromptRecord,
    image_key: tuple[float, int, int],
    settings: GenerationSettings,
    model: dict,
    cache_key: str | None,
    *,
    from_cache: bool,
) -> dict:
    guidance, height, width = image_key
    return {
        "index": record.index,
        "file": image_file_name(record),
        "prompt": record.prompt,
        "seed": record.seed,
        "model": model["label"],
        "extra": dict(record.extra),
        "settings": {
            "num_inference_steps": settings.num_inference_steps,
            "guidance_scale": guidance,
            "height": height,
            "width": width,
            "scheduler": model["scheduler"],
            "dtype": settings.dtype,
        },
        "cache_key": cache_key,
        "from_cache": from_cache,
    }
