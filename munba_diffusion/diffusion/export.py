"""Write an erased model folder: fused pipeline, LoRA, munba.py, erasure_config.json, model card, images.

Layout of ``output_dir`` (see ``pipelines/munba.py`` for how it loads)::

    model_index.json                    _class_name "StableDiffusionPipeline" + "erasure" entry
    unet/ vae/ text_encoder/ tokenizer/ scheduler/ (safety_checker/ feature_extractor/)   LoRA fused into unet
    munba.py                            the MunbaPipeline file, for custom_pipeline="munba"
    pytorch_lora_weights.safetensors    diffusers-format LoRA with peft adapter metadata
    erasure_config.json                 ErasureConfig + library versions
    README.md                           Hub model card
    images/                             before_after.png, widget_<i>.png

The folder appears at once: everything is written into a hidden staging folder beside ``output_dir`` and renamed
into place. Entries of an existing ``output_dir`` that are not results (training checkpoints, logs) are kept.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from huggingface_hub import ModelCard, ModelCardData, create_repo, upload_folder
from peft.utils import get_peft_model_state_dict
from PIL import Image

from munba_diffusion.pipelines.munba import (
    ERASURE_CONFIG_NAME,
    LORA_WEIGHT_NAME,
    PIPELINE_FILE_NAME,
    MunbaPipeline,
)

RESULT_MARKERS = ("model_index.json", LORA_WEIGHT_NAME, ERASURE_CONFIG_NAME)
"""Files whose presence means a folder already holds an erased model."""

RESULT_NAMES = frozenset(
    {
        *RESULT_MARKERS,
        PIPELINE_FILE_NAME,
        "README.md",
        "images",
        "unet",
        "vae",
        "text_encoder",
        "tokenizer",
        "scheduler",
        "safety_checker",
        "feature_extractor",
        "image_encoder",
    }
)
"""Every top-level entry an export may write; anything else in output_dir (checkpoints, logs) is kept."""

CARD_TAGS = ("stable-diffusion", "diffusers", "text-to-image", "lora", "concept-erasure", "munba")
SD1_LICENSE = "creativeml-openrail-m"
PROMPTS_SHOWN_PER_CONCEPT = 5
LIBRARIES_RECORDED = ("munba-diffusion", "torch", "diffusers", "transformers", "peft", "accelerate", "huggingface_hub")


@dataclass
class ConceptSpec:
    """One erased concept and the prompts that defined it for training."""

    name: str
    forget_prompts: list[str]
    preserve_prompts: list[str] = field(default_factory=list)
    anchor: str | None = None  # prompt the forget loss steers the concept towards ("" = unconditional)


@dataclass
class LoraSpec:
    """The LoRA that was trained: delta W = (alpha / rank) B A on each target module."""

    rank: int
    alpha: float
    target_modules: str | list[str]  # exactly as given to peft.LoraConfig (a regex or module names)
    preset: str | None = None  # name of the target preset, e.g. "xattn"


@dataclass
class TrainingSpec:
    """Training hyperparameters, named like the diffusers training-script arguments."""

    max_train_steps: int
    learning_rate: float
    train_batch_size: int
    seed: int
    resolution: int
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class ErasureConfig:
    """What was erased and how; the trainer fills it, export writes it as erasure_config.json.

    `loss` names the forget loss (e.g. "esd", "anchor") and `combiner` the bargaining rule that combined the
    players' gradients (e.g. "nash"). `license` is the model-card license; None means creativeml-openrail-m
    for Stable Diffusion 1.x bases (recognised by "stable-diffusion-v1" in `base_model`) and "other" otherwise.
    `extra` holds any further JSON values the trainer wants recorded; `versions` is filled at export.
    """

    base_model: str
    concepts: list[ConceptSpec]
    loss: str
    combiner: str
    lora: LoraSpec
    training: TrainingSpec
    revision: str | None = None
    variant: str | None = None
    license: str | None = None
    created: str = field(default_factory=_utc_now)  # ISO 8601, UTC
    extra: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)

    @property
    def concept_names(self) -> list[str]:
        return [concept.name for concept in self.concepts]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ErasureConfig:
        """Build from a plain dict (as the trainer writes it or as read from erasure_config.json), checked."""
        values = _checked_keys(cls, data, "erasure_config")
        values["concepts"] = [_as_spec(ConceptSpec, item, "erasure_config concept") for item in values["concepts"]]
        values["lora"] = _as_spec(LoraSpec, values["lora"], "erasure_config lora")
        values["training"] = _as_spec(TrainingSpec, values["training"], "erasure_config training")
        return cls(**values)

    def __post_init__(self) -> None:
        names = self.concept_names
        if not names or not all(isinstance(name, str) and name.strip() for name in names):
            raise ValueError(f"erasure_config needs at least one concept with a non-empty name, got {names!r}.")
        if len(set(names)) != len(names):
            raise ValueError(f"erasure_config concept names must be unique, got {names!r}.")
        try:
            json.dumps(self.to_dict())
        except TypeError as error:
            raise ValueError(
                f"erasure_config holds a value JSON cannot store ({error}); use str/number/list/dict."
            ) from None


def _checked_keys(spec_class: type, data: Mapping[str, Any], where: str) -> dict[str, Any]:
    """`data` as a dict, or a one-line ValueError naming unknown or missing keys."""
    known = {spec_field.name for spec_field in fields(spec_class)}
    required = {
        spec_field.name
        for spec_field in fields(spec_class)
        if spec_field.default is MISSING and spec_field.default_factory is MISSING
    }
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(
            f"{where} has unknown keys {unknown}; known keys are {sorted(known)} (extras go under 'extra')."
        )
    missing = sorted(required - set(data))
    if missing:
        raise ValueError(f"{where} misses keys {missing}; the trainer must fill them.")
    return dict(data)


def _as_spec(spec_class: type, value: Any, where: str) -> Any:
    if isinstance(value, spec_class):
        return value
    if not isinstance(value, Mapping):
        raise ValueError(f"{where} must be a dict with keys {[f.name for f in fields(spec_class)]}, got {value!r}.")
    return spec_class(**_checked_keys(spec_class, value, where))


def check_output_dir(output_dir: str | Path, overwrite_output_dir: bool = False) -> Path:
    """Refuse (one-line FileExistsError) an output_dir that already holds an erased model, unless overwriting.

    Call it before training too, so a run does not fail only at its end.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"--output_dir {output_dir} is a file; pass a folder.")
    found = [name for name in RESULT_MARKERS if (output_dir / name).exists()]
    if found and not overwrite_output_dir:
        raise FileExistsError(
            f"{output_dir} already holds results ({', '.join(found)}); pass --overwrite_output_dir "
            "(overwrite_output_dir=True) to replace them, or choose another --output_dir."
        )
    return output_dir


def export_erased_model(
    pipeline: StableDiffusionPipeline,
    output_dir: str | Path,
    erasure_config: ErasureConfig | Mapping[str, Any],
    *,
    before_after: Image.Image | None = None,
    evaluation_markdown: str | None = None,
    widget_images: Sequence[tuple[str, Image.Image]] = (),
    hub_model_id: str | None = None,
    overwrite_output_dir: bool = False,
) -> Path:
    """Write the erased model folder for `pipeline`, whose UNet carries the trained peft LoRA adapter.

    The LoRA is fused into a copy of the UNet, so the caller's UNet keeps its adapter and weights (this needs
    memory for one more UNet). `widget_images` are (prompt, image) pairs shown on the model card;
    `evaluation_markdown` becomes its Evaluation section; `hub_model_id` names the repo in its code examples.
    Returns `output_dir`.
    """
    config = erasure_config if isinstance(erasure_config, ErasureConfig) else ErasureConfig.from_dict(erasure_config)
    output_dir = check_output_dir(output_dir, overwrite_output_dir)
    adapter_name = _single_adapter_name(pipeline)
    _check_lora_spec(config.lora, pipeline.unet.peft_config[adapter_name])
    config = replace(config, versions=library_versions())
    with _staged_output_dir(output_dir) as staging:
        _save_fused_pipeline(pipeline, adapter_name, config, staging)
        _save_lora(pipeline, adapter_name, staging)
        (staging / ERASURE_CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=2) + "\n", encoding="utf-8")
        widget = _save_images(staging, before_after, widget_images)
        card = erased_model_card(
            config,
            widget=widget,
            has_before_after=before_after is not None,
            evaluation_markdown=evaluation_markdown,
            model_id=hub_model_id or output_dir.name,
        )
        card.save(staging / "README.md")
    return output_dir


def rewrite_model_card(output_dir: str | Path, *, evaluation_markdown: str | None, hub_model_id: str | None = None) -> Path:
    """Rebuild the README.md model card of an exported folder (e.g. once its evaluation has run), atomically."""
    output_dir = Path(output_dir)
    config = ErasureConfig.from_dict(json.loads((output_dir / ERASURE_CONFIG_NAME).read_text(encoding="utf-8")))
    old = ModelCard.load(output_dir / "README.md")
    card = erased_model_card(
        config,
        widget=old.data.widget or (),
        has_before_after=(output_dir / "images" / "before_after.png").is_file(),
        evaluation_markdown=evaluation_markdown,
        model_id=hub_model_id or output_dir.name,
    )
    tmp = output_dir / "README.md.tmp"
    card.save(tmp)
    os.replace(tmp, output_dir / "README.md")
    return output_dir / "README.md"


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that shaped the exported model."""
    versions = {}
    for name in LIBRARIES_RECORDED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _single_adapter_name(pipeline: StableDiffusionPipeline) -> str:
    adapters = list(getattr(pipeline.unet, "peft_config", {}) or {})
    if len(adapters) != 1:
        raise ValueError(
            f"export needs exactly one LoRA adapter on pipeline.unet, found {adapters}; attach the trained one "
            "with unet.add_adapter(LoraConfig(...))."
        )
    if getattr(pipeline.text_encoder, "peft_config", None):
        raise ValueError("export supports a UNet LoRA only; the text encoder carries adapters too.")
    return adapters[0]


def _check_lora_spec(spec: LoraSpec, peft_config: Any) -> None:
    """The card and erasure_config.json must describe the adapter that is actually saved."""
    targets = peft_config.target_modules
    expected_targets = spec.target_modules if isinstance(spec.target_modules, str) else set(spec.target_modules)
    actual = (peft_config.r, float(peft_config.lora_alpha), targets if isinstance(targets, str) else set(targets))
    if actual != (spec.rank, float(spec.alpha), expected_targets):
        raise ValueError(
            f"erasure_config lora (rank={spec.rank}, alpha={spec.alpha}, targets={spec.target_modules!r}) does not "
            f"match the UNet adapter (r={actual[0]}, lora_alpha={actual[1]}, targets={targets!r}); fill it from "
            "the LoraConfig you trained."
        )


def _save_fused_pipeline(
    pipeline: StableDiffusionPipeline, adapter_name: str, config: ErasureConfig, directory: Path
) -> None:
    """Save the pipeline with the LoRA fused into a copy of the UNet, as a MunbaPipeline folder."""
    fused_unet = copy.deepcopy(pipeline.unet)
    fused_unet.fuse_lora(lora_scale=1.0, adapter_names=[adapter_name])
    fused_unet.unload_lora()
    erased = MunbaPipeline(
        vae=pipeline.vae,
        text_encoder=pipeline.text_encoder,
        tokenizer=pipeline.tokenizer,
        unet=fused_unet,
        scheduler=pipeline.scheduler,
        safety_checker=pipeline.safety_checker,
        feature_extractor=pipeline.feature_extractor,
        image_encoder=pipeline.image_encoder,
        requires_safety_checker=pipeline.config.requires_safety_checker,
        erasure={
            "concepts": config.concept_names,
            "fused": True,
            "lora_weight_name": LORA_WEIGHT_NAME,
            "base_model": config.base_model,
        },
    )
    erased.save_pretrained(directory)  # keeps _class_name "StableDiffusionPipeline" and writes munba.py


def _save_lora(pipeline: StableDiffusionPipeline, adapter_name: str, directory: Path) -> None:
    unet = pipeline.unet
    lora_state = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    StableDiffusionPipeline.save_lora_weights(
        directory,
        unet_lora_layers=convert_state_dict_to_diffusers(lora_state),
        unet_lora_adapter_metadata=unet.peft_config[adapter_name].to_dict(),
        weight_name=LORA_WEIGHT_NAME,
        safe_serialization=True,
    )


def _save_images(
    directory: Path, before_after: Image.Image | None, widget_images: Sequence[tuple[str, Image.Image]]
) -> list[dict[str, Any]]:
    """Write images/ and return the model card's widget entries."""
    images_dir = directory / "images"
    if before_after is None and not widget_images:
        return []
    images_dir.mkdir()
    if before_after is not None:
        before_after.save(images_dir / "before_after.png")
    widget = []
    for index, (prompt, image) in enumerate(widget_images):
        image.save(images_dir / f"widget_{index}.png")
        widget.append({"text": prompt, "output": {"url": f"images/widget_{index}.png"}})
    return widget


@contextmanager
def _staged_output_dir(output_dir: Path) -> Iterator[Path]:
    """Yield a staging folder beside `output_dir`; on success it becomes `output_dir` in one rename.

    Entries of an existing `output_dir` that an export does not write (RESULT_NAMES) are moved over first;
    old results are discarded only after the new folder is in place. On any failure nothing changes.
    """
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.staging-", dir=output_dir.parent))
    try:
        yield staging
        if output_dir.exists():
            _replace_dir_keeping_foreign_entries(staging, output_dir)
        else:
            os.replace(staging, output_dir)
    finally:
        _discard_staging(staging)


def _discard_staging(staging: Path) -> None:
    """Remove a leftover staging folder, unless a failed rollback left user entries in it."""
    if not staging.exists():
        return
    if any(entry.name not in RESULT_NAMES for entry in staging.iterdir()):
        raise RuntimeError(f"export failed while moving files; your other files are in {staging}, move them back.")
    shutil.rmtree(staging)


def _replace_dir_keeping_foreign_entries(staging: Path, output_dir: Path) -> None:
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


def _is_hub_repo_id(name: str) -> bool:
    return re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None and not Path(name).exists()


def _card_license(config: ErasureConfig) -> str:
    if config.license:
        return config.license
    return SD1_LICENSE if re.search(r"stable-diffusion-v1", config.base_model, re.IGNORECASE) else "other"


def _table_cell(text: str | None) -> str:
    return "" if text is None else text.replace("|", "\\|").replace("\n", " ")


def _prompt_list(prompts: list[str]) -> str:
    shown = "; ".join(f"`{_table_cell(prompt)}`" for prompt in prompts[:PROMPTS_SHOWN_PER_CONCEPT])
    hidden = len(prompts) - PROMPTS_SHOWN_PER_CONCEPT
    return shown + (f" and {hidden} more" if hidden > 0 else "")


def erased_model_card(
    config: ErasureConfig,
    *,
    widget: Sequence[dict[str, Any]] = (),
    has_before_after: bool = False,
    evaluation_markdown: str | None = None,
    model_id: str = "path/to/erased-model",
) -> ModelCard:
    """The Hub model card (README.md) of an erased model folder, built offline."""
    base_model_on_hub = _is_hub_repo_id(config.base_model)
    card_data = ModelCardData(
        library_name="diffusers",
        pipeline_tag="text-to-image",
        license=_card_license(config),
        base_model=config.base_model if base_model_on_hub else None,
        base_model_relation="finetune" if base_model_on_hub else None,
        tags=list(CARD_TAGS),
        widget=list(widget) or None,
    )
    concepts = ", ".join(f"**{name}**" for name in config.concept_names)
    lora, training = config.lora, config.training
    targets = lora.target_modules if isinstance(lora.target_modules, str) else ", ".join(lora.target_modules)
    concept_rows = "\n".join(
        f"| {_table_cell(c.name)} | {_prompt_list(c.forget_prompts)} | "
        f"{'(unconditional)' if c.anchor == '' else _table_cell(c.anchor)} | {_prompt_list(c.preserve_prompts)} |"
        for c in config.concepts
    )
    base_line = f"`{config.base_model}`" + (f" (revision `{config.revision}`)" if config.revision else "")
    base_line += f" (variant `{config.variant}`)" if config.variant else ""
    sections = [
        f"# {model_id.rsplit('/', 1)[-1]}: {', '.join(config.concept_names)} erased from {config.base_model}",
        f"{base_line} with {concepts} erased by MUNBa (Machine Unlearning via Nash Bargaining): a LoRA trained "
        "so that prompts of the concept no longer produce it while other prompts keep their images. "
        "The LoRA is fused into this folder's UNet and also shipped on its own.",
        "![Same seeds: original model (top) and erased model (bottom)](images/before_after.png)"
        if has_before_after
        else "",
        "## What was erased\n\n| Concept | Forget prompts | Anchor | Preserve prompts |\n|---|---|---|---|\n"
        + concept_rows
        + f"\n\nAll prompts are in [`{ERASURE_CONFIG_NAME}`]({ERASURE_CONFIG_NAME}).",
        "## How it was erased\n\n"
        f"- Base model: {base_line}\n"
        f"- Forget loss: `{config.loss}`; the forget and preserve gradients were combined each step by the "
        f"`{config.combiner}` rule\n"
        f"- LoRA: rank {lora.rank}, alpha {lora.alpha}, targets `{targets}`"
        + (f" (preset `{lora.preset}`)" if lora.preset else "")
        + "\n"
        f"- Training: {training.max_train_steps} steps, learning rate {training.learning_rate}, batch size "
        f"{training.train_batch_size} x {training.gradient_accumulation_steps} accumulation, resolution "
        f"{training.resolution}, seed {training.seed}, mixed precision `{training.mixed_precision}`\n"
        f"- Created {config.created} with "
        + ", ".join(f"{name} {version}" for name, version in config.versions.items()),
        f"## Evaluation\n\n{evaluation_markdown.strip()}" if evaluation_markdown else "",
        _how_to_load(config, model_id),
        "## Limitations\n\nErasure lowers how often the concept appears; it is not a guarantee. Adversarial "
        "prompts may still recover it, and nearby concepts can change too. Check the evaluation above before "
        "relying on this model.",
    ]
    body = "\n\n".join(section for section in sections if section)
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}\n")


def _how_to_load(config: ErasureConfig, model_id: str) -> str:
    return f"""## How to load

1. As a plain Stable Diffusion pipeline (the erasure is fused into the UNet):

```python
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{model_id}")
```

2. As `MunbaPipeline`, which knows what was erased and can dial the erasure (`munba.py` ships in this folder):

```python
import torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{model_id}", custom_pipeline="munba", trust_remote_code=True)
print(pipe.erased_concepts)
pipe.erasure_scale = 0.5   # 0 = original model, 1 = erased
result = pipe.compare("a photo of {config.concept_names[0]}", seed=0)   # same-seed original vs erased
result.grid.save("compare.png")
```

With munba-diffusion installed, `from munba_diffusion import MunbaPipeline; MunbaPipeline.from_pretrained("{model_id}")`
does the same without remote code.

3. As the base model plus the erasure LoRA:

```python
from munba_diffusion import MunbaPipeline

pipe = MunbaPipeline.from_pretrained("{config.base_model}").load_erasure("{model_id}")
# or with diffusers only:
# pipe = StableDiffusionPipeline.from_pretrained("{config.base_model}")
# pipe.load_lora_weights("{model_id}", weight_name="{LORA_WEIGHT_NAME}")
```"""


def push_erased_model_to_hub(
    output_dir: str | Path, repo_id: str, token: str | None = None, private: bool = False
) -> str:
    """Upload the results of an erased model folder (not checkpoints or logs) to the Hub; returns the commit URL."""
    output_dir = Path(output_dir)
    missing = [name for name in ("model_index.json", ERASURE_CONFIG_NAME) if not (output_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{output_dir} is not an erased model folder (no {', '.join(missing)}); export it first."
        )
    model_index = json.loads((output_dir / "model_index.json").read_text(encoding="utf-8"))
    component_dirs = [name for name, value in model_index.items() if isinstance(value, list) and value[0] is not None]
    allow_patterns = [name for name in RESULT_NAMES if (output_dir / name).is_file()]
    allow_patterns += [f"{name}/*" for name in [*component_dirs, "images"]]
    repo_id = create_repo(repo_id, token=token, private=private, exist_ok=True).repo_id
    commit = upload_folder(
        repo_id=repo_id,
        folder_path=output_dir,
        allow_patterns=allow_patterns,
        token=token,
        commit_message="Upload MUNBa erased model",
    )
    return commit.commit_url
