"""The GPU backends' language-model contract (one step graph, engine.Engine with Backend.lm == "step") run here
on the CPU provider, against the CPU backend's prefill + decode graphs on the tiny twin.

Both graphs come from the same torch modules (edgeprune/graphs.py), but the step graph attends over the cache
buffers with every slot masked during prefill and is one session for prefill and decode: a wrong slot order,
position, mask or binding in the step path changes the greedy tokens. The CPU backend's tokens are themselves
checked against transformers' generate (tests/test_cli_run.py, tests/test_reference_stream.py).
"""

from __future__ import annotations

import numpy as np
import pytest

from tiny_inputs import random_image

PROMPT = "What is on the table?"


@pytest.fixture(scope="module")
def image_paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    paths = {}
    for name, hw in {"photo": (480, 640), "tall": (300, 90)}.items():
        paths[name] = root / f"{name}.png"
        random_image(hw, seed=5).save(paths[name])
    return paths


def _tokens(bundle, image, count=12):
    from edgeprune_runtime.generator import Generator, GeneratorParams

    gen = Generator(bundle, GeneratorParams(max_new_tokens=count, ignore_eos=True), image, PROMPT)
    tokens, logits = [], []
    for _ in range(count):
        tokens.append(gen.generate_next_token())
        logits.append(gen.logits.copy())  # [vocab] the token was chosen from
    return tokens, np.stack(logits), gen


@pytest.mark.parametrize("budget", [1.0, 0.2])
@pytest.mark.parametrize("image", ["photo", "tall"])
def test_step_contract_gives_the_prefill_decode_tokens(tiny_bundles, image_paths, budget, image):
    from edgeprune_runtime.backends.select import CPU_STEP
    from edgeprune_runtime.engine import Engine
    from edgeprune_runtime.generator import LoadedBundle

    bundle = LoadedBundle(tiny_bundles[budget], backend="cpu")
    expected, expected_logits, reference = _tokens(bundle, image_paths[image])
    bundle.engine = Engine(bundle.manifest, CPU_STEP)
    assert bundle.engine.step is not None and bundle.engine.prefill is None
    got, logits, gen = _tokens(bundle, image_paths[image])
    assert got == expected
    # every step's logits, not only their argmax (the tiny twin's greedy answers repeat a token or two)
    np.testing.assert_allclose(logits, expected_logits, rtol=1e-4, atol=1e-4)
    assert np.ptp(expected_logits, axis=0).max() > 1e-3  # the steps differ: a stale cache would show
    n = gen.cache.length
    assert n == reference.cache.length
    for mine, theirs in zip(gen.cache.keys + gen.cache.values, reference.cache.keys + reference.cache.values):
        np.testing.assert_allclose(mine[:, :n], theirs[:, :n], rtol=1e-4, atol=1e-4)


def test_engine_wrapper_paths_load_through_the_same_code(tiny_bundles, image_paths):
    """The trt backend's Engine path (sessions from Backend.engines, no shared weight map, the step contract), with
    the ONNX graphs the engines are built from standing in for their EPContext wrappers on the CPU provider."""
    import dataclasses

    from edgeprune_runtime.backends.select import CPU_STEP
    from edgeprune_runtime.engine import Engine
    from edgeprune_runtime.generator import LoadedBundle

    bundle = LoadedBundle(tiny_bundles[0.2], backend="cpu")
    expected = _tokens(bundle, image_paths["photo"])[0]
    graphs = bundle.manifest.graphs
    stand_in = dataclasses.replace(CPU_STEP, engines={"vision": graphs["vision"]["file"], "lm": graphs["step"]["file"]})
    bundle.engine = Engine(bundle.manifest, stand_in)
    assert bundle.engine.weights is None and bundle.engine.step is not None
    assert _tokens(bundle, image_paths["photo"])[0] == expected
