"""Command-line fields of a config's ``*overrides`` dicts that the preset does not list.

An ``overrides`` block (``model.overrides``, ``base.overrides``, ``model.lm_overrides``, ...) holds
keyword arguments for a model dataclass, and a preset names only the few it changes. ml-collections
can override only keys that exist, so ``--config.model.overrides.dtype=bfloat16`` on a preset that
does not set ``dtype`` would be an "unknown key" error although the dataclass takes the field. Such
arguments are taken out of ``argv`` before the flags are parsed and set on the loaded config after
(``split`` then ``apply``); a field the dataclass does not have is then the dataclass's own error
when the model is built. Values are Python literals (``3``, ``0.1``, ``True``, ``(1, 2)``), else strings.
"""

from __future__ import annotations

import ast
import re
from typing import Any

import ml_collections as mlc

# --config.<path ending in a component named *overrides>.<field>[=value]
_ARG = re.compile(r"^--config\.((?:\w+\.)*?\w*overrides)\.(\w+(?:\.\w+)*)(?:=(.*))?$", re.S)


def split(argv: list[str]) -> tuple[list[str], list[tuple[str, str, str]]]:
    """``argv`` without its ``--config.<...>overrides.<field>`` arguments (``=value`` or a separate
    value), and those as ``(overrides path, field path, value text)``."""
    kept, pending, i = [], [], 0
    while i < len(argv):
        m = _ARG.match(argv[i])
        if m is None:
            kept.append(argv[i])
        else:
            parent, field, value = m.groups()
            if value is None:
                if i + 1 >= len(argv):
                    raise ValueError(f"{argv[i]} has no value")
                i += 1
                value = argv[i]
            pending.append((parent, field, value))
        i += 1
    return kept, pending


def parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply(config: mlc.ConfigDict, pending: list[tuple[str, str, str]]) -> mlc.ConfigDict:
    """Sets each ``split`` argument on ``config`` (in place; new keys too) and returns it."""
    for parent, field, text in pending:
        node = config
        for name in parent.split("."):
            if not isinstance(node, mlc.ConfigDict) or name not in node:
                raise ValueError(f"--config.{parent}.{field}: the config has no {parent!r} block")
            node = node[name]
        *inner, leaf = field.split(".")
        with config.unlocked():
            for name in inner:
                if name not in node:
                    node[name] = mlc.ConfigDict()
                node = node[name]
            node[leaf] = parse_value(text)
    return config
