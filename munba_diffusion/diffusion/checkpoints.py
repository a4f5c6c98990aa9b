"""Resumable checkpoints of an erasure run: ``<output_dir>/checkpoints/checkpoint-N``.

A checkpoint holds Accelerate's state (optimizer, learning-rate schedule, RNG states), the LoRA weights
(safetensors) and the step. It is written into ``checkpoint-N.tmp`` and renamed, so a checkpoint folder exists only
once it is complete; resuming from one continues the run bit-identically (the per-step randomness is a function of
the seed and the step, see :func:`munba_diffusion.diffusion.train.step_generator`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..io import write_json_atomic, write_text_atomic
from ..models import is_bundled_model
from .config import CHECKPOINTS_DIR, ErasureTrainingConfig
from .lora import StaleLoraTargetsError, load_lora_state_dict, lora_state_dict

LORA_CHECKPOINT_NAMES = {
    "unet": "erasure_lora.safetensors",
    "text_encoder": "erasure_text_encoder_lora.safetensors",
    "text_encoder_2": "erasure_text_encoder_2_lora.safetensors",  # SDXL
}
STEP_FILE = "step.json"
RUN_CONFIG_FILE = "run_config.json"
# options a resumed run may change: where and how results are written, shown and shared, not what is trained
RESUMABLE_CHANGES = frozenset(
    {
        "output_dir",
        "overwrite_output_dir",
        "resume_from_checkpoint",
        "checkpointing_steps",
        "checkpoints_total_limit",
        "report_to",
        "validation_prompts",
        "validation_seeds",
        "validation_guidance_scale",
        "validation_inference_steps",
        "evaluate",
        "push_to_hub",
        "hub_model_id",
        "save_dtype",
        "nonfinite_gradients",
        "gradient_checkpointing",
        "shard_base",
        "enable_xformers_memory_efficient_attention",
        "revision",  # what it resolves to is checked instead (check_same_base), where the checkpoint saved a commit
    }
)


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    """Where the checkpoint of ``step`` is saved: ``output_dir/checkpoints/checkpoint-<step>``."""
    return output_dir / CHECKPOINTS_DIR / f"checkpoint-{step}"


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
    """The checkpoint the run resumes from (None: a fresh start), checked before any work: a checkpoint of a run
    with other settings (:data:`RESUMABLE_CHANGES` aside) is refused, naming the setting.

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
        if not existing:
            return None
        path = existing[-1]
    else:
        path = Path(resume)
        if not path.is_absolute() and not path.exists():
            path = output_dir / CHECKPOINTS_DIR / resume
    lora = config.lora
    needed = [RUN_CONFIG_FILE] + [
        LORA_CHECKPOINT_NAMES[component]
        for component, on in (("unet", lora.on_unet), ("text_encoder", lora.on_text_encoder))
        if on
    ]
    for name in needed:
        if not (path / name).is_file():
            raise FileNotFoundError(
                f"{resume} is not a checkpoint of this trainer (no {name}); "
                "pass --resume_from_checkpoint latest or a checkpoint-N folder"
            )
    check_same_run(config, path)
    return path


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # missing, truncated by a kill, or not JSON
        raise ValueError(
            f"{path} ({what}) cannot be read ({type(error).__name__}); resume from another checkpoint "
            "or start over with --overwrite_output_dir"
        ) from None


def check_same_run(config: ErasureTrainingConfig, checkpoint: Path) -> None:
    """Refuse to resume ``checkpoint`` with settings that change what is trained, naming the first that differs."""
    saved = _read_json(checkpoint / RUN_CONFIG_FILE, "the settings of the run that wrote it")
    step_record = _read_json(checkpoint / STEP_FILE, "its step")
    step = int(step_record["global_step"])
    # --revision may change where check_same_base compares what it resolves to: checkpoints that saved the commit
    resumable = RESUMABLE_CHANGES if "base_commit" in step_record else RESUMABLE_CHANGES - {"revision"}
    current = config.record()
    defaults = {field.name: field.default for field in dataclasses.fields(config)}
    for name in sorted(set(saved) | set(current)):
        if name not in saved and current.get(name) == defaults.get(name):
            continue  # an option added since that checkpoint, at its default: what that run did
        if name not in resumable and saved.get(name) != current.get(name):
            raise ValueError(
                f"{checkpoint.name} was trained with {name}={_short(saved.get(name))}, this run asks for "
                f"{_short(current.get(name))}; resume with the same --{name} or start over with --overwrite_output_dir"
            )
    if step > config.max_train_steps:  # equal: the final checkpoint of a --shard_base run, exported again
        raise ValueError(f"{checkpoint.name} is at step {step}, past --max_train_steps {config.max_train_steps}")


def check_same_base(config: ErasureTrainingConfig, checkpoint: Path, commit: str | None, content: str | None) -> None:
    """Refuse to resume ``checkpoint`` on another base than it trained on. Where the checkpoint and this run both know
    the base's files (``content``, :func:`~munba_diffusion.models.model_folder_sha256`: a local or bundled folder, a
    Hub cache snapshot given as a path), those decide: other files under the same name (a folder retrained in place,
    a newer bundled demo) are refused. Otherwise a Hub base must be at the same ``commit`` (not another one: the id's
    main moved since, another ``--revision``; nor none: the name is now a local folder), and a local base must still
    be one. Checkpoints from before a record was kept are not checked for it."""
    record = _read_json(checkpoint / STEP_FILE, "its step")
    saved, saved_content = record.get("base_commit"), record.get("base_sha256")
    name = config.pretrained_model_name_or_path
    if saved_content and content:
        if saved_content != content:
            where = f"the bundled {name}" if is_bundled_model(name) else f"the folder {name}"
            fix = (
                "resume with the munba-diffusion version it trained with"
                if is_bundled_model(name)
                else ("put back the files it trained on")
            )
            raise ValueError(
                f"{checkpoint.name} trained on {where} (files' sha256 {saved_content[:12]}), which has other files "
                f"now (sha256 {content[:12]}): {fix}, or start over with --overwrite_output_dir"
            )
        return
    if saved and saved != commit:
        if commit is None:
            raise ValueError(
                f"{checkpoint.name} trained on the Hub's {name} at commit {saved}, and {name} is now a local folder: "
                f"move it away and resume with --revision {saved}, or start over with --overwrite_output_dir"
            )
        raise ValueError(
            f"{checkpoint.name} trained on {name} at commit {saved}, which now resolves to {commit}; resume with "
            f"--revision {saved} or start over with --overwrite_output_dir"
        )
    if saved_content and not saved:
        raise ValueError(
            f"{checkpoint.name} trained on the folder {name} (files' sha256 {saved_content[:12]}), which is no longer "
            "a local folder: put it back, or start over with --overwrite_output_dir"
        )


def _short(value: object) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def prune_checkpoints(output_dir: Path, limit: int | None) -> None:
    """Keep room for one more checkpoint within ``limit`` (diffusers' checkpoints_total_limit semantics)."""
    if limit is None:
        return
    existing = checkpoint_dirs(output_dir)
    for old in existing[: max(0, len(existing) - limit + 1)]:
        shutil.rmtree(old)


def save_checkpoint(
    accelerator,
    models: Mapping[str, torch.nn.Module],
    config: ErasureTrainingConfig,
    step: int,
    extra: dict[str, dict[str, torch.Tensor]] | None = None,
    base_commit: str | None = None,
    base_sha256: str | None = None,
) -> None:
    """Write ``checkpoint-<step>`` with the run's settings (all processes call it; the main process writes).
    ``models``: the models carrying the LoRA by component name (``unet``, ``text_encoder``); ``extra``
    maps file names to more tensors the run needs to resume exactly (e.g. the robust mode's prefixes);
    ``base_commit``: the Hub commit of the base (:func:`.base_model.base_commit`); ``base_sha256``: a local base's
    files (:func:`~munba_diffusion.models.model_folder_sha256`); both checked at resume (:func:`check_same_base`)."""
    output_dir = config.output_dir
    if accelerator.is_main_process:
        prune_checkpoints(output_dir, config.checkpoints_total_limit)
    final = checkpoint_dir(output_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # optimizer, lr scheduler, RNG states
    accelerator.wait_for_everyone()  # every process's files are in tmp before the main process moves it
    if accelerator.is_main_process:
        for component, model in models.items():
            state = {k: v.contiguous().cpu() for k, v in lora_state_dict(model).items()}
            save_file(state, str(tmp / LORA_CHECKPOINT_NAMES[component]))
        for name, tensors in (extra or {}).items():
            save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp / name))
        step_record = {"global_step": step, "base_commit": base_commit, "base_sha256": base_sha256}
        write_json_atomic(tmp / STEP_FILE, step_record)
        write_json_atomic(tmp / RUN_CONFIG_FILE, config.record())
        _replace_dir(tmp, final)
    accelerator.wait_for_everyone()


def _replace_dir(new: Path, final: Path) -> None:
    """Move ``new`` to ``final``; a ``final`` already there (this run's own checkpoint of that step, made before it
    resumed from an earlier one) is set aside first and removed once ``new`` is in place."""
    if not final.exists():
        os.replace(new, final)
        return
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(final, old)
    os.replace(new, final)
    shutil.rmtree(old)


def load_checkpoint(accelerator, models: Mapping[str, torch.nn.Module], path: Path) -> int:
    """Restore the state saved by :func:`save_checkpoint`; returns its step. A damaged file is one line."""
    try:  # the LoRA first: a LoRA of other layers also fails the optimizer's load, which cannot say why
        for component, model in models.items():
            load_lora_state_dict(model, load_file(str(path / LORA_CHECKPOINT_NAMES[component])))
        accelerator.load_state(str(path))
    except StaleLoraTargetsError:  # its own one line: every checkpoint of that run is alike, none is damaged
        raise
    except Exception as error:  # truncated, tampered or foreign files: safetensors, torch and peft raise many types
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise ValueError(
            f"{path} is damaged ({first}); resume from an earlier checkpoint or start over with --overwrite_output_dir"
        ) from None
    return int(_read_json(path / STEP_FILE, "its step")["global_step"])


def load_checkpoint_tensors(path: Path, name: str) -> dict[str, torch.Tensor]:
    """The tensors of ``path/name`` saved through ``save_checkpoint(extra=...)``; a missing or damaged file is one
    line."""
    try:
        return load_file(str(path / name))
    except Exception as error:  # missing, truncated or tampered
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise ValueError(
            f"{path / name} cannot be read ({first}); resume from an earlier checkpoint or start over with "
            "--overwrite_output_dir"
        ) from None


def truncate_log(path: Path, step: int) -> None:
    """Drop log lines written after ``step`` by an interrupted run, so a resumed log has each step once."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):  # a line torn by the kill
            continue
    write_text_atomic(path, "".join(line + "\n" for line in kept))
