"""Concept presets: which prompts to forget, which to preserve, and what to map the concept to.

A preset is a YAML file (schema in ``prompts/README.md``); the bundled ones live in ``prompts/presets/`` and install
as package data. ``resolve_concept`` turns one ``--concept`` argument into a :class:`ConceptPreset`.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field, replace
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
    that forget prompt to (a single ``anchor`` in the YAML applies to every forget prompt). ``neighbour_prompts``
    are concepts close to the erased one that must survive it (the other colours of a colour, other artists for an
    artist, clothed people for nudity): preserved with the other preservation prompts, or bargained as their own
    player with ``--neighbour_player``. ``substitute_prompts`` (optional) has one entry per forget prompt: the
    prompts whose images replace it under the ``substitute`` loss, each in turn (empty: the anchors).
    """

    name: str
    forget_prompts: tuple[str, ...]
    preserve_prompts: tuple[str, ...]
    anchor_prompts: tuple[str, ...]
    description: str = ""
    default_model: str | None = None
    eval_prompts: str | None = None
    neighbour_prompts: tuple[str, ...] = ()
    substitute_prompts: tuple[tuple[str, ...], ...] = ()
    source: str = "preset"
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not self.forget_prompts:
            raise ValueError(f"concept {self.name!r} has no forget prompts; add at least one under 'forget:'")
        if len(self.anchor_prompts) != len(self.forget_prompts):
            raise ValueError(f"concept {self.name!r}: give one anchor, or one anchor per forget prompt")
        if self.substitute_prompts and len(self.substitute_prompts) != len(self.forget_prompts):
            raise ValueError(f"concept {self.name!r}: give one 'substitutes' entry per forget prompt")

    def training_pairs(self, forget_loss: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The forgetting player's rows as (forget prompt, anchor) pairs, aligned: under ``substitute`` one pair per
        (forget prompt, substitute), so that a forget prompt with three substitutes is replaced by each in turn;
        otherwise the forget prompts with their anchors."""
        if forget_loss != "substitute" or not self.substitute_prompts:
            return self.forget_prompts, self.anchor_prompts
        pairs = [(f, s) for f, subs in zip(self.forget_prompts, self.substitute_prompts) for s in subs]
        return tuple(f for f, _ in pairs), tuple(s for _, s in pairs)

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
            "neighbours": list(self.neighbour_prompts),
            "substitutes": [list(s) for s in self.substitute_prompts],
        }


def compose_substitutes(concepts: list[ConceptPreset]) -> list[ConceptPreset]:
    """Substitutes for erasing ``concepts`` together: a substitute that another of the concepts forgets is replaced,
    in turn, by that concept's substitutes for it.

    Erasing red and circle at once, red's substitute "a blue circle" for "a red circle" is circle's forget prompt
    and becomes circle's substitutes for it ("a blue square", "a blue triangle", "a blue cross"): each concept's
    substitution is applied once, so every prompt that comes out is free of all the concepts that have
    substitutes for it. A substitute that no other concept maps on (or that the concept forgets itself) is kept as
    it is, for the caller to refuse. Idempotent; a single concept is returned unchanged.
    """
    owners: dict[str, list[tuple[str, tuple[str, ...]]]] = {}
    for c in concepts:
        for prompt, subs in zip(c.forget_prompts, c.substitute_prompts):
            owners.setdefault(prompt, []).append((c.name, subs))

    def resolve(prompt: str, applied: frozenset[str]) -> list[str]:
        for name, subs in owners.get(prompt, ()):
            if name not in applied:
                return [r for s in subs for r in resolve(s, applied | {name})]
        return [prompt]

    return [
        replace(
            c,
            substitute_prompts=tuple(
                tuple(dict.fromkeys(r for s in entry for r in resolve(s, frozenset({c.name}))))
                for entry in c.substitute_prompts
            ),
        )
        for c in concepts
    ]


def _presets_dir():
    return resources.files("munba_diffusion.prompts") / "presets"


def list_presets() -> list[str]:
    """Names of the bundled presets."""
    return sorted(p.name[: -len(".yaml")] for p in _presets_dir().iterdir() if p.name.endswith(".yaml"))


PRESET_KEYS = (
    "name",
    "description",
    "forget",
    "preserve",
    "neighbours",
    "anchor",
    "substitutes",
    "default_model",
    "eval",
)
"""The keys of a preset file (schema: ``prompts/README.md``); any other key is refused, naming the closest."""
SCHEMA = "prompts/README.md"


def _shown(value: object) -> str:
    """A value as an error message shows it: its YAML kind and, when short, the value."""
    kinds = {dict: "a mapping", list: "a list", bool: "true/false", int: "a number", float: "a number"}
    kind = "empty" if value is None else kinds.get(type(value), type(value).__name__)
    text = repr(value)
    return kind if value is None or len(text) > 40 else f"{kind} {text}"


def _string(data: dict, key: str, where: str, *, required: bool = False) -> str | None:
    value = data.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or (required and not value.strip()):
        raise ValueError(
            f"{where}: '{key}' must be a non-empty string, got {_shown(value)}; write {key}: \"...\" (schema: {SCHEMA})"
        )
    return value


def _strings(data: dict, key: str, where: str, *, blank_ok: bool = False) -> tuple[str, ...] | None:
    """A list of strings or one string (None when the key is absent or empty)."""
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise ValueError(
            f"{where}: '{key}' must be a list of strings (or one string), got {_shown(value)}; write each prompt "
            f"on its own '- ' line under {key}: (schema: {SCHEMA})"
        )
    for number, item in enumerate(value, start=1):
        if not isinstance(item, str):
            raise ValueError(
                f"{where}: entry {number} of '{key}' must be a string, got {_shown(item)}; quote it or write it as "
                f"plain text (schema: {SCHEMA})"
            )
        if not blank_ok and not item.strip():
            raise ValueError(f"{where}: entry {number} of '{key}' is empty; write a prompt there or delete the line")
    return tuple(value)


def preset_from_mapping(data: object, source: str, *, where: str | None = None) -> ConceptPreset:
    """Build a preset from parsed YAML, checking every key and its type (schema: ``prompts/README.md``).

    ``source`` is recorded on the preset; ``where`` names the file in error messages (default: ``source``). Every
    error is one ``ValueError`` line that names the file and the key to fix.
    """
    where = where or source
    for key in data if isinstance(data, dict) else ():
        if key not in PRESET_KEYS:
            close = difflib.get_close_matches(str(key), PRESET_KEYS, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ValueError(
                f"{where}: unknown key {str(key)!r}; {hint}a preset has the keys {', '.join(PRESET_KEYS)} "
                f"(schema: {SCHEMA})"
            )
    if not isinstance(data, dict) or "name" not in data or "forget" not in data:
        raise ValueError(f"{where} is not a concept preset: it needs at least 'name' and 'forget' keys (see {SCHEMA})")
    name = _string(data, "name", where, required=True)
    forget = _strings(data, "forget", where)
    if not forget:
        raise ValueError(f"{where}: 'forget' is empty; add at least one prompt under forget: (schema: {SCHEMA})")
    anchor = _strings(data, "anchor", where, blank_ok=True)
    if anchor is None or (len(anchor) == 1 and not isinstance(data.get("anchor"), list)):
        anchor = ((anchor or ("",))[0],) * len(forget)
    if len(anchor) != len(forget):
        raise ValueError(
            f"{where}: 'anchor' has {len(anchor)} entries for {len(forget)} 'forget' prompts; give one anchor "
            "string, or one anchor per forget prompt"
        )
    substitutes = _substitutes(data, where, len(forget))
    return ConceptPreset(
        name=name,
        forget_prompts=forget,
        preserve_prompts=_strings(data, "preserve", where) or (),
        anchor_prompts=anchor,
        description=_string(data, "description", where) or "",
        default_model=_string(data, "default_model", where),
        eval_prompts=_string(data, "eval", where),
        neighbour_prompts=_strings(data, "neighbours", where) or (),
        substitute_prompts=substitutes,
        source=source,
    )


def _substitutes(data: dict, where: str, count: int) -> tuple[tuple[str, ...], ...]:
    """The optional ``substitutes`` key: one entry per forget prompt, each a prompt or a list of prompts."""
    value = data.get("substitutes")
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) != count:
        raise ValueError(
            f"{where}: 'substitutes' must be a list with one entry per 'forget' prompt ({count}), got "
            f"{_shown(value)}; each entry is a prompt or a list of prompts (schema: {SCHEMA})"
        )
    entries = []
    for number, entry in enumerate(value, start=1):
        entry = _strings({"substitutes": entry}, "substitutes", f"{where}: entry {number}")
        if not entry:
            raise ValueError(f"{where}: entry {number} of 'substitutes' is empty; write at least one prompt there")
        entries.append(entry)
    return tuple(entries)


def _read_text(path: Path, what: str, fix: str) -> str:
    """The UTF-8 text of ``path``, or a one-line error that names the file and ``fix``."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{what} {path} is not UTF-8 text (byte {error.object[error.start]:#04x} at offset {error.start}); "
            f"save it as UTF-8"
        ) from None
    except OSError as error:
        raise ValueError(f"cannot read {what} {path} ({error.strerror or type(error).__name__}); {fix}") from None


def _parse_preset_yaml(text: str, where: str) -> object:
    """``yaml.safe_load`` (plain data only: no tag ever constructs an object), with one-line errors."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
        at = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = str(getattr(error, "problem", None) or error).splitlines()[0]
        tag = re.search(r"the tag '([^']+)'", problem)
        if isinstance(error, yaml.constructor.ConstructorError) and tag:
            shown = tag.group(1).replace("tag:yaml.org,2002:", "!!")
            raise ValueError(
                f"{where}{at}: the tag {shown} is not allowed (a preset holds only strings and lists of strings, "
                f"and nothing in it is ever run); remove the tag"
            ) from None
        context = getattr(error, "context", None)
        detail = f"{problem}, {context}" if context else problem
        raise ValueError(f"{where}{at}: not valid YAML ({detail}); fix the file (schema: {SCHEMA})") from None


def read_preset_file(path: str | Path) -> ConceptPreset:
    """A preset .yaml file (read with ``yaml.safe_load``; see :func:`preset_from_mapping` for the checks)."""
    path = Path(path)
    if not path.is_file():
        state = "is not a file" if path.exists() else "does not exist"
        raise FileNotFoundError(
            f"preset file {path} {state}; pass an existing .yaml, a bundled preset name (see prompts/presets/) "
            f"or '{TEXT_PREFIX}<phrase>'"
        )
    text = _read_text(path, "preset file", "check its permissions")
    return preset_from_mapping(_parse_preset_yaml(text, str(path)), source=str(path))


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
    resource = _presets_dir() / f"{name}.yaml"
    where = f"bundled preset {resource}"
    text = resource.read_text(encoding="utf-8")
    return preset_from_mapping(_parse_preset_yaml(text, where), source=f"preset:{name}", where=where)


def read_prompt_file(path: str | Path) -> tuple[str, ...]:
    """One prompt per line; blank lines and lines starting with '#' are skipped."""
    path = Path(path)
    if not path.is_file():
        state = "is not a file" if path.exists() else "does not exist"
        raise FileNotFoundError(f"prompt file {path} {state}; pass a text file with one prompt per line")
    text = _read_text(path, "prompt file", "pass a text file you can read, with one prompt per line")
    prompts = tuple(line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#"))
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
        return read_preset_file(spec)
    return load_preset(spec)


def eval_prompts_path(name: str) -> Path:
    """A bundled evaluation prompt set (CSV in prompts/eval/) by name."""
    path = Path(str(resources.files("munba_diffusion.prompts") / "eval" / f"{name}.csv"))
    if not path.is_file():
        raise FileNotFoundError(f"no bundled evaluation prompt set {name!r} (looked for {path})")
    return path
