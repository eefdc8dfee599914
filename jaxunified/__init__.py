"""jaxunified: TPU-first JAX/Flax tokenizers and unified multimodal models (TokLIP, DualToken, STAR)."""

__version__ = "0.1.0"
