"""The Hub model card (README.md) of an erased model folder, built offline from the run record."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from munba_diffusion.pipelines.munba import ERASURE_CONFIG_NAME, LORA_WEIGHT_NAME

from ...io import is_local_path, write_text_atomic

CARD_TAGS = ("stable-diffusion", "diffusers", "text-to-image", "lora", "concept-erasure", "munba")
SD1_LICENSE = "creativeml-openrail-m"
PROMPTS_SHOWN_PER_CONCEPT = 5


def card_license(record: Mapping[str, Any]) -> str:
    """The base model's own licence when it travels with it (its model card), else SD 1.x's for SD 1.x bases
    (recognised by "stable-diffusion-v1" in the id), else "other"."""
    if record.get("license"):
        return record["license"]
    base = record["pretrained_model_name_or_path"]
    return SD1_LICENSE if re.search(r"stable-diffusion-v1", base, re.IGNORECASE) else "other"


def _table_cell(text: str | None) -> str:
    return "" if text is None else text.replace("|", "\\|").replace("\n", " ")


def _prompt_list(prompts: Sequence[str]) -> str:
    shown = "; ".join(f"`{_table_cell(prompt)}`" for prompt in prompts[:PROMPTS_SHOWN_PER_CONCEPT])
    hidden = len(prompts) - PROMPTS_SHOWN_PER_CONCEPT
    return shown + (f" and {hidden} more" if hidden > 0 else "")


def _anchor_cell(anchor_prompts: Sequence[str]) -> str:
    anchors = sorted(set(anchor_prompts))
    if anchors == [""]:
        return "(unconditional)"
    return _prompt_list(anchors)


def erased_model_card(
    record: Mapping[str, Any],
    *,
    widget: Sequence[dict[str, Any]] = (),
    has_before_after: bool = False,
    evaluation_markdown: str | None = None,
    model_id: str = "path/to/erased-model",
) -> ModelCard:
    """The model card of the erased model that ``record`` (``erasure_config.json``) describes."""
    base = record["pretrained_model_name_or_path"]
    base_on_hub = not is_local_path(base) and "/" in base
    card_data = ModelCardData(
        library_name="diffusers",
        pipeline_tag="text-to-image",
        license=card_license(record),
        base_model=base if base_on_hub else None,
        base_model_relation="finetune" if base_on_hub else None,
        tags=list(CARD_TAGS),
        widget=list(widget) or None,
    )
    names = [concept["name"] for concept in record["concepts"]]
    concept_rows = "\n".join(
        f"| {_table_cell(c['name'])} | {_prompt_list(c['forget_prompts'])} | {_anchor_cell(c['anchor_prompts'])} | "
        f"{_prompt_list(c['preserve_prompts'])} |"
        for c in record["concepts"]
    )
    base_line = f"`{base}`" + (f" (revision `{record['revision']}`)" if record.get("revision") else "")
    base_line += f" (variant `{record['variant']}`)" if record.get("variant") else ""
    alpha = float(record["lora_alpha"] or record["rank"])
    targets = ", ".join(sorted(record["run"]["target_modules"]))
    versions = ", ".join(f"{name} {version}" for name, version in record.get("versions", {}).items())
    sections = [
        f"# {model_id.rsplit('/', 1)[-1]}: {', '.join(names)} erased from {base}",
        f"{base_line} with {', '.join(f'**{n}**' for n in names)} erased by MUNBa (Machine Unlearning via Nash "
        "Bargaining): a LoRA trained so that prompts of the concept no longer produce it while other prompts keep "
        "their images. The LoRA is fused into this folder's UNet and also shipped on its own.",
        "![Same seeds: original model (top) and erased model (bottom)](images/before_after.png)"
        if has_before_after
        else "",
        "## What was erased\n\n| Concept | Forget prompts | Anchor | Preserve prompts |\n|---|---|---|---|\n"
        + concept_rows
        + f"\n\nAll prompts are in [`{ERASURE_CONFIG_NAME}`]({ERASURE_CONFIG_NAME}).",
        "## How it was erased\n\n"
        f"- Base model: {base_line}\n"
        f"- Forget loss: `{record['forget_loss']}`; the forget and preserve gradients were combined each step by "
        f"the `{record['combiner']}` rule\n"
        f"- LoRA: rank {record['rank']}, alpha {alpha}, target set `{record['lora_target']}` ({targets})\n"
        f"- Training: {record['max_train_steps']} steps, learning rate {record['learning_rate']}, batch size "
        f"{record['train_batch_size']} x {record['gradient_accumulation_steps']} accumulation, resolution "
        f"{record['run']['resolution']}, seed {record['seed']}, mixed precision `{record['mixed_precision']}`\n"
        f"- Created {record.get('created', '')} with {versions}",
        f"## Evaluation\n\n{evaluation_markdown.strip()}" if evaluation_markdown else "",
        _how_to_load(base, names[0], model_id),
        "## Limitations\n\nErasure lowers how often the concept appears; it is not a guarantee. Adversarial "
        "prompts may still recover it, and nearby concepts can change too. Check the evaluation above before "
        "relying on this model.",
    ]
    body = "\n\n".join(section for section in sections if section)
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}\n")


def write_model_card(directory: Path, card: ModelCard) -> Path:
    """Write ``card`` as ``directory/README.md`` atomically."""
    path = Path(directory) / "README.md"
    write_text_atomic(path, str(card))
    return path


def _how_to_load(base: str, concept: str, model_id: str) -> str:
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
result = pipe.compare("a photo of {concept}", seed=0)   # same-seed original vs erased
result.grid.save("compare.png")
```

With munba-diffusion installed, `from munba_diffusion import MunbaPipeline; MunbaPipeline.from_pretrained("{model_id}")`
does the same without remote code.

3. As the base model plus the erasure LoRA:

```python
from munba_diffusion import MunbaPipeline

pipe = MunbaPipeline.from_pretrained("{base}").load_erasure("{model_id}")
# or with diffusers (and peft) only:
# pipe = StableDiffusionPipeline.from_pretrained("{base}")
# pipe.load_lora_weights("{model_id}", weight_name="{LORA_WEIGHT_NAME}")
```"""
