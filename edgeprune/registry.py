"""Model registry: `@register("name")` on a factory, looked up by name with a did-you-mean hint.

A registry entry knows how to load a model (a `LoadedModel`) and which recipe file it uses.
Adding a model family is a new module under `edgeprune/models/`, not edits across the code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from edgeprune.errors import ConfigError


@dataclass(frozen=True)
class ModelEntry:
    name: str
    description: str
    loader: Callable[..., object]  # (model_dir: str | None, **options) -> LoadedModel
    recipe: str  # recipe file name under edgeprune/recipes/ (RECIPE_DIR)
    checkpoint: bool  # True: weights come from a directory (--model); False: built in code (a twin)


_REGISTRY: dict[str, ModelEntry] = {}


def register(name: str, *, description: str, recipe: str, checkpoint: bool = False):
    def wrap(loader):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = ModelEntry(name, description, loader, recipe, checkpoint)
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
        from edgeprune.recipe import did_you_mean

        raise ConfigError(f"unknown model {name!r}.{did_you_mean(name, _REGISTRY)} Known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]
