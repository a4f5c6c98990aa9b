"""The wheel carries the demo weights, prompts and the pipeline file, and works outside the checkout."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (path,) = out.glob("munba_diffusion-*.whl")
    return path


def test_wheel_holds_package_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    required = [
        "munba_diffusion/pipelines/munba.py",
        "munba_diffusion/pipelines/munba_xl.py",
        "munba_diffusion/pipelines/munba_sd3.py",
        "munba_diffusion/pipelines/munba_flux.py",
        "munba_diffusion/prompts/presets/nudity.yaml",
        "munba_diffusion/prompts/presets/circle.yaml",
        "munba_diffusion/prompts/eval/demo.csv",
        "munba_diffusion/demo/weights/pipeline/model_index.json",
        "munba_diffusion/demo/weights/pipeline/README.md",
        "munba_diffusion/demo/weights/pipeline/unet/diffusion_pytorch_model.safetensors",
        "munba_diffusion/demo/weights/clip/model.safetensors",
        "munba_diffusion/demo/weights/judge/judge.safetensors",
    ]
    assert [n for n in required if n not in names] == []
    # the scripts that built the demo stay out of the installed package
    assert [
        n for n in names if n.startswith(("scripts/", "munba_diffusion/demo/train", "munba_diffusion/demo/measure"))
    ] == []
    for pipeline in ("munba.py", "munba_xl.py", "munba_sd3.py", "munba_flux.py"):
        assert (
            zipfile.ZipFile(wheel).read(f"munba_diffusion/pipelines/{pipeline}")
            == (ROOT / "pipelines" / pipeline).read_bytes()
        )


def test_installed_wheel_runs_the_demo_outside_the_checkout(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    script = (
        "import munba_diffusion, torch\n"
        "from munba_diffusion import MunbaPipeline, MunbaXLPipeline\n"
        "from munba_diffusion.demo import load_demo_judge\n"
        "from munba_diffusion.models import model_license, resolve_model_path\n"
        "from munba_diffusion.presets import load_preset\n"
        "assert str(munba_diffusion.__file__).startswith(%r), munba_diffusion.__file__\n"
        "pipe = MunbaPipeline.from_pretrained(resolve_model_path('munba-demo'))\n"
        "pipe.set_progress_bar_config(disable=True)\n"
        "img = pipe('a red square', num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type='pt').images\n"
        "assert img.shape == (1, 3, 32, 32) and load_preset('circle').forget_prompts\n"
        "load_demo_judge().classify(img)\n"
        "assert model_license('munba-demo') == 'apache-2.0'  # the model card travels in the wheel\n"
        "print('ok')\n"
    ) % str(target)
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    # run from an empty folder; the wheel's copy comes first on the path (the assert on __file__ checks it)
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")
