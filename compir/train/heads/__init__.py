"""Registry of composition heads, by the name a model config gives (``"head": {"name": ...}``).

Each head is a module in this package that decorates its class with ``@register_head(name)``;
:func:`build_head` imports the package's modules on first use, so adding a head is adding a
file (e.g. ``tgcir.py``), with no edit here.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import Any, TypeVar

from compir.errors import InputError
from compir.train.heads.base import CompositionHead

_HEADS: dict[str, type[CompositionHead]] = {}
_H = TypeVar("_H", bound=type[CompositionHead])


def register_head(name: str) -> Callable[[_H], _H]:
    """Class decorator: make a CompositionHead subclass buildable under ``name``."""

    def decorate(cls: _H) -> _H:
        if name in _HEADS and _HEADS[name] is not cls:
            raise ValueError(f"composition head {name!r} is registered twice ({_HEADS[name]} and {cls})")
        cls.name = name
        _HEADS[name] = cls
        return cls

    return decorate


def head_names() -> list[str]:
    """Every registered head name (after importing all head modules)."""
    _import_head_modules()
    return sorted(_HEADS)


def head_class(name: str) -> type[CompositionHead]:
    _import_head_modules()
    if name not in _HEADS:
        raise InputError(f"unknown composition head {name!r}; available: {', '.join(sorted(_HEADS))}")
    return _HEADS[name]


def build_head(name: str, *, embed_dim: int, image_width: int, text_width: int, options: dict[str, Any]) -> CompositionHead:
    """Instantiate the head ``name`` for a backbone of the given widths."""
    cls = head_class(name)
    try:
        return cls(embed_dim=embed_dim, image_width=image_width, text_width=text_width, **options)
    except TypeError as exc:
        raise InputError(f"composition head {name!r}: bad options in the model config ({exc})") from exc


def _import_head_modules() -> None:
    for module in pkgutil.iter_modules(__path__):
        if module.name != "base":
            importlib.import_module(f"{__name__}.{module.name}")
