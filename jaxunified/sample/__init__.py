"""Autoregressive sampling: strategies and guidance (``strategies``), the one decode loop
(``decode.generate``), and per-family samplers built on it (``lm``, ``llamagen``), plus timers."""
