"""train_erase.py end to end: accelerate launch, checkpoints, kill + resume, the saved folder, bad input."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

import train_erase
from munba_diffusion.models import DEMO_MODEL as DEMO_MODEL_NAME

ROOT = Path(__file__).resolve().parents[1]
FAST = [
    "--sampler_steps",
    "5",
    "--pool_trajectories",
    "1",
    "--validation_inference_steps",
    "4",
    "--validation_seeds",
    "1",
    "--no_evaluation",
    "--train_batch_size",
    "2",
]
DEMO_ERASURE = [
    "--lora_target",
    "attn",
    "--rank",
    "4",
    "--learning_rate",
    "1e-3",
    "--sampler_guidance_scale",
    "4",
    "--validation_guidance_scale",
    "4",
]


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _launch(args: list[str]) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--cpu",
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(ROOT / "train_erase.py"),
        *args,
    ]
    # its own process group, so that a kill reaches accelerate's training child too
    return subprocess.Popen(
        cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def _lora(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "pytorch_lora_weights.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "erased"
    proc = _launch(
        [
            "--pretrained_model_name_or_path",
            DEMO_MODEL_NAME,
            "--concept",
            "circle",
            "--output_dir",
            str(out),
            "--max_train_steps",
            "8",
            "--checkpointing_steps",
            "2",
            "--checkpoints_total_limit",
            "2",
            *FAST,
        ]
    )
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log[-3000:]
    return out


def test_checkpoints_are_pruned_to_the_limit(uninterrupted):
    names = sorted(p.name for p in (uninterrupted / "checkpoints").iterdir())
    assert names == ["checkpoint-4", "checkpoint-6"]  # 2, 4, 6 written; the limit keeps the last two
    assert (uninterrupted / "checkpoints" / "checkpoint-6" / "erasure_lora.safetensors").is_file()


def test_step_log_records_the_bargaining(uninterrupted):
    records = [json.loads(line) for line in (uninterrupted / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 9))
    late = records[-1]
    for key in (
        "weight/preserve",
        "weight/forget",
        "cos_phi",
        "loss/preserve",
        "loss/forget",
        "utility/preserve",
        "utility/forget",
    ):
        assert key in late
    ok = [r for r in records if r["status"] == "ok"]
    assert ok, "every step hit a degenerate case"
    # Nash bargaining: |d|^2 = 2 and both utilities positive whenever the solution exists
    assert all(abs(r["direction_norm"] - 2**0.5) < 1e-6 for r in ok)
    assert all(r["utility/preserve"] > 0 and r["utility/forget"] > 0 for r in ok)


def test_kill_and_resume_latest_gives_the_same_lora(uninterrupted, tmp_path):
    out = tmp_path / "erased"
    args = [
        "--pretrained_model_name_or_path",
        DEMO_MODEL_NAME,
        "--concept",
        "circle",
        "--output_dir",
        str(out),
        "--max_train_steps",
        "8",
        "--checkpointing_steps",
        "2",
        "--checkpoints_total_limit",
        "2",
        *FAST,
    ]
    proc = _launch(args)
    first = out / "checkpoints" / "checkpoint-2"
    deadline = time.time() + 300
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert not (out / "model_index.json").exists(), "the run finished before it could be killed"
    assert first.exists()

    resumed = _launch([*args, "--resume_from_checkpoint", "latest"])
    log, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, log[-3000:]
    a, b = _lora(uninterrupted), _lora(out)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    steps = [json.loads(line)["step"] for line in (out / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))  # each step logged once


def test_saved_folder_loads_three_ways_and_matches_base_plus_lora(uninterrupted):
    from diffusers import DiffusionPipeline

    from munba_diffusion import MunbaPipeline

    def image(pipe):
        pipe.set_progress_bar_config(disable=True)
        return pipe(
            "a red circle", num_inference_steps=4, generator=torch.Generator().manual_seed(3), output_type="pt"
        ).images

    plain = image(DiffusionPipeline.from_pretrained(uninterrupted))
    custom = image(DiffusionPipeline.from_pretrained(uninterrupted, custom_pipeline="munba", trust_remote_code=True))
    installed_pipe = MunbaPipeline.from_pretrained(uninterrupted)
    installed = image(installed_pipe)
    base_plus_lora = image(MunbaPipeline.from_pretrained(_demo()).load_erasure(str(uninterrupted)))
    torch.testing.assert_close(plain, custom, rtol=0, atol=0)
    torch.testing.assert_close(plain, installed, rtol=0, atol=0)
    torch.testing.assert_close(plain, base_plus_lora, rtol=0, atol=2e-3)
    assert installed_pipe.erased_concepts == ["circle"]
    base = image(MunbaPipeline.from_pretrained(_demo()))
    assert (base - plain).abs().max() > 1e-3, "the erasure changed nothing"


def _demo() -> str:
    from munba_diffusion.models import resolve_model_path

    return resolve_model_path(DEMO_MODEL_NAME)


def test_model_card_names_base_model_and_concept(uninterrupted):
    text = (uninterrupted / "README.md").read_text()
    meta = yaml.safe_load(text.split("---")[1])
    assert meta["library_name"] == "diffusers" and meta["pipeline_tag"] == "text-to-image"
    assert "concept-erasure" in meta["tags"]
    assert "circle" in text and DEMO_MODEL_NAME in text
    config = json.loads((uninterrupted / "erasure_config.json").read_text())
    assert config["pretrained_model_name_or_path"] == DEMO_MODEL_NAME and config["combiner"] == "nash"
    assert [c["name"] for c in config["concepts"]] == ["circle"]
    assert (uninterrupted / "images" / "before_after.png").is_file()


# ----------------------------------------------------------------------------------------- bad input
def _error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as info:
        train_erase.main(argv)
    message = str(info.value.code) if not isinstance(info.value.code, int) else capsys.readouterr().err
    assert "\n" not in message.strip(), message
    return message


def test_unknown_preset_names_the_choices(tmp_path, capsys):
    message = _error(["--concept", "cirlce", "--output_dir", str(tmp_path / "o")], capsys)
    assert "unknown concept 'cirlce'" in message and "did you mean circle" in message


def test_empty_prompt_file(tmp_path, capsys):
    empty = tmp_path / "forget.txt"
    empty.write_text("# only a comment\n\n")
    message = _error(
        [
            "--concept",
            "circle",
            "--forget_prompts_file",
            str(empty),
            "--output_dir",
            str(tmp_path / "o"),
            "--pretrained_model_name_or_path",
            DEMO_MODEL_NAME,
        ],
        capsys,
    )
    assert "holds no prompts" in message


def test_folder_that_is_not_a_pipeline(tmp_path, capsys):
    (tmp_path / "notapipe").mkdir()
    message = _error(
        [
            "--concept",
            "circle",
            "--pretrained_model_name_or_path",
            str(tmp_path / "notapipe"),
            "--output_dir",
            str(tmp_path / "o"),
        ],
        capsys,
    )
    assert "not a diffusers pipeline folder" in message


def test_offline_hub_id_says_how_to_proceed(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = _error(["--concept", "nudity", "--output_dir", str(tmp_path / "o")], capsys)
    assert "offline" in message and DEMO_MODEL_NAME in message and "CompVis/stable-diffusion-v1-4" in message


def test_output_folder_with_results_is_not_overwritten(uninterrupted, tmp_path, capsys):
    before = (uninterrupted / "pytorch_lora_weights.safetensors").read_bytes()
    message = _error(
        ["--concept", "circle", "--pretrained_model_name_or_path", DEMO_MODEL_NAME, "--output_dir", str(uninterrupted)],
        capsys,
    )
    assert "--overwrite_output_dir" in message
    assert (uninterrupted / "pytorch_lora_weights.safetensors").read_bytes() == before


# ----------------------------------------------------------------------------------------- multi-concept
def _concept_rates(folder: str, prompts: list[tuple[str, str, str]]) -> dict[str, float]:
    """Share of each concept's prompts that the demo judge still sees as that concept."""
    from diffusers import StableDiffusionPipeline

    from munba_diffusion.demo import COLOURS, SHAPES, load_demo_judge

    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    texts = [p for p, _, _ in prompts]
    images = pipe(
        texts,
        num_inference_steps=20,
        guidance_scale=4.0,
        output_type="pt",
        generator=[torch.Generator().manual_seed(50 + i) for i in range(len(texts))],
    ).images
    out = load_demo_judge().classify(images)
    hits: dict[str, list[bool]] = {}
    for (_, kind, concept), s, c in zip(prompts, out.shape.tolist(), out.colour.tolist()):
        judged = SHAPES[s] if kind == "shape" else COLOURS[c]
        hits.setdefault(concept, []).append(judged == concept)
    return {k: sum(v) / len(v) for k, v in hits.items()}


def test_two_concepts_at_once_lower_both_rates(tmp_path):
    out = tmp_path / "no-red-no-blue"
    train_erase.main(
        [
            "--pretrained_model_name_or_path",
            DEMO_MODEL_NAME,
            "--concept",
            "red",
            "--concept",
            "blue",
            "--output_dir",
            str(out),
            *DEMO_ERASURE,
            *FAST,
            # half the steps at twice the learning rate of 120 at 1e-3, which judged the same (red 0/6, blue 2/6
            # after, both 6/6 before): the suite's costliest test at half the price
            *("--max_train_steps", "60", "--learning_rate", "2e-3"),
        ]
    )
    config = json.loads((out / "erasure_config.json").read_text())
    assert config["run"]["players"] == ["preserve", "forget:red", "forget:blue"]
    records = [json.loads(line) for line in (out / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert all(len([k for k in r if k.startswith("weight/")]) == 3 for r in records)
    prompts = [(f"a red {s}", "colour", "red") for s in ("circle", "square", "triangle")] * 2
    prompts += [(f"a blue {s}", "colour", "blue") for s in ("circle", "square", "cross")] * 2
    before, after = _concept_rates(_demo(), prompts), _concept_rates(str(out), prompts)
    assert after["red"] < before["red"] - 0.3, (before, after)
    assert after["blue"] < before["blue"] - 0.3, (before, after)


def test_erasure_scale_on_the_demo_output(uninterrupted):
    from munba_diffusion import MunbaPipeline

    def image(pipe, scale=None):
        pipe.set_progress_bar_config(disable=True)
        if scale is not None:
            pipe.erasure_scale = scale
        return pipe(
            "a blue circle", num_inference_steps=4, generator=torch.Generator().manual_seed(8), output_type="pt"
        ).images

    base = image(MunbaPipeline.from_pretrained(_demo()))
    with_lora = MunbaPipeline.from_pretrained(_demo()).load_erasure(str(uninterrupted))
    fused = MunbaPipeline.from_pretrained(uninterrupted)
    torch.testing.assert_close(image(with_lora, 0.0), base, rtol=0, atol=0)  # adapters off: exactly the base
    torch.testing.assert_close(image(fused, 0.0), base, rtol=0, atol=2e-3)  # fused minus the LoRA
    torch.testing.assert_close(image(with_lora, 1.0), image(fused, 1.0), rtol=0, atol=2e-3)
    half = image(fused, 0.5)
    assert (half - base).abs().max() > 1e-4 and (half - image(fused, 1.0)).abs().max() > 1e-4
    assert fused.erased_concepts == with_lora.erased_concepts == ["circle"]


# Run by torchrun in each process of the two-process tests: train_erase.py's main, with each rank's LoRA weights (as
# initialised and as trained) and the rows it drew saved under the folder given first; rank 1 saves checkpoints late.
_RANK_RECORDER = """
import os
import sys

import time

import torch
from accelerate import Accelerator

import munba_diffusion.diffusion.train as train
import train_erase

rank, folder = int(os.environ["RANK"]), sys.argv[1]
save_state = Accelerator.save_state


def late_save_state(self, *args, **kwargs):  # the other rank saves its part of a checkpoint late, as under load
    if rank:
        time.sleep(1.5)
    return save_state(self, *args, **kwargs)


Accelerator.save_state = late_save_state
params, initial, rows = [], [], []
add_loras, players = train.add_erasure_loras, train.erasure_players


def add_erasure_loras(pipe, config):
    params.extend(add_loras(pipe, config))
    initial.extend(p.detach().clone() for p in params)
    return params


def erasure_players(unet, batch, *args, **kwargs):
    rows.append(torch.cat([batch.preserve[0].latents, *(lat.latents for lat, _, _ in batch.forget)]))
    return players(unet, batch, *args, **kwargs)


def reloaded_transformer(*args, **kwargs):
    raise OSError("could not load the base (it moved)")


train.add_erasure_loras, train.erasure_players = add_erasure_loras, erasure_players
if os.environ.get("FAIL_EXPORT_RELOAD"):  # the base cannot be reloaded for the export of a --shard_base run
    train.reloaded_transformer = reloaded_transformer
if os.environ.get("COMMIT_BY_RANK"):  # each process found the Hub id at another commit
    train.base_commit = lambda denoiser: str(rank) * 40
train_erase.main(sys.argv[2:])
trained = [p.detach().clone() for p in params]
torch.save({"initial": initial, "trained": trained, "rows": rows}, os.path.join(folder, f"rank{rank}.pt"))
"""


def _two_processes(
    base: Path, out: Path, ranks: Path, *extra: str, recorder_env: dict[str, str] | None = None, fails: bool = False
) -> str:
    """train_erase.py on ``base`` (a tiny FLUX or SD3) as README's CPU multi-process command launches it (two gloo
    processes), each rank's LoRA weights and rows saved under ``ranks``; returns the launch's output.
    ``recorder_env``: switches of the rank recorder (FAIL_EXPORT_RELOAD, COMMIT_BY_RANK); ``fails``: the launch must
    fail."""
    ranks.mkdir()
    recorder = ranks / "record_ranks.py"
    recorder.write_text(_RANK_RECORDER)
    args = [
        *("--pretrained_model_name_or_path", str(base), "--concept", "text:a red circle", "--output_dir", str(out)),
        *("--max_train_steps", "3", "--train_batch_size", "1", "--resolution", "32", "--lora_target", "attn"),
        *("--learning_rate", "5e-3", "--sampler_steps", "2", "--pool_trajectories", "1"),
        *("--validation_inference_steps", "1", "--validation_seeds", "1", "--no_evaluation", *extra),
    ]
    env = {**_env(), "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(ROOT), **(recorder_env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*cmd, str(recorder), str(ranks), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    output = proc.stdout + proc.stderr
    assert (proc.returncode != 0) == fails, _first_failure(output)
    for checkpoint in (out / "checkpoints").glob("*"):  # each rank's random state in it, though rank 1 saved late
        assert checkpoint.name.startswith("checkpoint-") and checkpoint.name[11:].isdigit(), checkpoint.name
        assert {f"random_states_{r}.pkl" for r in range(2)} <= {f.name for f in checkpoint.iterdir()}, checkpoint
    return output


def _first_failure(output: str) -> str:
    """What a failed launch's ranks said: each one-line error (the rank that stopped first, which the tail of the
    launcher's report of the ranks it took down hides), then that tail."""
    errors = [line for line in output.splitlines() if "train_erase.py: error:" in line or line.startswith("[rank")]
    return "\n".join(errors[:20]) + "\n...\n" + output[-2000:]


def _ranks(folder: Path) -> list[dict]:
    return [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in range(2)]


def _train_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "logs" / "train_log.jsonl").read_text().splitlines()]


def test_two_processes_erase_flux_identically(tmp_path):
    """README's CPU multi-process command (ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 train_erase.py) on a
    tiny FLUX.1-dev: the two ranks draw different rows, the players' gradients are averaged across them before
    the bargaining, so both ranks end with the same LoRA weights, bit for bit."""
    from tests.tiny_flow import build_tiny_flux_pipeline

    base, out, ranks = tmp_path / "flux", tmp_path / "erased", tmp_path / "ranks"
    build_tiny_flux_pipeline(0).save_pretrained(base)
    _two_processes(base, out, ranks)
    first, second = _ranks(ranks)
    assert len(first["rows"]) == len(second["rows"]) == 3  # one micro-batch per step on each rank
    # each rank draws its own rows (from a small pool here, so a step's rows may coincide)
    assert any(not torch.equal(a, b) for a, b in zip(first["rows"], second["rows"]))
    for name in ("initial", "trained"):
        assert len(first[name]) == len(second[name]) > 0
        assert all(torch.equal(a, b) for a, b in zip(first[name], second[name])), name
    assert any(not torch.equal(a, b) for a, b in zip(first["initial"], first["trained"]))  # the LoRA did train
    assert [r["step"] for r in _train_log(out)] == [1, 2, 3]
    assert (out / "erasure_config.json").is_file()  # rank 0 exported the folder


def test_a_sharded_base_trains_as_data_parallel_does_and_resumes_exactly(tmp_path):
    """--shard_base on two gloo processes (tiny FLUX.1-dev): each process stores half of the frozen transformer;
    both ranks take the same bargained steps, bit for bit, and the same ones as the unsharded launch up to float
    rounding (FSDP gathers the weights into other buffers). A checkpoint resumes bit for bit. When the export cannot
    reload the base, the final checkpoint keeps the LoRA and `--resume_from_checkpoint latest` exports it: the same
    fused transformer and before/after grid as the unsharded launch."""
    from tests.tiny_flow import build_tiny_flux_pipeline

    base = tmp_path / "flux"
    build_tiny_flux_pipeline(0).save_pretrained(base)
    plain, sharded = tmp_path / "plain", tmp_path / "sharded"
    shard = ("--shard_base", "--checkpointing_steps", "2")
    _two_processes(base, plain, tmp_path / "plain_ranks")
    cannot_reload = {"FAIL_EXPORT_RELOAD": "1"}
    output = _two_processes(base, sharded, tmp_path / "sharded_ranks", *shard, recorder_env=cannot_reload, fails=True)

    held = [tuple(map(int, m)) for m in re.findall(r"this process holds (\d+) of the base transformer's (\d+)", output)]
    assert len(held) == 2 and held[0][1] == held[1][1] == held[0][0] + held[1][0], held
    assert all(mine < 0.6 * total for mine, total in held), held
    message = "could not load the base (it moved); the trained LoRA is safe in"
    assert message in output and "rerun the same command with --resume_from_checkpoint latest" in output
    assert not (sharded / "erasure_config.json").exists()
    assert {d.name for d in (sharded / "checkpoints").iterdir()} == {"checkpoint-2", "checkpoint-3"}
    reference = _ranks(tmp_path / "plain_ranks")[0]
    for ours, theirs in zip(_train_log(sharded), _train_log(plain), strict=True):
        for key in ("loss/preserve", "loss/forget", "weight/preserve", "weight/forget"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-9), key

    _two_processes(base, sharded, tmp_path / "continued_ranks", *shard, "--resume_from_checkpoint", "checkpoint-2")
    first, second = _ranks(tmp_path / "continued_ranks")
    assert len(first["rows"]) == 1  # only step 3 ran
    assert all(torch.equal(a, b) for a, b in zip(first["trained"], second["trained"]))
    assert all(torch.equal(a, b) for a, b in zip(first["rows"], reference["rows"][2:]))  # the same data
    moved = max(float((t - i).abs().max()) for t, i in zip(reference["trained"], reference["initial"]))
    gap = max(float((a - b).abs().max()) for a, b in zip(first["trained"], reference["trained"]))
    assert moved > 1e-3 and gap < 1e-4, (moved, gap)  # Adam magnifies rounding only where a gradient is near zero

    _two_processes(base, sharded, tmp_path / "exported_ranks", *shard, "--resume_from_checkpoint", "latest")
    exported = _ranks(tmp_path / "exported_ranks")[0]
    assert exported["rows"] == []  # nothing left to train: the final checkpoint, then the export
    assert all(torch.equal(a, b) for a, b in zip(exported["trained"], first["trained"]))  # the resumed step 3, exactly
    fused = [load_file(next((run / "transformer").glob("*.safetensors"))) for run in (sharded, plain)]
    assert fused[0].keys() == fused[1].keys()
    assert all(torch.allclose(fused[0][k], fused[1][k], atol=1e-5) for k in fused[0])
    grids = [np.asarray(Image.open(run / "images" / "before_after.png"), dtype=int) for run in (sharded, plain)]
    assert np.abs(grids[0] - grids[1]).max() <= 2


def test_a_sharded_sd3_in_bf16_with_gradient_checkpointing_takes_the_same_steps_on_both_ranks(tmp_path):
    """--shard_base on SD3's block list (JointTransformerBlock), with the memory levers it is meant to go with: bf16
    frozen weights (float32 LoRA) and gradient checkpointing. Each process holds half the transformer; both ranks
    end with the same LoRA, bit for bit, and it trained."""
    from tests.tiny_flow import build_tiny_sd3_pipeline

    base, ranks = tmp_path / "sd3", tmp_path / "ranks"
    build_tiny_sd3_pipeline(0).save_pretrained(base)
    levers = ("--mixed_precision", "bf16", "--gradient_checkpointing")
    output = _two_processes(base, tmp_path / "erased", ranks, "--shard_base", *levers)
    held = [tuple(map(int, m)) for m in re.findall(r"this process holds (\d+) of the base transformer's (\d+)", output)]
    assert len(held) == 2 and held[0][1] == held[0][0] + held[1][0] and max(h for h, _ in held) < 0.6 * held[0][1]
    first, second = _ranks(ranks)
    assert all(p.dtype == torch.float32 for p in first["trained"])
    assert all(torch.equal(a, b) for a, b in zip(first["trained"], second["trained"]))
    assert any(not torch.equal(a, b) for a, b in zip(first["initial"], first["trained"]))
    assert (tmp_path / "erased" / "erasure_config.json").is_file()


def test_processes_that_loaded_different_commits_of_the_base_stop_before_training(tmp_path):
    """Each process of a launch downloads the Hub id itself; if its main moved in between, the processes would
    train on different bases under one averaged gradient. They stop in one line naming the commits, before a step."""
    from tests.tiny_flow import build_tiny_flux_pipeline

    base, out, ranks = tmp_path / "flux", tmp_path / "erased", tmp_path / "ranks"
    build_tiny_flux_pipeline(0).save_pretrained(base)
    output = _two_processes(base, out, ranks, recorder_env={"COMMIT_BY_RANK": "1"}, fails=True)
    assert f"the processes loaded {base} at different commits ({'0' * 40}, {'1' * 40}); rerun with --revision" in output
    assert not (out / "logs" / "train_log.jsonl").exists() and not (ranks / "rank0.pt").exists()


def test_the_multi_gpu_config_launches_data_parallel_and_documents_sharding():
    """accelerate_config_multi_gpu.yaml is an accelerate launch config for data parallelism in bf16 (not Accelerate's
    FSDP, which the trainer refuses), and its comments give the --shard_base launch for bases no GPU holds."""
    from accelerate.commands.config.config_args import load_config_from_file

    path = ROOT / "accelerate_config_multi_gpu.yaml"
    config = load_config_from_file(str(path))
    assert config.distributed_type == "MULTI_GPU" and config.mixed_precision == "bf16" and config.num_processes > 1
    assert "train_erase.py ... --shard_base" in path.read_text()
