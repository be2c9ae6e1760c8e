"""Put the toolchain (`edgeprune`) and the runtime (`edgeprune_runtime`) on sys.path until they are pip-installed."""

import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parents[1]
for _p in (_ROOT / "runtime", _ROOT):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))


from tiny_inputs import random_image  # noqa: E402  (tests/ is on sys.path)


# --- shared fixtures: the tiny LLaVA-NeXT twin, its recipe, inputs, and exported bundles -----------

TINY_RECIPE = _ROOT / "edgeprune" / "recipes" / "llava-next-tiny.toml"
PROMPT = "USER: <image>\nWhat is in the picture? ASSISTANT:"


@pytest.fixture(scope="session")
def tiny():
    """The offline tiny LLaVA-NeXT twin (`LoadedModel`), built once per session. Tests must not modify it."""
    from edgeprune.models.llava_next import load_tiny

    return load_tiny()


@pytest.fixture(scope="session")
def tiny_recipe():
    """budget -> the tiny twin's recipe file with that budget (validated)."""
    from edgeprune.recipe import load_recipe

    base = load_recipe(TINY_RECIPE)
    return lambda budget: base.override(budget=budget)


@pytest.fixture(scope="session")
def tiny_shapes(tiny, tiny_recipe):
    """budget -> the `Shapes` planned for the tiny twin."""
    from edgeprune.plan import plan_shapes

    return lambda budget: plan_shapes(tiny.config, tiny.processor.image_processor, tiny_recipe(budget))




@dataclass
class TinyCase:
    """One image + PROMPT, as transformers' processor sees it and as the static graphs take it."""

    hw: tuple[int, int]
    hf_inputs: dict  # the processor's output (input_ids, attention_mask, pixel_values, image_sizes)
    layout: object  # edgeprune_runtime.layout.Layout
    pixel_values: object  # torch f32 [P, 3, H, W], zero-padded to the bundle's partitions
    vision_feeds: dict  # pixel_values and every layout input by name (numpy), for ONNX Runtime
    text_ids: object  # torch int64 [T1+T2]
    text_valid: object  # torch f32 [T1+T2]
    n_before: int  # real text tokens before the image
    n_after: int  # real text tokens after the image

    def args_for(self, vision) -> tuple:
        """The inputs of a VisionGraph, in its `input_names` order (torch tensors)."""
        import torch

        return tuple(torch.from_numpy(self.vision_feeds[n]) for n in vision.input_names)


@pytest.fixture(scope="session")
def tiny_case(tiny):
    """(hw, shapes) -> TinyCase: the processor's inputs and the static-graph inputs for the same request."""
    import torch

    from edgeprune_runtime.layout import compute_layout

    def make(hw, shapes, seed: int = 0) -> TinyCase:
        s = shapes
        inputs = tiny.processor(images=random_image(hw, seed), text=PROMPT, return_tensors="pt")
        layout = compute_layout(hw, tiny.config.image_grid_pinpoints, s.crop_size, s.patch_grid, s.partitions,
                                s.newline_slots)
        pv = inputs["pixel_values"][0]  # [n, 3, H, W]
        pv = torch.cat([pv, torch.zeros(s.partitions - pv.shape[0], *pv.shape[1:])])  # [P, 3, H, W]
        feeds = {"pixel_values": pv.numpy(), **layout.feeds()}

        ids = inputs["input_ids"][0].tolist()
        image_id = tiny.config.image_token_id
        first = ids.index(image_id)
        before, after = ids[:first], [t for t in ids[first:] if t != image_id]
        t1, t2 = s.text_slots_before_image, s.text_slots_after_image
        assert len(before) <= t1 and len(after) <= t2, "PROMPT does not fit the recipe's text slots"
        text_ids = torch.zeros(t1 + t2, dtype=torch.int64)
        text_valid = torch.zeros(t1 + t2)
        text_ids[: len(before)] = torch.tensor(before)
        text_valid[: len(before)] = 1.0
        text_ids[t1 : t1 + len(after)] = torch.tensor(after)
        text_valid[t1 : t1 + len(after)] = 1.0
        return TinyCase(hw, inputs, layout, pv, feeds, text_ids, text_valid, len(before), len(after))

    return make


@pytest.fixture(scope="session")
def tiny_bundles(tmp_path_factory, tiny, tiny_recipe):
    """{budget: bundle dir} for the tiny twin exported at budgets 0.2 and 1.0 (read-only for tests)."""
    from edgeprune.export import export_bundle

    root = tmp_path_factory.mktemp("bundles")
    return {b: export_bundle("llava-next-tiny", root / f"tiny-{b}", tiny_recipe(b), loaded=tiny) for b in (0.2, 1.0)}


# `make mutants`: the same examples on every run (reproducible scores) and no shrinking (a killed mutant
# needs one failing example, not the smallest).
from hypothesis import Phase, settings  # noqa: E402

settings.register_profile("mutation", derandomize=True, database=None, phases=[Phase.explicit, Phase.generate])  # tests/examples.py caps the count
