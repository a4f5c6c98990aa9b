"""The demo world's small CLIP BPE vocabulary (vocab.json + merges.txt), loadable by stock ``CLIPTokenizer``."""

from __future__ import annotations

import json
import string
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, trainers

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77


def write_clip_vocabulary(words: list[str], out_dir: Path, vocab_size: int = 600) -> Path:
    """Learn BPE merges over ``words`` (CLIP style: '</w>' ends a word) and write vocab.json and merges.txt.

    Ids 0 and 1 are the start/end tokens (the text encoder's config must say bos_token_id=0, eos_token_id=1);
    every letter and digit exists with and without '</w>', so any lower-case prompt tokenizes without <unk>.
    """
    alphabet = list(string.ascii_lowercase + string.digits + ".,!?'-")
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        initial_alphabet=alphabet,
        end_of_word_suffix="</w>",
        show_progress=False,
        special_tokens=[],
    )
    # Each word once per character so that every "x</w>" ending exists too.
    corpus = words + [c for c in alphabet]
    bpe.train_from_iterator(corpus, trainer=trainer)
    learned = json.loads(bpe.to_str())["model"]
    merges = [" ".join(m) if isinstance(m, list) else m for m in learned["merges"]]
    tokens = [BOS, EOS] + alphabet + [c + "</w>" for c in alphabet]
    for token in sorted(learned["vocab"], key=learned["vocab"].get):
        if token not in tokens:
            tokens.append(token)
    for merge in merges:  # merged tokens must be in the vocabulary
        merged = merge.replace(" ", "")
        if merged not in tokens:
            tokens.append(merged)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, indent=0))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return out_dir
