"""Upload an erased model folder's results (not its checkpoints or logs) to the Hugging Face Hub."""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import create_repo, upload_folder

from munba_diffusion.pipelines.munba import ERASURE_CONFIG_NAME

from .folder import RESULT_NAMES


def push_erased_model_to_hub(
    output_dir: str | Path, repo_id: str, token: str | None = None, private: bool = False
) -> str:
    """Upload the results of an erased model folder to ``repo_id``; returns the commit URL."""
    output_dir = Path(output_dir)
    missing = [name for name in ("model_index.json", ERASURE_CONFIG_NAME) if not (output_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{output_dir} is not an erased model folder (no {', '.join(missing)}); export it first."
        )
    model_index = json.loads((output_dir / "model_index.json").read_text(encoding="utf-8"))
    component_dirs = [name for name, value in model_index.items() if isinstance(value, list) and value[0] is not None]
    allow_patterns = [name for name in RESULT_NAMES if (output_dir / name).is_file()]
    allow_patterns += [f"{name}/*" for name in [*component_dirs, "images"]]
    allow_patterns += ["evaluation/**"]
    repo_id = create_repo(repo_id, token=token, private=private, exist_ok=True).repo_id
    commit = upload_folder(
        repo_id=repo_id,
        folder_path=output_dir,
        allow_patterns=allow_patterns,
        token=token,
        commit_message="Upload MUNBa erased model",
    )
    return commit.commit_url
