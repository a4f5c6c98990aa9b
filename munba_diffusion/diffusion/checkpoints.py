"""Resumable checkpoints of an erasure run: ``<output_dir>/checkpoints/checkpoint-N``.

A checkpoint holds Accelerate's state (optimizer, learning-rate schedule, RNG states), the LoRA weights
(safetensors) and the step. It is written into ``checkpoint-N.tmp`` and renamed, so a checkpoint folder exists only
once it is complete; resuming from one continues the run bit-identically (the per-step randomness is a function of
the seed and the step, see :func:`munba_diffusion.diffusion.train.step_generator`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from ..io import write_json_atomic
from .config import CHECKPOINTS_DIR, ErasureTrainingConfig
from .lora import load_lora_state_dict, lora_state_dict

LORA_CHECKPOINT_NAME = "erasure_lora.safetensors"
STEP_FILE = "step.json"


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """The complete checkpoints of ``output_dir``, oldest first."""
    root = output_dir / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [
        p for p in root.iterdir() if p.is_dir() and p.name.startswith("checkpoint-") and p.name.split("-")[-1].isdigit()
    ]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def checkpoint_to_resume(config: ErasureTrainingConfig) -> Path | None:
    """The checkpoint the run resumes from (None: a fresh start), checked before any work.

    Checkpoints of an earlier run are never silently overwritten: resuming needs ``--resume_from_checkpoint``,
    starting over needs ``--overwrite_output_dir`` (which then removes the old checkpoints and logs).
    """
    output_dir = config.output_dir
    existing = checkpoint_dirs(output_dir)
    resume = config.resume_from_checkpoint
    if resume is None:
        if existing and not config.overwrite_output_dir:
            raise FileExistsError(
                f"{output_dir} holds checkpoints of an earlier run; pass --resume_from_checkpoint "
                "latest to continue it or --overwrite_output_dir to start over"
            )
        if config.overwrite_output_dir:
            for sub in (CHECKPOINTS_DIR, "logs"):
                shutil.rmtree(output_dir / sub, ignore_errors=True)
        return None
    if resume == "latest":
        return existing[-1] if existing else None
    path = Path(resume)
    if not path.is_absolute() and not path.exists():
        path = output_dir / CHECKPOINTS_DIR / resume
    if not (path / LORA_CHECKPOINT_NAME).is_file():
        raise FileNotFoundError(
            f"{resume} is not a checkpoint of this trainer (no {LORA_CHECKPOINT_NAME}); "
            "pass --resume_from_checkpoint latest or a checkpoint-N folder"
        )
    return path


def prune_checkpoints(output_dir: Path, limit: int | None) -> None:
    """Keep room for one more checkpoint within ``limit`` (diffusers' checkpoints_total_limit semantics)."""
    if limit is None:
        return
    existing = checkpoint_dirs(output_dir)
    for old in existing[: max(0, len(existing) - limit + 1)]:
        shutil.rmtree(old)


def save_checkpoint(accelerator, unet, output_dir: Path, step: int, limit: int | None) -> None:
    """Write ``checkpoint-<step>`` (all processes call it; the main process writes the files)."""
    if accelerator.is_main_process:
        prune_checkpoints(output_dir, limit)
    final = output_dir / CHECKPOINTS_DIR / f"checkpoint-{step}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # optimizer, lr scheduler, RNG states
    if accelerator.is_main_process:
        save_file({k: v.contiguous().cpu() for k, v in lora_state_dict(unet).items()}, str(tmp / LORA_CHECKPOINT_NAME))
        write_json_atomic(tmp / STEP_FILE, {"global_step": step})
        os.replace(tmp, final)
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator, unet, path: Path) -> int:
    """Restore the state saved by :func:`save_checkpoint`; returns its step."""
    accelerator.load_state(str(path))
    load_lora_state_dict(unet, load_file(str(path / LORA_CHECKPOINT_NAME)))
    return int(json.loads((path / STEP_FILE).read_text())["global_step"])


def truncate_log(path: Path, step: int) -> None:
    """Drop log lines written after ``step`` by an interrupted run, so a resumed log has each step once."""
    if path.is_file():
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))
