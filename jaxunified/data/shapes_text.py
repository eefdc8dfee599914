"""A word-level SentencePiece model for the shapes caption grammar, built on first use.

Byte tokens spread every word over 3–8 positions, and a small text tower learns colour words (their
first bytes differ) long before shape words ("circle"/"cross", "square"/"star" share them); with
one token per word both are one embedding away. The model is SentencePiece ``model_type=word``
trained on every word the grammar can produce, so it is deterministic and needs no download.
Refer to it as ``data.text.path = "builtin:shapes_words"`` with ``tokenizer = "sentencepiece"``.

``HardNegativeCaptions`` adds grammar-made hard-negative captions (``data.text.hard_negatives``).
"""

from __future__ import annotations

import io
import os
import pathlib

import grain
import numpy as np

from jaxunified.data import shapes

BUILTIN_PREFIX = "builtin:"
_NAME = "shapes_words"


def _grammar_sentences() -> list[str]:
    """Sentences covering every word of the caption grammar, each word several times."""
    phrases = [shapes._phrase(s, c) for s in range(len(shapes.SHAPES)) for c in range(len(shapes.COLORS))]
    counts = [f"{n} {c} {p}" for n in shapes._NUMBERS.values() for c in shapes.COLORS for p in shapes._PLURALS]
    relations = [f"{phrases[0]} {r} {phrases[-1]}" for r in shapes._RELATION_PHRASES]
    binding = [f"{phrases[1]} and {phrases[-2]}"]
    return (phrases + counts + relations + binding) * 3


def shapes_words_model(cache_dir: str | os.PathLike = "~/.cache/jaxunified/tokenizers") -> str:
    """Path of the word-level model (pad 0, unk 1, eos 2, no bos); trained and cached if missing."""
    path = pathlib.Path(cache_dir).expanduser() / f"{_NAME}.model"
    if path.exists():
        return str(path)
    import sentencepiece

    buf = io.BytesIO()
    sentences = _grammar_sentences()
    words = {w for s in sentences for w in s.split()}
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=buf,
        model_type="word",
        vocab_size=len(words) + 3,
        pad_id=0,
        unk_id=1,
        eos_id=2,
        bos_id=-1,
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)  # atomic: concurrent first uses never read a half-written file
    return str(path)


def resolve_builtin(path: str) -> str:
    """``builtin:<name>`` → a file path; other paths unchanged."""
    if not str(path).startswith(BUILTIN_PREFIX):
        return path
    name = str(path)[len(BUILTIN_PREFIX):]
    if name != _NAME:
        raise ValueError(f"unknown built-in tokenizer model {path!r}; available: {BUILTIN_PREFIX}{_NAME}")
    return shapes_words_model()


class HardNegativeCaptions(grain.transforms.RandomMap):
    """Per-example grain transform: ``num`` hard-negative captions of the example's caption
    (``shapes.negative_caption``), tokenised into int32 ``neg_tokens`` [num, max_len].

    Random per example from grain's per-record rng, so a resumed run sees the same negatives.
    """

    def __init__(self, tokenizer, num: int, kinds=None):
        if num < 1:
            raise ValueError(f"hard_negatives must be ≥ 1 when set, got {num}")
        self.tokenizer = tokenizer
        self.num = int(num)
        self.kinds = tuple(kinds) if kinds else shapes.NEGATIVE_KINDS  # None / () = every kind

    def random_map(self, element, rng: np.random.Generator):
        caption = element["caption"]
        caption = caption.decode() if isinstance(caption, bytes) else str(caption)
        out = dict(element)
        out["neg_tokens"] = self.tokenizer.encode([shapes.negative_caption(caption, rng, self.kinds)
                                                   for _ in range(self.num)])
        return out
