"""Recipes: TOML files loaded into frozen dataclasses; unknown keys are errors with a hint.

Precedence: dataclass defaults < recipe file < explicit CLI flags (`Recipe.override`).
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from edgeprune.errors import ConfigError
from edgeprune.strategies import SPECS

# The one place that decides where recipes live: inside the package, so an installed (non-editable)
# edgeprune finds them without a checkout. Target profiles are RECIPE_DIR / "targets".
RECIPE_DIR = Path(__file__).resolve().parent / "recipes"

NEWLINE_POLICIES = ("auto", "keep", "drop")
# fp16: matmuls and their weights in fp16, the rest fp32 (graph_passes.fp16_matmuls);
# int8 / int4: ONNX Runtime CPU quantization, vision INT8 with fp32 scoring, LM INT8 / INT4 weights (quantize.py)
PRECISIONS = ("fp32", "fp16", "int8", "int4")


@dataclass(frozen=True)
class ShapesRecipe:
    text_slots_before_image: int = 64  # prompt tokens before <image> (chat template preamble, BOS)
    text_slots_after_image: int = 64  # prompt tokens after <image> (the question, "ASSISTANT:")
    new_token_slots: int = 256  # cache slots reserved for generated tokens beyond the prefill slots


@dataclass(frozen=True)
class OnnxRecipe:
    opset: int = 17  # TensorRT 8.5/8.6 (P40, Jetson Xavier/Orin JetPack 6.0) stop at 17
    precision: str = "fp32"
    target: str = ""  # a target profile (RECIPE_DIR/targets/) whose parser the graph forms must suit; "" = any


HEAD_CRITERIA = ("output-norm", "first-token", "visual")  # edgeprune/rewrites/plan.py: which heads matter least


@dataclass(frozen=True)
class RewritesRecipe:
    """Torch-level rewrites before export (edgeprune/rewrites/); every default leaves the model as it is."""

    prune_heads: float = 0.0  # fraction of each LM layer's KV groups to prune, in [0, 1)
    head_criterion: str = "output-norm"  # output-norm | first-token (dormant heads) | visual (YOPO; LM only)
    prune_vision_heads: float = 0.0  # fraction of the heads of each CLIP layer up to the feature layer, in [0, 1)
    skip_layers: int = 0  # skip this many LM layers, the least influential by calibration
    skip_layer_indices: tuple[int, ...] = ()  # or exactly these LM layers (not with skip_layers)
    skip_vision_layers: int = 0  # skip this many CLIP layers below the feature layer, the least influential
    skip_vision_layer_indices: tuple[int, ...] = ()  # or exactly these CLIP layers (not with skip_vision_layers)
    fold_pruned_heads: bool = False  # LM: add each pruned head's mean output (calibration) to the o_proj bias
    drop_visual_after: str = ""  # "L:KEEP,...": after LM layer L keep KEEP visual slots (rewrites/schedules.py)
    skip_decode: str = ""  # "POS:K,...": from decode position POS on skip the lowest K LM layers (SkipDecode)
    stats: str = ""  # `edgeprune calibrate` output; "" = calibrate on the built-in samples when scores are needed

    def active(self) -> bool:
        return (self.prune_heads > 0 or self.prune_vision_heads > 0 or self.skip_layers > 0 or bool(self.skip_layer_indices)
                or self.skip_vision_layers > 0 or bool(self.skip_vision_layer_indices) or bool(self.drop_visual_after)
                or bool(self.skip_decode))


@dataclass(frozen=True)
class CacheRecipe:
    """What the runtime does when the KV cache is full (edgeprune_runtime/cache_policy.py); the bundle's default,
    which `run --cache-policy` overrides. heavy-hitter adds the `attn_mass` output to the decode and step graphs."""

    policy: str = "stop"  # stop | sink-window | heavy-hitter
    sinks: int = 4  # first slots never evicted (attention sinks)
    pin_image: bool = True  # heavy-hitter: never evict the image's kept visual slots


@dataclass(frozen=True)
class Recipe:
    budget: float = 0.2  # fraction of patch tokens (all partitions) the LM sees
    strategy: str = "hired"  # see edgeprune/selection.py
    newlines: str = "auto"  # auto: keep image_newline slots at budget 1.0 only (never for hired-reference)
    alpha: float = 0.5  # hired / hired-reference: the base image's share of the budget
    contextual: float = 0.15  # visionzip: fraction of each partition's slots for merged contextual tokens
    seed: int = 0  # random: the draw baked into the graph
    vision_keep: str = ""  # token pruning inside the vision tower: "LAYER:FRACTION,..." (edgeprune/vision_prune.py); "" = off
    shapes: ShapesRecipe = field(default_factory=ShapesRecipe)
    onnx: OnnxRecipe = field(default_factory=OnnxRecipe)
    rewrites: RewritesRecipe = field(default_factory=RewritesRecipe)
    cache: CacheRecipe = field(default_factory=CacheRecipe)

    def override(self, **flags) -> "Recipe":
        """Returns a copy with every flag that is not None applied, then validated.

        `opset`, `precision` and `target` set the `[onnx]` table, the `[rewrites]` keys that table,
        `cache_policy`, `cache_sinks` and `cache_pin_image` the `[cache]` table's policy, sinks and pin_image;
        the others are top-level keys. Giving `skip_layers` clears `skip_layer_indices` and vice versa."""
        onnx_keys = {f.name for f in dataclasses.fields(OnnxRecipe)}
        rewrite_keys = {f.name for f in dataclasses.fields(RewritesRecipe)}
        cache_keys = {f"cache_{f.name}": f.name for f in dataclasses.fields(CacheRecipe)}
        given = {k: v for k, v in flags.items() if v is not None}
        top = {k: v for k, v in given.items() if k not in onnx_keys | rewrite_keys | set(cache_keys)}
        onnx = {k: v for k, v in given.items() if k in onnx_keys}
        rewrites = {k: v for k, v in given.items() if k in rewrite_keys}
        cache = {cache_keys[k]: v for k, v in given.items() if k in cache_keys}
        for count, indices in (("skip_layers", "skip_layer_indices"), ("skip_vision_layers", "skip_vision_layer_indices")):
            if count in rewrites:
                rewrites.setdefault(indices, ())
            if indices in rewrites:
                rewrites.setdefault(count, 0)
        return dataclasses.replace(self, **top, onnx=dataclasses.replace(self.onnx, **onnx),
                                   rewrites=dataclasses.replace(self.rewrites, **rewrites),
                                   cache=dataclasses.replace(self.cache, **cache)).validated()

    def validated(self) -> "Recipe":
        if not (0.0 < self.budget <= 1.0):
            raise ConfigError(f"budget must be in (0, 1], got {self.budget}; e.g. --budget 0.2 keeps 20% of visual tokens")
        _one_of("strategy", self.strategy, tuple(SPECS))
        _one_of("newlines", self.newlines, NEWLINE_POLICIES)
        from edgeprune.vision_prune import parse_schedule

        parse_schedule(self.vision_keep)  # syntax and monotonicity; layers and K are checked against the model at export
        if self.newlines == "keep" and not SPECS[self.strategy].newlines:
            raise ConfigError(f"strategy {self.strategy!r} emits no newline tokens; use newlines = 'drop' or 'auto'")
        if not (0.0 <= self.alpha <= 1.0):
            raise ConfigError(f"alpha must be in [0, 1] (the base image's share of the budget), got {self.alpha}")
        if not (0.0 <= self.contextual < 1.0):
            raise ConfigError(f"contextual must be in [0, 1), got {self.contextual}")
        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0, got {self.seed}")
        _one_of("onnx.precision", self.onnx.precision, PRECISIONS)
        if self.onnx.target:
            from edgeprune.trt.targets import get_target

            get_target(self.onnx.target)  # ConfigError listing the known targets
        if not (13 <= self.onnx.opset <= 21):
            raise ConfigError(f"onnx.opset must be between 13 and 21, got {self.onnx.opset}")
        r = self.rewrites
        if not (0.0 <= r.prune_heads < 1.0):
            raise ConfigError(f"rewrites.prune_heads (--prune-heads) must be a ratio in [0, 1), got {r.prune_heads}")
        if not (0.0 <= r.prune_vision_heads < 1.0):
            raise ConfigError(f"rewrites.prune_vision_heads (--prune-vision-heads) must be a ratio in [0, 1), "
                              f"got {r.prune_vision_heads}")
        _one_of("rewrites.head_criterion", r.head_criterion, HEAD_CRITERIA)
        if r.skip_layers < 0 or any(i < 0 for i in r.skip_layer_indices):
            raise ConfigError(f"rewrites.skip_layers (--skip-layers) must be >= 0 (a count) or layer indices >= 0, got "
                              f"{r.skip_layers or r.skip_layer_indices}")
        if r.skip_layers and r.skip_layer_indices:
            raise ConfigError("give rewrites.skip_layers (a count) or rewrites.skip_layer_indices (layers), not both")
        if r.skip_vision_layers < 0 or any(i < 0 for i in r.skip_vision_layer_indices):
            raise ConfigError(f"rewrites.skip_vision_layers (--skip-vision-layers) must be >= 0 (a count) or layer "
                              f"indices >= 0, got {r.skip_vision_layers or r.skip_vision_layer_indices}")
        if r.skip_vision_layers and r.skip_vision_layer_indices:
            raise ConfigError("give rewrites.skip_vision_layers (a count) or rewrites.skip_vision_layer_indices "
                              "(layers), not both")
        from edgeprune.rewrites.schedules import parse_drop_visual, parse_skip_decode

        parse_drop_visual(r.drop_visual_after)  # syntax and monotonicity; layers and KEEP are checked at export
        parse_skip_decode(r.skip_decode)
        for name in ("text_slots_before_image", "text_slots_after_image", "new_token_slots"):
            if getattr(self.shapes, name) < 1:
                raise ConfigError(f"shapes.{name} must be >= 1, got {getattr(self.shapes, name)}")
        from edgeprune_runtime.cache_policy import POLICIES

        _one_of("cache.policy (--cache-policy)", self.cache.policy, POLICIES)
        if self.cache.sinks < 0:  # the upper bound (below the cache capacity) is checked against the planned shapes
            raise ConfigError(f"cache.sinks (--cache-sinks) must be >= 0, got {self.cache.sinks}")
        if self.cache.policy != "stop" and (r.drop_visual_after or r.skip_decode):
            raise ConfigError(f"cache.policy {self.cache.policy!r} needs every LM layer to hold the same tokens; "
                              "--drop-visual-after and --skip-decode take --cache-policy stop")
        return self

    def keeps_newlines(self) -> bool:
        if not SPECS[self.strategy].newlines:
            return False
        return self.newlines == "keep" or (self.newlines == "auto" and self.budget == 1.0)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def did_you_mean(value: str, choices) -> str:
    """' Did you mean 'x'?' for the nearest choice, or ''."""
    close = difflib.get_close_matches(str(value), list(choices), n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} {value!r} is not one of {', '.join(allowed)}.{did_you_mean(value, allowed)}")


_TABLES = {"shapes": ShapesRecipe, "onnx": OnnxRecipe, "rewrites": RewritesRecipe, "cache": CacheRecipe}
_SCALARS = {"int": int, "float": float, "str": str, "bool": bool}
_LISTS = {"tuple[int, ...]": int}  # list-valued keys and their element type


def _typed(key: str, value, annotation: str):
    """`value` as the field's type (ints are fine for float fields); ConfigError naming the key otherwise."""
    if annotation in _LISTS:
        if not isinstance(value, (list, tuple)) or any(isinstance(v, bool) or not isinstance(v, int) for v in value):
            raise ConfigError(f"recipe key '{key}' must be a list of integers, e.g. [0, 3], got {value!r}")
        return tuple(int(v) for v in value)
    want = _SCALARS[annotation]
    if want is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"recipe key '{key}' must be true or false, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        ok = False
    elif want is float:
        ok = isinstance(value, (int, float))
    else:
        ok = isinstance(value, want)
    if not ok:
        raise ConfigError(f"recipe key '{key}' must be {'a number' if want is float else 'an integer' if want is int else 'a string'}, "
                          f"got {value!r}")
    return float(value) if want is float else value


def _build(cls, data: dict, where: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"unknown recipe key '{where}{key}'.{did_you_mean(key, fields)}")
        if key in _TABLES:
            if not isinstance(value, dict):
                raise ConfigError(f"recipe key '{where}{key}' must be a table, e.g. [{key}]")
            value = _build(_TABLES[key], value, f"{where}{key}.")
        else:
            value = _typed(f"{where}{key}", value, fields[key].type)
        kwargs[key] = value
    return cls(**kwargs)


def recipe_from_dict(data: dict, where: str = "recipe") -> Recipe:
    """A validated Recipe from a dict (a parsed TOML file or a manifest's resolved recipe)."""
    try:
        return _build(Recipe, data, "").validated()
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None


def load_recipe(path: str | Path | None) -> Recipe:
    """Loads a recipe TOML file (None: all defaults). Raises ConfigError on bad files or keys.

    A relative path that does not exist here but names a built-in recipe, `recipes/NAME.toml`, is that built-in
    file: `--recipe recipes/llava-next-fast.toml` works from any directory, and from an installed package."""
    if path is None:
        return Recipe().validated()
    path = Path(path)
    if not path.is_file() and not path.is_absolute() and path.parts[:1] == ("recipes",):
        built_in = RECIPE_DIR.joinpath(*path.parts[1:])
        path = built_in if built_in.is_file() else path
    if not path.is_file():
        raise ConfigError(f"recipe file {path} does not exist; pass --recipe with a TOML file (examples: {RECIPE_DIR})")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"recipe {path} is not valid TOML: {e}") from None
    return recipe_from_dict(data, f"recipe {path}")


def default_recipe_path(recipe_name: str) -> Path:
    return RECIPE_DIR / recipe_name
