"""The Hub model card (README.md) of an erased model folder, built offline from the run record and the
evaluation reports (``evaluation/<concept>/report.json``), whose numbers become the card's ``model-index``."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from munba_diffusion.app import APP_FILE_NAME, MODEL_ENV
from munba_diffusion.pipelines.munba import (
    ERASURE_CONFIG_NAME,
    ERASURE_FILE_NAME,
    KOHYA_LORA_WEIGHT_NAME,
    LORA_WEIGHT_NAME,
    PIPELINE_FILE_NAME,
)

from ...io import is_local_path, write_text_atomic

CARD_TAGS = ("stable-diffusion", "diffusers", "text-to-image", "lora", "concept-erasure", "munba")
SD1_LICENSE = "creativeml-openrail-m"
PROMPTS_SHOWN_PER_CONCEPT = 5
EVALUATION_DIR = "evaluation"
REPORT_JSON = "report.json"
ERASED_LABEL = "erased"
"""The label of the erased model in the end-of-run evaluation's reports (the other one is the original)."""
METRIC_NAMES = {
    "concept_rate": "Concept rate",
    "kept_attribute_accuracy": "Kept-attribute accuracy",
    "other_accuracy": "Accuracy on other prompts",
    "judge_kid_other": "Judge KID (other prompts)",
    "judge_kid_other_renders": "Judge KID of fresh renders (baseline)",
    "judge_fid_other": "Judge FID (other prompts)",
    "clip_score_concept": "CLIP score (concept prompts)",
    "clip_score_other": "CLIP score (other prompts)",
    "nudity_rate": "Nudity rate",
    "attack_success_rate": "Attack success rate",
    "unlearning_accuracy": "Unlearning accuracy (erased class)",
    "accuracy": "Accuracy",
    "fid": "FID",
    "clip_score": "CLIP score",
}
"""Readable names of the usual metrics; any other number of a report is named after its key."""
FAMILY_LAYOUTS = {  # family (as the record's run.family begins) -> (Munba class, stock class, component folders)
    "Stable Diffusion XL": (
        "MunbaXLPipeline",
        "StableDiffusionXLPipeline",
        "`unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `text_encoder_2/`, `tokenizer_2/`",
    ),
    "Stable Diffusion 3": (
        "MunbaSD3Pipeline",
        "StableDiffusion3Pipeline",
        "`transformer/`, `vae/`, `text_encoder/`, `tokenizer/`, `text_encoder_2/`, `tokenizer_2/`, `text_encoder_3/`, "
        "`tokenizer_3/` (T5; absent, and null in `model_index.json`, for a model without T5)",
    ),
    "FLUX": (
        "MunbaFluxPipeline",
        "FluxPipeline",
        "`transformer/`, `vae/`, `text_encoder/`, `tokenizer/`, `text_encoder_2/`, `tokenizer_2/` (T5)",
    ),
}
SD_LAYOUT = ("MunbaPipeline", "StableDiffusionPipeline", "`unet/`, `vae/`, `text_encoder/`, `tokenizer/`")
"""SD 1.x / 2.x (and a record that does not name its family)."""
RATE_COMPANIONS = ("_ci95", "_n")
"""How report.json carries a rate K's uncertainty: ``K_ci95`` = [low, high] (95% Wilson interval) and ``K_n`` = its
image count (written by ``munba_diffusion.evaluation.intervals.rate_fields``; read here, a layer below, by name)."""


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


def _replaced_by(concept: dict[str, Any], record: dict[str, Any]) -> list[str]:
    """What the forget prompts were mapped to: the substitutes under ``--forget_loss substitute``, else the anchors."""
    substitutes = concept.get("substitute_prompts") or []
    if record.get("forget_loss") == "substitute" and substitutes:
        return [prompt for entry in substitutes for prompt in entry]
    return concept["anchor_prompts"]


def read_evaluation_reports(folder: str | Path) -> dict[str, dict[str, Any]]:
    """``folder/evaluation/<concept>/report.json`` of every evaluated concept, by concept ({} when none ran)."""
    reports = {}
    for path in sorted(Path(folder).glob(f"{EVALUATION_DIR}/*/{REPORT_JSON}")):
        reports[path.parent.name] = json.loads(path.read_text(encoding="utf-8"))
    return reports


def _measured(key: str, value: object, values: Mapping[str, Any]) -> bool:
    """A number the evaluation measured: not a flag, a sample size (``num_*``, a rate's ``*_n``), a rate's interval
    or a setting (``*threshold``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    companion = any(key.endswith(end) and key[: -len(end)] + RATE_COMPANIONS[0] in values for end in RATE_COMPANIONS)
    return not key.startswith("num_") and not key.endswith("threshold") and not companion


def _interval_args(values: Mapping[str, Any], key: str) -> dict[str, Any] | None:
    """``{"ci95": [low, high], "n": n}`` of a rate that carries its interval (the EvalResult's ``metric_args``)."""
    ci95, n = values.get(key + RATE_COMPANIONS[0]), values.get(key + RATE_COMPANIONS[1])
    if not isinstance(ci95, (list, tuple)) or len(ci95) != 2:
        return None
    return {"ci95": [float(v) for v in ci95], "n": n}


def evaluation_results(reports: Mapping[str, Mapping[str, Any]], model_label: str = ERASED_LABEL) -> list[EvalResult]:
    """The erased model's measured numbers in ``reports`` (concept -> report.json) as the Hub's EvalResults.

    One result per top-level number of each metric (``metric_type`` = its key in report.json, ``metric_config`` =
    the metric, the value unchanged; a rate's 95% Wilson interval and image count go into ``metric_args`` as
    ``{"ci95": [low, high], "n": n}``); the dataset is the concept's prompt set (``dataset_config`` = the concept,
    ``dataset_revision`` = the prompt set's sha256). A report whose erased model is not labelled ``model_label``
    counts only when it scored a single model. Lists, nested tables and the original model's numbers stay in
    report.json and the card's Markdown.
    """
    results = []
    for concept, report in reports.items():
        by_model = report.get("results", {})
        label = model_label if model_label in by_model else (next(iter(by_model)) if len(by_model) == 1 else None)
        if label is None:
            continue
        prompt_set = report.get("protocol", {}).get("prompt_set", {})
        prompt_file = Path(str(prompt_set.get("name") or "prompts")).stem
        size = f" ({prompt_set['size']} prompts)" if prompt_set.get("size") else ""
        for metric, values in by_model[label].items():
            for key, value in values.items() if isinstance(values, Mapping) else ():
                if not _measured(key, value, values):
                    continue
                results.append(
                    EvalResult(
                        task_type="text-to-image",
                        task_name="Concept erasure",
                        dataset_type=prompt_file,
                        dataset_name=f"{prompt_file} prompts, concept {concept}{size}",
                        dataset_config=concept,
                        dataset_revision=prompt_set.get("sha256"),
                        metric_type=key,
                        metric_value=value,
                        metric_name=METRIC_NAMES.get(key, key.replace("_", " ").capitalize()),
                        metric_config=metric,
                        metric_args=_interval_args(values, key),
                    )
                )
    return results


def erased_model_card(
    record: Mapping[str, Any],
    *,
    widget: Sequence[dict[str, Any]] = (),
    has_before_after: bool = False,
    evaluation_markdown: str | None = None,
    evaluation_reports: Mapping[str, Mapping[str, Any]] | None = None,
    model_id: str = "path/to/erased-model",
) -> ModelCard:
    """The model card of the erased model that ``record`` (``erasure_config.json``) describes.

    ``evaluation_reports`` (concept -> report.json, see :func:`read_evaluation_reports`) fill the ``model-index``
    with the erased model's numbers; ``evaluation_markdown`` is the Evaluation section's text.
    """
    base = record["pretrained_model_name_or_path"]
    base_on_hub = not is_local_path(base) and "/" in base
    eval_results = evaluation_results(evaluation_reports or {})
    card_data = ModelCardData(
        library_name="diffusers",
        pipeline_tag="text-to-image",
        license=card_license(record),
        base_model=base if base_on_hub else None,
        base_model_relation="finetune" if base_on_hub else None,
        tags=list(CARD_TAGS),
        widget=list(widget) or None,
        model_name=model_id.rsplit("/", 1)[-1] if eval_results else None,
        eval_results=eval_results or None,
    )
    names = [concept["name"] for concept in record["concepts"]]
    concept_rows = "\n".join(
        f"| {_table_cell(c['name'])} | {_prompt_list(c['forget_prompts'])} | {_anchor_cell(_replaced_by(c, record))} | "
        f"{_prompt_list(c['preserve_prompts'])} |"
        for c in record["concepts"]
    )
    base_line = f"`{base}`" + (f" (revision `{record['revision']}`)" if record.get("revision") else "")
    base_line += f" (variant `{record['variant']}`)" if record.get("variant") else ""
    commit = record["run"].get("base_commit")
    base_line += f" (commit `{commit}`)" if commit and commit != record.get("revision") else ""
    alpha = float(record["lora_alpha"] or record["rank"])
    versions = ", ".join(f"{name} {version}" for name, version in record.get("versions", {}).items())
    family = str(record["run"].get("family") or "")
    sections = [
        f"# {model_id.rsplit('/', 1)[-1]}: {', '.join(names)} erased from {base}",
        f"{base_line} with {', '.join(f'**{n}**' for n in names)} erased by MUNBa (Machine Unlearning via Nash "
        "Bargaining): a LoRA trained so that prompts of the concept no longer produce it while other prompts keep "
        "their images. The LoRA is fused into this folder's weights and also shipped on its own, for diffusers"
        + (" and for ComfyUI / AUTOMATIC1111 / Forge." if _has_kohya_file(family) else "."),
        "![Same seeds: original model (top) and erased model (bottom)](images/before_after.png)"
        if has_before_after
        else "",
        "## What was erased\n\n| Concept | Forget prompts | Anchor | Preserve prompts |\n|---|---|---|---|\n"
        + concept_rows
        + f"\n\nAll prompts are in [`{ERASURE_CONFIG_NAME}`]({ERASURE_CONFIG_NAME}).",
        "## How it was erased\n\n"
        f"- Base model: {base_line}" + (f", {record['run']['family']}" if record["run"].get("family") else "") + "\n"
        f"- Forget loss: `{record['forget_loss']}`; the forget and preserve gradients were combined each step by "
        f"the `{record['combiner']}` rule\n"
        f"- LoRA: rank {record['rank']}, alpha {alpha}, {_lora_placement(record, family)}\n"
        f"- Training: {record['max_train_steps']} steps, learning rate {record['learning_rate']}, batch size "
        f"{record['train_batch_size']} x {record['gradient_accumulation_steps']} accumulation, resolution "
        f"{record['run']['resolution']}, seed {record['seed']}, mixed precision `{record['mixed_precision']}`\n"
        f"- Created {record.get('created', '')} with {versions}",
        f"## Evaluation\n\n{evaluation_markdown.strip()}" if evaluation_markdown else "",
        _files_section(family),
        _how_to_load(base, names[0], model_id, family, base_revision=commit or record.get("revision")),
        _app_section(model_id),
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


def _layout(family: str) -> tuple[str, str, str]:
    """(Munba class, stock class, component folders) of the family the record names (``run.family``)."""
    return next((layout for name, layout in FAMILY_LAYOUTS.items() if family.startswith(name)), SD_LAYOUT)


def _has_transformer(family: str) -> bool:
    """SD3 and FLUX: the LoRA is on a transformer (no UNet, and no kohya-layout file: kohya names their modules
    differently from the diffusers paths that the kohya writer uses)."""
    return _layout(family)[1] in ("StableDiffusion3Pipeline", "FluxPipeline")


def _has_kohya_file(family: str) -> bool:
    return not _has_transformer(family)


def _lora_placement(record: Mapping[str, Any], family: str = "") -> str:
    """Where the LoRA is: the denoiser's (UNet's or transformer's) target set and modules, the text encoder's
    modules."""
    run = record["run"]
    parts = []
    denoiser = "transformer" if _has_transformer(family) else "UNet"
    if run.get("target_modules"):
        parts.append(f"{denoiser} target set `{record['lora_target']}` ({', '.join(sorted(run['target_modules']))})")
    if run.get("text_encoder_target_modules"):
        parts.append(f"text encoder ({', '.join(sorted(run['text_encoder_target_modules']))})")
    return "; ".join(parts)


def _files_section(family: str = "") -> str:
    munba, _, folders = _layout(family)
    lora_stem = Path(KOHYA_LORA_WEIGHT_NAME).stem
    table = f"""## Which file is for which tool

| File | For |
|---|---|
| `model_index.json`, {folders}, `scheduler/` | diffusers: the whole pipeline with the erasure fused in |
| `{LORA_WEIGHT_NAME}` | diffusers (with peft): the erasure LoRA, to put on the base model with \
`load_lora_weights` |
"""
    if _has_transformer(family):
        return f"""{table}\
| `{PIPELINE_FILE_NAME}`, `{ERASURE_FILE_NAME}` | `{munba}` (which concepts were erased, `erasure_scale`, \
`compare`) |
| `{ERASURE_CONFIG_NAME}` | the run record: every training option, all prompts, library versions |

There is no ComfyUI / AUTOMATIC1111 file for this model: kohya-style tools name the transformer's modules
differently from diffusers, and this folder ships the LoRA in diffusers' layout only."""
    return f"""{table}\
| `{KOHYA_LORA_WEIGHT_NAME}` | **ComfyUI, AUTOMATIC1111, Forge**: the same LoRA in kohya keys, for the base \
checkpoint |
| `{PIPELINE_FILE_NAME}`, `{ERASURE_FILE_NAME}` | `{munba}` (which concepts were erased, `erasure_scale`, \
`compare`) |
| `{ERASURE_CONFIG_NAME}` | the run record: every training option, all prompts, library versions |

**ComfyUI**: copy `{KOHYA_LORA_WEIGHT_NAME}` into `ComfyUI/models/loras/` and put a *LoraLoader* (or *LoraLoaderModelOnly*)
node with strength 1 after the base checkpoint's loader. **AUTOMATIC1111 / Forge**: copy it into `models/Lora/` and
add `<lora:{lora_stem}:1>` to the prompt. Rename the file (to this model's name, say) to tell several erasures
apart. Strength 1 is the erased model, 0 the original; the LoRA touches the UNet and/or the text encoder, as trained
(see "How it was erased")."""


def _how_to_load(base: str, concept: str, model_id: str, family: str = "", *, base_revision: str | None = None) -> str:
    """The card's loading section; ``base_revision`` pins the base of option 3 (the commit the LoRA trained on)."""
    munba, stock, _ = _layout(family)
    pinned = f', revision="{base_revision}"' if base_revision else ""
    no_t5 = ""
    if stock == "StableDiffusion3Pipeline":
        no_t5 = f"""
A model without T5 (`text_encoder_3` and `tokenizer_3` are `null` in `model_index.json`) needs them passed as
`None` to the stock pipeline (`{munba}` and `custom_pipeline="munba"` need nothing extra):

```python
from diffusers import StableDiffusion3Pipeline

pipe = StableDiffusion3Pipeline.from_pretrained("{model_id}", text_encoder_3=None, tokenizer_3=None)
```
"""
    return f"""## How to load

1. As a plain `{stock}` (the erasure is fused into its weights; needs `diffusers`, `transformers` and `torch`
only):

```python
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{model_id}")
```
{no_t5}
2. As `{munba}`, which knows what was erased and can dial the erasure (`munba.py` ships in this folder; the
same packages, plus `peft` for an `erasure_scale` other than 1):

```python
import torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{model_id}", custom_pipeline="munba", trust_remote_code=True)
print(pipe.erased_concepts)
pipe.erasure_scale = 0.5   # 0 = original model, 1 = erased
result = pipe.compare("a photo of {concept}", seed=0)   # same-seed original vs erased
result.grid.save("compare.png")
```

With munba-diffusion installed (`pip install munba-diffusion`),
`from munba_diffusion import {munba}; {munba}.from_pretrained("{model_id}")` does the same without
remote code.

3. As the base model plus the erasure LoRA (`load_lora_weights` and `load_erasure` need `peft` besides
`diffusers` and `transformers`):

```python
from munba_diffusion import {munba}

pipe = {munba}.from_pretrained("{base}"{pinned}).load_erasure("{model_id}")

# or with diffusers and peft only:
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{base}"{pinned})
pipe.load_lora_weights("{model_id}", weight_name="{LORA_WEIGHT_NAME}")
```"""


def _app_section(model_id: str) -> str:
    return f"""## Compare in a browser

`{APP_FILE_NAME}` is a small Gradio app: a prompt, a seed, the number of steps and an `erasure_scale` slider, with the
original model's image (scale 0) beside the erased model's, from the same seed. It runs offline, on a CPU too.

- Locally: `pip install "munba-diffusion[app]"` and `munba-app path/to/this/folder`, or `pip install gradio` and
`python {APP_FILE_NAME}` in this folder.
- As a Hugging Face Space (SDK Gradio): upload `{APP_FILE_NAME}` and a `requirements.txt` holding
`gradio diffusers transformers torch peft accelerate`, and set the Space variable `{MODEL_ENV}` to `{model_id}`
(`{APP_FILE_NAME}` loads it with its `munba.py`, as remote code)."""
