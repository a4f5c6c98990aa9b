"""FID with clean-fid (``mode="clean"``) against a folder of reference images or precomputed statistics.

FID = ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)) over feature means mu and covariances S.
Features are clean-fid's Inception (``inception-2015-12-05.pt``) unless a ``feature_extractor`` is given: any
torch module mapping (B, 3, H, W) floats in [0, 255] (clean-fid resizes to 299 x 299 first) to (B, D).

clean-fid fetches the Inception file into ``/tmp`` (``./`` on Windows) at first use without a timeout. We look
for it first: when it is missing and ``HF_HUB_OFFLINE`` is set (or ``download=False``) we raise a one-line error
saying where to place it, and otherwise we download it ourselves with a timeout, atomically.
"""

from __future__ import annotations

import platform
import shutil
import urllib.request
from pathlib import Path

import numpy as np
import torch
from cleanfid import fid as cleanfid_fid
from cleanfid.downloads_helper import inception_url
from cleanfid.inception_torchscript import InceptionV3W

from ..io import atomic_write, is_offline
from .manifest import collect_images

INCEPTION_FILE = "inception-2015-12-05.pt"


def default_inception_dir() -> Path:
    """Where clean-fid itself keeps the Inception weights."""
    return Path("./" if platform.system() == "Windows" else "/tmp")


def ensure_inception(
    inception_dir: str | Path | None = None, download: bool | None = None, timeout_s: float = 60
) -> Path:
    """Path of clean-fid's Inception file, downloading it when allowed (``download`` None: unless offline)."""
    folder = Path(inception_dir) if inception_dir is not None else default_inception_dir()
    path = folder / INCEPTION_FILE
    if path.is_file():
        return path
    hint = f"clean-fid's Inception weights are missing: download {inception_url} and place it at {path}"
    if download is False or (download is None and is_offline()):
        raise FileNotFoundError(hint)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_write(path) as handle, urllib.request.urlopen(inception_url, timeout=timeout_s) as response:
            shutil.copyfileobj(response, handle)
    except OSError as error:
        raise FileNotFoundError(f"{hint} (download failed: {error})") from None
    return path


def inception_extractor(
    device: str | torch.device, inception_dir: str | Path | None = None, download: bool | None = None
) -> torch.nn.Module:
    """clean-fid's Inception feature extractor (what ``mode="clean"`` uses), loaded from ``inception_dir``."""
    path = ensure_inception(inception_dir, download)
    return InceptionV3W(str(path.parent), download=False, resize_inside=False).to(device).eval()


def _image_folder(source: str | Path) -> str:
    """The folder clean-fid should read: the folder of a manifest, or the folder itself."""
    collect_images(source)  # one-line errors for empty or missing sources
    source = Path(source)
    return str(source.parent if source.is_file() else source)


def load_statistics(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) from an ``.npz`` with arrays ``mu`` and ``sigma`` (never unpickled)."""
    with np.load(path, allow_pickle=False) as stats:
        if "mu" not in stats or "sigma" not in stats:
            raise ValueError(f"{path} lacks 'mu' and 'sigma' arrays; write it with save_statistics")
        return stats["mu"], stats["sigma"]


def folder_features(
    folder: str, model: torch.nn.Module, device: str | torch.device, batch_size: int, num_workers: int
) -> np.ndarray:
    return cleanfid_fid.get_folder_features(
        folder,
        model,
        num_workers=num_workers,
        batch_size=batch_size,
        device=torch.device(device),
        mode="clean",
        verbose=False,
    )


def save_statistics(
    source: str | Path,
    output: str | Path,
    *,
    device: str | torch.device,
    feature_extractor: torch.nn.Module | None = None,
    inception_dir: str | Path | None = None,
    batch_size: int = 32,
    num_workers: int = 0,
) -> Path:
    """Precompute reference statistics (mu, sigma) of a folder into an ``.npz`` (e.g. for COCO-30k)."""
    model = feature_extractor if feature_extractor is not None else inception_extractor(device, inception_dir)
    feats = folder_features(_image_folder(source), model, device, batch_size, num_workers)
    output = Path(output)
    with atomic_write(output) as handle:
        np.savez(handle, mu=feats.mean(axis=0), sigma=np.cov(feats, rowvar=False))
    return output


def fid_score(
    source: str | Path,
    reference: str | Path,
    *,
    device: str | torch.device,
    feature_extractor: torch.nn.Module | None = None,
    inception_dir: str | Path | None = None,
    download: bool | None = None,
    batch_size: int = 32,
    num_workers: int = 0,
) -> dict:
    """FID of the images of ``source`` against a reference folder or an ``.npz`` of (mu, sigma)."""
    reference = Path(reference)
    if not reference.exists():
        raise FileNotFoundError(
            f"FID reference {reference} not found; pass a folder of reference images or a .npz of mu/sigma"
        )
    model = feature_extractor if feature_extractor is not None else inception_extractor(device, inception_dir, download)
    folder = _image_folder(source)
    if reference.is_dir():
        score = cleanfid_fid.compute_fid(
            folder,
            _image_folder(reference),
            mode="clean",
            device=torch.device(device),
            num_workers=num_workers,
            batch_size=batch_size,
            custom_feat_extractor=model,
            verbose=False,
        )
    else:
        mu_ref, sigma_ref = load_statistics(reference)
        feats = folder_features(folder, model, device, batch_size, num_workers)
        score = cleanfid_fid.frechet_distance(feats.mean(axis=0), np.cov(feats, rowvar=False), mu_ref, sigma_ref)
    return {
        "fid": float(score),
        "num_images": len(collect_images(source)),
        "reference": str(reference),
        "mode": "clean",
        "features": "inception-2015-12-05 (clean-fid)"
        if feature_extractor is None
        else type(feature_extractor).__name__,
    }
