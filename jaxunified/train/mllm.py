"""Task ``mllm``: understanding — a decoder LM reads an image as tokens, then a question, and
answers (``models.mllm.MLLM``; the chat data of ``data.shapes_chat``).

    loss = CE over the answer tokens (and the closing <|im_end|>) only

Visual inputs (``vision.kind``: SigLIP patch states, VQ codebook rows, TokLIP's or DualToken's
token vectors; ``train.vision_input``), frozen, through the trainable projector.

The LM trains from scratch on the shapes vocabulary (``model.variant`` + ``model.overrides``;
``model.image_positions="mrope"`` gives the image tokens Qwen2-VL's 3-D positions on an LM with
``mrope_section``, ``models.mllm``; the default numbers them as a sequence);
every training image gets one conversation drawn from ``shapes_chat.TASKS`` (a caption
request or one question type the scene can answer), uniformly or by ``data.task_weights``.

Evaluation on the split's first ``eval.num_examples`` images, greedy answers: per question type
the exact-answer accuracy (``qa_<type>``) and their mean (``qa_mean``); the text-only rewrites of
indirect names (``rewrite_acc``); for captions the exact
match (``caption_exact``) and the attribute accuracy (``caption_attr_acc``, see
``caption_attribute_accuracy``: the generated caption parsed back into objects with the
shapes-GenEval grammar and judged against the scene, not the wording).

The exported model (``runs.load_run``) is the MLLM; STAR's stages take its LM as their frozen base.
"""

from __future__ import annotations

import json
import math
import pathlib

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxunified.data import cache, shapes, shapes_chat
from jaxunified.eval import shapes_geneval
from jaxunified.eval.chat import text_answers
from jaxunified.models import lm as lm_lib
from jaxunified.models import mllm as mllm_lib
from jaxunified.sample.lm import generate_text, left_pad
from jaxunified.train.task import Task, eval_params, kwargs
from jaxunified.train.vision_input import VisionInput

_SCENE_KEYS = ("obj_shape", "obj_color", "obj_size", "obj_center", "count")
ANSWER_TOKENS = {"caption": 14, "rewrite": 5, **{k: 2 for k in shapes_chat.QA_TYPES}}


class ChatExamples(grain.transforms.RandomMap):
    """Adds ``tokens``/``loss_mask`` [max_len]: one conversation per image, its kind drawn from
    ``shapes_chat.TASKS`` among those the scene can answer, uniformly or in proportion to
    ``weights`` (kind → weight; kinds left out get none)."""

    def __init__(self, num_image_tokens: int, max_len: int, weights: dict | None = None):
        self.vocab = shapes_chat.ChatVocab()
        self.num_image_tokens, self.max_len = num_image_tokens, max_len
        self.probs = task_probabilities(weights)

    def random_map(self, element, rng: np.random.Generator):
        for _ in range(32):
            n = len(shapes_chat.TASKS)  # uniform keeps the draws (and runs) of before the weights existed
            kind = shapes_chat.TASKS[int(rng.integers(n) if self.probs is None else rng.choice(n, p=self.probs))]
            ex = shapes_chat.understanding_example(self.vocab, element, kind, self.num_image_tokens, self.max_len,
                                                   rng)
            if ex is not None:
                return {**element, **ex}
        raise RuntimeError("no answerable conversation for a shapes scene")  # caption/count always are


def task_probabilities(weights: dict | None) -> np.ndarray | None:
    """Sampling probabilities over ``shapes_chat.TASKS`` from ``kind → weight``; None when uniform
    (drawn as before the weights existed, so such runs keep their data)."""
    if not weights:
        return None
    unknown = set(weights) - set(shapes_chat.TASKS)
    if unknown:
        raise ValueError(f"data.task_weights: unknown kinds {sorted(unknown)}; the kinds are {shapes_chat.TASKS}")
    w = np.array([float(weights.get(k, 0.0)) for k in shapes_chat.TASKS])
    always = [shapes_chat.TASKS.index(k) for k in ("caption", "count")]  # every scene can answer these
    if (w < 0).any() or not w[always].sum() > 0:
        raise ValueError(f"data.task_weights must be >= 0 and give the caption or count kind (always answerable) "
                         f"a positive weight, got {dict(weights)}")
    p = w / w.sum()
    return None if np.all(p == p[0]) else p


class MLLMTask(Task):
    cache_inputs = ("image",)  # the cache holds the vision vectors; conversations are drawn per step

    def __init__(self, config, mesh):
        super().__init__(config, mesh)
        self.vocab = shapes_chat.ChatVocab()
        self.vision = VisionInput(config.vision, int(config.data.resolution))
        n, dim = self.vision.num_tokens, self.vision.dim
        self.model_cfg = self.mllm_config(config, n, dim)
        self.model = mllm_lib.MLLM(self.model_cfg)

    @staticmethod
    def mllm_config(config, num_image_tokens: int, vision_dim: int) -> mllm_lib.MLLMConfig:
        # the shapes chat vocabulary unless the overrides keep a released LM's table (pod plans)
        lm = lm_lib.variant(config.model.variant, **{"vocab_size": shapes_chat.ChatVocab().size,
                                                     **kwargs(config.model.get("overrides"))})
        grid = ()
        positions = config.model.get("image_positions", "sequence")
        if positions not in ("sequence", "mrope"):
            raise ValueError(f"model.image_positions must be 'sequence' or 'mrope', got {positions!r}")
        if positions == "mrope":  # every visual input here is a square raster of patches or codes
            side = math.isqrt(num_image_tokens)
            grid = (side, side)
        return mllm_lib.MLLMConfig(lm, vision_dim, num_image_tokens, shapes_chat.IMAGE_START,
                                   int(config.model.get("projector_depth", 2)), grid)

    @classmethod
    def model_config(cls, config) -> mllm_lib.MLLMConfig:
        return cls(config, None).model_cfg

    def export(self, params, collections):
        return self.model, {"params": params["mllm"]}

    @property
    def max_len(self) -> int:
        return int(self.config.data.max_len)

    # ---- variables ----
    def dummy_batch(self):
        r, b = int(self.config.data.resolution), int(self.config.data.batch_size)
        return {"image": np.zeros((b, r, r, 3), np.uint8), "tokens": np.zeros((b, self.max_len), np.int32),
                "loss_mask": np.zeros((b, self.max_len), np.float32), "has_image": np.ones((b,), bool)}

    def train_batch_example(self):
        batch = self.dummy_batch()
        if self.config.data.get("cache_dir"):  # build_dataset's cached form: vision vectors for pixels
            batch.update(self.cached_batch_example(batch))
            del batch["image"]
        return batch

    def init_variables(self, rng, batch):
        c = self.model_cfg
        boxed = self.model.init(rng, jnp.zeros((1, self.max_len), jnp.int32),
                                jnp.zeros((1, c.num_image_tokens, c.vision_dim), jnp.float32))
        frozen = {"vision": self.vision.frozen_variables()}
        return {"mllm": boxed["params"]}, {"frozen": frozen}

    def param_labels(self, params):
        return {"mllm": jax.tree.map(lambda _: "mllm", params["mllm"])}

    # ---- the step ----
    def vision_vectors(self, frozen, images) -> jax.Array:
        """[B, N, vision_dim] float32 for images in [-1, 1] or uint8."""
        return self.vision.vectors(frozen["vision"], images)

    def loss_and_metrics(self, mllm_params, collections, batch):
        vision = batch["vision"] if "vision" in batch else self.vision_vectors(collections["frozen"], batch["image"])
        tokens = batch["tokens"]
        logits = self.model.apply({"params": mllm_params}, tokens, vision,
                                  has_image=batch.get("has_image"))["logits"][:, :-1]
        targets, mask = tokens[:, 1:], batch["loss_mask"][:, :-1]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        n = jnp.maximum(mask.sum(), 1.0)
        acc = ((jnp.argmax(logits, -1) == targets) * mask).sum() / n
        return (ce * mask).sum() / n, acc

    def grad_fn(self, params, collections, batch, rng, step, axis_name=None):
        def loss_fn(p):
            loss, acc = self.loss_and_metrics(p, collections, batch)
            return loss, {"loss": loss, "answer_token_acc": acc}

        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params["mllm"])
        return {"mllm": grads}, collections, metrics

    # ---- data ----
    def build_dataset(self, split: str):
        """The split's batches; for training with ``data.cache_dir``, the frozen vision model's vectors
        come from a cache built once (keyed by its weights) instead of a forward pass per step."""
        extra = (ChatExamples(self.model_cfg.num_image_tokens, self.max_len,
                                dict(self.config.data.get("task_weights") or {})),) if split == "train" else ()
        return self.cached_train_dataset(split, "mllm", self.cache_key, pixel_fields=("vision",),
                                         extra_transforms=extra)

    def cache_key(self) -> str:
        """A digest of what the cached vectors depend on: the vision weights, its config and how it is read."""
        v = self.vision
        return cache.dataset_key(self.config.data, [self._frozen_host()],
                                 (v.kind, v.model.cfg, v.select_layer, v.num_tokens, v.dim))

    def _frozen_host(self) -> dict:
        return {"vision": self.vision.loaded_variables()}

    def _cache_fns(self) -> dict:
        return {"vision": lambda fr, b: self.vision_vectors(fr, b["image"])}

    # ---- evaluation ----
    def answer(self, mllm_params, frozen, images, questions, max_new_tokens: int) -> list[str]:
        """Greedy answers to ``questions`` (one per image) about ``images`` [B, H, W, 3]; ``images``
        None asks them without an image."""
        if images is None:
            return text_answers(self.model, {"params": mllm_params}, questions, max_new_tokens)
        n = self.model_cfg.num_image_tokens
        prompts = [shapes_chat.understanding_ids(self.vocab, q, n) for q in questions]
        _, valid = left_pad(prompts, shapes_chat.PAD, bucket=8)
        start = (valid.shape[1] - valid.sum(1) + shapes_chat.IMAGE_START).astype(np.int32)
        vision = jax.jit(self.vision_vectors)(frozen, jnp.asarray(images))
        tokens, _ = generate_text(self.model, mllm_params, prompts, max_new_tokens=max_new_tokens,
                                  eos_id=shapes_chat.IM_END, pad_id=shapes_chat.PAD,
                                  prefill_inputs={"vision": vision, "image_start": jnp.asarray(start)})
        return [self.vocab.decode(t) for t in tokens]

    def evaluate(self, state, split, workdir, step) -> dict:
        params = eval_params(state)["mllm"]
        frozen = state.collections["frozen"]
        limit = self.eval_num_examples() or 10**9
        bs = int(self.config.data.get("eval_batch_size", 64))
        _, data = cache.in_order_batches(self.config.data, split, bs)
        right = {k: 0 for k in shapes_chat.TASKS}
        asked = {k: 0 for k in shapes_chat.TASKS}
        attr_total, rows, seen = 0.0, [], 0
        for host in data:
            keep = np.flatnonzero(np.asarray(host["mask"], bool))[:max(limit - seen, 0)]
            if not len(keep):
                break
            for kind in shapes_chat.TASKS:
                qas, idx = [], []
                for i in keep:
                    labels = {k: (v[i] if hasattr(v, "__len__") else v) for k, v in host.items()}
                    qa = shapes_chat.question_answer(labels, kind, np.random.default_rng(seen + int(i)))
                    if qa is not None:
                        qas.append(qa)
                        idx.append(i)
                if not qas:
                    continue
                images = None if kind in shapes_chat.TEXT_ONLY else np.asarray(host["image"])[idx]
                got = self.answer(params, frozen, images, [q for q, _ in qas], ANSWER_TOKENS[kind])
                for (q, a), g, i in zip(qas, got, idx):
                    asked[kind] += 1
                    right[kind] += int(g == a)
                    if kind == "caption":
                        objects = shapes.scene_objects({k: host[k][i] for k in _SCENE_KEYS})
                        attr_total += caption_attribute_accuracy(a, g, objects)
                    if asked[kind] <= 40:
                        rows.append({"kind": kind, "question": q, "answer": a, "generated": g})
            seen += len(keep)
            if seen >= limit:
                break
        out = {f"qa_{k}": right[k] / max(asked[k], 1) for k in shapes_chat.QA_TYPES}
        out["qa_mean"] = float(np.mean([out[f"qa_{k}"] for k in shapes_chat.QA_TYPES]))
        out["rewrite_acc"] = right["rewrite"] / max(asked["rewrite"], 1)
        out["caption_exact"] = right["caption"] / max(asked["caption"], 1)
        out["caption_attr_acc"] = attr_total / max(asked["caption"], 1)
        out["num_examples"] = seen
        if workdir is not None and jax.process_index() == 0:
            (pathlib.Path(workdir) / f"answers_{split}_{step:07d}.json").write_text(json.dumps(rows, indent=0))
        return out


def caption_attribute_accuracy(truth: str, generated: str, objects) -> float:
    """How much of the scene ``truth`` describes a generated caption gets right, judged on the
    scene's objects, not on the wording.

    ``objects``: the scene's (shape id, colour id, size, (cx, cy)) in caption order. The attributes
    are each described object's shape and colour and each phrase's count, plus the relation when
    ``truth`` states one. The generated caption's phrases are matched to the true ones in the order
    that scores best (so "b and a" = "a and b", and "b right of a" = "a left of b"); its relation
    is right when it holds between the matched objects in the image (dominant axis of their
    centres). An unparsable caption scores 0."""
    want = shapes_geneval.parse_prompt(truth)
    try:
        got = shapes_geneval.parse_prompt(generated)
    except ValueError:
        return 0.0
    n_attr = 3 * len(want.objects) + (1 if want.relation else 0)
    centres = {}  # phrase index in truth → centre of its (first) object
    k = 0
    for i, o in enumerate(want.objects):
        centres[i] = objects[k][3]
        k += o.count
    best = 0.0
    orders = [tuple(range(len(got.objects)))] + ([(1, 0)] if len(got.objects) == 2 else [])
    for order in orders:  # got phrase order[j] ↔ truth phrase j
        right = 0
        for j, w in enumerate(want.objects):
            if j >= len(order):
                break
            g = got.objects[order[j]]
            right += (g.shape == w.shape) + (g.color == w.color) + (g.count == w.count)
        if want.relation and got.relation and len(want.objects) == 2 and len(order) == 2:
            a, b = (centres[order.index(0)], centres[order.index(1)])  # got's first / second objects
            stated = shapes.RELATIONS.index(got.relation)
            right += int(shapes.spatial_relation(a, b) == stated)
        best = max(best, right / n_attr)
    return best
