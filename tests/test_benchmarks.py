"""The benchmark scripts at tiny sizes, so that they cannot silently rot; plus the pieces whose correctness the
benchmarks' conclusions rest on (the step variants compute the directions they claim, the Pareto test), and the
command lines the documents record (they must parse)."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from benchmarks import (
    classifier,
    clip,
    gpu_check,
    memory,
    overhead,
    prompt_channels,
    robustness,
    run_all,
    sampling,
    specificity,
    tradeoff,
)
from benchmarks._common import (
    STEP_VARIANTS,
    build_unet,
    check_run_settings,
    erasure_gradients,
    model_content,
    random_erasure_batch,
)
from munba_diffusion.config import build_parser, parse_config
from munba_diffusion.diffusion.base_model import load_base_pipeline
from munba_diffusion.diffusion.lora import TRANSFORMER_TARGET_SETS_REVISION, ErasureLoraConfig, add_erasure_lora
from tests.tiny_sd import save_tiny_sd

ROOT = Path(__file__).resolve().parents[1]
TINY_ERASURE = [
    "--steps",
    "4",
    "--batch_size",
    "1",
    "--sampler_steps",
    "3",
    "--pool_trajectories",
    "1",
    "--grid_steps",
    "1",
    "--eval_steps",
    "2",
    "--max_eval_prompts",
    "1",
]
COMMANDS = {  # what a documented command runs -> the configuration its parser is built from
    "benchmarks.overhead": overhead.OverheadConfig,
    "benchmarks.memory": memory.MemoryConfig,
    "benchmarks.sampling": sampling.SamplingConfig,
    "benchmarks.tradeoff": tradeoff.TradeoffConfig,
    "benchmarks.specificity": specificity.SpecificityConfig,
    "benchmarks.robustness": robustness.RobustnessConfig,
    "benchmarks.prompt_channels": prompt_channels.PromptChannelsConfig,
    "benchmarks.gpu_check": gpu_check.GpuCheckConfig,
    "benchmarks.run_all": run_all.RunAllConfig,
    "benchmarks.classifier": classifier.ClassifierCommand,
    "munba-unlearn-classifier": classifier.ClassifierCommand,
    "benchmarks.clip": clip.ClipCommand,
    "munba-unlearn-clip": clip.ClipCommand,
}


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory) -> str:
    return str(save_tiny_sd(tmp_path_factory.mktemp("tiny") / "tiny-sd"))


def _results(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


# ------------------------------------------------------------------------------------------ step variants
def _gradients(variant: str, unet, batch, uncond, params) -> list[torch.Tensor]:
    for p in params:
        p.grad = None
    erasure_gradients(variant, unet, batch, uncond, params, torch.device("cpu"))
    return [p.grad.clone() for p in params]


def test_step_variants_compute_the_directions_they_claim():
    unet = build_unet("sd15-tiny")
    params = add_erasure_lora(unet, ErasureLoraConfig(rank=2))
    with torch.no_grad():  # move off the zero LoRA so that the preservation gradient is not ~0
        for p in params:
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    batch, uncond = random_erasure_batch(unet, 2, 8, torch.Generator().manual_seed(0))
    grads = {v: _gradients(v, unet, batch, uncond, params) for v in STEP_VARIANTS}
    for a, b in zip(grads["sum_plain"], grads["single_backward"]):  # both = g_r + g_f
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    for a, b in zip(grads["sum"], grads["sum_plain"]):  # the trainer's sum path = plain addition
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    flat = {v: torch.cat([g.flatten() for g in gs]).double() for v, gs in grads.items()}
    assert torch.linalg.vector_norm(flat["nash"]).item() == pytest.approx(2**0.5, rel=1e-4)  # |d|^2 = 2
    cos = torch.nn.functional.cosine_similarity(flat["nash"], flat["sum_plain"], dim=0).item()
    assert cos < 0.999  # Nash re-weights the players: not just a rescaled sum
    with pytest.raises(ValueError, match="unknown step variant"):
        erasure_gradients("mean", unet, batch, uncond, params, torch.device("cpu"))


# ------------------------------------------------------------------------------------------ scripts
def test_overhead_writes_ratios_for_each_model(tiny_sd, tmp_path):
    out = tmp_path / "overhead"
    overhead.main(
        [
            "--models",
            tiny_sd,
            "sd15-tiny",
            "--latent_size",
            "8",
            "--rounds",
            "2",
            "--warmup",
            "0",
            "--output_dir",
            str(out),
        ]
    )
    results = _results(out)
    assert [m["model"] for m in results["models"]] == [tiny_sd, "sd15-tiny"]
    for model in results["models"]:
        assert set(model["seconds_per_step"]) == set(STEP_VARIANTS)
        assert all(s["median"] > 0 and s["n"] == 2 for s in model["seconds_per_step"].values())
        assert all(r > 0 for r in model["ratios"].values())
        assert model["lora_parameters"] > 0 and model["unet_parameters"] > 100 * model["lora_parameters"]
    assert results["models"][1]["latent_size"] == 8 and results["machine"]["nproc"] >= 1
    assert "nash / sum" in (out / "results.md").read_text()
    with pytest.raises(FileExistsError, match="--overwrite"):
        overhead.main(["--models", "sd15-tiny", "--output_dir", str(out)])


def test_memory_esd_way_needs_more_than_lora(tmp_path):
    out = tmp_path / "memory"
    memory.main(
        [
            "--architecture",
            "sd15-small",
            "--latent_size",
            "8",
            "--variants",
            "ours",
            "esd",
            "--parallel",
            "--analytic_targets",
            "xattn",
            "noxattn",
            "--output_dir",
            str(out),
        ]
    )
    results = _results(out)
    runs = results["measured"]["xattn"]["runs"]
    ours, esd = runs["ours"], runs["esd"]
    # Byte counts of tensors, not process RSS: the machine's load cannot change them. The ESD way holds a second
    # 25M-parameter UNet (~100 MB) and AdamW states of whole layers; ours one UNet plus a LoRA and its states.
    unet_bytes = 4 * ours["unet_parameters"]
    assert unet_bytes < ours["held_tensor_bytes"] < unet_bytes + 16 * 4 * ours["trainable_parameters"]
    assert esd["held_tensor_bytes"] >= 2 * unet_bytes + 2 * 4 * esd["trainable_parameters"]
    assert 0 < results["measured"]["xattn"]["ratios"]["held_ours_over_esd"] < 0.6
    assert ours["saved_activation_peak_bytes"] > 0 and esd["saved_activation_peak_bytes"] > 0
    assert all(r["peak_rss_bytes"] > 0 for r in runs.values())  # recorded for the report; load-dependent, not compared
    assert esd["saved_bytes"] > 50 * ours["saved_bytes"] > 0
    assert esd["trainable_parameters"] > 10 * ours["trainable_parameters"]
    analytic = results["analytic"]
    assert analytic["noxattn"]["ratio"] < analytic["xattn"]["ratio"] < 1
    assert analytic["xattn"]["unet_file_bytes_fp32"] == 2 * analytic["xattn"]["unet_file_bytes_fp16"]


def test_sampling_reports_both_sources(tiny_sd, tmp_path):
    out = tmp_path / "sampling"
    sampling.main(["--model", tiny_sd, *TINY_ERASURE, "--output-dir", str(out)])
    results = _results(out)
    pool, fresh = results["runs"]["pool"], results["runs"]["fresh"]
    assert pool["setup_seconds"] > 0 and pool["step_seconds"] > 0 and fresh["step_seconds"] > 0
    assert results["speedup_loop"] > 0 and results["speedup_amortised"] > 0
    assert results["pool_step_seconds_amortised"] > pool["step_seconds"]
    for scores in (results["original"], pool["scores"], fresh["scores"]):
        assert 0 <= scores["concept_rate"] <= 1 and 0 <= scores["other_accuracy"] <= 1
        assert scores["num_concept_images"] == 4 and scores["num_images"] == 16  # first prompt of each pair
    assert (out / "sampling.png").stat().st_size > 0


def test_tradeoff_runs_resumes_and_summarises(tiny_sd, tmp_path):
    out = tmp_path / "tradeoff"
    args = [
        "--model",
        tiny_sd,
        *TINY_ERASURE,
        "--methods",
        "nash",
        "forget_only",
        "--seeds",
        "0",
        "--two-concept-methods",
        "nash",
        "--output-dir",
        str(out),
    ]
    tradeoff.main(args)
    runs = sorted(p.name for p in (out / "runs").glob("*.json"))
    assert runs == ["forget_only-seed0.json", "nash-seed0.json", "original.json", "two_concepts-nash-seed0.json"]
    results = _results(out)
    summary = results["summary"]
    assert set(summary["single_concept"]) == {"nash", "forget_only"}
    assert summary["single_concept"]["nash"]["concept_rate"]["n"] == 1
    assert set(summary["two_concepts"]["nash"]) >= {"concept_rate/circle", "concept_rate/red", "other_accuracy"}
    assert isinstance(summary["nash_on_front"], bool)
    assert json.loads((out / "runs" / "forget_only-seed0.json").read_text())["combiner_weights"] == [0.0, 1.0]
    assert (out / "pareto.png").stat().st_size > 0
    with pytest.raises(FileExistsError, match="--resume"):
        tradeoff.main(args)
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}
    tradeoff.main([*args, "--resume"])  # every run is there: nothing is trained again
    assert {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")} == stamps
    with pytest.raises(ValueError, match="other settings"):
        tradeoff.main([*args, "--resume", "--learning-rate", "0.5"])


def test_run_settings_refuse_runs_made_with_other_settings(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    record = runs / "settings.json"
    settings = {"erasure": {"learning_rate": 3e-3, "model": "munba-demo-flow"}, "evaluation": {"steps": 25}}
    check_run_settings(record, settings)
    assert json.loads(record.read_text()) == settings
    changed = {**settings, "erasure": {"learning_rate": 2e-3, "model": "munba-demo-flow"}}
    check_run_settings(record, changed)  # no run finished yet: the new settings are recorded
    assert json.loads(record.read_text()) == changed
    (runs / "nash-seed0.json").write_text("{}")
    check_run_settings(record, changed)  # the same settings continue
    with pytest.raises(ValueError, match=r"other settings \(erasure.learning_rate: 0.002 there, 0.003 now\)"):
        check_run_settings(record, settings)
    assert json.loads(record.read_text()) == changed  # refused: the record is kept
    check_run_settings(record, settings, replace=True)
    assert json.loads(record.read_text()) == settings


def test_runs_made_on_other_weights_under_the_same_name_are_refused(tmp_path, tiny_sd):
    """A bundled demo retrained between releases keeps its name: the settings record the model folder's content, so
    runs made on the old weights are not continued (or reported) as the new model's."""
    model = tmp_path / "model"
    shutil.copytree(tiny_sd, model)
    settings = specificity.SpecificityConfig(model=str(model)).run_settings()
    assert settings["erasure"]["model_content"] == model_content(str(model))
    assert model_content(str(model)).startswith("sha256:")
    assert model_content("munba-demo-flow") != model_content("munba-demo")
    runs = tmp_path / "runs"
    runs.mkdir()
    check_run_settings(runs / "settings.json", settings)
    (runs / "red-seed0.json").write_text("{}")
    weights = next(model.glob("unet/*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    retrained = specificity.SpecificityConfig(model=str(model)).run_settings()
    with pytest.raises(ValueError, match=r"other settings \(erasure.model_content: 'sha256:[0-9a-f]{64}' there"):
        check_run_settings(runs / "settings.json", retrained)
    (model / "unet" / "notes.md").write_text("a card is not a weight")
    (model / "single-file.safetensors").write_bytes(b"a checkpoint beside the components, which the pipeline ignores")
    assert model_content(str(model)) == retrained["erasure"]["model_content"]


def test_runs_on_a_transformer_record_the_meaning_of_its_target_sets(tmp_path, tiny_sd):
    """xattn / attn on SD3 and FLUX gained the prompt's embeddings: runs made before (no revision recorded) are not
    continued under the new meaning; a UNet's settings carry no revision (its sets did not change)."""
    flow = specificity.SpecificityConfig(model="munba-demo-flow").run_settings()
    assert flow["erasure"]["transformer_target_sets"] == TRANSFORMER_TARGET_SETS_REVISION
    assert "transformer_target_sets" not in specificity.SpecificityConfig(model=tiny_sd).run_settings()["erasure"]
    runs = tmp_path / "runs"
    runs.mkdir()
    before = {**flow, "erasure": {k: v for k, v in flow["erasure"].items() if k != "transformer_target_sets"}}
    check_run_settings(runs / "settings.json", before)
    (runs / "red-seed0.json").write_text("{}")
    with pytest.raises(ValueError, match=r"erasure.transformer_target_sets: None there, 2 now"):
        check_run_settings(runs / "settings.json", flow)


def test_pareto_front_marks_dominated_methods():
    points = {"a": (0.1, 0.9), "b": (0.2, 0.8), "c": (0.05, 0.5), "d": (0.1, 0.9)}
    dominated = tradeoff.pareto_front(points)
    assert dominated == {"a": [], "b": ["a", "d"], "c": [], "d": []}  # equal points do not dominate each other


def test_gpu_check_dry_run_on_cpu(tmp_path):
    out = tmp_path / "gpu"
    gpu_check.main(
        [
            "--device",
            "cpu",
            "--tiny",
            "--dtype",
            "fp32",
            "--batch-sizes",
            "1",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--variants",
            "nash",
            "sum_plain",
            "--attention",
            "sdpa",
            "--threads",
            "1",
            "--output-dir",
            str(out),
        ]
    )
    results = _results(out)
    assert [(r["batch_size"], r["variant"]) for r in results["rows"]] == [(1, "nash"), (1, "sum_plain")]
    assert all(r["steps_per_second"] > 0 and r["peak_bytes"] is None for r in results["rows"])
    robust = results["robustness"]
    assert robust["attack_iteration_seconds"] > 0 and robust["robust_step_seconds"] > 0
    assert robust["attack_seconds_per_prompt_max"] == pytest.approx(
        40 * (robust["attack_iteration_seconds"] + robust["attack_generation_seconds"])
    )
    assert "White-box attack per prompt" in (out / "results.md").read_text()
    assert results["esd_way"][0]["trainable_parameters"] > 0
    assert results["settings"]["resolution"] == 64
    script = (Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh").read_text()
    assert "python3" in script and "-m benchmarks.gpu_check" in script


def test_gpu_check_flux_dry_run_on_cpu(tmp_path):
    """FLUX.1-dev's transformer at a tiny width: LoRA on every attention projection, the bargained step through the
    trainer's denoise (packed latents, T5 rows + the packed [pooled, guidance] row) with gradient checkpointing."""
    out = tmp_path / "flux"
    argv = ["--device", "cpu", "--tiny", "--architecture", "flux", "--dtype", "fp32", "--batch-sizes", "1"]
    argv += ["--steps", "1", "--warmup", "0", "--variants", "nash", "--gradient_checkpointing", "--threads", "1"]
    gpu_check.main([*argv, "--output-dir", str(out)])
    results = _results(out)
    assert [(r["attention"], r["batch_size"], r["variant"]) for r in results["rows"]] == [("sdpa", 1, "nash")]
    assert results["rows"][0]["steps_per_second"] > 0
    assert results["esd_way"] == [] and results["robustness"] is None  # measured on UNets only
    settings = results["settings"]
    assert settings["lora"] == {"rank": 4, "target": "attn"} and settings["resolution"] == 64
    assert settings["architecture"] == "flux-tiny" and settings["gradient_checkpointing"]
    assert "flux-tiny transformer" in (out / "results.md").read_text()
    script = (Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh").read_text()
    assert "--architecture flux" in script
    with pytest.raises(ValueError, match="must be even"):
        gpu_check.main([*argv, "--latent_size", "7", "--output-dir", str(tmp_path / "odd")])


def test_run_all_lists_every_benchmark(capsys):
    assert run_all.main(["--dry-run"]) == 0
    printed = capsys.readouterr().out
    for name in ("overhead", "memory", "sampling", "tradeoff", "classifier", "clip"):
        assert f"-m benchmarks.{name}" in printed
    for line in printed.splitlines():  # each printed command parses with its benchmark's own options
        argv = shlex.split(line.split("] ", 1)[1])
        parse_config(COMMANDS[argv[2]], argv[3:])


def _documented_commands() -> list[tuple[str, list[str]]]:
    """(module or console script, arguments) of every benchmark command in README.md and BENCHMARKS.md."""
    pattern = re.compile(r"(?:python -m (benchmarks\.\w+)|(munba-unlearn-(?:classifier|clip)))((?: [^`\n#|]*)?)")
    commands = []
    for name in ("README.md", "BENCHMARKS.md"):
        text = (ROOT / name).read_text().replace("\\\n", " ")
        for module, script, arguments in pattern.findall(text):
            argv = [token for token in shlex.split(arguments) if token != "..."]  # "..." elides the rest
            if argv:  # a bare name in prose is no command
                commands.append((module or script, argv))
    return commands


def test_documented_commands_parse():
    commands = _documented_commands()
    assert {target for target, _ in commands} >= {
        "benchmarks.overhead",
        "benchmarks.memory",
        "benchmarks.sampling",
        "benchmarks.tradeoff",
        "benchmarks.classifier",
        "benchmarks.clip",
        "munba-unlearn-classifier",
        "munba-unlearn-clip",
    }
    for target, argv in commands:
        parse_config(COMMANDS[target], argv)  # exits (SystemExit) on a flag that no longer exists


def test_flags_are_underscore_names_with_hyphen_aliases():
    parser = build_parser(tradeoff.TradeoffConfig)
    flags = {s for action in parser._actions for s in action.option_strings}
    assert {
        "--output_dir",
        "--output-dir",
        "--two_concept_methods",
        "--two-concept-methods",
        "--no_two_concepts",
        "--sampler_guidance",
        "--sampler-guidance",
    } <= flags
    config = parse_config(tradeoff.TradeoffConfig, ["--sampler-guidance", "3", "--no-two-concepts", "--seeds", "4"])
    assert config.sampler_guidance_scale == 3.0 and config.concept_sets == [] and config.seeds == (4,)
    with pytest.raises(ValueError, match="exclude each other"):
        tradeoff.TradeoffConfig(resume=True, overwrite=True)


@pytest.mark.parametrize("script", ["munba-unlearn-classifier", "munba-unlearn-clip"])
def test_console_scripts_run_outside_the_checkout(script, tmp_path):
    module = {"munba-unlearn-classifier": "classifier", "munba-unlearn-clip": "clip"}[script]
    installed = shutil.which(script)
    command = [installed] if installed else [sys.executable, "-m", f"munba_diffusion.benchmarks.{module}"]
    result = subprocess.run([*command, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--output_dir" in result.stdout and "--output-dir" in result.stdout


def test_wilson_interval_matches_the_formula_and_stays_in_bounds():
    wilson = specificity.wilson_interval  # the evaluation package's one implementation (tests/test_eval_intervals.py)

    interval = wilson(0, 24)
    assert interval["rate"] == 0.0 and interval["low"] == 0.0 and 0.13 < interval["high"] < 0.15  # 0/24: [0, 0.138]
    interval = wilson(22, 24)
    assert interval["low"] < 22 / 24 < interval["high"] <= 1.0
    assert wilson(0, 0)["rate"] is None


def test_specificity_runs_at_tiny_size(tmp_path):

    out = tmp_path / "specificity"
    tiny = ["--steps", "2", "--sampler_steps", "2", "--pool_trajectories", "1", "--max_eval_prompts", "1"]
    tiny += ["--eval_steps", "2", "--grid_steps", "1"]
    specificity.main(
        [
            *tiny,
            "--concept_sets",
            "red",
            "--forget_losses",
            "anchored_esd",
            "--combiners",
            "nash",
            "--seeds",
            "0",
            "--output_dir",
            str(out),
        ]
    )
    results = json.loads((out / "results.json").read_text())
    (row,) = results["summary"]
    assert row["forget_loss"] == "anchored_esd" and row["concept"] == "red" and row["seeds"] == [0]
    assert 0.0 <= row["concept_rate"]["mean"] <= 1.0 and (out / "results.png").is_file()
    assert "anchored_esd" in (out / "results.md").read_text()
    with pytest.raises(ValueError, match=r"other settings \(.*erasure.steps: 2 there, 200 now"):
        specificity.main(["--report_only", "--concept_sets", "red", "--output_dir", str(out), "--overwrite"])
    report = specificity.main(
        [
            *tiny,
            "--report_only",
            "--concept_sets",
            "red",
            "--forget_losses",
            "anchored_esd",
            "esd",
            "--combiners",
            "nash",
            "--seeds",
            "0",
            "--output_dir",
            str(out),
            "--overwrite",
        ]
    )
    assert report["missing"] == ["red-esd-nash-folded-seed0"] and len(report["runs"]) == 1


def test_overhead_and_memory_sweep_the_number_of_players(tmp_path):
    """Step time and memory for K players: the fast path, the per-player passes and an ordinary step."""
    variants = ["nash", "nash_per_player", "single_backward"]
    out = tmp_path / "overhead"
    common = ["--latent_size", "8", "--rounds", "1", "--warmup", "0"]
    overhead.main(
        ["--models", "sd15-tiny", *common, "--players", "2", "3", "--variants", *variants, "--output_dir", str(out)]
    )
    results = _results(out)
    assert [(m["model"], m["players"]) for m in results["models"]] == [("sd15-tiny", 2), ("sd15-tiny", 3)]
    for model in results["models"]:
        assert set(model["seconds_per_step"]) == set(variants)
        assert {"nash_over_single_backward", "nash_per_player_over_single_backward"} <= set(model["ratios"])
    assert "per-player / ordinary" in (out / "results.md").read_text()
    out = tmp_path / "memory"
    memory.main(
        [
            "--architecture",
            "sd15-tiny",
            "--latent_size",
            "8",
            "--players",
            "3",
            "--variants",
            "ours",
            "ordinary",
            "esd",
            "--analytic_targets",
            "xattn",
            "--output_dir",
            str(out),
        ]
    )
    measured = _results(out)["measured"]
    assert list(measured) == ["xattn, K=3"] and set(measured["xattn, K=3"]["runs"]) == {"ours", "ordinary"}
    ratios = measured["xattn, K=3"]["ratios"]
    assert ratios["held_ours_over_ordinary"] == 1.0  # one UNet, one LoRA, its AdamW states and its .grad in both
    assert 1.0 <= ratios["saved_ours_over_ordinary"] < 1.10  # the same activations plus K copies of the LoRA


def test_robustness_report_averages_the_runs_over_seeds(tmp_path):
    """--report_only: per method, means and stds over seeds of the attack rates, kept attribute and other prompts."""
    runs = tmp_path / "runs"
    runs.mkdir(parents=True)

    def rate(value):
        return {"rate": value, "low": 0.0, "high": 1.0, "n": 12}

    def scores(concept, kept, other):
        return {
            "concepts": {"red": {"concept_rate": concept, "kept_attribute_accuracy": kept}},
            "other_accuracy": other,
        }

    (runs / "original.json").write_text(
        json.dumps({"scores": scores(0.9, 0.8, 0.85), "replay": {"rows": 10, "rows_kept": 7}})
    )
    for method, seed, post in (("plain", 0, 0.5), ("plain", 1, 0.7), ("robust", 0, 0.1), ("robust", 1, 0.2)):
        record = {
            "method": method,
            "seed": seed,
            "train_seconds": 100.0 * (1 + seed),
            "scores": scores(0.0, 0.75, 0.8),
            "whitebox": {"pre_attack_success_rate": rate(0.0), "post_attack_success_rate": rate(post)},
            "replay": {"attack_success_rate": rate(post / 2)},
        }
        (runs / f"{method}-seed{seed}.json").write_text(json.dumps(record))
    robustness.main(
        ["--report_only", "--methods", "plain", "robust", "--seeds", "0", "1", "--output_dir", str(tmp_path)]
    )
    results = _results(tmp_path)
    by_method = {row["method"]: row for row in results["summary"]}
    assert by_method["plain"]["whitebox_post"]["mean"] == pytest.approx(0.6)
    assert by_method["plain"]["whitebox_post"]["std"] == pytest.approx(0.1414, abs=1e-4)
    assert by_method["robust"]["replay"]["mean"] == pytest.approx(0.075)
    assert results["original"]["replay"] == 0.7 and results["missing"] == []
    markdown = (tmp_path / "results.md").read_text()
    assert "| robust | 2 | 0.0 ± 0.0 | 0.0 ± 0.0 | 15.0 ± 7.1 |" in markdown
    assert (tmp_path / "results.png").is_file()


def test_specificity_sequential_erases_each_concept_from_the_previous_stage(tmp_path, monkeypatch):
    calls = []

    def fake_erasure(settings, concepts, output_dir, *, combiner, **options):
        calls.append((settings.model, list(concepts), output_dir, combiner, options["seed"]))

    monkeypatch.setattr(specificity, "run_erasure", fake_erasure)
    config = specificity.SpecificityConfig(output_dir=tmp_path / "out")
    final = specificity.erase(config, tmp_path / "run", ["red", "blue", "green"], "sequential", 3, "esd", "folded")
    stages = [call[2] for call in calls]
    assert [call[1] for call in calls] == [["red"], ["blue"], ["green"]]
    assert [call[0] for call in calls] == [config.model, str(stages[0]), str(stages[1])]
    assert {call[3] for call in calls} == {"nash"} and {call[4] for call in calls} == {3} and final == stages[-1]
    calls.clear()
    assert specificity.erase(config, tmp_path / "one", ["red", "blue"], "sum", 0, "esd", "folded") == tmp_path / "one"
    assert calls == [(config.model, ["red", "blue"], tmp_path / "one", "sum", 0)]


def test_specificity_one_substitute_trains_each_concept_on_a_preset_cut_to_that_substitute(tmp_path, monkeypatch):
    """--one_substitute blue hands the trainer a preset file where each red prompt has only its blue substitute (the
    rest of the preset as it was), records the setting, and refuses what it cannot do before anything trains."""
    from munba_diffusion.presets import resolve_concept

    calls = []
    monkeypatch.setattr(specificity, "run_erasure", lambda settings, concepts, output_dir, **kw: calls.append(concepts))
    config = specificity.SpecificityConfig(
        concept_sets=("red",), forget_losses=("substitute",), one_substitute="blue", output_dir=tmp_path / "out"
    )
    specificity.erase(config, tmp_path / "run", ["red"], "nash", 0, "substitute", "folded")
    (spec,) = calls[0]
    cut, red = resolve_concept(spec), resolve_concept("red")
    assert cut.name == "red" and cut.forget_prompts == red.forget_prompts
    assert cut.substitute_prompts[1] == ("a blue circle",) and len(red.substitute_prompts[1]) == 3
    assert all(len(s) == 1 and "blue" in s[0].split() for s in cut.substitute_prompts)
    assert cut.preserve_prompts == red.preserve_prompts and cut.neighbour_prompts == red.neighbour_prompts
    assert config.run_settings()["erasure"]["one_substitute"] == "blue"
    assert "one_substitute" not in specificity.SpecificityConfig().run_settings()["erasure"]

    with pytest.raises(ValueError, match="--one_substitute applies to --forget_losses substitute only"):
        specificity.SpecificityConfig(forget_losses=("esd", "substitute"), one_substitute="blue")
    with pytest.raises(ValueError, match="0 substitutes of 'a red object' name 'circle'"):
        specificity.SpecificityConfig(concept_sets=("red",), forget_losses=("substitute",), one_substitute="circle")


def test_specificity_scores_a_concept_set_without_counting_its_own_concepts_as_kept_or_neighbours(monkeypatch):
    """red + circle erased together: "a red circle" keeps nothing for either concept (its shape is erased too), "a blue
    circle" is a colour neighbour of red and keeps its colour for circle; only prompts with neither are "other"."""
    from types import SimpleNamespace

    from PIL import Image

    from munba_diffusion.demo import COLOURS, SHAPES
    from munba_diffusion.evaluation.manifest import ImageEntry

    asked_judged = [  # (asked colour, asked shape) -> (judged colour, judged shape)
        (("red", "circle"), ("blue", "square")),
        (("red", "square"), ("blue", "square")),
        (("blue", "circle"), ("blue", "circle")),
        (("green", "square"), ("green", "triangle")),
    ]
    entries = [
        ImageEntry(Path(f"{i}.png"), {"colour": c, "shape": s, "prompt": f"a {c} {s}"})
        for i, ((c, s), _) in enumerate(asked_judged)
    ]
    judge = SimpleNamespace(
        classify=lambda images: SimpleNamespace(
            colour=torch.tensor([COLOURS.index(c) for _, (c, _) in asked_judged]),
            shape=torch.tensor([SHAPES.index(s) for _, (_, s) in asked_judged]),
        )
    )
    monkeypatch.setattr(specificity, "collect_images", lambda folder: entries)
    monkeypatch.setattr(specificity, "load_rgb", lambda path: Image.new("RGB", (4, 4)))
    scores = specificity.specificity_scores(Path("unused"), ["red", "circle"], judge)
    red, circle = scores["concepts"]["red"], scores["concepts"]["circle"]
    assert (red["concept_rate"]["rate"], red["concept_rate"]["n"]) == (0.0, 2)
    assert (red["kept_attribute"]["rate"], red["kept_attribute"]["n"]) == (1.0, 1)  # "a red square" only
    assert (red["neighbour_accuracy"]["rate"], red["neighbour_accuracy"]["n"]) == (1.0, 2)  # blue and green asked
    assert red["substitutes"] == {"blue": 2}
    assert (circle["concept_rate"]["rate"], circle["concept_rate"]["n"]) == (0.5, 2)
    assert (circle["kept_attribute"]["rate"], circle["kept_attribute"]["n"]) == (1.0, 1)  # "a blue circle" only
    assert (circle["neighbour_accuracy"]["rate"], circle["neighbour_accuracy"]["n"]) == (0.5, 2)  # square, square
    assert (scores["other_accuracy"]["rate"], scores["other_accuracy"]["n"]) == (0.0, 1)  # the green triangle
    assert scores["other_by_prompt"] == {"a green square": {"right": 0, "n": 1}}  # where the other prompts lose


def test_prompt_channels_feeds_each_channel_its_own_caption(tmp_path):
    """A caption given as both tokens and pooled vector draws exactly the pipeline's own images of it, and a swap
    draws others; every image of a swapped pair is counted once, as whose attribute it shows. A UNet model is
    refused in one line before anything is written."""
    results = prompt_channels.main(["--images", "2", "--steps", "2", "--output_dir", str(tmp_path / "out")])
    config = parse_config(prompt_channels.PromptChannelsConfig, ["--images", "2", "--steps", "2"])
    pipe = load_base_pipeline(config.model)
    own = pipe(
        ["a red cross"] * 2,
        num_inference_steps=2,
        guidance_scale=config.guidance,
        generator=[torch.Generator().manual_seed(prompt_channels.SEED + k) for k in range(2)],
        output_type="pt",
    ).images
    assert torch.equal(prompt_channels.images_of(pipe, "a red cross", "a red cross", config), own)
    assert not torch.equal(prompt_channels.images_of(pipe, "a red cross", "a blue cross", config), own)
    pairs = results["pairs"]
    assert len(pairs) == len(prompt_channels.swapped_pairs()) == 16
    assert all(sum(p[c] for c in prompt_channels.CHANNELS) == 2 for p in pairs)
    assert {("a red circle", "a blue circle"), ("a red cross", "a red circle")} <= {
        (p["tokens_of"], p["pooled_of"]) for p in pairs
    }
    for attribute in ("colour", "shape"):
        assert sum(results["summary"][attribute][c]["rate"] for c in prompt_channels.CHANNELS) == pytest.approx(1.0)
    assert "follows the pooled vector" in (tmp_path / "out" / "results.md").read_text()
    with Image.open(tmp_path / "out" / "pairs.png") as picture:  # one labelled row per swapped pair
        assert picture.height > 16 * 50
    with pytest.raises(
        ValueError, match="munba-demo is Stable Diffusion; this benchmark takes an SD3 model of the demo world"
    ):
        prompt_channels.main(["--model", "munba-demo", "--output_dir", str(tmp_path / "unet")])
    assert not (tmp_path / "unet").exists()
