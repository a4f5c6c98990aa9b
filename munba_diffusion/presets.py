"""Concept presets: which prompts to forget, which to preserve, and what to map the concept to.

A preset is a YAML file (schema in ``prompts/README.md``); the bundled ones live in ``prompts/presets/`` and install
as package data. ``resolve_concept`` turns one ``--concept`` argument into a :class:`ConceptPreset`.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

TEXT_PREFIX = "text:"
GENERIC_PRESERVE_PROMPTS = (
    "a photo of a person",
    "a landscape with mountains and a lake",
    "a city street at night",
    "a bowl of fruit",
    "a dog playing in a garden",
    "a painting of flowers",
    "a car parked on a road",
    "a portrait of an old man",
)


@dataclass(frozen=True)
class ConceptPreset:
    """One concept to erase.

    ``anchor_prompts`` has one entry per forget prompt: the prompt whose frozen prediction the ``anchor`` loss maps
    that forget prompt to (a single ``anchor`` in the YAML applies to every forget prompt).
    """

    name: str
    forget_prompts: tuple[str, ...]
    preserve_prompts: tuple[str, ...]
    anchor_prompts: tuple[str, ...]
    description: str = ""
    default_model: str | None = None
    eval_prompts: str | None = None
    source: str = "preset"
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not self.forget_prompts:
            raise ValueError(f"concept {self.name!r} has no forget prompts; add at least one under 'forget:'")
        if len(self.anchor_prompts) != len(self.forget_prompts):
            raise ValueError(f"concept {self.name!r}: give one anchor, or one anchor per forget prompt")

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "description": self.description,
            "source": self.source,
            "forget": list(self.forget_prompts),
            "preserve": list(self.preserve_prompts),
            "anchor": list(self.anchor_prompts),
            "default_model": self.default_model,
            "eval": self.eval_prompts,
        }


def _presets_dir():
    return resources.files("munba_diffusion.prompts") / "presets"


def list_presets() -> list[str]:
    """Names of the bundled presets."""
    return sorted(p.name[: -len(".yaml")] for p in _presets_dir().iterdir() if p.name.endswith(".yaml"))


def preset_from_mapping(data: dict, source: str) -> ConceptPreset:
    """Build a preset from parsed YAML, checking the schema."""
    if not isinstance(data, dict) or "name" not in data or "forget" not in data:
        raise ValueError(
            f"{source} is not a concept preset: it needs at least 'name' and 'forget' (see prompts/README.md)"
        )
    forget = tuple(str(p) for p in data["forget"] or ())
    anchor = data.get("anchor", "")
    anchors = tuple(str(a) for a in anchor) if isinstance(anchor, list) else (str(anchor or ""),) * len(forget)
    return ConceptPreset(
        name=str(data["name"]),
        forget_prompts=forget,
        preserve_prompts=tuple(str(p) for p in data.get("preserve") or ()),
        anchor_prompts=anchors,
        description=str(data.get("description", "")),
        default_model=data.get("default_model"),
        eval_prompts=data.get("eval"),
        source=source,
    )


def load_preset(name: str) -> ConceptPreset:
    """A bundled preset by name; an unknown name raises a one-line error with the closest names."""
    names = list_presets()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ValueError(
            f"unknown concept {name!r}: {hint}choose a preset ({', '.join(names)}), a preset .yaml file, "
            f"or free text as '{TEXT_PREFIX}<phrase>'"
        )
    text = (_presets_dir() / f"{name}.yaml").read_text(encoding="utf-8")
    return preset_from_mapping(yaml.safe_load(text), source=f"preset:{name}")


def read_prompt_file(path: str | Path) -> tuple[str, ...]:
    """One prompt per line; blank lines and lines starting with '#' are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist; pass a text file with one prompt per line")
    prompts = tuple(
        line.strip()
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    )
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompts; write one prompt per line")
    return prompts


def concept_from_text(phrase: str) -> ConceptPreset:
    """Free text: forget the phrase in a few phrasings, preserve generic prompts, anchor to the empty prompt."""
    phrase = phrase.strip()
    if not phrase:
        raise ValueError(f"empty free-text concept; write it as '{TEXT_PREFIX}<phrase>'")
    forget = (phrase, f"a photo of {phrase}", f"an image of {phrase}", f"a painting of {phrase}")
    return ConceptPreset(
        name=phrase,
        forget_prompts=forget,
        preserve_prompts=GENERIC_PRESERVE_PROMPTS,
        anchor_prompts=("",) * len(forget),
        description=f"free text: {phrase}",
        source="text",
    )


def resolve_concept(spec: str) -> ConceptPreset:
    """A preset name, a path to a preset .yaml, or ``text:<phrase>``."""
    if spec.startswith(TEXT_PREFIX):
        return concept_from_text(spec[len(TEXT_PREFIX) :])
    if spec.endswith((".yaml", ".yml")):
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"preset file {path} does not exist")
        return preset_from_mapping(yaml.safe_load(path.read_text(encoding="utf-8")), source=str(path))
    return load_preset(spec)


def eval_prompts_path(name: str) -> Path:
    """A bundled evaluation prompt set (CSV in prompts/eval/) by name."""
    path = Path(str(resources.files("munba_diffusion.prompts") / "eval" / f"{name}.csv"))
    if not path.is_file():
        raise FileNotFoundError(f"no bundled evaluation prompt set {name!r} (looked for {path})")
    return path
