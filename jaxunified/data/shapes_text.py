"""A word-level SentencePiece model for the shapes caption grammar, made on first use.

Byte tokens spread every word over 3–8 positions, and a small text tower learns colour words (their
first bytes differ) long before shape words ("circle"/"cross", "square"/"star" share them); with
one token per word both are one embedding away. Plurals are the singular's token plus a suffix
token ("circles" → ``▁circle s``, "crosses" → ``▁cross es``), as a subword vocabulary would split
them: with a separate token per plural, "circle" and "circles" were learned apart, and a zero-shot
shape class averaging singular and plural prompts scored 66% on one-object images where the
singular prompts alone scored 90%. The model is a SentencePiece unigram ``ModelProto`` written
directly from the grammar's words (no training run), so it is deterministic and needs no download.
Refer to it as ``data.text.path = "builtin:shapes_words"`` with ``tokenizer = "sentencepiece"``.

``HardNegativeCaptions`` adds grammar-made hard-negative captions (``data.text.hard_negatives``).
"""

from __future__ import annotations

import hashlib
import os
import pathlib

import grain
import numpy as np

from jaxunified.data import shapes

BUILTIN_PREFIX = "builtin:"
_NAME = "shapes_words"
PLURAL_SUFFIXES = ("s", "es")


def _grammar_words() -> list[str]:
    """Every word a shapes caption can contain except the plurals (stem + suffix), sorted."""
    phrases = [shapes.object_phrase(s, c) for s in range(len(shapes.SHAPES)) for c in range(len(shapes.COLORS))]
    words = {w for p in phrases for w in p.split()}
    words |= set(shapes.NUMBER_WORDS.values()) | {"and"}
    words |= {w for p in shapes._RELATION_PHRASES for w in p.split()}
    return sorted(words)


def _model_proto() -> bytes:
    """The serialized unigram model: pad 0, unk 1, eos 2 (no bos), then ``▁word`` for every word and
    the plural suffixes. Every caption has exactly one segmentation, so the equal scores never tie."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    piece = pb.ModelProto.SentencePiece
    m = pb.ModelProto()
    words = _grammar_words()
    m.trainer_spec.model_type = pb.TrainerSpec.UNIGRAM
    m.trainer_spec.vocab_size = 3 + len(words) + len(PLURAL_SUFFIXES)
    m.trainer_spec.pad_id, m.trainer_spec.unk_id, m.trainer_spec.eos_id, m.trainer_spec.bos_id = 0, 1, 2, -1
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.add_dummy_prefix = True
    m.normalizer_spec.remove_extra_whitespaces = True
    m.normalizer_spec.escape_whitespaces = True
    specials = (("<pad>", piece.CONTROL), ("<unk>", piece.UNKNOWN), ("</s>", piece.CONTROL))
    normal = [("\u2581" + w, piece.NORMAL) for w in words] + [(s, piece.NORMAL) for s in PLURAL_SUFFIXES]
    for text, kind in specials + tuple(normal):
        p = m.pieces.add()
        p.piece, p.type, p.score = text, kind, 0.0 if kind != piece.NORMAL else -1.0
    return m.SerializeToString()


def shapes_words_model(cache_dir: str | os.PathLike = "~/.cache/jaxunified/tokenizers") -> str:
    """Path of the model file; written if missing. The name carries a digest of the model, so a
    changed grammar never reads an old file."""
    proto = _model_proto()
    digest = hashlib.sha256(proto).hexdigest()[:12]
    path = pathlib.Path(cache_dir).expanduser() / f"{_NAME}-{digest}.model"
    if path.exists():
        return str(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(proto)
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
    A caption none of ``kinds`` applies to raises, unless ``optional``: then the caption itself
    stands in and ``neg_valid`` [num] bool says which rows are real negatives.
    """

    def __init__(self, tokenizer, num: int, kinds=None, optional: bool = False):
        if num < 1:
            raise ValueError(f"hard_negatives must be ≥ 1 when set, got {num}")
        self.tokenizer = tokenizer
        self.num = int(num)
        self.kinds = tuple(kinds) if kinds else shapes.NEGATIVE_KINDS  # None / () = every kind
        self.optional = optional

    def random_map(self, element, rng: np.random.Generator):
        caption = element["caption"]
        caption = caption.decode() if isinstance(caption, bytes) else str(caption)
        out = dict(element)
        if not self.optional:
            out["neg_tokens"] = self.tokenizer.encode([shapes.negative_caption(caption, rng, self.kinds)
                                                       for _ in range(self.num)])
            return out
        negs, valid = zip(*(shapes.negative_or_self(caption, rng, self.kinds) for _ in range(self.num)))
        out["neg_tokens"] = self.tokenizer.encode(list(negs))
        out["neg_valid"] = np.asarray(valid, bool)
        return out
