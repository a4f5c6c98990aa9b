#!/usr/bin/env bash
# One-GPU check (H100/H200, no network): erasure steps/s and peak GPU memory of SD 1.5's UNet architecture at
# 512 px (64x64 latents), bf16, batch 1 and 4 per player, nash vs sum vs one backward, SDPA vs xformers (when it
# imports), plus the ESD way's peak memory, the white-box attack's cost per prompt and the robust mode's step; then
# SDXL base's UNet at 1024 px (batch 1, bf16, with and without gradient checkpointing); then FLUX.1-dev's transformer
# (12B, ~24 GB in bf16) at 512 and 1024 px (batch 1, bf16, LoRA on every attention projection and the prompt's
# embeddings, gradient checkpointing, 512 T5 tokens). Random weights: nothing is downloaded. Each part has its own timeout (SD 1.5 220 s,
# SDXL 2 x 75 s, FLUX 90 + 120 s: 580 s in all), so the whole script ends in under 10 minutes.
#
#   bash benchmarks/gpu_check.sh                       # writes benchmarks/results/gpu_check/ (or $OUT when set)
#   bash benchmarks/gpu_check.sh --batch_sizes 1       # extra arguments go to python -m benchmarks.gpu_check
#
# Python packages the GPU image may lack (diffusers, often) can travel as wheels in .whl/ at the repository
# root (pip download --no-deps --only-binary=:all: diffusers==<version> -d .whl); they are installed into
# /tmp/site first. A dry run of the Python part on a CPU: python -m benchmarks.gpu_check --device cpu --tiny
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}

if compgen -G ".whl/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # munba_diffusion and benchmarks from this checkout

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi: not available"
"$PYTHON" - <<'EOF'
import importlib, sys
missing = []
for name in ("torch", "diffusers", "transformers", "peft", "yaml", "safetensors"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '?')}")
    except Exception as error:  # report every missing package at once
        missing.append(f"{name} ({error.__class__.__name__}: {error})")
if missing:
    sys.exit("gpu_check.sh: missing " + "; ".join(missing) + ": put their wheels in .whl/ (see the top of this script)")
EOF

OUTPUT_DIR=${OUT:-benchmarks/results/gpu_check}
status=0  # a failed or timed-out SD 1.5 run still lets the SDXL and FLUX parts run; the script then exits 1
timeout 220 "$PYTHON" -m benchmarks.gpu_check --output_dir "$OUTPUT_DIR" "$@" || {
  echo "gpu_check.sh: the SD 1.5 run failed (exit $?)"
  status=1
}
# SDXL base's UNet at 1024 px, batch 1: the trainer's step with and without gradient checkpointing (issue 15);
# the extra arguments above go to the SD 1.5 run only
for levers in "" "--gradient_checkpointing"; do
  timeout 75 "$PYTHON" -m benchmarks.gpu_check --architecture sdxl --batch_sizes 1 --variants nash sum_plain \
    --attention sdpa --no_esd --no_robustness --steps 5 --warmup 2 $levers \
    --output_dir "$OUTPUT_DIR/sdxl${levers:+-checkpointing}" || echo "gpu_check.sh: the SDXL run $levers failed"
done
# FLUX.1-dev's transformer, batch 1 per player (2 players), the bargained step only, gradient checkpointing on: the
# 12B weights are initialised on the GPU (float32, then bf16; ~48 GB at the peak), not on the CPU
for size in 64 128; do
  timeout $((size == 64 ? 90 : 120)) "$PYTHON" -m benchmarks.gpu_check --architecture flux --latent_size $size \
    --batch_sizes 1 --variants nash --attention sdpa --no_esd --no_robustness --steps 3 --warmup 2 \
    --gradient_checkpointing --output_dir "$OUTPUT_DIR/flux-$((size * 8))" \
    || echo "gpu_check.sh: the FLUX run at $((size * 8)) px failed"
done
exit $status
