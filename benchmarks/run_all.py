"""Re-run every benchmark behind BENCHMARKS.md, one after the other (they share the machine's cores).

    python -m benchmarks.run_all --dry-run             # print the commands
    python -m benchmarks.run_all --overwrite           # re-run all (several hours on 2 CPU cores)
    python -m benchmarks.run_all --only overhead_demo memory --overwrite

The commands are exactly the ones BENCHMARKS.md records. Results that exist are kept unless ``--overwrite``
(which is passed on to every command). ``gpu_check`` needs a GPU machine and is not part of this list: run
``bash benchmarks/gpu_check.sh`` there.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = "benchmarks/results"
# The demo runs use the scripts' defaults: README.md's demo erasure settings (LoRA attn rank 4, batch 4, 200 steps,
# lr 1e-3, sampler 10 DDIM steps at guidance 4; scores from 25 steps at guidance 4), recorded in each results.json.

BENCHMARKS: dict[str, list[str]] = {
    "overhead_demo": ["-m", "benchmarks.overhead", "--models", "munba-demo", "--batch-size", "4", "--lora-target",
                      "attn", "--rounds", "30", "--output-dir", f"{RESULTS}/overhead_demo"],
    "overhead_sd15": ["-m", "benchmarks.overhead", "--models", "sd15", "--latent-size", "16", "--rounds", "12",
                      "--output-dir", f"{RESULTS}/overhead_sd15"],
    "memory": ["-m", "benchmarks.memory", "--architecture", "sd15", "--output-dir", f"{RESULTS}/memory"],
    "demo_settings": ["-m", "benchmarks.tradeoff", "--methods", "nash", "--seeds", "100", "--two-concepts",
                      "--output-dir", f"{RESULTS}/demo_settings"],
    "sampling": ["-m", "benchmarks.sampling", "--output-dir", f"{RESULTS}/sampling"],
    "sampling_sampler50": ["-m", "benchmarks.sampling", "--sampler-steps", "50",
                           "--output-dir", f"{RESULTS}/sampling_sampler50"],
    "tradeoff": ["-m", "benchmarks.tradeoff", "--seeds", "0", "1", "2", "--output-dir", f"{RESULTS}/tradeoff"],
    "classifier_digits": ["-m", "munba_diffusion.classifiers.cli", "--seeds", "0", "1", "2", "--forget", "random:0.1",
                          "class:3", "--methods", "retrain", "ft", "ga", "rl", "munba", "--threads", "1", "--quiet",
                          "--output-dir", f"{RESULTS}/classifier_digits"],
    "clip_demo": ["-m", "munba_diffusion.classifiers.clip_cli", "--threads", "1",
                  "--output-dir", f"{RESULTS}/clip_demo"],
}


def available(name: str) -> bool:
    """A command whose module is not in this checkout (yet) is skipped with a note."""
    module = BENCHMARKS[name][1]
    return importlib.util.find_spec(module) is not None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=list(BENCHMARKS), default=list(BENCHMARKS))
    p.add_argument("--overwrite", action="store_true", help="replace existing results (passed to every command)")
    p.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    failed = []
    for name in args.only:
        cmd = [sys.executable, *BENCHMARKS[name], *(["--overwrite"] if args.overwrite else [])]
        shown = " ".join(["python", *cmd[1:]])
        if not available(name):
            print(f"[{name}] skipped: {BENCHMARKS[name][1]} is not in this checkout", flush=True)
            continue
        print(f"[{name}] {shown}", flush=True)
        if args.dry_run:
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
