"""Replay sets: published adversarial and red-teaming prompt sets, each read in its own published layout.

``--prompts NAME`` reads a registered set online: the Hub dataset through ``datasets`` (cached by ``datasets``), or,
where the authors put no dataset on the Hub, the published CSV file at a pinned commit (cached in
:func:`replay_cache_dir`);
``--prompts NAME=path/to/copy.csv`` reads your local copy of the published file with the same column mapping.
Offline without a cached copy, or without access to a gated dataset, the error is one line naming the fix.

========================  =======================================================  ==============  ===========
name                      source (what the rows are)                               evaluator       rows
========================  =======================================================  ==============  ===========
i2p                       I2P (real Lexica prompts, 7 categories)                  nudenet         4,703
unlearndiffatk-nudity     UnlearnDiffAtk's nudity prompts (from I2P)               nudenet         142
unlearndiffatk-vangogh    UnlearnDiffAtk's Van Gogh style prompts                  clip (no ASR)   50
unlearndiffatk-church     UnlearnDiffAtk's object prompts (also -garbage-truck,    objects         50 each
                          -parachute, -tench)
ring-a-bell-nudity        Ring-A-Bell's nudity prompts (gated)                     nudenet         285 (Hub)
p4d-nudity                P4D-N's optimised nudity prompts (gated)                 nudenet         151 (?)
mma-diffusion             MMA-Diffusion's adversarial nudity prompts (gated)       nudenet         1,000
demo-replay               the demo world's held-out phrasings (this repository)    demo            packaged
========================  =======================================================  ==============  ===========

Each :class:`ReplaySet` names its prompt column, seed column, guidance column and the label it adds (the Imagenette
class of an object set, the artist of a style set), its source (paper and repository), its licence as published and
the evaluator of ``eval/evaluate.py`` that judges it. What could not be confirmed from the published files (gated
sets whose files we could not open) is written in its ``unconfirmed`` field and shown in reports.

Seeds: a row takes the seed in the set's own seed column (then ``seed``, ``evaluation_seed``, ``sd_seed``); a set or
row without one gets its row index (0, 1, 2, ...) as its seed, so every row has its own noise and the same row always
gets the same image. The report's ``prompt_set.replay_set.seed_policy`` says which applied.

The UnlearnDiffAtk sets are the prompts its attack *starts* from (its adversarial prompts are made per model and are
not published, OPTML-Group/Diffusion-MU-Attack issue #16); replayed as they are they measure the erased model on the
benchmark's prompts, the white-box attack (``munba_diffusion.evaluation.attack``) optimises from them.
"""

from __future__ import annotations

import hashlib
import os
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import datasets

from ..io import is_offline, write_bytes_atomic

SEED_FALLBACK_COLUMNS = ("seed", "evaluation_seed", "sd_seed")
GUIDANCE_FALLBACK_COLUMNS = ("guidance_scale", "evaluation_guidance", "sd_guidance_scale")
DEFAULT_SEED_POLICY = "row index (0, 1, 2, ...): the set has no seed column"

# The commit of OPTML-Group/Diffusion-MU-Attack that the authors' own Space (huggingface.co/spaces/Intel/
# UnlearnDiffAtk, about.py) links the prompt files at; pinned so that the rows never change under a report.
_UDA_COMMIT = "e848ddd19df1f86d08e08cc9146f8a2bb126da12"
_UDA_REPO = "https://github.com/OPTML-Group/Diffusion-MU-Attack"
_UDA_PAPER = (
    "Zhang et al., To Generate or Not? Safety-Driven Unlearned Diffusion Models Are Still Easy To Generate Unsafe "
    "Images ... For Now, ECCV 2024, https://arxiv.org/abs/2310.11868"
)
_UDA_LICENCE = (
    "none stated: the repository publishes no licence file (its nudity prompts are I2P rows, MIT); ask the "
    "authors before redistributing"
)


def _uda_raw(file: str) -> str:
    return f"https://raw.githubusercontent.com/OPTML-Group/Diffusion-MU-Attack/{_UDA_COMMIT}/prompts/{file}"


def _uda_page(file: str) -> str:
    return f"{_UDA_REPO}/blob/{_UDA_COMMIT}/prompts/{file}"


@dataclass(frozen=True)
class ReplaySet:
    """One published prompt set: where it lives, how its columns map onto a prompt set's, whose it is.

    Columns: ``prompt_columns`` (the first one present in the file holds the prompt), ``seed_columns`` and
    ``guidance_columns`` (tried before the usual names), ``renamed`` (published column -> the column our metrics
    read, e.g. ``artist`` -> ``concept``), ``constants`` (columns every row gets, e.g. ``label`` = ``church``).
    Where it lives: ``hub_id`` (+ ``hub_data_files``, ``hub_split``) for a Hub dataset, else ``url`` (a CSV file read
    through the ``csv`` builder of ``datasets``), or ``packaged`` (a CSV in ``munba_diffusion.prompts``);
    ``download`` is the page a person fetches the file from.
    """

    name: str
    title: str
    paper: str
    repository: str
    licence: str
    evaluator: str
    evaluator_note: str
    download: str
    prompt_columns: tuple[str, ...] = ("prompt",)
    seed_columns: tuple[str, ...] = ()
    guidance_columns: tuple[str, ...] = ()
    width_columns: tuple[str, ...] = ()
    height_columns: tuple[str, ...] = ()
    renamed: Mapping[str, str] = field(default_factory=dict)
    constants: Mapping[str, str] = field(default_factory=dict)
    hub_id: str | None = None
    hub_data_files: str | None = None
    hub_split: str = "train"
    url: str | None = None
    packaged: str | None = None
    gated: bool = False
    unconfirmed: str = ""

    @property
    def online_source(self) -> str:
        """What ``--prompts NAME`` reads: the Hub id (and file), or the URL."""
        if self.hub_id is not None:
            return self.hub_id + (f" ({self.hub_data_files})" if self.hub_data_files else "")
        return self.url or f"packaged {self.packaged}"

    def prompt_column(self, columns: Sequence[str], where: str) -> str:
        """The column holding the prompt; a table without one is one line naming what it has and what is expected."""
        for column in self.prompt_columns:
            if column in columns:
                return column
        expected = " or ".join(repr(c) for c in self.prompt_columns)
        shown = ", ".join(repr(c) for c in columns if c) or "none"
        raise ValueError(
            f"{where} has no prompt column for the {self.name} set: it has {shown}, the set's prompt column is "
            f"{expected}; pass the file as published ({self.download}) or rename its prompt column to "
            f"{self.prompt_columns[0]!r}"
        )

    def seed_policy(self, columns: Sequence[str]) -> str:
        for column in (*self.seed_columns, *SEED_FALLBACK_COLUMNS):
            if column in columns:
                return f"the set's {column} column (row index where a row has none)"
        return DEFAULT_SEED_POLICY

    def map_row(self, row: Mapping[str, object], index: int, prompt_column: str) -> dict:
        """A published row in the prompt-set layout: prompt, seed, guidance_scale, width, height, then its other
        columns (renamed where the set says so) and the set's constant columns."""
        used = {prompt_column}

        def take(columns: Sequence[str]) -> object | None:
            for column in columns:
                value = row.get(column)
                if column in row:
                    used.add(column)
                if value is not None and str(value).strip() != "":
                    return value
            return None

        seed = take((*self.seed_columns, *SEED_FALLBACK_COLUMNS))
        mapped: dict = {
            "prompt": row.get(prompt_column),
            "seed": index if seed is None else seed,
            "guidance_scale": take((*self.guidance_columns, *GUIDANCE_FALLBACK_COLUMNS)),
            "width": take(self.width_columns),
            "height": take(self.height_columns),
        }
        for column, value in row.items():
            if column in used or column is None or column == "" or str(column).startswith("Unnamed:"):
                continue  # pandas index columns ("Unnamed: 0", a blank header) are no data
            mapped[self.renamed.get(column, column)] = value
        mapped.update(self.constants)
        return mapped

    def offline_fix(self) -> str:
        """The one fix to name when the online read fails."""
        access = (
            f"accept the dataset's conditions at https://huggingface.co/datasets/{self.hub_id} and log in "
            "(huggingface-cli login), then "
            if self.gated
            else ""
        )
        return (
            f"{access}go online once, or save it as CSV and pass the file: download {self.download} and pass "
            f"--prompts {self.name}=path/to/file.csv"
        )

    def protocol(self, columns: Sequence[str]) -> dict:
        """What a report states about the set (``columns``: those of the table read)."""
        return {
            "name": self.name,
            "title": self.title,
            "source": self.online_source,
            "paper": self.paper,
            "repository": self.repository,
            "licence": self.licence,
            "evaluator": self.evaluator,
            "prompt_column": next((c for c in self.prompt_columns if c in columns), self.prompt_columns[0]),
            "seed_policy": self.seed_policy(columns),
            "renamed": dict(self.renamed),
            "constants": dict(self.constants),
            **({"unconfirmed": self.unconfirmed} if self.unconfirmed else {}),
        }


def _uda_object(slug: str, file: str, label: str) -> ReplaySet:
    return ReplaySet(
        name=f"unlearndiffatk-{slug}",
        title=f"UnlearnDiffAtk's {label} prompts (50 captions that show a {label})",
        paper=_UDA_PAPER,
        repository=_UDA_REPO,
        licence=_UDA_LICENCE,
        evaluator="objects",
        evaluator_note=f"Imagenette ResNet-50 (--metrics objects --concept '{label}'): unlearning accuracy",
        download=_uda_page(file),
        seed_columns=("evaluation_seed",),
        guidance_columns=("evaluation_guidance",),
        constants={"label": label},
        url=_uda_raw(file),
    )


REPLAY_SETS: dict[str, ReplaySet] = {
    s.name: s
    for s in (
        ReplaySet(
            name="i2p",
            title="I2P: Inappropriate Image Prompts (4,703 real Lexica prompts in 7 categories)",
            paper=(
                "Schramowski et al., Safe Latent Diffusion: Mitigating Inappropriate Degeneration in Diffusion "
                "Models, CVPR 2023, https://arxiv.org/abs/2211.05105"
            ),
            repository="https://github.com/ml-research/i2p",
            licence="MIT (Hub dataset card)",
            evaluator="nudenet",
            evaluator_note="NudeNet (--metrics nudenet; --nudity_only or --category sexual for the nudity subsets)",
            download="https://huggingface.co/datasets/AIML-TUDA/i2p/blob/main/i2p_benchmark.csv",
            seed_columns=("sd_seed",),
            guidance_columns=("sd_guidance_scale",),
            width_columns=("sd_image_width",),
            height_columns=("sd_image_height",),
            hub_id="AIML-TUDA/i2p",
        ),
        ReplaySet(
            name="unlearndiffatk-nudity",
            title="UnlearnDiffAtk's nudity prompts (142 I2P rows its attack starts from)",
            paper=_UDA_PAPER,
            repository=_UDA_REPO,
            licence=_UDA_LICENCE,
            evaluator="nudenet",
            evaluator_note="NudeNet attack success rate (--metrics nudenet, threshold 0.45 as in the paper)",
            download=_uda_page("nudity.csv"),
            seed_columns=("evaluation_seed",),
            guidance_columns=("evaluation_guidance",),
            width_columns=("sd_image_width",),
            height_columns=("sd_image_height",),
            url=_uda_raw("nudity.csv"),
        ),
        ReplaySet(
            name="unlearndiffatk-vangogh",
            title="UnlearnDiffAtk's Van Gogh style prompts (50 titles of his paintings 'by Vincent van Gogh')",
            paper=_UDA_PAPER,
            repository=_UDA_REPO,
            licence=_UDA_LICENCE,
            evaluator="clip",
            evaluator_note=(
                "CLIP score only (--metrics clip): the paper judges style with a ViT artist classifier that this "
                "project does not bundle, so there is no attack success rate for this set"
            ),
            download=_uda_page("vangogh.csv"),
            seed_columns=("evaluation_seed",),
            renamed={"artist": "concept"},
            url=_uda_raw("vangogh.csv"),
        ),
        _uda_object("church", "church.csv", "church"),
        _uda_object("garbage-truck", "garbage_truck.csv", "garbage truck"),
        _uda_object("parachute", "parachute.csv", "parachute"),
        _uda_object("tench", "tench.csv", "tench"),
        ReplaySet(
            name="ring-a-bell-nudity",
            title="Ring-A-Bell's nudity prompts (made from a nudity concept vector)",
            paper=(
                "Tsai, Hsu et al., Ring-A-Bell! How Reliable are Concept Removal Methods for Diffusion Models?, "
                "ICLR 2024, https://arxiv.org/abs/2310.10012"
            ),
            repository="https://github.com/chiayi-hsu/Ring-A-Bell",
            licence=("not stated on the Hub dataset (gated: accept its conditions); the repository's code is MIT"),
            evaluator="nudenet",
            evaluator_note="NudeNet attack success rate (--metrics nudenet)",
            download="https://huggingface.co/datasets/Chia15/RingABell-Nudity",
            prompt_columns=("prompt", "sensitive prompt"),
            seed_columns=("evaluation_seed",),
            hub_id="Chia15/RingABell-Nudity",
            gated=True,
            unconfirmed=(
                "the files are gated: the prompt column ('prompt'; 'sensitive prompt' in the copy SAFREE "
                "redistributes) and the seed column ('evaluation_seed', as in the repository's violence CSVs) are "
                "not confirmed; the Hub lists 285 rows"
            ),
        ),
        ReplaySet(
            name="p4d-nudity",
            title="P4D-N's problematic nudity prompts (16 optimised tokens, found against safe T2I models)",
            paper=(
                "Chin et al., Prompting4Debugging: Red-Teaming Text-to-Image Diffusion Models by Finding "
                "Problematic Prompts, ICML 2024, https://arxiv.org/abs/2309.06135"
            ),
            repository="https://github.com/joycenerd/P4D",
            licence=(
                "CC BY 4.0 (Hub dataset card); the gate asks you to agree to non-commercial research use; the "
                "repository's code is MIT"
            ),
            evaluator="nudenet",
            evaluator_note="NudeNet attack success rate (--metrics nudenet)",
            download="https://huggingface.co/datasets/joycenerd/p4d",
            seed_columns=("evaluation_seed",),
            guidance_columns=("evaluation_guidance",),
            hub_id="joycenerd/p4d",
            hub_data_files="p4dn_16_prompt.csv",
            gated=True,
            unconfirmed=(
                "the files are gated (access granted by hand): the file name p4dn_16_prompt.csv, its columns "
                "prompt and evaluation_seed and its 151 rows come from code that reads it, not from the file"
            ),
        ),
        ReplaySet(
            name="mma-diffusion",
            title="MMA-Diffusion's text-modality adversarial nudity prompts (1,000)",
            paper=(
                "Yang et al., MMA-Diffusion: MultiModal Attack on Diffusion Models, CVPR 2024, "
                "https://arxiv.org/abs/2311.17516"
            ),
            repository="https://github.com/cure-lab/MMA-Diffusion",
            licence=(
                "the repository is CC BY-NC-ND 3.0; the Hub dataset is gated (access request) and its card states no "
                "licence we could read"
            ),
            evaluator="nudenet",
            evaluator_note="NudeNet attack success rate (--metrics nudenet)",
            download="https://huggingface.co/datasets/YijunYang280/MMA-Diffusion-NSFW-adv-prompts-benchmark",
            prompt_columns=("adv_prompt",),
            hub_id="YijunYang280/MMA-Diffusion-NSFW-adv-prompts-benchmark",
            gated=True,
            unconfirmed=(
                "the prompt column adv_prompt and the train split are confirmed (the authors' README and code that "
                "reads it); the other columns are not; the set has no seeds"
            ),
        ),
        ReplaySet(
            name="demo-replay",
            title="The demo world's replay prompts: held-out names and templates no demo preset trains on",
            paper="this repository (scripts/demo/make_replay_prompts.py; prompts/README.md)",
            repository="this repository",
            licence="Apache-2.0 (this project)",
            evaluator="demo",
            evaluator_note="the demo judge (--metrics demo --concept CONCEPT)",
            download="prompts/eval/demo_replay.csv",
            packaged="eval/demo_replay.csv",
        ),
    )
}


def split_source(source: str) -> tuple[ReplaySet, str | None] | None:
    """``"NAME"`` -> (set, None); ``"NAME=path"`` -> (set, path); anything else (a CSV path) -> None."""
    name, sep, path = str(source).partition("=")
    spec = REPLAY_SETS.get(name.strip().lower())
    if spec is None:
        return None
    if sep and not path.strip():
        raise ValueError(f"--prompts {source}: give the path of your copy after '=', e.g. {name}=path/to/file.csv")
    return spec, (path.strip() if sep else None)


def replay_cache_dir() -> Path:
    """Where published CSV files fetched by URL are kept: ``$XDG_CACHE_HOME/munba_diffusion/replay_sets`` (by
    default ``~/.cache/munba_diffusion/replay_sets``)."""
    root = os.environ.get("XDG_CACHE_HOME", "").strip() or "~/.cache"
    return Path(root).expanduser() / "munba_diffusion" / "replay_sets"


def fetch_published_csv(spec: ReplaySet) -> Path:
    """The set's published CSV (``spec.url``, a pinned commit) in the replay cache, fetched once.

    Fetched with the standard library: the ``csv`` builder of ``datasets`` would need ``aiohttp`` for an http URL,
    which ``datasets`` does not install. Offline (``HF_HUB_OFFLINE``) only the cached copy is read.
    """
    if spec.url is None:
        raise ValueError(f"the {spec.name} set has no published CSV URL")
    cached = replay_cache_dir() / f"{spec.name}-{hashlib.sha256(spec.url.encode()).hexdigest()[:12]}.csv"
    if cached.is_file():
        return cached
    if is_offline():
        reason = "HF_HUB_OFFLINE is set and the file is not in the cache"
    else:
        try:
            with urllib.request.urlopen(spec.url, timeout=60) as response:  # noqa: S310 (a fixed https URL)
                data = response.read()
        except (OSError, ValueError) as error:  # URLError, HTTPError and timeouts are OSErrors
            reason = str(getattr(error, "reason", None) or error).strip().splitlines()[0] or type(error).__name__
        else:
            try:
                cached.parent.mkdir(parents=True, exist_ok=True)
                return write_bytes_atomic(cached, data)
            except OSError as error:
                raise ValueError(
                    f"cannot write the replay cache {cached.parent} ({error.strerror or type(error).__name__}); "
                    "set XDG_CACHE_HOME to a folder you can write"
                ) from None
    raise ConnectionError(f"could not load the {spec.name} set from {spec.url} ({reason}); {spec.offline_fix()}")


def load_hub_rows(spec: ReplaySet) -> tuple[list[dict], list[str]]:
    """The set's rows and columns read from the Hub through ``datasets`` (cached after the first read)."""
    try:
        kwargs = {"data_files": spec.hub_data_files} if spec.hub_data_files else {}
        table = datasets.load_dataset(spec.hub_id, split=spec.hub_split, **kwargs)
    except Exception as error:  # datasets raises ConnectionError, OSError or its own errors when offline or gated
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConnectionError(
            f"could not load the {spec.name} set from {spec.online_source} ({reason}); {spec.offline_fix()}"
        ) from None
    return list(table), list(table.column_names)
