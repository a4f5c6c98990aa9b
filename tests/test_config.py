"""Configurations declared once: validation of every field, the generated parser, the run record."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import munba_diffusion.diffusion.train as train_module
from munba_diffusion.config import build_parser, check_options, config_record, option, parse_config
from munba_diffusion.diffusion.config import ErasureTrainingConfig

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Settings:
    steps: int = option(10, "optimizer steps", low=1)
    rate: float = option(0.5, "a rate", low=0.0, high=1.0, high_open=True)
    mode: str = option("fast", "how to run", choices=("fast", "exact"))
    names: list[str] | None = option(None, "names", flag="name", repeat=True)
    weights: list[float] | None = option(None, "weights", low=0.0)
    verbose: bool = option(False, "say more")
    keep: bool = option(True, "drop it", flag="no_keep")
    token: str | None = option(None, "secret", secret=True)

    def __post_init__(self) -> None:
        check_options(self)


@pytest.mark.parametrize(
    "values,message",
    [
        ({"steps": 0}, "steps (--steps) must be >= 1; got 0"),
        ({"steps": 1.5}, "steps (--steps) must be an integer"),
        ({"steps": True}, "steps (--steps) must be an integer"),
        ({"rate": 1.0}, "rate (--rate) must be < 1"),
        ({"rate": math.nan}, "rate (--rate) must be a finite number"),
        ({"mode": "slow"}, "mode (--mode) must be one of fast, exact; got 'slow'"),
        ({"weights": [1.0, -1.0]}, "weights (--weights) must be >= 0"),
        ({"names": "a"}, "names (--name) must be a list"),
        ({"verbose": "yes"}, "verbose (--verbose) must be True or False"),
    ],
)
def test_each_rule_gives_one_line_naming_the_field(values, message):
    with pytest.raises(ValueError) as error:
        Settings(**values)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_parser_is_generated_from_the_fields():
    parsed = parse_config(
        Settings,
        [
            "--steps",
            "3",
            "--mode",
            "exact",
            "--name",
            "a",
            "--name",
            "b",
            "--weights",
            "1",
            "2",
            "--verbose",
            "--no-keep",
        ],
    )
    assert parsed == Settings(steps=3, mode="exact", names=["a", "b"], weights=[1.0, 2.0], verbose=True, keep=False)
    assert parse_config(Settings, []) == Settings()
    help_text = build_parser(Settings).format_help()
    assert "optimizer steps (default: 10)" in help_text and "--no_keep" in help_text and "--no-keep" in help_text


def test_parser_refuses_a_broken_rule_with_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(Settings, ["--rate", "2"], prog="tool")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "tool: error: rate (--rate) must be < 1; got 2.0 (see --help)\n"  # no usage block
    with pytest.raises(SystemExit):
        parse_config(Settings, ["--no-such-flag"], prog="tool")
    assert capsys.readouterr().err == "tool: error: unrecognized arguments: --no-such-flag (see --help)\n"


def test_record_leaves_secrets_out():
    record = config_record(Settings(token="hf_secret", names=["a"]))
    assert "token" not in record and record["names"] == ["a"] and "hf_secret" not in str(record)


# ------------------------------------------------------------------ the training configuration, field by field
BASE = {"concepts": ["red"], "output_dir": "unused"}
BAD_TRAINING_VALUES = {
    "concepts": ([], "name at least one concept"),
    "output_dir": ("FILE", "is a file"),
    "pretrained_model_name_or_path": (7, "must be a string"),
    "revision": (7, "must be a string"),
    "variant": (7, "must be a string"),
    "forget_prompts_file": ("missing.txt", "does not exist"),
    "preserve_prompts_file": ("missing.txt", "does not exist"),
    "anchor_prompt": (7, "must be a string"),
    "forget_loss": ("foo", "forget_loss (--forget_loss) must be one of esd, anchor"),
    "negative_guidance": (-1.0, "negative_guidance (--negative_guidance) must be >= 0"),
    "combiner": ("best", "combiner (--combiner) must be one of nash"),
    "combiner_weights": ([1.0, 1.0], "are used by --combiner sum only"),
    "neighbour_player": ("yes", "neighbour_player (--neighbour_player) must be True or False"),
    "robust": ("yes", "robust (--robust) must be True or False"),
    "adversarial_every": (0, "adversarial_every (--adversarial_every) must be >= 1"),
    "adversarial_steps": (0, "adversarial_steps (--adversarial_steps) must be >= 1"),
    "adversarial_tokens": (0, "adversarial_tokens (--adversarial_tokens) must be >= 1"),
    "adversarial_lr": (0.0, "adversarial_lr (--adversarial_lr) must be > 0"),
    "adversarial_prompts_kept": (0, "adversarial_prompts_kept (--adversarial_prompts_kept) must be >= 1"),
    "lora_target": ("everything", "lora_target (--lora_target) must be one of xattn"),
    "lora_on": ("vae", "lora_on (--lora_on) must be one of unet, text_encoder, both"),
    "rank": (0, "rank (--rank) must be >= 1"),
    "lora_alpha": (0.0, "lora_alpha (--lora_alpha) must be > 0"),
    "latent_source": ("web", "latent_source (--latent_source) must be one of pool, fresh, images"),
    "pool_trajectories": (0, "pool_trajectories (--pool_trajectories) must be >= 1"),
    "sampler_steps": (0, "sampler_steps (--sampler_steps) must be >= 1"),
    "sampler_guidance_scale": (math.inf, "sampler_guidance_scale (--sampler_guidance_scale) must be a finite"),
    "forget_image_dir": ("missing-dir", "forget_image_dir (--forget_image_dir) is not a folder"),
    "preserve_image_dir": ("missing-dir", "preserve_image_dir (--preserve_image_dir) is not a folder"),
    "overwrite_output_dir": ("yes", "overwrite_output_dir (--overwrite_output_dir) must be True or False"),
    "seed": (-1, "seed (--seed) must be >= 0"),
    "resolution": (4, "resolution (--resolution) must be >= 8"),
    "train_batch_size": (0, "train_batch_size (--train_batch_size) must be >= 1"),
    "max_train_steps": (0, "max_train_steps (--max_train_steps) must be >= 1"),
    "gradient_accumulation_steps": (0, "gradient_accumulation_steps (--gradient_accumulation_steps) must be >= 1"),
    "gradient_checkpointing": (1, "gradient_checkpointing (--gradient_checkpointing) must be True or False"),
    "use_8bit_adam": ("yes", "use_8bit_adam (--use_8bit_adam) must be True or False"),
    "shard_base": ("no", "shard_base (--shard_base) must be True or False"),
    "flux_guidance": (-1.0, "flux_guidance (--flux_guidance) must be >= 0"),
    "learning_rate": (-1e-3, "learning_rate (--learning_rate) must be > 0"),
    "lr_scheduler": ("exponential", "lr_scheduler (--lr_scheduler) must be one of linear"),
    "lr_warmup_steps": (-1, "lr_warmup_steps (--lr_warmup_steps) must be >= 0"),
    "max_grad_norm": (-1.0, "max_grad_norm (--max_grad_norm) must be >= 0"),
    "mixed_precision": ("fp8", "mixed_precision (--mixed_precision) must be one of no, fp16, bf16"),
    "save_dtype": ("float64", "save_dtype (--save_dtype) must be one of float32, float16, bfloat16"),
    "enable_xformers_memory_efficient_attention": ("on", "enable_xformers_memory_efficient_attention"),
    "report_to": ("mlflow", "report_to (--report_to) must be one of none, tensorboard, wandb, all"),
    "checkpointing_steps": (-5, "checkpointing_steps (--checkpointing_steps) must be >= 0"),
    "checkpoints_total_limit": (0, "checkpoints_total_limit (--checkpoints_total_limit) must be >= 1"),
    "resume_from_checkpoint": ("checkpoint-99", "resume_from_checkpoint (--resume_from_checkpoint)"),
    "nonfinite_gradients": ("ignore", "nonfinite_gradients (--nonfinite_gradients) must be one of raise, skip"),
    "player_gradients": ("both", "player_gradients (--player_gradients) must be one of fast, per_player"),
    "validation_prompts": ("a red circle", "validation_prompts (--validation_prompt) must be a list"),
    "validation_seeds": (0, "validation_seeds (--validation_seeds) must be >= 1"),
    "validation_guidance_scale": (math.nan, "validation_guidance_scale (--validation_guidance_scale) must be a finite"),
    "validation_inference_steps": (0, "validation_inference_steps (--validation_inference_steps) must be >= 1"),
    "evaluate": ("no", "evaluate (--no_evaluation) must be True or False"),
    "push_to_hub": (True, "--push_to_hub needs --hub_model_id"),
    "hub_model_id": (7, "hub_model_id (--hub_model_id) must be a string"),
    "hub_token": (7, "hub_token (--hub_token) must be a string"),
}


def test_the_table_covers_every_field():
    assert set(BAD_TRAINING_VALUES) == {f.name for f in dataclasses.fields(ErasureTrainingConfig)}


@pytest.mark.parametrize("field", sorted(BAD_TRAINING_VALUES))
def test_every_training_field_is_validated_with_one_line(field, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "FILE").write_text("not a folder")
    value, message = BAD_TRAINING_VALUES[field]
    with pytest.raises((ValueError, OSError)) as error:
        ErasureTrainingConfig(**{**BASE, field: value})
    assert message in str(error.value) and "\n" not in str(error.value)


def test_command_line_refuses_bad_numbers_before_loading_a_model(monkeypatch, capsys):
    import train_erase

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(train_module, "load_base_pipeline", no_loading)
    for flag, value in [
        ("--rank", "0"),
        ("--learning_rate", "-1e-3"),
        ("--pool_trajectories", "0"),
        ("--train_batch_size", "0"),
        ("--sampler_steps", "0"),
        ("--lora_alpha", "0"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            train_erase.main(["--concept", "red", "--output_dir", "unused", flag, value])
        assert exit_info.value.code == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("train_erase.py: error: ") and flag in last


def test_hyphen_aliases_and_console_script_help():
    config = parse_config(ErasureTrainingConfig, ["--concept", "red", "--output-dir", "out", "--train-batch-size", "3"])
    assert config.train_batch_size == 3 and config.output_dir == Path("out")
    result = subprocess.run(
        [sys.executable, str(ROOT / "train_erase.py"), "--help"], capture_output=True, text=True, check=True
    )
    assert (
        "--negative_guidance" in result.stdout
        and "eta of the esd, anchored_esd and substitute targets" in result.stdout
    )


def test_run_record_is_derived_from_the_configuration():
    config = ErasureTrainingConfig(concepts=["red", "blue"], output_dir="out", hub_token="hf_secret", rank=8)
    record = config.record()
    assert set(record) == {f.name for f in dataclasses.fields(config)} - {"hub_token"}
    assert [c["name"] for c in record["concepts"]] == ["red", "blue"] and record["rank"] == 8
    assert record["output_dir"] == "out"
