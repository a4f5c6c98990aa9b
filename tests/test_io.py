"""munba_diffusion.io: atomic writes, strict JSON, the results guard, local-vs-Hub, offline mode, versions."""

from __future__ import annotations

import json
import os
import stat

import pytest
from PIL import Image

from munba_diffusion import io


def _listing(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_a_write_that_fails_midway_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    io.write_json_atomic(path, {"old": 1})

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        io.write_text_atomic(path, "new text that never lands")
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"old": 1}
    assert _listing(tmp_path) == ["results.json"]

    with pytest.raises(RuntimeError, match="crash"), io.atomic_write(path) as handle:
        handle.write(b"half of a new file")
        raise RuntimeError("crash while writing")
    assert json.loads(path.read_text()) == {"old": 1}
    assert _listing(tmp_path) == ["results.json"]


def test_a_failing_rename_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "image.png"
    io.write_bytes_atomic(path, b"old")

    def broken_replace(src, dst):
        raise PermissionError("rename refused")

    monkeypatch.setattr(io.os, "replace", broken_replace)
    with pytest.raises(PermissionError):
        io.write_bytes_atomic(path, b"new")
    monkeypatch.undo()
    assert path.read_bytes() == b"old" and _listing(tmp_path) == ["image.png"]


def test_new_files_get_the_usual_mode_and_replaced_files_keep_theirs(tmp_path, umask_022):
    new = io.write_text_atomic(tmp_path / "a.md", "x")
    assert stat.S_IMODE(new.stat().st_mode) == 0o644  # what save_pretrained gives, not tempfile's 0o600
    image = io.save_image_atomic(tmp_path / "a.png", Image.new("RGB", (2, 2)))
    assert stat.S_IMODE(image.stat().st_mode) == 0o644
    private = tmp_path / "private.json"
    private.write_text("{}")
    private.chmod(0o600)
    io.write_json_atomic(private, {"a": 1})
    assert stat.S_IMODE(private.stat().st_mode) == 0o600 and json.loads(private.read_text()) == {"a": 1}


def test_json_is_strict_nan_and_inf_become_null(tmp_path):
    import numpy as np
    import torch

    data = {
        "nan": float("nan"),
        "inf": [1.0, float("-inf")],
        "nested": {"t": (np.float32("nan"), 2)},
        "numpy": np.float64(0.5),
        "tensor": torch.tensor(3.0),
        "path": tmp_path,
        7: "int key",
    }
    path = io.write_json_atomic(tmp_path / "r.json", data)
    text = path.read_text()

    def no_constants(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    loaded = json.loads(text, parse_constant=no_constants)
    assert loaded == {
        "nan": None,
        "inf": [1.0, None],
        "nested": {"t": [None, 2]},
        "numpy": 0.5,
        "tensor": 3.0,
        "path": str(tmp_path),
        "7": "int key",
    }
    with pytest.raises(TypeError):
        io.write_json_atomic(tmp_path / "bad.json", {"object": object()})
    assert not (tmp_path / "bad.json").exists()


def test_jsonl_has_one_sorted_line_per_record(tmp_path):
    path = io.write_jsonl_atomic(tmp_path / "m.jsonl", [{"b": 1, "a": float("nan")}, {"c": "é"}])
    assert path.read_text(encoding="utf-8").splitlines() == ['{"a": null, "b": 1}', '{"c": "é"}']


def test_the_results_guard_refuses_and_names_the_flag(tmp_path):
    assert io.check_results_dir(tmp_path / "new", ["results.json"], overwrite=False) == tmp_path / "new"
    assert not (tmp_path / "new").exists()  # the guard creates nothing
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(FileExistsError) as error:
        io.check_results_dir(tmp_path, ["results.json", "results.md"], overwrite=False)
    message = str(error.value)
    assert "results.json" in message and "--overwrite" in message and "results.md" not in message
    assert "\n" not in message
    with pytest.raises(FileExistsError, match="--overwrite_output_dir"):
        io.check_results_dir(tmp_path, ["results.json"], overwrite=False, flag="--overwrite_output_dir")
    assert io.check_results_dir(tmp_path, ["results.json"], overwrite=True) == tmp_path
    (tmp_path / "checkpoints" / "checkpoint-10").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="checkpoints/checkpoint-10"):
        io.check_results_dir(tmp_path, ["checkpoints/checkpoint-*"], overwrite=False)
    with pytest.raises(FileExistsError, match="is a file"):
        io.check_results_dir(tmp_path / "results.json", ["x"], overwrite=True)


@pytest.mark.parametrize(
    ("name", "local"),
    [
        ("CompVis/stable-diffusion-v1-4", False),
        ("openai/clip-vit-base-patch32", False),
        ("bert-base-uncased", False),
        ("munba-demo", False),  # a bundled name: resolved by munba_diffusion.models before this rule
        ("./x", True),
        ("../up/model", True),
        ("/abs", True),
        ("a/b/c", True),
        ("~/m", True),
        ("~", True),
        ("C:\\models\\sd", True),
        ("owner/name/", True),
        ("a//b", True),
        ("my model", True),
        ("owner/na--me", True),
        ("outputs", True),  # an existing relative folder (created by the test)
        ("outputs/run", True),  # exists too
        ("missing-folder", False),  # looks like a Hub id and is not on disk
    ],
)
def test_local_path_or_hub_id(name, local, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs" / "run").mkdir(parents=True)
    assert io.is_local_path(name) is local


def test_a_path_object_is_always_local(tmp_path):
    from pathlib import Path

    assert io.is_local_path(Path("owner/name")) and not io.is_local_path("")


@pytest.mark.parametrize(
    ("environment", "offline"),
    [
        ({}, False),
        ({"HF_HUB_OFFLINE": "1"}, True),
        ({"HF_HUB_OFFLINE": "TRUE"}, True),
        ({"HF_HUB_OFFLINE": "0"}, False),
        ({"HF_HUB_OFFLINE": "no"}, False),
        ({"TRANSFORMERS_OFFLINE": "yes"}, True),
        ({"HF_HUB_OFFLINE": " on "}, True),
    ],
)
def test_offline_follows_the_hub_variables(environment, offline, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    assert io.is_offline() is offline


def test_library_versions_and_machine_record():
    versions = io.library_versions(["torch", "surely-not-installed-munba-package"])
    assert set(versions) == {"torch"} and versions["torch"]
    assert set(io.library_versions()) <= set(io.DEFAULT_LIBRARIES)
    record = io.machine_record()
    assert record["nproc"] >= 1 and record["torch_threads"] >= 1 and record["python"] and record["date_utc"]
    json.loads(io.json_text(record), parse_constant=lambda name: pytest.fail(name))
