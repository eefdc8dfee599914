"""Image–text contrastive losses: softmax CLIP (TokLIP) and sigmoid SigLIP, global and per device.

Every loss takes ``axis_name``:

* ``axis_name=None`` — **global view**, for ``jax.jit`` over arrays sharded on the batch axes
  (``NamedSharding``); the ``[B, B]`` logits are written plainly and the compiler inserts the
  collectives.
* ``axis_name=<mesh axis or tuple of axes>`` — **per device**, inside ``jax.shard_map``: each
  device sees its ``n = B / N`` rows and exchanges embeddings with named-axis collectives.
  CLIP all-gathers the other side (``[n, B]`` logits per device); the sigmoid loss passes text
  chunks round a ``ppermute`` ring, so no device ever holds more than an ``[n, n]`` logits block.

How the two forms relate (the contract the training loop relies on: it ``pmean``s per-device
gradients and metrics, see ``train/state.py``): the per-device loss is the *mean over this device's
rows*, so ``pmean`` of the per-device loss equals the global loss. The transpose of ``all_gather``
is ``psum_scatter`` and that of ``ppermute`` the reverse ``ppermute``, so every device's embedding
cotangent collects the terms all devices' losses contribute, i.e. it is ``N ×`` the global
gradient for its rows; the replicated parameters' per-device gradients therefore sum to
``N ×`` the global gradient, and their ``pmean`` is exactly it. This holds for
``shard_map(..., check_vma=False)`` (the loop's setting), where a replicated parameter's gradient
is left per-device. Under ``check_vma=True`` JAX itself ``psum``s that gradient (the transpose of
the implicit ``pvary``), so a further ``pmean`` would leave it ``N ×`` too large (tested).
Metrics are per-device too; their ``pmean`` is the global value.

Embeddings are l2-normalised inside (``normalize=True``, the default: TokLIP's towers and
big_vision's two-towers both feed unit vectors), in float32; pass ``normalize=False`` when the
model already normalises. Logits, softmax and sigmoid always run in float32 at full matmul
precision (measured: the two forms agree to ≤ 2e-6 on CPU, losses, metrics and gradients).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxunified.quant.vq import l2_normalize

# TokLIP/open_clip: the scale used is exp(min(logit_scale, ln 100)), i.e. temperature ≥ 0.01.
CLIP_MAX_LOGIT_SCALE = math.log(100.0)
# big_vision two-towers init for the sigmoid loss: t = log 10, b = −10.
SIGLIP_INIT_T = math.log(10.0)
SIGLIP_INIT_B = -10.0

_HIGHEST = lax.Precision.HIGHEST  # TPUs would otherwise run f32 logits as bf16 passes.
AxisName = Any  # str | tuple[str, ...] | None


def clamp_logit_scale(logit_scale, min_value: float = 0.0, max_value: float = CLIP_MAX_LOGIT_SCALE):
    """TokLIP's post-update clamp of the learnable log-scale to ``[0, ln 100]``.

    Apply it to the parameter after each optimizer step; the loss's own ``min`` only bounds the
    value used, which leaves an over-the-top parameter stuck with zero gradient.
    """
    return jnp.clip(logit_scale, min_value, max_value)


def clip_scale(logit_scale) -> jax.Array:
    """The multiplier the CLIP loss uses: ``exp(min(logit_scale, ln 100))``."""
    return jnp.exp(jnp.minimum(jnp.asarray(logit_scale, jnp.float32), CLIP_MAX_LOGIT_SCALE))


def clip_loss(
    zimg: jax.Array,
    ztxt: jax.Array,
    logit_scale,
    *,
    negatives: jax.Array | None = None,
    axis_name: AxisName = None,
    normalize: bool = True,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Softmax CLIP loss ``(CE(img→txt) + CE(txt→img)) / 2`` over the in-batch pairs.

    ``zimg``, ``ztxt``: ``[B, D]`` (global) or ``[n, D]`` (this device's rows under
    ``axis_name``); row ``i`` of each is a positive pair. ``logit_scale``: the learnable log-scale
    (scalar). ``negatives``: optional extra captions ``[M, D]`` (this device's under ``axis_name``,
    gathered like the texts) that match no image, NegCLIP's hard negatives: they join every
    image's softmax over captions (image→text term only). Returns ``(loss, metrics)`` with metrics
    ``i2t_acc``, ``t2i_acc`` (in-batch top-1 over the global batch) and ``logit_scale`` (the scale
    actually used).
    """
    zimg, ztxt = _prepare(zimg, ztxt, normalize, "clip_loss")
    negatives = _prepare_negatives(negatives, zimg, normalize, "clip_loss")
    scale = clip_scale(logit_scale)
    pos = scale * jnp.sum(zimg * ztxt, axis=-1)
    if axis_name is None:
        logits = scale * _dot(zimg, ztxt)
        pos_cols = jnp.arange(zimg.shape[0])
        ce_t, hit_t = _softmax_rows(logits.T, pos, pos_cols)
    else:
        n = zimg.shape[0]
        all_img = lax.all_gather(zimg, axis_name, axis=0, tiled=True)
        all_txt = lax.all_gather(ztxt, axis_name, axis=0, tiled=True)
        if negatives is not None:
            negatives = lax.all_gather(negatives, axis_name, axis=0, tiled=True)
        pos_cols = lax.axis_index(axis_name) * n + jnp.arange(n)
        logits = scale * _dot(zimg, all_txt)
        ce_t, hit_t = _softmax_rows(scale * _dot(ztxt, all_img), pos, pos_cols)
    if negatives is not None:
        logits = jnp.concatenate([logits, scale * _dot(zimg, negatives)], axis=1)
    ce_i, hit_i = _softmax_rows(logits, pos, pos_cols)
    loss = 0.5 * (jnp.mean(ce_i) + jnp.mean(ce_t))
    metrics = {"i2t_acc": jnp.mean(hit_i), "t2i_acc": jnp.mean(hit_t), "logit_scale": scale}
    return loss, metrics


def sigmoid_loss(
    zimg: jax.Array,
    ztxt: jax.Array,
    t,
    b,
    *,
    negatives: jax.Array | None = None,
    axis_name: AxisName = None,
    normalize: bool = True,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """SigLIP's sigmoid loss, as big_vision: ``−Σ_{i,j} log σ(y_ij (e^t zimg_i·ztxt_j + b)) / B``.

    ``y_ij`` is +1 on the diagonal, −1 elsewhere; ``t`` (init ``log 10``) and ``b`` (init −10)
    are learnable scalars. Per device the text chunks travel round a ring (``ppermute``): step 0
    scores this device's own texts (the only chunk with positives), each later step the next
    device's, so the device holds ``[n, n]`` logits at a time and ``n × D`` text embeddings in
    flight. ``negatives``: optional extra captions ``[M, D]`` (per device: this device's; they
    travel the ring beside the texts) scored with label −1 against every image. Returns
    ``(loss, metrics)`` with ``i2t_acc``, ``t2i_acc``, ``temperature`` (``e^t``) and ``bias``.
    """
    zimg, ztxt = _prepare(zimg, ztxt, normalize, "sigmoid_loss")
    negatives = _prepare_negatives(negatives, zimg, normalize, "sigmoid_loss")
    scale = jnp.exp(jnp.asarray(t, jnp.float32))
    b = jnp.asarray(b, jnp.float32)
    n = zimg.shape[0]
    pos = scale * jnp.sum(zimg * ztxt, axis=-1) + b
    if axis_name is None:
        total, logits = _sigmoid_block(zimg, ztxt, scale, b, own=True)
        pos_cols = jnp.arange(n)
        t2i = _hits(logits.T, pos, pos_cols)
        if negatives is not None:
            part, neg_logits = _sigmoid_block(zimg, negatives, scale, b, own=False)
            total, logits = total + part, jnp.concatenate([logits, neg_logits], axis=1)
        metrics = {"i2t_acc": jnp.mean(_hits(logits, pos, pos_cols)), "t2i_acc": jnp.mean(t2i)}
    else:
        total, metrics = _sigmoid_ring(zimg, ztxt, negatives, scale, b, pos, axis_name)
    metrics.update(temperature=scale, bias=b)
    return total / n, metrics


# ---------------------------------------------------------------- internals


def _prepare(zimg, ztxt, normalize: bool, what: str):
    zimg = jnp.asarray(zimg, jnp.float32)
    ztxt = jnp.asarray(ztxt, jnp.float32)
    if zimg.ndim != 2 or zimg.shape != ztxt.shape:
        raise ValueError(
            f"{what} needs image and text embeddings of the same shape [batch, dim], got "
            f"{zimg.shape} and {ztxt.shape}; pool tokens and project both towers to one width first"
        )
    if normalize:
        zimg, ztxt = l2_normalize(zimg), l2_normalize(ztxt)
    return zimg, ztxt


def _prepare_negatives(negatives, zimg, normalize: bool, what: str):
    if negatives is None:
        return None
    negatives = jnp.asarray(negatives, jnp.float32)
    if negatives.ndim != 2 or negatives.shape[-1] != zimg.shape[-1]:
        raise ValueError(f"{what}: negatives must be [M, {zimg.shape[-1]}] caption embeddings, got {negatives.shape}")
    return l2_normalize(negatives) if normalize else negatives


def _dot(a, b):
    return jnp.matmul(a, b.T, precision=_HIGHEST)


def _softmax_rows(logits, pos, pos_cols):
    """Per-row cross-entropy with the positive at ``pos_cols``, and the row's top-1 hit.

    ``pos`` is the positive logit computed from the row pair directly, so its gradient stays local.
    """
    return jax.nn.logsumexp(logits, axis=-1) - pos, _hits(logits, pos, pos_cols)


def _hits(logits, pos, pos_cols):
    """Whether each row's positive beats all its negatives (a strict win; ties count as misses)."""
    return lax.stop_gradient(pos > _max_negative(logits, pos_cols))


def _max_negative(logits, pos_cols):
    cols = jnp.arange(logits.shape[-1])
    return jnp.max(jnp.where(cols[None, :] == pos_cols[:, None], -jnp.inf, logits), axis=-1)


def _sigmoid_block(zimg, ztxt, scale, b, own: bool):
    """``−Σ log σ(y·logits)`` over one block; positives only on the diagonal of a device's own block."""
    logits = scale * _dot(zimg, ztxt) + b
    if own:
        labels = 2.0 * jnp.eye(*logits.shape, dtype=logits.dtype) - 1.0
        signed = labels * logits
    else:
        signed = -logits
    return -jnp.sum(jax.nn.log_sigmoid(signed)), logits


def _sigmoid_ring(zimg, ztxt, negatives, scale, b, pos, axis_name):
    n_dev = lax.axis_size(axis_name)
    # Device j hands its chunk to j−1, so after k hops device d holds device (d+k)'s texts.
    perm = [(j, (j - 1) % n_dev) for j in range(n_dev)]
    # Recompute each block's logits in the backward pass rather than keep n×B of them as residuals.
    other_block = jax.checkpoint(lambda txt, s, bb: _sigmoid_block(zimg, txt, s, bb, own=False))

    def score_negatives(neg, total, img_best):
        if neg is None:
            return total, img_best
        part, logits = other_block(neg, scale, b)
        return total + part, jnp.maximum(img_best, jnp.max(lax.stop_gradient(logits), axis=1))

    total, logits = _sigmoid_block(zimg, ztxt, scale, b, own=True)
    diag = jnp.arange(zimg.shape[0])
    img_best = lax.stop_gradient(_max_negative(logits, diag))
    # The texts' own metric state travels with them: best negative score so far, and the positive.
    txt_best = _max_negative(logits.T, diag)
    total, img_best = score_negatives(negatives, total, img_best)

    def hop(carry, _):
        txt, neg, total, img_best, txt_best, txt_pos = carry
        txt, txt_best, txt_pos = (lax.ppermute(v, axis_name, perm) for v in (txt, txt_best, txt_pos))
        neg = None if neg is None else lax.ppermute(neg, axis_name, perm)
        part, logits = other_block(txt, scale, b)
        logits = lax.stop_gradient(logits)
        img_best = jnp.maximum(img_best, jnp.max(logits, axis=1))
        txt_best = jnp.maximum(txt_best, jnp.max(logits, axis=0))
        total, img_best = score_negatives(neg, total + part, img_best)
        return (txt, neg, total, img_best, txt_best, txt_pos), None

    carry = (ztxt, negatives, total, img_best, lax.stop_gradient(txt_best), lax.stop_gradient(pos))
    (_, _, total, img_best, txt_best, txt_pos), _ = lax.scan(hop, carry, None, length=n_dev - 1)
    # Each text chunk ends on exactly one device, so the pmean of these per-device rates is global.
    metrics = {
        "i2t_acc": jnp.mean(lax.stop_gradient(pos) > img_best),
        "t2i_acc": jnp.mean(txt_pos > txt_best),
    }
    return total, metrics


LOSS_KINDS = ("sigmoid", "softmax")


def contrastive_loss(kind: str, zimg, ztxt, params, *, negatives=None, axis_name=None):
    """The configured loss on raw (unnormalised) embeddings; ``params`` holds ``logit_scale`` (and
    ``logit_bias`` for the sigmoid loss). Returns ``(loss, metrics)``.

    ``negatives``: embeddings of hard-negative captions [M, D] (``data.text.hard_negatives``)."""
    if kind == "sigmoid":
        return sigmoid_loss(zimg, ztxt, params["logit_scale"], params["logit_bias"],
                            negatives=negatives, axis_name=axis_name)
    if kind == "softmax":
        return clip_loss(zimg, ztxt, params["logit_scale"], negatives=negatives, axis_name=axis_name)
    raise ValueError(f"loss kind {kind!r}; use one of {LOSS_KINDS}")
