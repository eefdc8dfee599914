"""Chat data for the shapes world: a word vocabulary with Qwen's chat special tokens, captions and
procedurally generated questions with answers, and the two prompt layouts the unified models use.

Understanding (``mllm``): ``<|im_start|> user <|vision_start|> [image × N] <|vision_end|> question
<|im_end|> <|im_start|> assistant answer <|im_end|>`` — the image tokens sit at a fixed offset
(``IMAGE_START``) so a batch needs no scatter. Generation (``star``): ``<|im_start|> user caption
<|im_end|> <|im_start|> assistant <|vision_start|>`` then the image codes. Each word is one token
(the grammar is closed), so the vocabulary is built here and needs no file.

Question types (``QA_TYPES``), each asked only where its answer is unambiguous for the scene:
``count`` (how many objects), ``color`` (the colour of a shape that appears in one colour),
``shape`` (the shape of a colour that appears on one shape), ``relation`` (where the first object
of a relation scene is relative to the second), ``yes_no`` (is there a <colour> <shape>, half the
time about an object that is absent). ``caption`` asks for the scene's caption. ``rewrite`` is
text only: an object of the scene named indirectly ("a plus sign the color of grass") is to be
rewritten as its plain caption ("a green cross") — the knowledge STAR's reasoning mode uses.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from jaxunified.data import shapes, shapes_edit

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|image_pad|>", "<|fim_pad|>")
PAD, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, FIM_PAD = range(len(SPECIALS))
TASKS = ("caption", "count", "color", "shape", "relation", "yes_no", "rewrite")
QA_TYPES = ("count", "color", "shape", "relation", "yes_no")
TEXT_ONLY = ("rewrite",)  # conversations without an image
# Indirect names the understanding stage teaches ("rewrite" conversations) and STAR's reasoning
# mode relies on: "a plus sign the color of grass" is "a green cross".
COLOR_RIDDLES = {"red": "cherry", "green": "grass", "blue": "sky", "yellow": "lemon", "purple": "grape",
                 "orange": "carrot"}
SHAPE_RIDDLES = {"circle": "round shape", "square": "box", "triangle": "three sided shape",
                 "star": "five pointed shape", "diamond": "rhombus", "cross": "plus sign"}
COUNT_WORDS = ("one",) + tuple(shapes.NUMBER_WORDS[n] for n in sorted(shapes.NUMBER_WORDS))
RELATION_ANSWERS = ("left", "right", "above", "below")  # shapes.RELATIONS order
_QUESTION_WORDS = ("user", "assistant", "describe", "the", "image", "how", "many", "objects", "are", "there",
                   "what", "color", "is", "shape", "object", "where", "relative", "to", "yes", "no")
IMAGE_START = 3  # <|im_start|> user <|vision_start|>


def _words() -> list[str]:
    words = set(_QUESTION_WORDS) | set(COUNT_WORDS) | set(RELATION_ANSWERS)
    words |= set(shapes.SHAPES) | set(shapes.PLURALS) | set(shapes.COLORS) | {"a", "an", "and", "of"}
    words |= {w for p in shapes._RELATION_PHRASES for w in p.split()}
    words |= set(shapes_edit.WORDS) | {"rewrite"}
    words |= {w for p in (*COLOR_RIDDLES.values(), *SHAPE_RIDDLES.values()) for w in p.split()}
    return sorted(words)


class ChatVocab:
    """Word-level ids: the ``SPECIALS`` first (``PAD`` = 0), then the sorted grammar words."""

    def __init__(self):
        self.tokens = SPECIALS + tuple(_words())
        self.ids = {t: i for i, t in enumerate(self.tokens)}
        self.size = len(self.tokens)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.ids[w] for w in text.split()]
        except KeyError as e:
            raise ValueError(f"word {e.args[0]!r} of {text!r} is not in the shapes chat vocabulary") from None

    def decode(self, ids: Sequence[int], stop_at_end: bool = True) -> str:
        words = []
        for i in ids:
            i = int(i)
            if stop_at_end and i in (IM_END, PAD):
                break
            if 0 <= i < self.size and i >= len(SPECIALS):
                words.append(self.tokens[i])
        return " ".join(words)


def _noun_phrase(shape: int, color: int) -> str:
    return f"{shapes.COLORS[color]} {shapes.SHAPES[shape]}"


def question_answer(labels: Mapping, kind: str, rng: np.random.Generator) -> tuple[str, str] | None:
    """(question, answer) of type ``kind`` for a scene's labels (``shapes.render_example``), or
    None when the scene cannot ask it unambiguously."""
    n = int(labels["count"])
    objs = [(int(labels["obj_shape"][i]), int(labels["obj_color"][i])) for i in range(n)]
    if kind == "caption":
        caption = labels["caption"]
        return "describe the image", caption.decode() if isinstance(caption, bytes) else str(caption)
    if kind == "count":
        return "how many objects are there", COUNT_WORDS[n - 1]
    if kind == "rewrite":
        s, c = objs[int(rng.integers(n))]
        return f"rewrite {indirect_caption(s, c, rng)}", shapes.object_phrase(s, c)
    if kind == "color":
        by_shape = {s: {c for s2, c in objs if s2 == s} for s, _ in objs}
        ok = sorted(s for s, cs in by_shape.items() if len(cs) == 1)
        if not ok:
            return None
        s = ok[int(rng.integers(len(ok)))]
        return f"what color is the {shapes.SHAPES[s]}", shapes.COLORS[next(iter(by_shape[s]))]
    if kind == "shape":
        by_color = {c: {s for s, c2 in objs if c2 == c} for _, c in objs}
        ok = sorted(c for c, ss in by_color.items() if len(ss) == 1)
        if not ok:
            return None
        c = ok[int(rng.integers(len(ok)))]
        return f"what shape is the {shapes.COLORS[c]} object", shapes.SHAPES[next(iter(by_color[c]))]
    if kind == "relation":
        rel = int(labels["relation"])
        if rel < 0:
            return None
        a, b = objs
        return (f"where is the {_noun_phrase(*a)} relative to the {_noun_phrase(*b)}", RELATION_ANSWERS[rel])
    if kind == "yes_no":
        present = set(objs)
        if rng.random() < 0.5:
            s, c = sorted(present)[int(rng.integers(len(present)))]
            return f"is there {_article(c)} {_noun_phrase(s, c)}", "yes"
        absent = [(s, c) for s in range(len(shapes.SHAPES)) for c in range(len(shapes.COLORS))
                  if (s, c) not in present]
        s, c = absent[int(rng.integers(len(absent)))]
        return f"is there {_article(c)} {_noun_phrase(s, c)}", "no"
    raise ValueError(f"unknown question kind {kind!r}; use one of {TASKS}")


def indirect_caption(shape: int, color: int, rng: np.random.Generator) -> str:
    """A single-object caption naming the colour, the shape or both indirectly (``*_RIDDLES``)."""
    how = int(rng.integers(3))  # 0: both, 1: colour only, 2: shape only
    noun = SHAPE_RIDDLES[shapes.SHAPES[shape]] if how != 1 else shapes.SHAPES[shape]
    if how == 2:
        return f"{_article(color)} {shapes.COLORS[color]} {noun}"
    article = "an" if noun[0] in "aeiou" else "a"
    return f"{article} {noun} the color of {COLOR_RIDDLES[shapes.COLORS[color]]}"


def _article(color: int) -> str:
    return shapes.object_phrase(0, color).split()[0]


def understanding_ids(vocab: ChatVocab, question: str, num_image_tokens: int) -> list[int]:
    """The user turn with the image (none when ``num_image_tokens`` is 0) and the assistant's
    opening: the answer's prompt."""
    image = [VISION_START] + [IMAGE_PAD] * num_image_tokens + [VISION_END] if num_image_tokens else []
    return ([IM_START, vocab.ids["user"]] + image + vocab.encode(question)
            + [IM_END, IM_START, vocab.ids["assistant"]])


def generation_ids(vocab: ChatVocab, caption: str) -> list[int]:
    """STAR's t2i prompt: the caption as the user turn, then the assistant's ``<|vision_start|>``."""
    return [IM_START, vocab.ids["user"]] + vocab.encode(caption) + [IM_END, IM_START, vocab.ids["assistant"],
                                                                    VISION_START]


EDIT_INSTRUCTION_SLOTS = 6  # the longest instruction is 5 words


def edit_ids(vocab: ChatVocab, instruction: str, num_image_tokens: int,
             instruction_slots: int = EDIT_INSTRUCTION_SLOTS, num_understanding: int = 0,
             instruction_first: bool = False) -> list[int]:
    """STAR's edit prompt: the source image's VQ block, its understanding block (``num_understanding``
    > 0: the vision tokens the base learned to read, as the reference's ViT block), the
    instruction, then the assistant's ``<|vision_start|>``. Both blocks' slots hold ``IMAGE_PAD``:
    the source's codes fill the first ``num_image_tokens``, its understanding vectors the rest.
    ``instruction_first`` puts the instruction before the blocks: a causal model then reads the
    source already knowing the edit, so each source token's state can say whether the edit touches it.

    The instruction is followed by ``PAD`` up to ``instruction_slots`` words: those slots are
    masked out of attention but keep their positions, so every edit prompt has one length and a
    target code sits at a fixed RoPE distance from the source code it copies (in the reference,
    that distance varies with the instruction and is learned at scale)."""
    words = vocab.encode(instruction)
    if len(words) > instruction_slots:
        raise ValueError(f"instruction {instruction!r} is longer than {instruction_slots} words")
    understanding = [VISION_START] + [IMAGE_PAD] * num_understanding + [VISION_END] if num_understanding else []
    blocks = [VISION_START] + [IMAGE_PAD] * num_image_tokens + [VISION_END] + understanding
    text = words + [PAD] * (instruction_slots - len(words))
    return ([IM_START, vocab.ids["user"]] + (text + blocks if instruction_first else blocks + text)
            + [IM_END, IM_START, vocab.ids["assistant"], VISION_START])


IMAGE_BLOCK = (VISION_START, IMAGE_PAD, VISION_END)  # kept in STAR's unconditional edit rows
GENERATION_TAIL = 3  # <|im_start|> assistant <|vision_start|>: kept in STAR's unconditional row


def understanding_example(vocab: ChatVocab, labels: Mapping, kind: str, num_image_tokens: int, max_len: int,
                          rng: np.random.Generator) -> dict[str, np.ndarray] | None:
    """One training row: ``tokens`` [max_len] (prompt + answer + <|im_end|>, right-padded) and
    ``loss_mask`` [max_len] marking the positions whose *next* token is part of the answer."""
    qa = question_answer(labels, kind, rng)
    if qa is None:
        return None
    with_image = kind not in TEXT_ONLY
    prompt = understanding_ids(vocab, qa[0], num_image_tokens if with_image else 0)
    answer = vocab.encode(qa[1]) + [IM_END]
    ids = prompt + answer
    if len(ids) > max_len:
        raise ValueError(f"a {kind} example needs {len(ids)} tokens; raise max_len ({max_len})")
    tokens = np.full((max_len,), PAD, np.int32)
    tokens[:len(ids)] = ids
    mask = np.zeros((max_len,), np.float32)
    mask[len(prompt) - 1:len(ids) - 1] = 1.0
    return {"tokens": tokens, "loss_mask": mask, "has_image": np.bool_(with_image)}


__all__ = ["ChatVocab", "SPECIALS", "TASKS", "QA_TYPES", "TEXT_ONLY", "IMAGE_START", "IMAGE_BLOCK", "GENERATION_TAIL",
           "indirect_caption", "question_answer", "understanding_ids", "generation_ids", "edit_ids", "EDIT_INSTRUCTION_SLOTS",
           "understanding_example"]
