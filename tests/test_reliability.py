"""Nothing lost, nothing silent (trainer side): resume refuses other settings, torn files, the Hub cache offline,
secrets, the exported dtype, launches that cannot be what was asked, optional packages found at start."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors import safe_open
from safetensors.torch import load_file

import munba_diffusion.diffusion.preflight as preflight
import munba_diffusion.diffusion.train as train
import train_erase
from munba_diffusion.diffusion.base_model import load_base_pipeline
from munba_diffusion.diffusion.checkpoints import truncate_log
from munba_diffusion.diffusion.config import ErasureTrainingConfig
from munba_diffusion.diffusion.export import export_erased_model
from munba_diffusion.models import DEMO_MODEL, resolve_model_path
from tests.tiny_sd import add_random_lora, build_tiny_sd_pipeline, tiny_erasure_config

torch.set_num_threads(1)
FAST = [
    "--sampler_steps",
    "2",
    "--pool_trajectories",
    "1",
    "--validation_inference_steps",
    "1",
    "--validation_seeds",
    "1",
    "--no_evaluation",
    "--train_batch_size",
    "1",
]
SECRET = "hf_thisIsNotARealToken123"
RESUME_CHANGES = [
    ("--rank", "8", "rank"),
    ("--learning_rate", "0.5", "learning_rate"),
    ("--concept", "square", "concepts"),
]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _refusal_before_loading(monkeypatch, argv: list[str]) -> str:
    """The one-line message ``train_erase`` stops with on ``argv``, failing the test if the base model loads first."""
    with monkeypatch.context() as patch, pytest.raises(SystemExit) as exit_info:
        patch.setattr(train, "load_base_pipeline", lambda *a, **k: pytest.fail("the model loaded"))
        train_erase.main(argv)
    message = str(exit_info.value.code)
    assert "\n" not in message
    return message


@pytest.fixture(scope="module")
def checkpointed_run(tmp_path_factory):
    """A 3-step demo run with a checkpoint at step 2; the trackers' configuration is captured."""
    out = tmp_path_factory.mktemp("run") / "erased"
    captured = {}
    original = Accelerator.init_trackers

    def capture(self, project_name, config=None, init_kwargs=None):
        captured["config"] = config
        return original(self, project_name, config=config, init_kwargs=init_kwargs or {})

    Accelerator.init_trackers = capture
    try:
        train_erase.main(
            [
                "--pretrained_model_name_or_path",
                DEMO_MODEL,
                "--concept",
                "circle",
                "--output_dir",
                str(out),
                "--max_train_steps",
                "3",
                "--checkpointing_steps",
                "2",
                "--hub_token",
                SECRET,
                *FAST,
            ]
        )
    finally:
        Accelerator.init_trackers = original
    return out, captured["config"]


def test_secrets_never_reach_trackers_logs_records_or_cards(checkpointed_run):
    out, tracker_config = checkpointed_run
    assert "hub_token" not in tracker_config and SECRET not in json.dumps(tracker_config)
    assert tracker_config["rank"] == "4"  # the trackers do get the run's settings
    for path in out.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


@pytest.mark.parametrize(
    "flag,value,setting",
    # resuming past --max_train_steps would export a longer run under a smaller count
    [*RESUME_CHANGES, ("--max_train_steps", "2", "max_train_steps")],
)
def test_resume_with_other_settings_refuses_naming_the_setting(
    checkpointed_run, tmp_path, capsys, flag, value, setting
):
    out = shutil.copytree(checkpointed_run[0], tmp_path / "erased")
    before = _files(out)
    argv = [
        "--pretrained_model_name_or_path",
        DEMO_MODEL,
        "--concept",
        "circle",
        "--output_dir",
        str(out),
        "--max_train_steps",
        "3",
        "--resume_from_checkpoint",
        "latest",
        "--hub_token",
        SECRET,
        *FAST,
    ]
    argv = [value if a == "circle" and flag == "--concept" else a for a in argv] + (
        [] if flag == "--concept" else [flag, value]
    )
    with pytest.raises(SystemExit) as exit_info:
        train_erase.main(argv)
    message = str(exit_info.value.code)
    assert "\n" not in message and f"trained with {setting}=" in message and "--overwrite_output_dir" in message
    assert _files(out) == before


def test_a_damaged_checkpoint_is_one_line(checkpointed_run, tmp_path):
    out = shutil.copytree(checkpointed_run[0], tmp_path / "erased")
    lora = out / "checkpoints" / "checkpoint-2" / "erasure_lora.safetensors"
    lora.write_bytes(lora.read_bytes()[:100])  # torn by a kill or a full disk
    with pytest.raises(SystemExit) as exit_info:
        train_erase.main(
            [
                "--pretrained_model_name_or_path",
                DEMO_MODEL,
                "--concept",
                "circle",
                "--output_dir",
                str(out),
                "--max_train_steps",
                "3",
                "--resume_from_checkpoint",
                "latest",
                *FAST,
            ]
        )
    message = str(exit_info.value.code)
    assert "\n" not in message and "checkpoint-2 is damaged" in message and "earlier checkpoint" in message


def test_a_checkpoint_past_the_runs_last_step_is_refused_before_the_model_loads(
    checkpointed_run, tmp_path, monkeypatch
):
    """A checkpoint whose step file says more steps than its run's --max_train_steps (copied in from elsewhere or
    edited) would export a longer run under a smaller count: one line, nothing loaded, nothing changed."""
    out = shutil.copytree(checkpointed_run[0], tmp_path / "erased")
    (out / "checkpoints" / "checkpoint-2" / "step.json").write_text('{"global_step": 7}')
    before = _files(out)
    argv = ["--pretrained_model_name_or_path", DEMO_MODEL, "--concept", "circle", "--output_dir", str(out)]
    message = _refusal_before_loading(
        monkeypatch, [*argv, "--max_train_steps", "3", "--resume_from_checkpoint", "latest", *FAST]
    )
    assert "checkpoint-2 is at step 7, past --max_train_steps 3" in message
    assert _files(out) == before


def test_a_checkpoint_refuses_a_local_base_whose_files_changed(checkpointed_run, tmp_path, monkeypatch):
    """A local or bundled base has no commit: each checkpoint (and the exported record) keeps its files' sha256, and a
    resume on other files under the same name (a folder retrained in place, a newer bundled demo) stops in one line
    before the model loads, with nothing changed; on the same files it resumes exactly."""
    from munba_diffusion.models import model_folder_sha256

    out = shutil.copytree(checkpointed_run[0], tmp_path / "erased")
    step_file = out / "checkpoints" / "checkpoint-2" / "step.json"
    record = json.loads(step_file.read_text())
    assert record["base_sha256"] == model_folder_sha256(DEMO_MODEL) and record["base_commit"] is None
    step_file.write_text(json.dumps({**record, "base_sha256": "0" * 64}))  # trained on other files
    before = _files(out)
    argv = ["--pretrained_model_name_or_path", DEMO_MODEL, "--concept", "circle", "--output_dir", str(out)]
    resume = [*argv, "--max_train_steps", "3", "--resume_from_checkpoint", "latest", *FAST]
    message = _refusal_before_loading(monkeypatch, resume)
    assert f"trained on the bundled {DEMO_MODEL} (files' sha256 000000000000)" in message
    assert f"has other files now (sha256 {record['base_sha256'][:12]})" in message
    assert "resume with the munba-diffusion version it trained with" in message
    assert _files(out) == before
    step_file.write_text(json.dumps(record))
    train_erase.main(resume)  # the same files: step 3 again, exactly as the run that wrote the checkpoint took it
    resumed, original = (
        load_file(folder / "pytorch_lora_weights.safetensors") for folder in (out, checkpointed_run[0])
    )
    assert resumed.keys() == original.keys() and all(torch.equal(resumed[k], original[k]) for k in original)
    assert json.loads((out / "erasure_config.json").read_text())["run"]["base_sha256"] == record["base_sha256"]


C, D, X, Y = "c" * 40, "d" * 40, "1" * 64, "2" * 64


@pytest.mark.parametrize(
    "saved,now,refusal",
    [
        ((None, X), (None, X), None),  # the same local files
        ((None, X), (None, Y), "which has other files now (sha256 222222222222): put back the files it trained on"),
        ((C, X), (C, None), None),  # trained on a Hub snapshot given as a path, resumed by its id at that commit
        ((C, None), (C, Y), None),  # trained by id, resumed with the snapshot's path
        ((C, X), (C, Y), "which has other files now"),  # the snapshot's files changed in place
        ((None, X), (D, None), "which is no longer a local folder: put it back"),  # the folder is gone: now a Hub id
        ((C, None), (D, None), f"at commit {C}, which now resolves to {D}; resume with --revision {C}"),
        ((C, None), (None, Y), f"at commit {C}, and base is now a local folder"),
        ((None, None), (D, Y), None),  # a checkpoint from before either was recorded
    ],
)
def test_the_base_a_checkpoint_trained_on_decides_the_resume(tmp_path, saved, now, refusal):
    """check_same_base on every pairing of what a checkpoint recorded (Hub commit, files' sha256) and what the base
    is now: the files decide where both sides know them, else the commit; a local base that is gone is refused."""
    from types import SimpleNamespace

    from munba_diffusion.diffusion.checkpoints import check_same_base

    (tmp_path / "step.json").write_text(
        json.dumps({"global_step": 2, "base_commit": saved[0], "base_sha256": saved[1]})
    )
    config = SimpleNamespace(pretrained_model_name_or_path="base")
    if refusal is None:
        check_same_base(config, tmp_path, *now)
    else:
        with pytest.raises(ValueError) as error:
            check_same_base(config, tmp_path, *now)
        assert refusal in str(error.value) and "\n" not in str(error.value)


def test_a_checkpoint_without_its_base_commit_refuses_another_revision(checkpointed_run, tmp_path):
    """A checkpoint written before commits were saved cannot check what --revision resolves to, so a changed
    --revision is refused as any other setting is (it could load another base)."""
    out = shutil.copytree(checkpointed_run[0], tmp_path / "erased")
    (out / "checkpoints" / "checkpoint-2" / "step.json").write_text('{"global_step": 2}')
    argv = ["--pretrained_model_name_or_path", DEMO_MODEL, "--concept", "circle", "--output_dir", str(out)]
    with pytest.raises(SystemExit) as exit_info:
        train_erase.main(
            [*argv, "--max_train_steps", "3", "--resume_from_checkpoint", "latest", *FAST, "--revision", "v2"]
        )
    assert 'trained with revision=null, this run asks for "v2"' in exit_info.value.code


def test_a_log_torn_by_a_kill_is_truncated_cleanly(tmp_path):
    log = tmp_path / "train_log.jsonl"
    log.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"ste')
    truncate_log(log, 2)
    assert log.read_text() == '{"step": 1}\n{"step": 2}\n'


def test_a_hub_base_records_its_commit_and_a_resume_after_main_moved_is_refused(tmp_path, monkeypatch):
    """A run on a Hub id records the commit it trained on (erasure_config.json, the model card, each checkpoint).
    When the id's main has moved to another commit by the time of a resume, the resume stops in one line naming
    --revision, before the model loads; with that --revision it resumes."""
    import huggingface_hub.constants as constants

    repo = tmp_path / "hub" / "models--someone--tiny-demo"
    started_on, pushed_later = "a" * 40, "b" * 40
    for commit in (started_on, pushed_later):
        shutil.copytree(resolve_model_path(DEMO_MODEL), repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(started_on)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "erased"
    argv = ["--pretrained_model_name_or_path", "someone/tiny-demo", "--concept", "circle", "--output_dir", str(out)]
    argv += ["--max_train_steps", "3", "--checkpointing_steps", "2", *FAST]
    train_erase.main(argv)
    assert json.loads((out / "erasure_config.json").read_text())["run"]["base_commit"] == started_on
    card = (out / "README.md").read_text()
    assert f"(commit `{started_on}`)" in card
    assert card.count(f'.from_pretrained("someone/tiny-demo", revision="{started_on}")') == 2  # the base + LoRA way
    assert json.loads((out / "checkpoints" / "checkpoint-2" / "step.json").read_text())["base_commit"] == started_on

    (repo / "refs" / "main").write_text(pushed_later)
    resume = [*argv, "--resume_from_checkpoint", "checkpoint-2"]
    before = _files(out)
    message = _refusal_before_loading(monkeypatch, resume)
    assert f"trained on someone/tiny-demo at commit {started_on}" in message
    assert f"resolves to {pushed_later}; resume with --revision {started_on}" in message
    assert _files(out) == before
    (tmp_path / "someone").mkdir()  # the same name is now a local folder (a download with --local-dir here)
    shutil.copytree(repo / "snapshots" / pushed_later, tmp_path / "someone" / "tiny-demo")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        train_erase.main(resume)
    assert "someone/tiny-demo is now a local folder: move it away and resume with --revision" in exit_info.value.code
    shutil.rmtree(tmp_path / "someone")
    train_erase.main([*resume, "--revision", started_on])
    assert json.loads((out / "erasure_config.json").read_text())["run"]["base_commit"] == started_on


@pytest.mark.parametrize(
    "loaded_from,commit",
    [
        (f"/cache/models--owner--name/snapshots/{'0123abcd' * 5}/transformer", "0123abcd" * 5),
        ("/home/me/snapshots/sd15/unet", None),  # a local folder that happens to sit in a "snapshots" folder
        (f"/home/me/snapshots/{'0123abcd' * 5}/unet", None),
        ("/cache/models--owner--name/snapshots/main/unet", None),
        ("", None),
    ],
)
def test_the_base_commit_is_read_only_from_a_hub_cache_snapshot(loaded_from, commit):
    from types import SimpleNamespace

    from munba_diffusion.diffusion.base_model import base_commit

    assert base_commit(SimpleNamespace(config=SimpleNamespace(_name_or_path=loaded_from))) == commit


def test_offline_hub_id_in_the_local_cache_loads(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--tiny-demo" / "snapshots" / ("0" * 40)
    shutil.copytree(resolve_model_path(DEMO_MODEL), snapshot)
    (cache / "models--someone--tiny-demo" / "refs").mkdir()
    (cache / "models--someone--tiny-demo" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    pipe = load_base_pipeline("someone/tiny-demo")
    assert pipe.unet.config.sample_size == 16
    with pytest.raises(OSError, match="not in the local Hugging Face cache") as error:
        load_base_pipeline("someone/not-cached")
    assert "\n" not in str(error.value)


def test_half_precision_training_exports_the_base_dtype(tmp_path):
    pipe = build_tiny_sd_pipeline(0)
    add_random_lora(pipe)
    pipe.to(dtype=torch.bfloat16)  # what --mixed_precision bf16 does to the frozen weights in memory
    out = export_erased_model(pipe, tmp_path / "out", tiny_erasure_config())
    for part in (
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
    ):
        with safe_open(out / part, "pt") as weights:
            assert {weights.get_tensor(k).dtype for k in weights.keys()} == {torch.float32}, part
    assert pipe.vae.dtype == torch.bfloat16 and pipe.unet.dtype == torch.bfloat16  # the caller's pipeline untouched


def test_processes_that_each_run_alone_are_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="ACCELERATE_USE_CPU=1 torchrun") as error:
        preflight.check_processes(num_processes=1)
    assert "\n" not in str(error.value)
    preflight.check_processes(num_processes=2)  # a working two-process launch


@pytest.mark.parametrize(
    ("variable", "expected"),
    [("ACCELERATE_USE_FSDP", "not Accelerate's FSDP plugin"), ("ACCELERATE_USE_DEEPSPEED", "not support DeepSpeed")],
)
def test_a_sharded_launch_is_refused_before_any_model_loads(monkeypatch, tmp_path, variable, expected):
    """`accelerate launch` with an FSDP or DeepSpeed config sets these variables; the trainer prepares no model with
    the accelerator, so the plugin would shard nothing and copy the whole base to every GPU: the line names the
    data-parallel launch and --shard_base instead."""

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("munba_diffusion.diffusion.train.base_model_family", no_loading)
    monkeypatch.setenv(variable, "true")
    with pytest.raises(SystemExit) as error:
        train_erase.main(["--concept", "red", "--output_dir", str(tmp_path / "out")])
    message = str(error.value.code)
    assert expected in message and "--multi_gpu" in message and "--shard_base" in message and "\n" not in message
    assert not (tmp_path / "out").exists()
    monkeypatch.setenv(variable, "false")  # what accelerate sets for a plain launch
    preflight.check_run_environment(ErasureTrainingConfig(concepts=["red"], output_dir=tmp_path / "out"))


def test_sharding_one_process_is_refused_before_any_model_loads(monkeypatch, tmp_path):
    """--shard_base splits the base across processes: a one-process launch has nothing to split it over."""

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("munba_diffusion.diffusion.train.base_model_family", no_loading)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit) as error:
        train_erase.main(["--concept", "red", "--output_dir", str(tmp_path / "out"), "--shard_base"])
    message = str(error.value.code)
    assert "--shard_base" in message and "launch several" in message and "\n" not in message
    monkeypatch.setenv("WORLD_SIZE", "2")
    preflight.check_run_environment(ErasureTrainingConfig(concepts=["red"], output_dir=tmp_path / "o", shard_base=True))


def test_sharding_on_a_pytorch_without_fsdp2s_ignored_params_is_refused(monkeypatch, tmp_path):
    from torch.torch_version import TorchVersion

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(preflight.torch, "__version__", TorchVersion("2.6.0+cu124"))
    config = ErasureTrainingConfig(concepts=["red"], output_dir=tmp_path / "out", shard_base=True)
    with pytest.raises(
        ValueError, match=r"--shard_base needs PyTorch 2.7 or newer .* 2.6.0\+cu124: pip install -U torch"
    ):
        preflight.check_run_environment(config)
    monkeypatch.setattr(preflight.torch, "__version__", TorchVersion("2.7.1"))
    preflight.check_run_environment(config)


def test_accelerate_asked_for_two_processes_but_started_one(tmp_path):
    """`accelerate launch --cpu --num_processes 2` runs one process; its parent's command line says 2."""
    parent = tmp_path / "launcher.py"
    parent.write_text(
        "import subprocess, sys\nsys.exit(subprocess.call([sys.executable, '-c', "
        "'from munba_diffusion.diffusion.preflight import launched_processes; "
        "print(launched_processes())']))\n"
    )
    result = subprocess.run(
        [sys.executable, str(parent), "accelerate", "--num_processes", "2"],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path.cwd())},
    )
    assert result.stdout.strip() == "2"


@pytest.mark.parametrize(
    "overrides,fix",
    [
        ({"report_to": "tensorboard"}, 'pip install "munba-diffusion[tensorboard]"'),
        ({"enable_xformers_memory_efficient_attention": True}, 'pip install "munba-diffusion[xformers]"'),
    ],
)
def test_missing_optional_packages_are_found_at_start(monkeypatch, tmp_path, overrides, fix):
    monkeypatch.setattr(preflight.importlib.util, "find_spec", lambda name: None)
    config = ErasureTrainingConfig(concepts=["red"], output_dir=tmp_path / "out", **overrides)
    with pytest.raises(ValueError) as error:
        preflight.check_run_environment(config)
    assert fix in str(error.value) and "\n" not in str(error.value)


def test_push_to_hub_problems_are_found_at_start(monkeypatch, tmp_path):
    config = ErasureTrainingConfig(
        concepts=["red"], output_dir=tmp_path / "out", push_to_hub=True, hub_model_id="someone/x"
    )
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="cannot upload while offline"):
        preflight.check_run_environment(config)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(preflight, "get_token", lambda: None)
    with pytest.raises(ValueError, match="needs a Hub token"):
        preflight.check_run_environment(config)
