"""What ``--report_to`` trackers receive: the step record's numbers as scalars, the validation grid as an image.

The scalars are the numbers of the ``train_log.jsonl`` record under the same names (``loss/<player>``,
``weight/<player>``, ``grad_norm/<player>``, ``utility/<player>``, ``cos/<a>,<b>``, ``cos_phi``, ``direction_norm``,
``clip_coef``, ``skipped``, ``lr``), so a curve in TensorBoard or wandb and a line of the log always agree.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def tracker_scalars(record: dict) -> dict[str, float]:
    """The record's numbers for ``accelerator.log`` (the step is the x axis, not a curve; the status is text)."""
    return {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, (int, float))}


def log_images(accelerator, images: dict[str, Image.Image], step: int) -> None:
    """Log each image to every started tracker that takes images (TensorBoard, wandb); others are skipped."""
    for tracker in accelerator.trackers:
        for tag, image in images.items():
            if tracker.name == "tensorboard":
                tracker.writer.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")
            elif tracker.name == "wandb":
                import wandb  # noqa: PLC0415 optional package, present whenever a wandb tracker started

                tracker.run.log({tag: wandb.Image(image)}, step=step)
