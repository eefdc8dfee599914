"""Text-only chat with a shapes-vocabulary LM: the understanding stage's rewrite answers, and
the rewrite STAR's reasoning mode asks its frozen base for."""

from __future__ import annotations

from jaxunified.data import shapes_chat
from jaxunified.sample.lm import generate_text


def text_answers(model, variables, questions, max_new_tokens: int) -> list[str]:
    """Greedy answers of a text-only chat (no image) from ``model`` (an ``MLLM`` or a ``DecoderLM``)."""
    vocab = shapes_chat.ChatVocab()
    prompts = [shapes_chat.understanding_ids(vocab, q, 0) for q in questions]
    tokens, _ = generate_text(model, variables["params"], prompts, max_new_tokens=max_new_tokens,
                              eos_id=shapes_chat.IM_END, pad_id=shapes_chat.PAD)
    return [vocab.decode(t) for t in tokens]
