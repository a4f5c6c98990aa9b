"""Exporting an erased model: the run record, the output folder (one owner), the kohya-layout LoRA for ComfyUI /
AUTOMATIC1111 / Forge, the model card, the Hub upload."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from diffusers import StableDiffusionPipeline
from PIL import Image

from .card import erased_model_card, evaluation_results, read_evaluation_reports, write_model_card
from .folder import RESULT_NAMES, OutputDirLock, check_output_dir, staged_output_dir, write_erased_model
from .hub import push_erased_model_to_hub
from .kohya import kohya_lora_state_dict, save_kohya_lora
from .record import run_record

__all__ = [
    "RESULT_NAMES",
    "OutputDirLock",
    "check_output_dir",
    "erased_model_card",
    "evaluation_results",
    "export_erased_model",
    "kohya_lora_state_dict",
    "push_erased_model_to_hub",
    "read_evaluation_reports",
    "run_record",
    "save_kohya_lora",
    "staged_output_dir",
    "write_erased_model",
    "write_model_card",
]


def export_erased_model(
    pipeline: StableDiffusionPipeline,
    output_dir: str | Path,
    record: Mapping[str, Any],
    *,
    before_after: Image.Image | None = None,
    evaluation_markdown: str | None = None,
    evaluation_reports: Mapping[str, Mapping[str, Any]] | None = None,
    widget_images: Sequence[tuple[str, Image.Image]] = (),
    hub_model_id: str | None = None,
    overwrite_output_dir: bool = False,
) -> Path:
    """Check, stage, write and swap in one call: the erased model folder of ``pipeline`` (whose UNet and/or text
    encoder carry the trained peft LoRA) described by the run ``record``; ``evaluation_reports`` (concept -> report.json) fill the
    card's model-index. Returns ``output_dir``."""
    output_dir = check_output_dir(output_dir, overwrite_output_dir)
    with staged_output_dir(output_dir) as staging:
        widget = write_erased_model(pipeline, staging, record, before_after=before_after, widget_images=widget_images)
        card = erased_model_card(
            record,
            widget=widget,
            has_before_after=before_after is not None,
            evaluation_markdown=evaluation_markdown,
            evaluation_reports=evaluation_reports,
            model_id=hub_model_id or output_dir.name,
        )
        write_model_card(staging, card)
    return output_dir
