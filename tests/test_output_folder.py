"""The one owner of the output folder: checked first, locked, everything staged (evaluation and card included),
swapped once; a user's files are never replaced."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard

from munba_diffusion.diffusion.base_model import load_base_pipeline
from munba_diffusion.diffusion.config import ErasureTrainingConfig
from munba_diffusion.diffusion.export import OutputDirLock, check_output_dir
from munba_diffusion.diffusion.finish import finish_erasure
from munba_diffusion.diffusion.lora import add_erasure_lora
from munba_diffusion.models import DEMO_MODEL

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def demo_with_lora():
    pipe = load_base_pipeline(DEMO_MODEL)
    pipe.set_progress_bar_config(disable=True)
    add_erasure_lora(pipe.unet, ErasureTrainingConfig(concepts=["red"], output_dir="unused").lora)
    return pipe


def _config(output_dir, **overrides) -> ErasureTrainingConfig:
    return ErasureTrainingConfig(
        concepts=["red"],
        output_dir=output_dir,
        pretrained_model_name_or_path=DEMO_MODEL,
        validation_seeds=1,
        validation_inference_steps=1,
        validation_prompts=["a red circle"],
        **overrides,
    )


def test_evaluation_and_card_are_written_before_the_single_swap(demo_with_lora, tmp_path):
    output_dir = tmp_path / "erased"
    (output_dir / "logs").mkdir(parents=True)
    (output_dir / "logs" / "train_log.jsonl").write_text("{}\n")
    seen = {}

    def evaluate(config, folder):
        seen["folder"], seen["final_exists"] = folder, (output_dir / "model_index.json").exists()
        (folder / "evaluation").mkdir()
        (folder / "evaluation" / "report.json").write_text("{}")
        return "| metric | original | erased |\n|---|---|---|\n| red rate | 0.9 | 0.0 |"

    finish_erasure(
        _config(output_dir),
        demo_with_lora,
        ["preserve", "forget"],
        train_seconds=1.0,
        pool_seconds=0.5,
        resolution=32,
        evaluate=evaluate,
    )
    assert seen["folder"] != output_dir and seen["final_exists"] is False  # evaluated in staging, before the swap
    assert (output_dir / "evaluation" / "report.json").is_file()
    assert (output_dir / "logs" / "train_log.jsonl").read_text() == "{}\n"  # training files carried over
    card = ModelCard.load(output_dir / "README.md")
    assert "| red rate | 0.9 | 0.0 |" in card.text
    assert card.data.license == "apache-2.0"  # read from the base model's own card, not from its name
    assert stat.S_IMODE(os.stat(output_dir).st_mode) == 0o755 & ~_umask()
    assert stat.S_IMODE(os.stat(output_dir / "erasure_config.json").st_mode) == 0o644 & ~_umask()
    record = json.loads((output_dir / "erasure_config.json").read_text())
    assert record["run"]["players"] == ["preserve", "forget"] and record["license"] == "apache-2.0"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["erased"]  # no staging folder left


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


@pytest.mark.parametrize("user_entry", ["README.md", "images", "unet", "model_index.json"])
def test_a_folder_with_the_users_files_is_refused_and_untouched(tmp_path, user_entry):
    output_dir = tmp_path / "mine"
    output_dir.mkdir()
    target = output_dir / user_entry
    if "." in user_entry:
        target.write_text("my own file")
    else:
        target.mkdir()
        (target / "keep.txt").write_text("my own file")
    before = {p: p.read_bytes() for p in output_dir.rglob("*") if p.is_file()}
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="did not write") as error:
            check_output_dir(output_dir, overwrite_output_dir=overwrite)
        assert "\n" not in str(error.value)
    assert {p: p.read_bytes() for p in output_dir.rglob("*") if p.is_file()} == before


def test_a_second_run_on_a_locked_folder_refuses_and_a_dead_lock_is_taken_over(tmp_path):
    with OutputDirLock(tmp_path / "out"):
        with pytest.raises(FileExistsError, match="being written by another run"):
            OutputDirLock(tmp_path / "out").__enter__()
    assert not (tmp_path / "out").exists()  # the lock made the folder, nothing was written: no empty folder left
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / ".munba.lock").write_text("999999999")  # a pid that does not exist: a killed run
    with OutputDirLock(tmp_path / "out") as lock:
        assert lock.path.read_text() == str(os.getpid())


def test_a_failed_evaluation_costs_the_evaluation_not_the_trained_model(demo_with_lora, tmp_path, caplog):
    output_dir = tmp_path / "erased"

    def evaluate(config, folder):
        (folder / "evaluation").mkdir()
        (folder / "evaluation" / "partial.json").write_text("{")
        raise OSError("could not load AIML-TUDA/i2p (offline); go online once")

    with caplog.at_level("WARNING"):
        finish_erasure(
            _config(output_dir),
            demo_with_lora,
            ["preserve", "forget"],
            train_seconds=1.0,
            pool_seconds=0.5,
            resolution=32,
            evaluate=evaluate,
        )
    assert (output_dir / "model_index.json").is_file() and (output_dir / "README.md").is_file()
    assert not (output_dir / "evaluation").exists()  # no half-written reports in the folder
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "could not load AIML-TUDA/i2p" in warning and "eval/evaluate.py" in warning


@pytest.mark.parametrize(
    ("preset", "metrics", "concept"),
    [("red", ("demo",), "red"), ("church", ("objects", "clip"), "church"), ("van-gogh", ("clip",), None)],
)
def test_each_evaluation_set_is_scored_by_metrics_that_can_read_it(preset, metrics, concept):
    """A preset's evaluation set gets the metrics that fit it (a demo judge never scores Imagenette prompts)."""
    from munba_diffusion.evaluation.erasure import evaluation_plan
    from munba_diffusion.evaluation.evaluate import check_metric_inputs
    from munba_diffusion.presets import resolve_concept

    preset = resolve_concept(preset)
    prompts, chosen, options = evaluation_plan(preset.eval_prompts, preset.name)
    assert chosen == metrics and options.concept == concept
    check_metric_inputs(chosen, prompts, options)  # would raise if a metric could not read the set


def test_grid_batches_columns_but_draws_each_columns_noise_from_its_own_seed(demo_with_lora, monkeypatch):
    import munba_diffusion.diffusion.finish as finish

    monkeypatch.setattr(finish, "GRID_BATCH", 2)  # 3 columns: one batch of 2, one of 1
    pipe, prompts = demo_with_lora, ["a red circle", "a blue square", "a green triangle"]
    _, erased_row = finish.before_after_grid(pipe, prompts, seeds=1, steps=3, guidance=4.0)
    for (prompt, image), expected_prompt in zip(erased_row, prompts):
        alone = pipe(prompt, num_inference_steps=3, guidance_scale=4.0, generator=torch.Generator().manual_seed(0))
        difference = np.abs(np.asarray(image, dtype=float) - np.asarray(alone.images[0], dtype=float))
        assert prompt == expected_prompt and difference.max() <= 2  # batch rounding, not another noise draw
        other_seed = pipe(prompt, num_inference_steps=3, guidance_scale=4.0, generator=torch.Generator().manual_seed(1))
        assert np.abs(np.asarray(image, dtype=float) - np.asarray(other_seed.images[0], dtype=float)).mean() > 5
