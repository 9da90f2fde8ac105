"""Model registry: ``@register_model`` factories, ``create_model(name, **kw)``, ``list_models()``.

Two kinds of entries: single models (``@register_model``) and depth families
(``@register_family("resnet", depths=...)``) that accept any depth of the paper's 6n+2 form, so
``resnet26`` works although only the paper's depths are listed.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch.nn as nn

__all__ = ["ModelError", "register_model", "register_family", "create_model", "list_models",
           "model_info", "ModelInfo"]


class ModelError(ValueError):
    """An unknown model name or an impossible depth; ``str(e)`` is one line for the CLI."""


@dataclass(frozen=True)
class ModelInfo:
    """What a model name means, without building the model."""

    name: str
    family: str      # "resnet", "plain", "preact", ... (the name without its depth)
    depth: int | None
    residual: bool   # True when the blocks add an identity/projection shortcut


_MODELS: dict[str, Callable[..., nn.Module]] = {}
_FAMILIES: dict[str, tuple[Callable[..., nn.Module], tuple[int, ...], bool]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a factory under its function name."""
    _MODELS[fn.__name__] = fn
    return fn


def register_family(prefix: str, depths: tuple[int, ...], residual: bool):
    """Register a factory ``fn(depth, **kw)`` for every ``{prefix}{6n+2}``; lists ``depths``."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _FAMILIES[prefix] = (fn, tuple(depths), residual)
        return fn

    return deco


def list_models() -> list[str]:
    """Names of every registered model, families expanded at their listed depths."""
    names = list(_MODELS)
    for prefix, (_, depths, _) in _FAMILIES.items():
        names += [f"{prefix}{d}" for d in depths]
    return sorted(names, key=_natural_key)


def _natural_key(name: str) -> tuple:
    m = re.fullmatch(r"([a-z_]+?)(\d+)", name)
    return (m.group(1), int(m.group(2))) if m else (name, 0)


#: The deepest network a family name may ask for (a resnet1202 has 1202; a typo like
#: resnet99999998 would otherwise build for minutes and then run out of memory).
MAX_DEPTH = 5000


def model_info(name: str) -> ModelInfo:
    """Parse and validate ``name``; :class:`ModelError` names the closest matches if unknown."""
    if name in _MODELS:
        return ModelInfo(name, name, None, False)
    m = re.fullmatch(r"([a-z_]+?)(\d+)", name or "")
    if m and m.group(1) in _FAMILIES:
        prefix, depth = m.group(1), int(m.group(2))
        _, listed, residual = _FAMILIES[prefix]
        if depth < 8 or (depth - 2) % 6:
            near = sorted({max(8, 6 * ((depth - 2) // 6) + 2), 6 * ((depth - 2) // 6 + 1) + 2})
            raise ModelError(
                f"{name}: depth {depth} is not of the form 6n+2 (n >= 1) that the CIFAR ResNet "
                f"family needs; nearest: {', '.join(f'{prefix}{d}' for d in near)}"
            )
        if depth > MAX_DEPTH:
            raise ModelError(f"{name}: depth {depth} is past the {MAX_DEPTH} layers gradlab "
                             "builds (He et al. 2015 went to 1202)")
        return ModelInfo(name, prefix, depth, residual)
    close = difflib.get_close_matches((name or "").lower(), list_models(), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ModelError(f"unknown model {name!r}{hint} (gradlab models lists them all)")


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model by name, e.g. ``create_model("resnet56", shortcut="B")``."""
    info = model_info(name)
    if info.depth is None:
        return _MODELS[name](**kwargs)
    fn = _FAMILIES[info.family][0]
    return fn(info.depth, **kwargs)
