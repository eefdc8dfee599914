"""Text tokenizers behind one interface: byte-level (no files), SentencePiece (SigLIP/Gemma), a
Hugging Face ``tokenizer.json`` (Qwen) and the shapes chat prompt (the shapes ``mllm`` LM's words).

``encode`` always gives rows of exactly ``max_len`` int32 ids, right-padded with ``pad_id``:
SigLIP text towers pool the *last* position, so the padding length is part of the model's input
contract, and a fixed shape keeps jitted steps from recompiling. ``decode`` inverts it, reading up
to the first EOS and dropping padding and special ids.

Framing options shared by every tokenizer (names follow big_vision's ``tok`` op):
``bos`` prepends BOS; ``eos="yes"`` appends EOS before truncation (a long text loses it),
``eos="sticky"`` keeps EOS as the last token even when the text is truncated (SigLIP2);
``canonicalize`` applies ``canonicalize_text`` first (SigLIP2/TokLIP: lowercase, ASCII
punctuation stripped, whitespace collapsed).

The data pipeline tokenises captions with ``TokenizeCaptions`` when the data config has a
``text`` sub-config (see ``make_tokenizer`` and ``pipeline.build_dataset``); ``tokenize_batch``
does the same on the host for evaluation prompts. ``sentencepiece`` and ``tokenizers`` are
imported only by the classes that need them.
"""

from __future__ import annotations

import os
import string
from typing import Any, Iterable, Mapping, Sequence

import grain
import numpy as np

from jaxunified.data import shapes_chat
from jaxunified.data.shapes_text import resolve_builtin

KINDS = ("byte", "sentencepiece", "hf", "shapes_chat")
EOS_MODES = ("no", "yes", "sticky")
# Tokens that mean "padding" / "end of text" in common tokenizer.json files, tried in order when
# neither the file's padding section nor the caller names one. Qwen pads with <|endoftext|>.
_HF_PAD_TOKENS = ("<pad>", "[PAD]", "<|pad|>", "<|endoftext|>")
_HF_BOS_TOKENS = ("<s>", "<bos>", "[CLS]", "<|begin_of_text|>")
_HF_EOS_TOKENS = ("</s>", "<eos>", "<|endoftext|>", "[SEP]")

# "_" becomes a space rather than vanishing so that "red_circle" stays two words.
_DROP_PUNCTUATION = str.maketrans({"_": " ", **{c: None for c in string.punctuation if c != "_"}})


def canonicalize_text(text: str) -> str:
    """SigLIP2-style caption cleaning: lowercase, ASCII punctuation removed, whitespace collapsed."""
    return " ".join(text.translate(_DROP_PUNCTUATION).lower().split())


def _existing_file(path: str | os.PathLike, what: str) -> str:
    path = os.path.expanduser(os.fspath(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist; fix text.path")
    return path


class TextTokenizer:
    """The shared interface; subclasses set ``vocab_size``/``pad_id``/``bos_id``/``eos_id`` (None
    where the vocabulary has no such token) and implement ``_encode_texts``/``_decode_ids``.

    ``encode(str)`` gives one row ``[max_len]``; ``encode(sequence of str)`` gives ``[N, max_len]``.
    """

    vocab_size: int
    pad_id: int
    bos_id: int | None = None
    eos_id: int | None = None

    def __init__(self, *, max_len: int, bos: bool = False, eos: str | bool = "no", canonicalize: bool = False):
        if isinstance(max_len, bool) or not isinstance(max_len, (int, np.integer)) or max_len < 1:
            raise ValueError(f"max_len must be a positive int, got {max_len!r}")
        if eos is None or isinstance(eos, bool):
            eos = "yes" if eos else "no"
        if eos not in EOS_MODES:
            raise ValueError(f"eos must be one of {EOS_MODES}, got {eos!r}")
        if bos and self.bos_id is None:
            raise ValueError(f"bos=True but {self!r} has no BOS token; pass bos_id or set bos=False")
        if eos != "no" and self.eos_id is None:
            raise ValueError(f"eos={eos!r} but {self!r} has no EOS token; pass eos_id or set eos='no'")
        self.max_len = int(max_len)
        self.bos = bool(bos)
        self.eos = eos
        self.canonicalize = bool(canonicalize)

    # -- subclass hooks --------------------------------------------------------------------------

    def _encode_texts(self, texts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def _decode_ids(self, ids: list[int]) -> str:
        raise NotImplementedError

    # -- interface -------------------------------------------------------------------------------

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids that ``decode`` drops."""
        return frozenset(i for i in (self.pad_id, self.bos_id, self.eos_id) if i is not None)

    def encode(self, texts: str | Sequence[str]) -> np.ndarray:
        """int32 ``[max_len]`` for one string, ``[N, max_len]`` for a sequence (lists, tuples, object arrays)."""
        single = isinstance(texts, (str, bytes))
        items = [self._prepare(t, i) for i, t in enumerate([texts] if single else texts)]
        out = np.full((len(items), self.max_len), self.pad_id, np.int32)
        for row, ids in zip(out, self._encode_texts(items) if items else []):
            framed = self._frame(ids)
            row[: len(framed)] = framed
        return out[0] if single else out

    def decode(self, ids: Any) -> str | list[str]:
        """``[L]`` ids → str, ``[N, L]`` → list of str. Reads up to the first EOS (after a leading
        BOS) and drops padding and special ids; ids outside ``[0, vocab_size)`` are an error."""
        arr = np.asarray(ids)
        if arr.dtype.kind not in "iu":
            if arr.size:
                raise TypeError(f"decode() takes integer ids, got dtype {arr.dtype}")
            arr = arr.astype(np.int32)
        if arr.ndim == 1:
            return self._decode_row(arr)
        if arr.ndim == 2:
            return [self._decode_row(row) for row in arr]
        raise ValueError(f"decode() takes ids of shape [L] or [N, L], got {arr.shape}")

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(vocab_size={getattr(self, 'vocab_size', '?')}, "
            f"max_len={getattr(self, 'max_len', '?')}, pad_id={getattr(self, 'pad_id', '?')})"
        )

    # -- shared framing --------------------------------------------------------------------------

    def _prepare(self, text: Any, index: int) -> str:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        if not isinstance(text, str):
            raise TypeError(f"encode() takes str or a sequence of str; item {index} is {type(text).__name__}: {text!r}")
        return canonicalize_text(text) if self.canonicalize else text

    def _frame(self, ids: list[int]) -> list[int]:
        seq = ([self.bos_id] if self.bos else []) + list(ids)
        if self.eos != "no":
            seq.append(self.eos_id)
        if self.eos == "sticky" and len(seq) > self.max_len:
            return seq[: self.max_len - 1] + [self.eos_id]
        return seq[: self.max_len]

    def _decode_row(self, row: np.ndarray) -> str:
        ids = row.tolist()
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size}) of {self!r}")
        if self.bos_id is not None and ids[:1] == [self.bos_id]:
            ids = ids[1:]  # BOS may equal EOS (GPT-2 style); it must not end the text
        if self.eos_id is not None and self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        special = self.special_ids
        return self._decode_ids([i for i in ids if i not in special])


class ByteTokenizer(TextTokenizer):
    """UTF-8 bytes shifted past three special ids (pad 0, bos 1, eos 2): vocabulary 259, no files.

    Truncation counts bytes, so it may split a multi-byte character; ``decode`` shows the broken
    tail as U+FFFD rather than dropping it silently.
    """

    PAD, BOS, EOS = 0, 1, 2
    OFFSET = 3

    def __init__(self, max_len: int = 64, *, bos: bool = False, eos: str | bool = "no", canonicalize: bool = False):
        self.vocab_size = 256 + self.OFFSET
        self.pad_id, self.bos_id, self.eos_id = self.PAD, self.BOS, self.EOS
        super().__init__(max_len=max_len, bos=bos, eos=eos, canonicalize=canonicalize)

    def _encode_texts(self, texts: list[str]) -> list[list[int]]:
        return [(np.frombuffer(t.encode("utf-8"), np.uint8).astype(np.int32) + self.OFFSET).tolist() for t in texts]

    def _decode_ids(self, ids: list[int]) -> str:
        return bytes(i - self.OFFSET for i in ids).decode("utf-8", errors="replace")


class SentencePieceTokenizer(TextTokenizer):
    """A SentencePiece ``.model`` file (SigLIP's c4_en, Gemma's for SigLIP2 — pad 0, eos 1, bos 2).

    ``pad_id``/``bos_id``/``eos_id`` override the model's own (an int or a piece string); a model
    without a pad piece needs ``pad_id``.
    """

    def __init__(
        self,
        model_file: str | os.PathLike,
        max_len: int = 64,
        *,
        pad_id: int | str | None = None,
        bos_id: int | str | None = None,
        eos_id: int | str | None = None,
        bos: bool = False,
        eos: str | bool = "no",
        canonicalize: bool = False,
    ):
        try:
            import sentencepiece
        except ImportError as e:  # optional dependency
            raise ImportError("SentencePieceTokenizer needs sentencepiece: pip install sentencepiece") from e
        self.path = _existing_file(model_file, "SentencePiece model")
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=self.path)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{self.path!r} is not a SentencePiece model file: {e}") from e
        self.vocab_size = self._sp.get_piece_size()
        self.pad_id = self._resolve(pad_id, self._sp.pad_id(), "pad")
        if self.pad_id is None:
            raise ValueError(f"SentencePiece model {self.path!r} has no pad piece; pass pad_id (e.g. 0)")
        self.bos_id = self._resolve(bos_id, self._sp.bos_id(), "bos")
        self.eos_id = self._resolve(eos_id, self._sp.eos_id(), "eos")
        super().__init__(max_len=max_len, bos=bos, eos=eos, canonicalize=canonicalize)

    def _resolve(self, value: int | str | None, model_default: int, what: str) -> int | None:
        if value is None:
            return model_default if model_default >= 0 else None
        if isinstance(value, str):
            i = self._sp.piece_to_id(value)
            if self._sp.id_to_piece(i) != value:  # unknown pieces map to unk
                raise ValueError(f"{what}_id={value!r} is not a piece of {self.path!r}")
            return i
        if not 0 <= value < self.vocab_size:
            raise ValueError(f"{what}_id={value} is outside the vocabulary [0, {self.vocab_size}) of {self.path!r}")
        return int(value)

    def _encode_texts(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(texts, out_type=int)

    def _decode_ids(self, ids: list[int]) -> str:
        return self._sp.decode(ids)

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", path={getattr(self, 'path', '?')!r})"


class HFTokenizer(TextTokenizer):
    """A Hugging Face ``tokenizer.json`` (Qwen2/2.5 and others) through the ``tokenizers`` package.

    The file's own padding, truncation and post-processor specials are not used: framing is ours
    so that every kind behaves alike. ``pad_id``/``bos_id``/``eos_id`` take an int or a token
    string; unset, pad comes from the file's padding section or the first of ``<pad>``, ``[PAD]``,
    ``<|pad|>``, ``<|endoftext|>`` in the vocabulary; bos/eos likewise from ``<s>``, ``<bos>``, ... (an
    error only if ``bos``/``eos`` framing asks for a token the file lacks).
    """

    def __init__(
        self,
        tokenizer_json: str | os.PathLike,
        max_len: int = 64,
        *,
        pad_id: int | str | None = None,
        bos_id: int | str | None = None,
        eos_id: int | str | None = None,
        bos: bool = False,
        eos: str | bool = "no",
        canonicalize: bool = False,
    ):
        try:
            import tokenizers
        except ImportError as e:  # optional dependency
            raise ImportError("HFTokenizer needs the tokenizers package (pip install tokenizers)") from e
        self.path = _existing_file(tokenizer_json, "tokenizer.json")
        try:
            self._tok = tokenizers.Tokenizer.from_file(self.path)
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            raise ValueError(f"{self.path!r} is not a tokenizers tokenizer.json: {e}") from e
        file_pad = (self._tok.padding or {}).get("pad_id")
        self._tok.no_padding()
        self._tok.no_truncation()
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.pad_id = self._resolve(pad_id, "pad", _HF_PAD_TOKENS, file_pad)
        if self.pad_id is None:
            raise ValueError(f"{self.path!r} names no pad token and has none of {_HF_PAD_TOKENS}; pass pad_id")
        self.bos_id = self._resolve(bos_id, "bos", _HF_BOS_TOKENS)
        self.eos_id = self._resolve(eos_id, "eos", _HF_EOS_TOKENS)
        super().__init__(max_len=max_len, bos=bos, eos=eos, canonicalize=canonicalize)

    def _resolve(self, value: int | str | None, what: str, candidates: Iterable[str], file_id: int | None = None):
        if value is None:
            if file_id is not None:
                return int(file_id)
            return next((i for i in map(self._tok.token_to_id, candidates) if i is not None), None)
        if isinstance(value, str):
            i = self._tok.token_to_id(value)
            if i is None:
                raise ValueError(f"{what}_id={value!r} is not a token of {self.path!r}")
            return i
        if not 0 <= value < self.vocab_size:
            raise ValueError(f"{what}_id={value} is outside the vocabulary [0, {self.vocab_size}) of {self.path!r}")
        return int(value)

    def _encode_texts(self, texts: list[str]) -> list[list[int]]:
        if len(texts) == 1:  # per-example calls stay off the thread pool (grain workers fork)
            return [self._tok.encode(texts[0], add_special_tokens=False).ids]
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def _decode_ids(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", path={getattr(self, 'path', '?')!r})"


class ShapesChatTokenizer(TextTokenizer):
    """A caption as STAR's text-to-image prompt over the shapes chat vocabulary
    (``shapes_chat.generation_ids``: the user turn, then the assistant's ``<|vision_start|>``) —
    what a shapes ``mllm`` run's LM reads, so that LM can serve as a text encoder. No file; pads
    with ``<|endoftext|>`` (0). ``decode`` gives the caption back."""

    def __init__(self, max_len: int = 16, *, bos: bool = False, eos: str | bool = "no", canonicalize: bool = False):
        self.vocab = shapes_chat.ChatVocab()
        self.vocab_size, self.pad_id = self.vocab.size, shapes_chat.PAD
        super().__init__(max_len=max_len, bos=bos, eos=eos, canonicalize=canonicalize)

    def _encode_texts(self, texts: list[str]) -> list[list[int]]:
        out = [shapes_chat.generation_ids(self.vocab, t) for t in texts]
        for t, ids in zip(texts, out):
            if len(ids) > self.max_len:  # a cut prompt would lose its <|vision_start|>, the position the image follows
                raise ValueError(f"the chat prompt of {t!r} needs {len(ids)} tokens; text.max_len={self.max_len}")
        return out

    def _decode_ids(self, ids: list[int]) -> str:
        return self.vocab.decode(ids[2:])  # after <|im_start|> user, up to <|im_end|>


# ----------------------------------------------------------------------------------------------
# Config → tokenizer


_CLASSES = {"byte": ByteTokenizer, "sentencepiece": SentencePieceTokenizer, "hf": HFTokenizer,
            "shapes_chat": ShapesChatTokenizer}
_FILE_NAMES = {"sentencepiece": "SentencePiece .model", "hf": "tokenizer.json"}
_FIELDS = ("tokenizer", "kind", "path", "max_len", "canonicalize", "bos", "eos", "pad_id", "bos_id", "eos_id")
# Fields of the ``data.text`` sub-config that the pipeline reads, not the tokenizer.
PIPELINE_FIELDS = ("hard_negatives", "negative_kinds")


def _config_fields(cfg: Any) -> dict:
    if cfg is None:
        return {}
    if hasattr(cfg, "to_dict"):  # ml_collections.ConfigDict
        return cfg.to_dict()
    if isinstance(cfg, Mapping):
        return dict(cfg)
    return dict(vars(cfg))


def make_tokenizer(cfg: Any = None, /, **overrides: Any) -> TextTokenizer:
    """A tokenizer from a config (dict, ConfigDict or attribute object) and/or keyword arguments.

    Fields: ``tokenizer`` (or ``kind``): "byte" (default) | "sentencepiece" | "hf"; ``path`` (the
    ``.model`` / ``tokenizer.json`` file, ``~`` allowed; none for "byte"); ``max_len`` (64);
    ``canonicalize``; ``bos``; ``eos`` ("no" | "yes" | "sticky"); ``pad_id``/``bos_id``/``eos_id``
    (not for "byte"). None and "" mean unset, as for ConfigDict placeholders; keyword arguments
    override the config. The pipeline's own fields (``hard_negatives``, ``negative_kinds``) are skipped.
    """
    fields = {k: v for k, v in {**_config_fields(cfg), **overrides}.items()
              if v is not None and v != "" and k not in PIPELINE_FIELDS}
    unknown = sorted(set(fields) - set(_FIELDS))
    if unknown:
        raise ValueError(f"unknown text tokenizer field(s) {unknown}; known fields are {list(_FIELDS)}")
    kind, alias = fields.pop("tokenizer", None), fields.pop("kind", None)
    if kind is not None and alias is not None and kind != alias:
        raise ValueError(f"text.tokenizer={kind!r} and kind={alias!r} disagree; give one")
    kind = kind or alias or "byte"
    if kind not in _CLASSES:
        raise ValueError(f"unknown text tokenizer {kind!r}; use one of {KINDS}")
    path = fields.pop("path", None)
    if kind in ("byte", "shapes_chat"):
        extra = sorted(k for k in ("pad_id", "bos_id", "eos_id") if k in fields) + (["path"] if path else [])
        if extra:
            raise ValueError(f"the {kind} tokenizer has fixed ids and needs no file; remove {extra}")
        return _CLASSES[kind](**fields)
    if path is None:
        raise ValueError(f"text tokenizer {kind!r} needs text.path (the {_FILE_NAMES[kind]} file)")
    if str(path).startswith("builtin:"):
        path = resolve_builtin(path)
    return _CLASSES[kind](path, **fields)


# ----------------------------------------------------------------------------------------------
# Pipeline integration


class TokenizeCaptions(grain.transforms.Map):
    """Per-example grain transform: ``example[key]`` (a caption) → int32 ``example[out_key]`` [max_len]."""

    def __init__(self, tokenizer: TextTokenizer, key: str = "caption", out_key: str = "tokens"):
        self.tokenizer = tokenizer
        self.key = key
        self.out_key = out_key

    def map(self, element):
        if self.key not in element:
            raise KeyError(f"example has no {self.key!r} field to tokenise (fields: {sorted(element)})")
        out = dict(element)
        out[self.out_key] = self.tokenizer.encode(element[self.key])
        return out


def tokenize_batch(tokenizer: TextTokenizer, captions: str | Sequence[str] | np.ndarray) -> np.ndarray:
    """Host-side tokenisation (evaluation prompts, a host batch's ``caption`` object array): int32 ``[N, max_len]``."""
    if isinstance(captions, np.ndarray):
        captions = captions.reshape(-1).tolist()
    return np.atleast_2d(tokenizer.encode(captions))
