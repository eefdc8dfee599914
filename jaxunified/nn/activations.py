"""Activation functions by the names configs and converted checkpoints use."""

from __future__ import annotations

import functools
from typing import Callable

import jax

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),  # HF "gelu_pytorch_tanh", SigLIP
    "gelu": functools.partial(jax.nn.gelu, approximate=False),  # exact erf (timm nn.GELU)
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,  # Qwen2/LLaMA SwiGLU gate
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; use one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]
