"""The run record (``erasure_config.json``): the training configuration plus what the run measured.

It is not a second schema: every option is the configuration's own field (:meth:`ErasureTrainingConfig.record`),
and ``run`` adds the statistics only a run knows (players, the LoRA's target modules, timings); ``license`` is the
base model's own (from the card that travels with it), ``versions`` and ``created`` say what made it.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from ...io import library_versions
from ...models import model_license
from ..config import ErasureTrainingConfig


def run_record(
    config: ErasureTrainingConfig,
    *,
    players: list[str],
    target_modules: list[str],
    text_encoder_target_modules: list[str] = (),
    family: str | None = None,
    base_commit: str | None = None,
    base_sha256: str | None = None,
    train_seconds: float,
    pool_seconds: float,
    resolution: int,
    steps_skipped: int = 0,
) -> dict[str, Any]:
    """``config.record()`` plus ``run`` statistics, ``license``, ``versions`` and ``created`` (ISO 8601, UTC)."""
    return {
        **config.record(),
        "run": {
            "players": players,
            "family": family,  # e.g. "Stable Diffusion 2.x (v-prediction, 768 px)"
            "base_commit": base_commit,  # the Hub commit of the base; None for a local folder
            "base_sha256": base_sha256,  # a local or bundled base's files (model_folder_sha256); None: a Hub id
            "resolution": resolution,
            "target_modules": sorted(target_modules),  # the UNet's adapted modules
            "text_encoder_target_modules": sorted(text_encoder_target_modules),
            "train_seconds": round(train_seconds, 1),
            "latent_pool_seconds": round(pool_seconds, 1),
            "steps_skipped": steps_skipped,
        },
        "license": model_license(config.pretrained_model_name_or_path),
        "versions": library_versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
