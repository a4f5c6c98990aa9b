"""munba_diffusion.models: bundled names become folders (and only there), licences come from the model card."""

from __future__ import annotations

from pathlib import Path

import pytest

from munba_diffusion import models
from munba_diffusion.models import (
    BUNDLED_MODELS,
    DEMO_MODEL,
    bundled_model_names,
    is_bundled_model,
    model_license,
    resolve_model_path,
    same_world,
)

PACKAGE = Path(models.__file__).resolve().parent
# Modules that still name the demo while they move out of the package or over to munba_diffusion.models. Each entry
# must still exist and still hold the name (so that the list shrinks as the work lands); delete entries, never add.
# Examples and help texts there should name the bundled models through munba_diffusion.models (bundled_model_names(),
# DEMO_MODEL) instead.
PENDING: set[str] = set()


def test_the_demo_resolves_to_its_packaged_folders():
    pipeline = Path(resolve_model_path("munba-demo"))
    assert (pipeline / "model_index.json").is_file() and (pipeline / "unet").is_dir()
    clip = Path(resolve_model_path("munba-demo", kind="clip"))
    assert (clip / "config.json").is_file() and (clip / "tokenizer.json").is_file()
    assert resolve_model_path("munba-demo-clip", kind="clip") == str(clip)
    assert DEMO_MODEL == "munba-demo" and is_bundled_model("munba-demo") and not is_bundled_model("munba-demo/x")
    flow = Path(resolve_model_path("munba-demo-flow"))
    assert (flow / "model_index.json").is_file() and (flow / "transformer").is_dir()
    assert resolve_model_path("munba-demo-flow", kind="clip") == str(clip)
    assert bundled_model_names("pipeline") == ("munba-demo", "munba-demo-flow")
    assert set(bundled_model_names("clip")) == {"munba-demo", "munba-demo-flow", "munba-demo-clip"}
    assert set(bundled_model_names()) == set(BUNDLED_MODELS)
    # what is written for one demo model judges the other's images: they draw the one world
    assert same_world("munba-demo-flow", "munba-demo") and same_world("munba-demo", "munba-demo-flow")
    assert same_world("CompVis/stable-diffusion-v1-4", "CompVis/stable-diffusion-v1-4")
    assert not same_world("CompVis/stable-diffusion-v1-4", "munba-demo")
    assert not same_world("munba-demo-clip", "munba-demo") and not same_world("./munba-demo", "munba-demo")


@pytest.mark.parametrize(
    "name",
    [
        "CompVis/stable-diffusion-v1-4",
        "outputs/erase-circle",
        "/abs/folder",
        "./munba-demo",
        "munba-demo-flow/x",
        "~/models/sd",
    ],
)
def test_hub_ids_and_paths_are_left_unchanged(name):
    assert resolve_model_path(name) == name
    assert resolve_model_path(Path(name) if name.startswith("/") else name, kind="clip") == name


def test_a_bundled_name_of_another_kind_and_an_unknown_kind_are_refused():
    with pytest.raises(ValueError, match="'munba-demo-clip' is a bundled clip model, not a pipeline.*munba-demo"):
        resolve_model_path("munba-demo-clip")
    with pytest.raises(ValueError, match="unknown model kind 'vae'"):
        resolve_model_path("munba-demo", kind="vae")


def test_a_missing_bundled_folder_names_the_rebuild_command(monkeypatch, tmp_path):
    from munba_diffusion import demo

    monkeypatch.setattr(demo, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="scripts/demo/train_demo.py --output_dir"):
        resolve_model_path("munba-demo")
    with pytest.raises(FileNotFoundError, match="scripts/demo/train_flow_demo.py --output_dir"):
        resolve_model_path("munba-demo-flow")


def test_the_licence_is_read_from_the_model_card(tmp_path):
    assert model_license("munba-demo") == "apache-2.0"
    assert model_license(resolve_model_path("munba-demo")) == "apache-2.0"
    assert model_license(tmp_path) is None  # a folder without a card
    (tmp_path / "README.md").write_text("# no front matter\n")
    assert model_license(tmp_path) is None
    (tmp_path / "README.md").write_text("---\nlicense: mit\nlibrary_name: diffusers\n---\n# card\n")
    assert model_license(str(tmp_path)) == "mit"
    assert model_license("not-a-cached/hub-model") is None  # nothing cached, and no network


def test_only_models_py_and_the_demo_package_name_the_demo():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative == "models.py" or relative.startswith("demo/"):
            continue
        if "munba-demo" in path.read_text(encoding="utf-8") and relative not in PENDING:
            offenders.append(relative)
    assert offenders == [], f"name bundled models only in munba_diffusion/models.py; found in {offenders}"
    for relative in PENDING:
        path = PACKAGE / relative
        assert path.is_file() and "munba-demo" in path.read_text(encoding="utf-8"), (
            f"{relative} no longer names the demo: remove it from PENDING"
        )


def test_the_demo_build_scripts_are_outside_the_package():
    assert not list((PACKAGE / "demo").glob("train*.py")) and not list((PACKAGE / "demo").glob("measure*.py"))
    scripts = PACKAGE.parent / "scripts" / "demo"
    assert (scripts / "train_demo.py").is_file() and (scripts / "measure_demo.py").is_file()
