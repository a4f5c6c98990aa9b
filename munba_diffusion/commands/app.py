"""Compare an erased model with its original in the browser: ``munba-app OUTPUT_DIR`` (needs the "app" extra).

    munba-app outputs/demo-no-red                    # http://127.0.0.1:7860, offline, on the CPU
    munba-app outputs/demo-no-red --port 8080

The app itself is :mod:`munba_diffusion.app`, which every output folder also carries as ``app.py`` (``python app.py``
there, or a Hugging Face Space). This command checks the folder and gradio first (one line naming the fix, before any
model loads), loads the folder with the installed MunbaPipeline (no code from the folder runs) and serves the app.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..app import INSTALL_HINT, build_app, serve
from ..config import check_options, option, parse_config
from ..diffusion.loading import check_erased_model_folder, load_erased_pipeline
from ..pipelines.munba import LORA_WEIGHT_NAME
from . import error_line

PROG = "munba-app"


@dataclass(frozen=True)
class AppConfig:
    """Serve the comparison app of an erased model folder: a prompt, a seed, the steps and an erasure_scale slider;
    the original model's image (scale 0) beside the erased model's, from the same seed.

        munba-app outputs/demo-no-red
        munba-app outputs/demo-no-red --port 8080 --host 0.0.0.0
    """

    output_dir: str = option(
        help="the erased model folder (the trainer's --output_dir)", positional=True, metavar="OUTPUT_DIR"
    )
    host: str = option("127.0.0.1", "address to serve on (0.0.0.0: every network interface)")
    port: int | None = option(None, "port to serve on (default: the first free one from 7860)", low=1, high=65535)
    device: str | None = option(None, "torch device, e.g. cuda:1 (default: CUDA when there is one, else the CPU)")

    def __post_init__(self) -> None:
        check_options(self)
        if self.device is not None:
            try:
                torch.device(self.device)
            except RuntimeError:
                raise ValueError(f"device (--device) must be a torch device such as cpu or cuda:0; got {self.device!r}")
        folder = check_erased_model_folder(self.output_dir)
        if not (folder / LORA_WEIGHT_NAME).is_file():
            raise FileNotFoundError(
                f"{folder} has no {LORA_WEIGHT_NAME}, which the app needs for the original model (erasure_scale 0); "
                "copy it back from the run or export the folder again."
            )


def main(argv: Sequence[str] | None = None) -> None:
    """``munba-app``: check the options and the folder (one line and exit 2 on a bad one) and gradio (one line and
    exit 1 when it is missing), load the model and serve the app until interrupted."""
    config = parse_config(AppConfig, argv, description=inspect.cleandoc(AppConfig.__doc__), prog=PROG)
    if importlib.util.find_spec("gradio") is None:
        sys.exit(f"{PROG}: error: the comparison app needs gradio: {INSTALL_HINT}")
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        pipeline = load_erased_pipeline(Path(config.output_dir)).to(device)
    except (ValueError, OSError) as error:
        sys.exit(f"{PROG}: error: {error_line(error, config.output_dir)}")
    serve(build_app(pipeline), server_name=config.host, server_port=config.port)


if __name__ == "__main__":
    main()
