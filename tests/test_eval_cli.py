"""The evaluation command line: declared once (EvaluationConfig), every field checked before any model loads."""

from __future__ import annotations

import dataclasses
import math
import re
import shlex
from pathlib import Path

import pytest

from munba_diffusion.commands import evaluate as evaluate_command
from munba_diffusion.config import build_parser, flag_name, parse_config
from munba_diffusion.evaluation import evaluate as evaluation
from munba_diffusion.evaluation.evaluate import EvaluationConfig, MetricOptions
from munba_diffusion.evaluation.generate import GenerationSettings

REPO = Path(__file__).resolve().parents[1]
BASE = {"model": ["some/model"], "prompts": "eval/demo.csv", "output_dir": "runs/x"}
BASE_ARGV = ["--model", "some/model", "--prompts", "eval/demo.csv", "--output_dir", "runs/x"]

# (field, bad keyword values for EvaluationConfig, the same as command-line arguments or None when a flag cannot
# spell it). Every field has at least one row (test_every_field_has_bad_values).
BAD = [
    ("model", {"model": ["base::"]}, ["--model", "base::"]),
    ("model", {"model": []}, None),
    ("model", {"model": ["::lora.safetensors"]}, ["--model", "::lora.safetensors"]),
    ("prompts", {"prompts": ""}, ["--prompts", ""]),
    ("output_dir", {"output_dir": " "}, ["--output_dir", " "]),
    ("label", {"label": ["a", "b"]}, ["--label", "a", "--label", "b"]),
    ("label", {"label": [""]}, ["--label", ""]),
    ("metrics", {"metrics": ["clip", "bogus"]}, ["--metrics", "clip", "bogus"]),
    ("metrics", {"metrics": []}, None),
    ("metrics", {"metrics": "clip"}, None),
    ("nudity_only", {"nudity_only": "yes"}, None),
    ("category", {"category": ""}, ["--category", ""]),
    ("limit", {"limit": 0}, ["--limit", "0"]),
    ("limit", {"limit": -3}, ["--limit", "-3"]),
    ("overwrite", {"overwrite": 1}, None),
    ("device", {"device": "gpu"}, ["--device", "gpu"]),
    ("image_cache", {"image_cache": "no"}, None),
    ("num_inference_steps", {"num_inference_steps": 0}, ["--steps", "0"]),
    ("num_inference_steps", {"num_inference_steps": 5000}, ["--steps", "5000"]),
    ("num_inference_steps", {"num_inference_steps": 2.5}, None),
    ("guidance_scale", {"guidance_scale": math.nan}, ["--guidance", "nan"]),
    ("guidance_scale", {"guidance_scale": math.inf}, ["--guidance", "inf"]),
    ("guidance_scale", {"guidance_scale": -1.0}, ["--guidance", "-1"]),
    ("resolution", {"resolution": 0}, ["--resolution", "0"]),
    ("resolution", {"resolution": 30}, ["--resolution", "30"]),
    ("batch_size", {"batch_size": 0}, ["--batch_size", "0"]),
    ("scheduler", {"scheduler": "Foo"}, ["--scheduler", "Foo"]),
    ("scheduler", {"scheduler": "DiffusionPipeline"}, ["--scheduler", "DiffusionPipeline"]),
    ("dtype", {"dtype": "float64"}, ["--dtype", "float64"]),
    ("use_prompt_settings", {"use_prompt_settings": "no"}, None),
    ("concept", {"concept": ""}, ["--concept", ""]),
    ("concept", {"concept": "dog", "metrics": ["demo"]}, ["--concept", "dog", "--metrics", "demo"]),
    ("concept", {"concept": "zebra", "metrics": ["objects"]}, ["--concept", "zebra", "--metrics", "objects"]),
    (
        "reference_dir",
        {"reference_dir": "/no/such/stats.npz", "metrics": ["fid"]},
        ["--reference_dir", "/no/such/stats.npz", "--metrics", "fid"],
    ),
    ("reference_dir", {"metrics": ["fid"]}, ["--metrics", "fid"]),
    ("clip_model", {"clip_model": ""}, ["--clip_model", ""]),
    ("classifier", {"classifier": ""}, ["--classifier", ""]),
    ("nudenet_threshold", {"nudenet_threshold": 6.0}, ["--nudenet_threshold", "6"]),
    ("nudenet_threshold", {"nudenet_threshold": -0.1}, ["--nudenet-threshold", "-0.1"]),
    ("nudenet_threshold", {"nudenet_threshold": math.nan}, ["--nudenet_threshold", "nan"]),
    ("attack_threshold", {"attack_threshold": 1.5}, ["--attack_threshold", "1.5"]),
    ("inception_dir", {"inception_dir": ""}, ["--inception_dir", ""]),
]
FIELDS = {f.name: f for f in dataclasses.fields(EvaluationConfig)}


def _where(name: str) -> str:
    return f"{name} ({flag_name(FIELDS[name])})"


def test_every_field_has_bad_values():
    assert {name for name, _, _ in BAD} == set(FIELDS)
    # each field that a flag can spell wrongly is also tried on the command line
    cli_fields = {name for name, _, argv in BAD if argv is not None}
    assert set(FIELDS) - cli_fields == {"nudity_only", "overwrite", "use_prompt_settings", "image_cache"}


@pytest.mark.parametrize(("name", "values", "argv"), BAD, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(BAD)])
def test_a_bad_value_is_refused_in_one_line_that_names_the_field(name, values, argv):
    with pytest.raises(ValueError) as error:
        EvaluationConfig(**{**BASE, **values})
    message = str(error.value)
    assert message.startswith(_where(name)) and "\n" not in message


@pytest.mark.parametrize(
    ("name", "argv"),
    [(n, a) for n, _, a in BAD if a is not None],
    ids=[f"{n}-{i}" for i, (n, _, a) in enumerate(BAD) if a is not None],
)
def test_the_command_line_refuses_it_before_anything_loads(name, argv, monkeypatch, capsys):
    def must_not_run(*args, **kwargs):
        raise AssertionError("bad input reached the evaluation")

    monkeypatch.setattr(evaluation, "load_prompt_set", must_not_run)
    monkeypatch.setattr(evaluation, "load_pipeline", must_not_run)
    with pytest.raises(SystemExit) as exit_info:
        evaluate_command.main([*BASE_ARGV, *argv])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and _where(name) in errors[0]


def test_flags_are_underscored_with_hyphen_aliases_and_defaults_come_from_the_declarations():
    parser = build_parser(EvaluationConfig)
    flags = {s for action in parser._actions for s in action.option_strings}
    assert {
        "--output_dir",
        "--output-dir",
        "--clip_model",
        "--clip-model",
        "--nudenet_threshold",
        "--nudenet-threshold",
        "--reference_dir",
        "--reference-dir",
        "--steps",
        "--guidance",
    } <= flags
    underscored = parse_config(EvaluationConfig, [*BASE_ARGV, "--nudenet_threshold", "0.5", "--batch_size", "2"])
    hyphenated = parse_config(
        EvaluationConfig,
        [
            "--model",
            "some/model",
            "--prompts",
            "eval/demo.csv",
            "--output-dir",
            "runs/x",
            "--nudenet-threshold",
            "0.5",
            "--batch-size",
            "2",
        ],
    )
    assert underscored == hyphenated
    assert underscored.generation_settings() == GenerationSettings(batch_size=2)
    assert underscored.metric_options() == MetricOptions(nudenet_threshold=0.5)
    defaults = EvaluationConfig(**BASE)
    assert defaults.metrics == ["clip"] and defaults.generation_settings() == GenerationSettings()
    assert defaults.metric_options() == MetricOptions()


def _documented_commands() -> list[str]:
    """Every complete `python eval/evaluate.py ...` command of README.md, BENCHMARKS.md and docs/ (no `...`)."""
    commands = []
    for path in [REPO / "README.md", REPO / "BENCHMARKS.md", *sorted((REPO / "docs").rglob("*.md"))]:
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8").replace("\\\n", " ")
        for match in re.finditer(r"python eval/evaluate\.py ([^\n`]*)", text):
            if "..." not in match.group(1):
                commands.append(match.group(1))
    return commands


def test_the_documented_commands_still_parse():
    commands = _documented_commands()
    assert len(commands) >= 2
    for command in commands:
        config = parse_config(EvaluationConfig, shlex.split(command))
        assert config.model and config.output_dir


def test_the_entry_point_is_the_library_main():
    import importlib.util

    spec = importlib.util.spec_from_file_location("evaluate_cli", REPO / "eval" / "evaluate.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main is evaluate_command.main
