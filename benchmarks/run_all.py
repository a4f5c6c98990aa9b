"""Re-run every benchmark behind BENCHMARKS.md, one after the other (they share the machine's cores).

    python -m benchmarks.run_all --dry_run             # print the commands
    python -m benchmarks.run_all --overwrite           # re-run all (several hours on 2 CPU cores)
    python -m benchmarks.run_all --only overhead_demo memory --overwrite

The commands are exactly the ones BENCHMARKS.md records. Results that exist are kept unless ``--overwrite``
(which is passed on to every command). ``gpu_check`` needs a GPU machine and is not part of this list: run
``bash benchmarks/gpu_check.sh`` there.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from munba_diffusion.config import check_options, option, parse_config

ROOT = Path(__file__).resolve().parents[1]
RESULTS = "benchmarks/results"
# The demo runs use the scripts' defaults: README.md's demo erasure settings (LoRA attn rank 4, batch 4, 200 steps,
# lr 1e-3, sampler 10 DDIM steps at guidance 4; scores from 25 steps at guidance 4), recorded in each results.json.

# the specificity benchmark erasing red from the flow demo over seeds 0-2 (section 10's commands start so)
FLOW_DEMO_RED = (
    "-m",
    "benchmarks.specificity",
    "--model",
    "munba-demo-flow",
    "--concept_sets",
    "red",
    "--seeds",
    "0",
    "1",
    "2",
)

BENCHMARKS: dict[str, list[str]] = {
    "overhead_demo": [
        "-m",
        "benchmarks.overhead",
        "--models",
        "munba-demo",
        "--batch_size",
        "4",
        "--lora_target",
        "attn",
        "--rounds",
        "30",
        "--output_dir",
        f"{RESULTS}/overhead_demo",
    ],
    "overhead_sd15": [
        "-m",
        "benchmarks.overhead",
        "--models",
        "sd15",
        "--latent_size",
        "16",
        "--rounds",
        "12",
        "--output_dir",
        f"{RESULTS}/overhead_sd15",
    ],
    "memory": ["-m", "benchmarks.memory", "--architecture", "sd15", "--output_dir", f"{RESULTS}/memory"],
    # issue 17: the fast per-player gradients (one backward) vs per-player passes vs an ordinary step, K players
    "overhead_players_demo": [
        *("-m", "benchmarks.overhead", "--models", "munba-demo", "--batch_size", "1", "--lora_target", "attn"),
        *("--players", "2", "3", "5", "9", "--variants", "nash", "nash_per_player", "single_backward"),
        *("--rounds", "10", "--warmup", "1", "--clock", "process", "--output_dir", f"{RESULTS}/overhead_players_demo"),
    ],
    "overhead_players_demo_k23": [
        *("-m", "benchmarks.overhead", "--models", "munba-demo", "--batch_size", "1", "--lora_target", "attn"),
        *("--players", "2", "3", "--variants", "nash", "single_backward", "--rounds", "24", "--warmup", "2"),
        *("--clock", "process", "--output_dir", f"{RESULTS}/overhead_players_demo_k23"),
    ],
    "overhead_players_demo_b4": [
        *("-m", "benchmarks.overhead", "--models", "munba-demo", "--batch_size", "4", "--lora_target", "attn"),
        *("--players", "2", "3", "--variants", "nash", "single_backward", "--rounds", "12", "--warmup", "1"),
        *("--clock", "process", "--output_dir", f"{RESULTS}/overhead_players_demo_b4"),
    ],
    "overhead_players_sd15small": [
        *("-m", "benchmarks.overhead", "--models", "sd15-small", "--latent_size", "16"),
        *("--players", "2", "3", "5", "9", "--variants", "nash", "nash_per_player", "single_backward"),
        *("--rounds", "4", "--warmup", "1", "--clock", "process"),
        *("--output_dir", f"{RESULTS}/overhead_players_sd15small"),
    ],
    "overhead_players_sd15": [
        *("-m", "benchmarks.overhead", "--models", "sd15", "--latent_size", "16", "--players", "2", "9"),
        *("--variants", "nash", "single_backward", "--rounds", "2", "--warmup", "1", "--clock", "process"),
        *("--output_dir", f"{RESULTS}/overhead_players_sd15"),
    ],
    "memory_players_sd15small": [
        *("-m", "benchmarks.memory", "--architecture", "sd15-small", "--players", "2", "3", "5", "9"),
        *("--variants", "ours", "ours_per_player", "ordinary", "--analytic_targets", "xattn", "--parallel"),
        *("--output_dir", f"{RESULTS}/memory_players_sd15small"),
    ],
    "memory_players_sd15": [
        *("-m", "benchmarks.memory", "--architecture", "sd15", "--players", "2", "9", "--variants", "ours"),
        *("ordinary", "--analytic_targets", "xattn", "--parallel", "--no_write_unet"),
        *("--output_dir", f"{RESULTS}/memory_players_sd15"),
    ],
    "demo_settings": [
        "-m",
        "benchmarks.tradeoff",
        "--methods",
        "nash",
        "--seeds",
        "100",
        "--no_two_concepts",
        "--output_dir",
        f"{RESULTS}/demo_settings",
    ],
    "sampling": ["-m", "benchmarks.sampling", "--output_dir", f"{RESULTS}/sampling"],
    "sampling_sampler50": [
        "-m",
        "benchmarks.sampling",
        "--sampler_steps",
        "50",
        "--output_dir",
        f"{RESULTS}/sampling_sampler50",
    ],
    "tradeoff": ["-m", "benchmarks.tradeoff", "--seeds", "0", "1", "2", "--output_dir", f"{RESULTS}/tradeoff"],
    "specificity": [
        "-m",
        "benchmarks.specificity",
        "--concept_sets",
        "red",
        "--forget_losses",
        "anchored_esd",
        "esd",
        "--combiners",
        "nash",
        "--neighbour_settings",
        "folded",
        "player",
        "--seeds",
        "0",
        "1",
        "--output_dir",
        f"{RESULTS}/specificity",
    ],
    "prompt_channels": ["-m", "benchmarks.prompt_channels", "--output_dir", f"{RESULTS}/prompt_channels"],
    # the flow demo's erasure (section 10): the quick start's settings, three forget targets
    "flow_demo_quick_start": [
        *FLOW_DEMO_RED,
        *("--forget_losses", "substitute", "--combiners", "nash", "sum", "--lora_target", "xattn"),
        *("--negative_guidance", "0.5", "--output_dir", f"{RESULTS}/flow_demo_quick_start"),
    ],
    "flow_demo_esd": [
        *FLOW_DEMO_RED,
        *("--forget_losses", "esd", "--combiners", "nash", "--output_dir", f"{RESULTS}/flow_demo_esd"),
    ],
    "flow_demo_anchored_esd": [
        *FLOW_DEMO_RED,
        *(
            "--forget_losses",
            "anchored_esd",
            "--combiners",
            "nash",
            "--output_dir",
            f"{RESULTS}/flow_demo_anchored_esd",
        ),
    ],
    # the same with one substitute per red prompt (the blue one) instead of the preset's three
    "flow_demo_one_substitute": [
        *FLOW_DEMO_RED,
        *("--forget_losses", "substitute", "--combiners", "nash", "--lora_target", "xattn"),
        *("--negative_guidance", "0.5", "--one_substitute", "blue"),
        *("--output_dir", f"{RESULTS}/flow_demo_one_substitute"),
    ],
    # the quick start's erasure scored at the stock StableDiffusion3Pipeline's guidance 7
    "flow_demo_guidance7": [
        *FLOW_DEMO_RED,
        *("--forget_losses", "substitute", "--combiners", "nash", "--lora_target", "xattn"),
        *("--negative_guidance", "0.5", "--eval_guidance", "7", "--output_dir", f"{RESULTS}/flow_demo_guidance7"),
    ],
    "robustness": [
        "-m",
        "benchmarks.robustness",
        "--seeds",
        "0",
        "1",
        "2",
        "--attack_rows",
        "12",
        "--check_every",
        "5",
        "--max_eval_prompts",
        "6",
        "--output_dir",
        f"{RESULTS}/robustness",
    ],
    "classifier_digits": [
        "-m",
        "benchmarks.classifier",
        "--seeds",
        "0",
        "1",
        "2",
        "--forget",
        "random:0.1",
        "class:3",
        "--methods",
        "retrain",
        "ft",
        "ga",
        "rl",
        "munba",
        "--threads",
        "1",
        "--quiet",
        "--output_dir",
        f"{RESULTS}/classifier_digits",
    ],
    "clip_demo": ["-m", "benchmarks.clip", "--threads", "1", "--output_dir", f"{RESULTS}/clip_demo"],
}


@dataclass(frozen=True)
class RunAllConfig:
    """Options of ``python -m benchmarks.run_all``."""

    only: tuple[str, ...] = option(tuple(BENCHMARKS), "the benchmarks to run", choices=tuple(BENCHMARKS))
    overwrite: bool = option(False, "replace existing results (passed to every command)")
    dry_run: bool = option(False, "print the commands and exit")

    def __post_init__(self) -> None:
        check_options(self)


def available(name: str) -> bool:
    """A command whose module is not in this checkout (yet) is skipped with a note."""
    module = BENCHMARKS[name][1]
    return importlib.util.find_spec(module) is not None


def main(argv: list[str] | None = None) -> int:
    config = parse_config(RunAllConfig, argv, description=__doc__, prog="python -m benchmarks.run_all")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    failed = []
    for name in config.only:
        cmd = [sys.executable, *BENCHMARKS[name], *(["--overwrite"] if config.overwrite else [])]
        shown = " ".join(["python", *cmd[1:]])
        if not available(name):
            print(f"[{name}] skipped: {BENCHMARKS[name][1]} is not in this checkout", flush=True)
            continue
        print(f"[{name}] {shown}", flush=True)
        if config.dry_run:
            continue
        start = time.time()
        code = subprocess.run(cmd, cwd=ROOT, env=env).returncode
        print(f"[{name}] exit {code} after {time.time() - start:.0f} s", flush=True)
        if code:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
