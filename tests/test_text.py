"""Text tokenizers: byte / SentencePiece / tokenizer.json round trips, framing, config, pipeline."""

import io
import pickle

import ml_collections
import numpy as np
import pytest

from jaxunified.data import pipeline, shapes
from jaxunified.data.shapes_tfds import build_shapes
from jaxunified.data.text import (
    ByteTokenizer,
    HFTokenizer,
    SentencePieceTokenizer,
    TokenizeCaptions,
    canonicalize_text,
    make_tokenizer,
    tokenize_batch,
)
from jaxunified.parallel.mesh import BATCH_AXES, make_mesh

CAPTIONS = [shapes.render_example(i, "train", 0, 32)["caption"] for i in range(64)]
NON_ASCII = "naïve café — 日本語 🙂"


def _train_sentencepiece(path, **special_ids):
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CAPTIONS),
        model_writer=model,
        vocab_size=60,
        hard_vocab_limit=False,  # the caption grammar is too small for exactly 60 pieces
        character_coverage=1.0,
        minloglevel=2,
        **special_ids,
    )
    path.write_bytes(model.getvalue())
    return path


@pytest.fixture(scope="module")
def spm_file(tmp_path_factory):
    # Gemma's (SigLIP2's) layout: pad 0, eos 1, bos 2.
    return _train_sentencepiece(tmp_path_factory.mktemp("spm") / "t.model", pad_id=0, eos_id=1, bos_id=2, unk_id=3)


@pytest.fixture(scope="module")
def hf_file(tmp_path_factory):
    # Qwen's layout: byte-level BPE, <|endoftext|> as pad and eos, no BOS.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CAPTIONS, trainer)
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    tok.save(str(path))
    return path


def test_byte_round_trip_padding_and_truncation():
    tok = ByteTokenizer(max_len=48)
    assert (tok.vocab_size, tok.pad_id) == (259, 0)
    row = tok.encode(NON_ASCII)
    n = len(NON_ASCII.encode("utf-8"))
    assert row.shape == (48,) and row.dtype == np.int32
    assert (row[n:] == tok.pad_id).all() and (row[:n] >= ByteTokenizer.OFFSET).all()
    assert tok.decode(row) == NON_ASCII

    batch = tok.encode(["", "a", NON_ASCII])
    assert batch.shape == (3, 48) and batch.dtype == np.int32
    assert tok.decode(batch) == ["", "a", NON_ASCII]
    assert tok.encode([]).shape == (0, 48)
    assert tok.encode(np.array(["ab", b"cd"], dtype=object)).tolist() == tok.encode(["ab", "cd"]).tolist()

    short = ByteTokenizer(max_len=7)
    assert short.decode(short.encode("hello world")) == "hello w"
    # Byte truncation can split a character; the broken tail shows instead of vanishing.
    assert short.decode(short.encode("abcdef日")) == "abcdef\ufffd"
    with pytest.raises(TypeError, match="item 1 is NoneType"):
        tok.encode(["a", None])


def test_bos_eos_framing_and_decode_stops_at_eos():
    text = "a red circle"
    ids = [b + ByteTokenizer.OFFSET for b in text.encode()]
    full = ByteTokenizer(max_len=16, bos=True, eos="yes").encode(text)
    assert full.tolist() == [1, *ids, 2] + [0] * 2
    # Truncation: "yes" loses EOS, "sticky" keeps it last; SigLIP pools that last position.
    assert ByteTokenizer(max_len=6, eos="yes").encode(text).tolist() == ids[:6]
    sticky = ByteTokenizer(max_len=6, eos="sticky")
    assert sticky.encode(text).tolist() == ids[:5] + [2]
    assert sticky.encode("ab").tolist() == [ord("a") + 3, ord("b") + 3, 2, 0, 0, 0]
    assert ByteTokenizer(max_len=1, bos=True, eos="sticky").encode(text).tolist() == [2]
    assert ByteTokenizer(max_len=4, eos=True).eos == "yes"

    plain = ByteTokenizer(max_len=16)
    assert plain.decode(full) == text
    assert plain.decode(np.array(ids[:3] + [2] + ids[3:], np.int32)) == text[:3]  # ends at EOS
    assert plain.decode(np.array([], np.int32)) == "" and plain.decode([]) == ""
    with pytest.raises(ValueError, match="outside the vocabulary"):
        plain.decode([5, 259])
    with pytest.raises(TypeError, match="integer ids"):
        plain.decode(np.ones(3, np.float32))
    with pytest.raises(ValueError, match="shape"):
        plain.decode(np.zeros((1, 2, 3), np.int32))
    with pytest.raises(ValueError, match="eos must be one of"):
        ByteTokenizer(eos="always")
    with pytest.raises(ValueError, match="max_len"):
        ByteTokenizer(max_len=0)


def test_canonicalize():
    messy = "  A Red_Circle, to the LEFT!\tof   'two' stars.\n"
    assert canonicalize_text(messy) == "a red circle to the left of two stars"
    assert canonicalize_text("Café — ÜBER") == "café — über"  # only ASCII punctuation goes
    tok = ByteTokenizer(max_len=40, canonicalize=True)
    np.testing.assert_array_equal(tok.encode(messy), ByteTokenizer(max_len=40).encode(canonicalize_text(messy)))


def test_sentencepiece_round_trip(spm_file, tmp_path):
    tok = SentencePieceTokenizer(spm_file, max_len=40, eos="sticky")
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2) and 20 < tok.vocab_size <= 60
    enc = tok.encode(CAPTIONS[:16])
    assert enc.shape == (16, 40) and enc.dtype == np.int32
    assert tok.decode(enc) == CAPTIONS[:16]
    for caption, row in zip(CAPTIONS, enc):
        n = len(tok._sp.encode(caption)) + 1
        assert row[n - 1] == tok.eos_id and (row[n:] == tok.pad_id).all()
    short = SentencePieceTokenizer(spm_file, max_len=3, eos="sticky").encode(CAPTIONS[4])
    assert short[-1] == 1 and len(short) == 3

    assert SentencePieceTokenizer(spm_file, max_len=8, pad_id="</s>").pad_id == 1
    with pytest.raises(ValueError, match="not a piece"):
        SentencePieceTokenizer(spm_file, pad_id="<nope>")
    no_pad = _train_sentencepiece(tmp_path / "nopad.model")  # trainer default: pad disabled
    with pytest.raises(ValueError, match="no pad piece; pass pad_id"):
        SentencePieceTokenizer(no_pad)
    assert SentencePieceTokenizer(no_pad, pad_id=0).pad_id == 0
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        SentencePieceTokenizer(tmp_path / "junk.model")


def test_hf_tokenizer_round_trip(hf_file, tmp_path):
    from tokenizers import Tokenizer, models

    tok = HFTokenizer(hf_file, max_len=32, eos="yes")
    eot = tok._tok.token_to_id("<|endoftext|>")
    assert tok.pad_id == eot == tok.eos_id and tok.bos_id is None and tok.vocab_size == 300
    texts = CAPTIONS[:8] + [NON_ASCII, "Mixed CASE, punctuation!"]
    enc = tok.encode(texts)
    assert enc.shape == (10, 32) and enc.dtype == np.int32
    assert tok.decode(enc) == texts
    np.testing.assert_array_equal(tok.encode(texts[0]), enc[0])  # single-text path == batch path
    with pytest.raises(ValueError, match="no BOS token"):
        HFTokenizer(hf_file, bos=True)
    assert HFTokenizer(hf_file, eos_id="<|im_end|>").eos_id == tok._tok.token_to_id("<|im_end|>")
    with pytest.raises(ValueError, match="not a token"):
        HFTokenizer(hf_file, pad_id="<pad>")

    # The file's padding section wins over the token-name guess.
    padded = Tokenizer.from_file(str(hf_file))
    padded.enable_padding(pad_id=5, pad_token=padded.id_to_token(5))
    padded.save(str(tmp_path / "padded.json"))
    assert HFTokenizer(tmp_path / "padded.json", max_len=4).pad_id == 5
    Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]")).save(str(tmp_path / "nopad.json"))
    with pytest.raises(ValueError, match="names no pad token"):
        HFTokenizer(tmp_path / "nopad.json")
    assert HFTokenizer(tmp_path / "nopad.json", pad_id=0).pad_id == 0


def test_make_tokenizer_and_config_errors(spm_file, hf_file, tmp_path):
    tok = make_tokenizer({"tokenizer": "byte", "path": "", "max_len": 32, "canonicalize": False})
    assert isinstance(tok, ByteTokenizer) and tok.max_len == 32 and not tok.canonicalize
    assert isinstance(make_tokenizer(), ByteTokenizer)  # byte is the default and needs no file
    cfg = ml_collections.ConfigDict({"tokenizer": "sentencepiece", "path": str(spm_file), "max_len": 16,
                                     "eos": "sticky", "pad_id": ml_collections.FieldReference(None, field_type=int)})
    spm = make_tokenizer(cfg)
    assert isinstance(spm, SentencePieceTokenizer) and spm.eos == "sticky" and spm.pad_id == 0
    assert make_tokenizer(cfg, max_len=8).max_len == 8  # keywords override the config
    hf = make_tokenizer(kind="hf", path=str(hf_file), max_len=12, canonicalize=True)
    assert isinstance(hf, HFTokenizer) and hf.decode(hf.encode("A Red, Circle!")) == "a red circle"

    with pytest.raises(ValueError, match="unknown text tokenizer 'bpe'"):
        make_tokenizer(tokenizer="bpe")
    with pytest.raises(FileNotFoundError, match="missing.model"):
        make_tokenizer(tokenizer="sentencepiece", path=str(tmp_path / "missing.model"))
    with pytest.raises(ValueError, match="needs text.path"):
        make_tokenizer(tokenizer="hf", path="")
    with pytest.raises(ValueError, match=r"unknown text tokenizer field\(s\) \['max_length'\]"):
        make_tokenizer(tokenizer="byte", max_length=8)
    with pytest.raises(ValueError, match="remove \\['pad_id', 'path'\\]"):
        make_tokenizer(tokenizer="byte", path="x", pad_id=3)
    with pytest.raises(ValueError, match="disagree"):
        make_tokenizer(tokenizer="byte", kind="hf")


def test_tokenizers_pickle_for_grain_workers(spm_file, hf_file):
    # grain worker processes receive the transforms (and so the tokenizers) pickled.
    for tok in (ByteTokenizer(16, eos="sticky"), SentencePieceTokenizer(spm_file, 16), HFTokenizer(hf_file, 16)):
        again = pickle.loads(pickle.dumps(TokenizeCaptions(tok))).tokenizer
        np.testing.assert_array_equal(again.encode(CAPTIONS[:4]), tok.encode(CAPTIONS[:4]))
        assert again.decode(again.encode(CAPTIONS[0])) == CAPTIONS[0]


def test_tokenize_batch_and_transform():
    tok = ByteTokenizer(max_len=10)
    captions = np.array(["a red star", "", "two"], dtype=object)  # a host batch's caption field
    out = tokenize_batch(tok, captions)
    assert out.shape == (3, 10) and out.dtype == np.int32
    assert tok.decode(out) == ["a red star", "", "two"]
    assert tokenize_batch(tok, "one prompt").shape == (1, 10)
    example = {"caption": "a red star", "image": np.zeros((2, 2, 3), np.uint8)}
    mapped = TokenizeCaptions(tok).map(example)
    assert set(mapped) == {"caption", "image", "tokens"} and "tokens" not in example
    np.testing.assert_array_equal(mapped["tokens"], out[0])
    with pytest.raises(KeyError, match="no 'caption' field"):
        TokenizeCaptions(tok).map({"image": 0})


def test_build_dataset_adds_tokens(tmp_path):
    res, num_train, num_test = 32, 32, 16
    build_shapes(tmp_path, res, num_train=num_train, num_test=num_test)
    mesh = make_mesh((2, 4, 1))
    cfg = dict(name="shapes", data_dir=str(tmp_path), resolution=res, num_train=num_train, num_test=num_test,
               batch_size=8, seed=0)
    text = {"tokenizer": "byte", "path": "", "max_len": 32, "canonicalize": False}
    tok = make_tokenizer(text)

    host = next(pipeline.build_dataset({**cfg, "text": text}, "train", mesh))
    assert host["tokens"].shape == (8, 32) and host["tokens"].dtype == np.int32
    np.testing.assert_array_equal(host["tokens"], tok.encode(list(host["caption"])))
    batch = pipeline.to_global(host, mesh)
    assert batch["tokens"].dtype == np.int32 and batch["tokens"].shape == (8, 32)
    assert batch["tokens"].sharding.spec[0] == BATCH_AXES
    np.testing.assert_array_equal(np.asarray(batch["tokens"]), host["tokens"])

    # ConfigDict with placeholders, eval split: same tokens, in order.
    conf = ml_collections.ConfigDict({**cfg, "text": {**text, "eos": "sticky", "max_len": 8}})
    conf.text.path = ""
    evals = list(pipeline.build_dataset(conf, "test", mesh))
    sticky = make_tokenizer(conf.text)
    for b in evals:
        np.testing.assert_array_equal(b["tokens"], sticky.encode(list(b["caption"])))
        assert (b["tokens"][:, -1] == sticky.eos_id).all()  # every shapes caption is > 7 bytes

    # No text config (or no tokenizer in it): the pipeline is unchanged.
    assert "tokens" not in next(pipeline.build_dataset(cfg, "train", mesh))
    assert "tokens" not in next(pipeline.build_dataset({**cfg, "text": {"max_len": 8}}, "train", mesh))


def test_builtin_shapes_word_model(tmp_path, monkeypatch):
    from jaxunified.data import shapes
    from jaxunified.data.shapes_text import shapes_words_model

    path = shapes_words_model(tmp_path)
    assert shapes_words_model(tmp_path) == path  # written once
    tok = make_tokenizer(tokenizer="sentencepiece", path="builtin:shapes_words", max_len=16)
    for i in range(300):
        caption = shapes.render_example(i, "train", 0, 32)["caption"]
        ids = tok.encode(caption)
        words = caption.split()
        plurals = sum(w in shapes.PLURALS for w in words)
        assert (ids != tok.pad_id).sum() == len(words) + plurals, caption  # a word each, plurals + suffix
        assert 1 not in ids  # the built-in model's unk id
        assert tok.decode(ids) == caption
    # A plural shares its singular's token, so both train one embedding.
    for singular, plural in zip(shapes.SHAPES, shapes.PLURALS):
        one, many = tok.encode(f"a red {singular}"), tok.encode(f"two red {plural}")
        assert one[2] == many[2] and many[3] != tok.pad_id
    with pytest.raises(ValueError, match="unknown built-in"):
        make_tokenizer(tokenizer="sentencepiece", path="builtin:nope")


def test_build_dataset_adds_hard_negatives(tmp_path):
    res, num_train, num_test = 32, 32, 16
    build_shapes(tmp_path, res, num_train=num_train, num_test=num_test)
    mesh = make_mesh((1, -1, 1))
    text = {"tokenizer": "sentencepiece", "path": "builtin:shapes_words", "max_len": 16, "hard_negatives": 3}
    cfg = dict(name="shapes", data_dir=str(tmp_path), resolution=res, num_train=num_train, num_test=num_test,
               batch_size=8, seed=0, text=text)
    tok = make_tokenizer(text)
    a = next(pipeline.build_dataset(cfg, "train", mesh))
    assert a["neg_tokens"].shape == (8, 3, 16) and a["neg_tokens"].dtype == np.int32
    for caption, negs in zip(a["caption"], a["neg_tokens"]):
        caption = caption.decode() if isinstance(caption, bytes) else str(caption)
        assert caption not in tok.decode(negs)
    b = next(pipeline.build_dataset(cfg, "train", mesh))  # per-record rng: the same negatives again
    np.testing.assert_array_equal(a["neg_tokens"], b["neg_tokens"])
    assert "neg_tokens" not in next(pipeline.build_dataset(cfg, "test", mesh))  # training only
    only_shape = {**cfg, "text": {**text, "negative_kinds": ("shape",), "hard_negatives": 1}}
    c = next(pipeline.build_dataset(only_shape, "train", mesh))
    for caption, neg in zip(c["caption"], tok.decode(c["neg_tokens"][:, 0])):
        caption = caption.decode() if isinstance(caption, bytes) else str(caption)
        assert sum(x != y for x, y in zip(caption.split(), neg.split())) == 1
    with pytest.raises(ValueError, match="shapes caption grammar"):
        pipeline.build_dataset({**cfg, "name": "folder", "path": str(tmp_path)}, "train", mesh)


def test_optional_hard_negatives_mark_captions_no_kind_applies_to():
    from jaxunified.data import shapes
    from jaxunified.data.shapes_text import HardNegativeCaptions

    rng = np.random.default_rng(0)
    assert shapes.negative_or_self("a red circle", rng, ("swap",)) == ("a red circle", False)
    neg, ok = shapes.negative_or_self("a red circle and a blue square", rng, ("swap",))
    assert ok and neg == "a red square and a blue circle"
    with pytest.raises(ValueError, match="unknown negative kind"):
        shapes.negative_or_self("a red circle", rng, ("colour",))
    tok = make_tokenizer({"tokenizer": "sentencepiece", "path": "builtin:shapes_words", "max_len": 16})
    out = HardNegativeCaptions(tok, 2, ("swap",), optional=True).random_map({"caption": b"a red circle"}, rng)
    assert out["neg_valid"].tolist() == [False, False] and tok.decode(out["neg_tokens"]) == ["a red circle"] * 2
    with pytest.raises(ValueError, match="no hard negative"):
        HardNegativeCaptions(tok, 1, ("swap",)).random_map({"caption": "a red circle"}, rng)


def test_shapes_chat_tokenizer_gives_the_t2i_chat_prompt():
    from jaxunified.data import shapes_chat

    tok = make_tokenizer(ml_collections.ConfigDict(dict(tokenizer="shapes_chat", path="", max_len=16)))
    caption = "a purple square to the left of an orange cross"
    ids = tok.encode([caption, "a red circle"])
    want = shapes_chat.generation_ids(shapes_chat.ChatVocab(), caption)
    assert ids.shape == (2, 16) and ids[0, :len(want)].tolist() == want and not ids[0, len(want):].any()
    assert tok.decode(ids) == [caption, "a red circle"]
    assert pickle.loads(pickle.dumps(tok)).encode(caption).tolist() == ids[0].tolist()
    with pytest.raises(ValueError, match="needs 16 tokens; text.max_len=8"):
        make_tokenizer(tokenizer="shapes_chat", max_len=8).encode(caption)
    with pytest.raises(ValueError, match="fixed ids and needs no file"):
        make_tokenizer(tokenizer="shapes_chat", path="x.model")
