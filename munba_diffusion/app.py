"""The comparison app: the original and the erased model's images side by side, from one prompt and seed (Gradio).

    munba-app outputs/demo-no-red        # the command (munba_diffusion.commands.app): checks, loads, launches
    python app.py                        # inside an erased output folder: every folder ships this file as app.py

A prompt box, a seed, the number of denoising steps and an ``erasure_scale`` slider (0 = the original model,
1 = the erased one; see ``munba.py``). Both images start from the same seed: the left one at scale 0, the right one
at the slider's scale, so at 0 they are the same image.

This file is copied into every erased output folder as ``app.py`` and runs there without munba-diffusion: it
imports only the standard library, torch, diffusers and (when the app is built) gradio, and loads the model with
the folder's own ``munba.py`` (``custom_pipeline="munba"``). ``python app.py`` shows the erased model named by the
``MUNBA_MODEL`` environment variable (a folder or Hub id), else the folder this file is in. As a Hugging Face Space
(SDK gradio): upload this file, a ``requirements.txt`` with ``gradio diffusers transformers torch peft accelerate``
and set the Space variable ``MUNBA_MODEL`` to the erased model's Hub id.

Nothing phones home: gradio's analytics are off, the page's assets and fonts are served by the app itself, and no
share link is made.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline

APP_FILE_NAME = "app.py"  # this file's name in every erased output folder
MODEL_ENV = "MUNBA_MODEL"
DEFAULT_STEPS = 25
MAX_STEPS = 100
MAX_SEED = 2**32 - 1
INSTALL_HINT = 'pip install "munba-diffusion[app]" (or pip install gradio)'
CSS = "#original img, #erased img {width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated}"
"""Small images (the demo's are 32x32) fill their box, pixels kept sharp."""


def load_model(source: str | os.PathLike | None = None, device: str | None = None) -> DiffusionPipeline:
    """The erased model at ``source`` (folder or Hub id; default: $MUNBA_MODEL, else this file's folder) as the
    MunbaPipeline of its own ``munba.py``, on ``device`` (default: CUDA when there is one, else the CPU)."""
    source = source or os.environ.get(MODEL_ENV) or Path(__file__).resolve().parent
    if Path(source).is_dir() and not (Path(source) / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{source} is not an erased model folder (no model_index.json); run app.py inside the folder the "
            f"trainer wrote, or set {MODEL_ENV} to one (a folder or Hub id)."
        )
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipeline = DiffusionPipeline.from_pretrained(str(source), custom_pipeline="munba", trust_remote_code=True)
    return pipeline.to(device)


def generate(
    pipeline: Any, prompt: str, seed: int = 0, steps: int = DEFAULT_STEPS, erasure_scale: float = 1.0
) -> tuple[Any, Any]:
    """(original image, image at ``erasure_scale``) of ``prompt`` from the same ``seed``, as PIL images.

    ``pipeline`` is a MunbaPipeline; its own erasure_scale is unchanged afterwards (``compare`` restores it)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("type a prompt, e.g. one of the erased concept")
    if seed is None or not 0 <= int(seed) <= MAX_SEED or int(seed) != seed:
        raise ValueError(f"the seed must be a whole number from 0 to {MAX_SEED}; got {seed}")
    if steps is None or not 1 <= int(steps) <= MAX_STEPS or int(steps) != steps:
        raise ValueError(f"steps must be a whole number from 1 to {MAX_STEPS}; got {steps}")
    pipeline.set_progress_bar_config(disable=True)
    result = pipeline.compare(
        prompt.strip(), seed=int(seed), erasure_scale=float(erasure_scale), num_inference_steps=int(steps)
    )
    return result.original[0], result.erased[0]


def build_app(pipeline: Any, *, title: str | None = None) -> Any:
    """The Gradio Blocks of the comparison app for ``pipeline`` (a MunbaPipeline, or a folder / Hub id to load).

    Elements the browser test drives: ``#prompt``, ``#seed``, ``#steps``, ``#erasure_scale``, ``#generate``,
    ``#original`` and ``#erased`` (the two images)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio as gr  # noqa: PLC0415 optional package (the "app" extra): the module imports without it
    except ImportError:
        raise ImportError(f"the comparison app needs gradio: {INSTALL_HINT}") from None
    if isinstance(pipeline, (str, os.PathLike)):
        pipeline = load_model(pipeline)
    concepts = list(getattr(pipeline, "erased_concepts", []))
    erased = ", ".join(concepts) or "the erased concept"
    lock = threading.Lock()  # compare() switches the pipeline's erasure_scale: one generation at a time

    def run(prompt: str, seed: float, steps: float, erasure_scale: float) -> tuple[Any, Any]:
        try:
            with lock:
                return generate(pipeline, prompt, seed, steps, erasure_scale)
        except ValueError as error:
            raise gr.Error(str(error)) from None

    with gr.Blocks(title=title or f"MUNBa: {erased} erased", analytics_enabled=False) as app:
        gr.Markdown(
            f"# {title or f'{erased} erased by MUNBa'}\n\nThe same prompt and seed through the original model "
            "(left, erasure scale 0) and the erased model (right, at the slider's erasure scale: 1 is the erased "
            "model, 0 the original)."
        )
        with gr.Row():
            prompt = gr.Textbox(label="Prompt", value=concepts[0] if concepts else "", elem_id="prompt", scale=4)
            button = gr.Button("Generate", variant="primary", elem_id="generate", scale=1)
        with gr.Row():
            seed = gr.Number(label="Seed", value=0, precision=0, minimum=0, maximum=MAX_SEED, elem_id="seed")
            steps = gr.Slider(1, MAX_STEPS, value=DEFAULT_STEPS, step=1, label="Steps", elem_id="steps")
            scale = gr.Slider(0, 1, value=1, step=0.05, label="erasure_scale", elem_id="erasure_scale")
        with gr.Row():
            shown = {"type": "pil", "format": "png", "height": 384, "buttons": ["download", "fullscreen"]}
            original = gr.Image(label="Original (scale 0)", elem_id="original", **shown)
            changed = gr.Image(label="Erased (at erasure_scale)", elem_id="erased", **shown)
        inputs = [prompt, seed, steps, scale]
        button.click(run, inputs=inputs, outputs=[original, changed])
        prompt.submit(run, inputs=inputs, outputs=[original, changed])
    return app


def serve(app: Any, **launch_kwargs: Any) -> Any:
    """Launch ``app`` (from :func:`build_app`) with its style; ``launch_kwargs`` go to gradio's ``launch``
    (server_name, server_port, prevent_thread_lock, ...). Never makes a share link."""
    return app.launch(css=CSS, share=False, **launch_kwargs)


def main() -> None:
    """``python app.py``: load the erased model ($MUNBA_MODEL or this file's folder) and serve the app."""
    serve(build_app(load_model()))


if __name__ == "__main__":
    main()
