"""FID through clean-fid with a small offline feature extractor; the missing-Inception error path."""

from __future__ import annotations

import socket
import urllib.request

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from munba_diffusion.evaluation.fid import fid_score, save_statistics


class PooledColours(torch.nn.Module):
    """(B, 3, H, W) in [0, 255] -> (B, 12): mean colour of each image quadrant, scaled to [0, 1]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(x / 255, 2).flatten(1)


def crops(image: np.ndarray, folder, n: int, seed: int):
    rng = np.random.default_rng(seed)
    folder.mkdir()
    for i in range(n):
        y, x = rng.integers(0, image.shape[0] - 96), rng.integers(0, image.shape[1] - 96)
        Image.fromarray(image[y : y + 96, x : x + 96]).save(folder / f"{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("fid")
    astronaut = skimage.data.astronaut()
    return {
        "astronaut": crops(astronaut, root / "astronaut", 20, seed=0),
        "astronaut_again": crops(astronaut, root / "astronaut_again", 20, seed=1),
        "coffee": crops(skimage.data.coffee(), root / "coffee", 20, seed=0),
    }


def test_fid_of_a_folder_with_itself_is_zero_and_grows_with_difference(folders):
    def fid(a: str, b: str) -> float:
        return fid_score(folders[a], folders[b], device="cpu", feature_extractor=PooledColours())["fid"]

    same = fid("astronaut", "astronaut")
    similar = fid("astronaut", "astronaut_again")
    different = fid("astronaut", "coffee")
    assert abs(same) < 1e-6
    assert similar > 1e-4
    assert different > 5 * similar


def test_precomputed_statistics_give_the_same_fid_as_the_folder(folders, tmp_path):
    stats = save_statistics(folders["coffee"], tmp_path / "coffee.npz", device="cpu", feature_extractor=PooledColours())
    from_stats = fid_score(folders["astronaut"], stats, device="cpu", feature_extractor=PooledColours())["fid"]
    from_folder = fid_score(folders["astronaut"], folders["coffee"], device="cpu", feature_extractor=PooledColours())[
        "fid"
    ]
    assert from_stats == pytest.approx(from_folder, rel=1e-6)
    np.savez(tmp_path / "bad.npz", mean=np.zeros(12))
    with pytest.raises(ValueError, match="mu"):
        fid_score(folders["astronaut"], tmp_path / "bad.npz", device="cpu", feature_extractor=PooledColours())


def test_missing_inception_gives_a_one_line_error_without_touching_the_network(folders, tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("a network call was attempted")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    empty = tmp_path / "inception-cache"
    empty.mkdir()
    with pytest.raises(FileNotFoundError) as error:
        fid_score(folders["astronaut"], folders["coffee"], device="cpu", inception_dir=empty)
    message = str(error.value)
    assert "\n" not in message and str(empty / "inception-2015-12-05.pt") in message
    assert list(empty.iterdir()) == []
    with pytest.raises(FileNotFoundError):  # an explicit "no downloads" holds online too
        monkeypatch.delenv("HF_HUB_OFFLINE")
        fid_score(folders["astronaut"], folders["coffee"], device="cpu", inception_dir=empty, download=False)
