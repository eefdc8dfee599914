"""Command-line fields of a config's ``*overrides`` dicts that the preset does not list.

An ``overrides`` block (``model.overrides``, ``base.overrides``, ``model.lm_overrides``, ...) holds
keyword arguments for a model dataclass, and a preset names only the few it changes. ml-collections
can override only keys that exist, so ``--config.model.overrides.dtype=bfloat16`` on a preset that
does not set ``dtype`` would be an "unknown key" error although the dataclass takes the field. Such
arguments are taken out of ``argv`` before the flags are parsed and set on the loaded config after
(``split`` then ``apply``). Nothing checks a new field's name here: where the block feeds a model
dataclass (``model.overrides`` of ar/vqgan, ``lm_overrides``, a ``random`` frozen part) a misspelt
field is that dataclass's error when the model is built; blocks a part's kind does not read (a
``workdir`` run's) ignore it. Not read from ``--flagfile`` files (ml-collections expands those).

Values: Python literals (``3``, ``0.1``, ``(1, 2)``), ``true``/``false`` in any case, else the text;
a field the preset sets to a string keeps the text as given. A bare ``--config.<...>overrides.flag``
(no value) is ``True``, as ml-collections treats boolean flags.

The entry points (train.py / eval.py through ``jaxunified.cli``, ``python -m jaxunified.bench``) call
``take_from_argv`` before ``absl.app.run`` and ``apply_taken`` to the parsed config.
"""

from __future__ import annotations

import ast
import re
import sys
from typing import Any

import ml_collections as mlc
from absl import app

# --config.<path ending in a component named *overrides>.<field>[=value]
_ARG = re.compile(r"^--config\.((?:\w+\.)*?\w*overrides)\.(\w+(?:\.\w+)*)(?:=(.*))?$", re.S)


def split(argv: list[str]) -> tuple[list[str], list[tuple[str, str, str | None]]]:
    """``argv`` without its ``--config.<...>overrides.<field>`` arguments (``=value``, a separate
    value, or none: True), and those as ``(overrides path, field path, value text or None)``.
    Arguments after ``--`` are left alone, as absl leaves them."""
    kept, pending, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            kept += argv[i:]
            break
        m = _ARG.match(arg)
        if m is None:
            kept.append(arg)
        else:
            parent, field, value = m.groups()
            if value is None and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                i += 1
                value = argv[i]
            pending.append((parent, field, value))
        i += 1
    return kept, pending


def parse_value(text: str | None) -> Any:
    if text is None:
        return True
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply(config: mlc.ConfigDict, pending: list[tuple[str, str, str | None]]) -> mlc.ConfigDict:
    """Sets each ``split`` argument on ``config`` (in place; new keys too) and returns it. A value of
    the wrong type for a field the preset sets is a ValueError naming the argument."""
    for parent, field, text in pending:
        arg = f"--config.{parent}.{field}"
        node = config
        for name in parent.split("."):
            if not isinstance(node, mlc.ConfigDict) or name not in node:
                raise ValueError(f"{arg}: the config has no {parent!r} block")
            node = node[name]
        *inner, leaf = field.split(".")
        with config.unlocked():
            for name in inner:
                if name not in node:
                    node[name] = mlc.ConfigDict()
                node = node[name]
            keep_text = text is not None and isinstance(node.get(leaf), str)
            try:
                node[leaf] = text if keep_text else parse_value(text)
            except TypeError as e:
                raise ValueError(f"{arg}={text}: {e}") from None
    return config


_TAKEN: list[tuple[str, str, str | None]] = []  # take_from_argv's, until apply_taken sets them


def take_from_argv() -> None:
    """Removes the ``*overrides`` arguments from ``sys.argv`` (``split``) and keeps them for ``apply_taken``."""
    sys.argv, _TAKEN[:] = split(sys.argv)


def apply_taken(config: mlc.ConfigDict) -> mlc.ConfigDict:
    """``apply`` of what ``take_from_argv`` took; a bad one is a usage error (absl prints it, no traceback)."""
    try:
        return apply(config, _TAKEN)
    except ValueError as e:
        raise app.UsageError(f"bad --config override: {e}") from None
