"""Model registry: `@register("name")` on a factory, looked up by name with a did-you-mean hint.

A registry entry knows how to load a model (a `LoadedModel`) and which recipe file it uses.
Adding a model family is a new module under `edgeprune/models/`, not edits across the code.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Callable

from edgeprune.errors import ConfigError


@dataclass(frozen=True)
class ModelEntry:
    name: str
    family: str  # adapter family, e.g. "llava-next"
    description: str
    loader: Callable[..., object]  # (model_dir: str | None, **options) -> LoadedModel
    recipe: str  # recipe file name under recipes/


_REGISTRY: dict[str, ModelEntry] = {}


def register(name: str, *, family: str, description: str, recipe: str):
    def wrap(loader):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = ModelEntry(name, family, description, loader, recipe)
        return loader

    return wrap


def _load_builtin_models() -> None:
    # Importing the adapters registers them; they import torch only inside loaders.
    import edgeprune.models  # noqa: F401


def names() -> list[str]:
    _load_builtin_models()
    return sorted(_REGISTRY)


def get(name: str) -> ModelEntry:
    _load_builtin_models()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown model {name!r}.{hint} Known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]
