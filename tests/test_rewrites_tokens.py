"""In-LLM visual-token dropping (--drop-visual-after) and SkipDecode (--skip-decode) on the tiny twin.

The reference is edgeprune.rewrites.reference: transformers' own decoder layers run on the whole sequence
each step, with the dropped visual tokens absent from the later layers and skipped layers absent for the
late tokens; nothing of graphs.py, the static slots or the runtime's per-layer cache is in it. The bundle
must give the same greedy tokens and logits. Other checks: each graph's shapes are what the manifest says,
a dropped token is never attended to after its layer (masked rows and cache slots changed, outputs not),
the step graph (TensorRT's) agrees with the prefill graph, and the rewritten bundles build with TensorRT.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
import torch

from edgeprune_runtime.manifest import SkipDecode
from tiny_inputs import random_image

QUESTION = "What is in the picture?"
VARIANTS = {
    "drop": dict(drop_visual_after="0:20"),  # FastV: 20 of the visual slots go on after layer 0
    "yopo": dict(drop_visual_after="0:0"),  # the visual tokens leave the sequence after layer 0
    "skip-decode": dict(skip_decode="2:1"),  # from the third decode step on, layer 0 is skipped
    "both": dict(drop_visual_after="0:12", skip_decode="1:1"),
}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, tiny, tiny_recipe):
    """name -> bundle of the tiny twin at budget 1.0 (so the bundle's sequence is transformers')."""
    from edgeprune.export import export_bundle

    root = tmp_path_factory.mktemp("tokens")
    return {name: export_bundle("llava-next-tiny", root / name, tiny_recipe(1.0).override(**flags), loaded=tiny)
            for name, flags in VARIANTS.items()}


def _manifest(bundle) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def _drops(m: dict) -> dict[int, int]:
    v = m["shapes"]["layer_visual_slots"]
    return {i: v[i + 1] for i in range(len(v) - 1) if v[i + 1] < v[i]}


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("seed,hw", [(3, (150, 230)), (8, (224, 100))])
def test_bundle_generates_as_the_torch_reference(tiny, bundles, name, seed, hw):
    from edgeprune.rewrites.reference import generate
    from edgeprune_runtime import Bundle

    m = _manifest(bundles[name])
    schedule = SkipDecode(tuple(tuple(s) for s in m.get("skip_decode", [])))
    image, steps = random_image(hw, seed=seed), 8
    with Bundle(bundles[name]) as bundle:
        hf = tiny.processor(images=image, text=m["prompt_template"].replace("{prompt}", QUESTION), return_tensors="pt")
        ref = generate(tiny.model, hf, steps, _drops(m), schedule.skip_at)
        with bundle.generator(image, QUESTION, max_new_tokens=steps) as gen:
            for step in range(steps):
                gen.generate_next_token()
                np.testing.assert_allclose(gen.logits, ref.logits[step].numpy(), atol=1e-4, rtol=0)
            assert list(gen.token_ids) == ref.tokens
    # the rewrite did something: the unrewritten model answers otherwise
    plain = generate(tiny.model, hf, steps)
    assert not all(torch.allclose(a, b, atol=1e-3) for a, b in zip(plain.logits, ref.logits))


def test_graphs_and_caches_are_sized_as_the_manifest_says(bundles):
    m = _manifest(bundles["both"])
    s = m["shapes"]
    t, v, c = s["text_slots_before_image"] + s["text_slots_after_image"], s["visual_slots"], s["cache_capacity"]
    assert s["layer_visual_slots"] == [v, 12]
    assert [(r["visual_slots"], r["cache_slots"]) for r in m["layers"]["lm"]] == [(v, c), (12, c - v + 12)]
    assert m["skip_decode"] == [[1, 1]] and set(m["graphs"]["decode_skip"]) == {"1"}

    def dims(graph, which):
        g = onnx.load(str(bundles["both"] / "lm" / f"{graph}.onnx"), load_external_data=False).graph
        return {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim] for i in getattr(g, which)}

    prefill = dims("prefill", "output")
    assert prefill["key_0"][1] == t + v and prefill["key_1"][1] == prefill["slot_valid_1"][0] == t + 12
    assert "slot_valid_0" not in prefill
    decode = dims("decode", "input")
    assert decode["past_key_1"][1] == decode["cache_valid_1"][0] == c - v + 12 and decode["cache_valid_0"] == [c]
    skip = dims("decode_skip1", "input")
    assert sorted(skip) == ["cache_valid_1", "past_key_1", "past_value_1", "position", "token_id"]
    # SkipDecode's graph holds no weights of its own: every LM tensor is in lm.weights, stored once
    index = json.loads((bundles["both"] / "lm" / "lm.weights.json").read_text())["tensors"]
    assert len({t["name"] for t in index}) == len(index)
    skip_model = onnx.load(str(bundles["both"] / "lm" / "decode_skip1.onnx"), load_external_data=False)
    assert {i.name for i in skip_model.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL} <= \
        {t["name"] for t in index}
    # the prefill physically shrinks: fewer FLOPs in the report
    costs = m["costs"]
    assert costs["after"]["flops"]["prefill"] < costs["before"]["flops"]["prefill"]
    assert costs["after"]["kv_cache_bytes"] < costs["before"]["kv_cache_bytes"]


def test_the_runtime_cache_holds_only_the_kept_tokens_per_layer(bundles):
    from edgeprune_runtime.generator import Generator, GeneratorParams, LoadedBundle

    g = Generator(LoadedBundle(bundles["both"]), GeneratorParams(max_new_tokens=4), random_image((150, 230), seed=3),
                  QUESTION)
    n, visual = g.prompt_slots, g.visual_tokens
    assert visual > 12 and g.cache.lengths == [n, n - visual + 12]
    for _ in range(4):
        g.generate_next_token()
    # three decode steps: the first ran both layers, the next two (position >= 1) skipped layer 0
    assert g.cache.lengths == [n + 1, n - visual + 12 + 3] and g.cache.position == n + 3
    for valid, length in zip(g.cache.valid, g.cache.lengths):
        assert valid.sum() == length and valid[:length].all()


def test_a_dropped_token_is_never_attended_after_its_layer(tiny, tiny_case, bundles):
    """Step graph (masking): noise on the rows it dropped after layer 0 changes neither the logits nor the
    kept rows' K/V of layer 1. Decode graph: garbage in layer 1's invalid cache slots changes nothing."""
    from edgeprune.graphs import DecodeGraph, StepGraph
    from edgeprune_runtime.manifest import load_manifest

    s = load_manifest(bundles["drop"], verify_hashes=False).shapes
    case = tiny_case((150, 230), s)
    t1, v = s.text_slots_before_image, s.visual_slots
    step = StepGraph(tiny.model, s, per_layer_valid=True).eval()
    torch.manual_seed(0)
    embeds = torch.randn(v, s.hidden_size) * 0.05
    slot_valid = torch.cat([case.text_valid[:t1], torch.ones(v), case.text_valid[t1:]])
    args = (torch.cat([case.text_ids[:t1], torch.zeros(v, dtype=torch.int64), case.text_ids[t1:]]),
            torch.cat([torch.zeros(t1, s.hidden_size), embeds, torch.zeros(s.text_slots_after_image, s.hidden_size)]),
            torch.cat([torch.zeros(t1), torch.ones(v), torch.zeros(s.text_slots_after_image)]), slot_valid,
            torch.zeros(1, dtype=torch.int64),
            *[torch.zeros(s.cache_slots_at(i)) for i in range(2)],
            *[torch.zeros(s.kv_heads[i], s.cache_slots_at(i), s.head_dim) for i in range(2) for _ in range(2)])
    with torch.no_grad():
        logits, k0, v0, k1, v1, keep1 = step(*args)
    assert int(keep1[t1:t1 + v].sum()) == 20 and torch.equal(keep1[:t1], slot_valid[:t1])
    dropped = (slot_valid - keep1) > 0  # [T]

    def noise(module, inputs):
        x = inputs[0].clone()
        x[dropped] += 100.0 * torch.randn(int(dropped.sum()), x.shape[1])
        return (x,)

    handle = step.layers[1].input_layernorm.register_forward_pre_hook(noise)  # layer 1 reads the rows here
    try:
        with torch.no_grad():
            logits2, _, _, k1b, v1b, _ = step(*args)
    finally:
        handle.remove()
    kept = keep1 > 0
    torch.testing.assert_close(logits2, logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(k1b[:, kept], k1[:, kept], atol=1e-5, rtol=0)
    assert not torch.allclose(k1b[:, dropped], k1[:, dropped])  # the noise did reach the dropped rows

    decode = DecodeGraph(tiny.model, s, per_layer_valid=True).eval()
    n1 = int(keep1.sum())
    valid = [torch.zeros(s.cache_slots_at(i)) for i in range(2)]
    valid[0][: int(slot_valid.sum())] = 1.0
    valid[1][:n1] = 1.0
    past = [torch.randn(s.kv_heads[i], s.cache_slots_at(i), s.head_dim) for i in range(2) for _ in range(2)]
    token = (torch.tensor([5]), torch.tensor([int(slot_valid.sum())]))
    with torch.no_grad():
        clean = decode(*token, *valid, *past)[0]
        for p in past[2:]:
            p[:, n1:] = 1.0e4  # layer 1's slots past its kept tokens
        assert torch.equal(decode(*token, *valid, *past)[0], clean)


def test_step_graph_agrees_with_the_prefill_graph(tiny, tiny_case, bundles):
    """TensorRT's step graph masks where the prefill graph gathers: the same logits and, per layer, the same
    kept K/V rows (in the prefill graph's order)."""
    from edgeprune.graphs import PrefillGraph, StepGraph
    from edgeprune_runtime.manifest import load_manifest

    s = load_manifest(bundles["both"], verify_hashes=False).shapes
    case = tiny_case((150, 230), s)
    t1, t2, v = s.text_slots_before_image, s.text_slots_after_image, s.visual_slots
    torch.manual_seed(1)
    embeds, visual_valid = torch.randn(v, s.hidden_size) * 0.05, (torch.arange(v) < v - 3).float()
    with torch.no_grad():
        p_logits, pk0, pv0, pk1, pv1, p_valid1 = PrefillGraph(tiny.model, s)(case.text_ids, case.text_valid, embeds,
                                                                            visual_valid)
        step = StepGraph(tiny.model, s, per_layer_valid=True)
        out = step(torch.cat([case.text_ids[:t1], torch.zeros(v, dtype=torch.int64), case.text_ids[t1:]]),
                   torch.cat([torch.zeros(t1, s.hidden_size), embeds, torch.zeros(t2, s.hidden_size)]),
                   torch.cat([torch.zeros(t1), torch.ones(v), torch.zeros(t2)]),
                   torch.cat([case.text_valid[:t1], visual_valid, case.text_valid[t1:]]), torch.zeros(1, dtype=torch.int64),
                   *[torch.zeros(s.cache_slots_at(i)) for i in range(2)],
                   *[torch.zeros(s.kv_heads[i], s.cache_slots_at(i), s.head_dim) for i in range(2) for _ in range(2)])
    s_logits, sk0, sv0, sk1, sv1, s_valid1 = out
    torch.testing.assert_close(s_logits, p_logits, atol=1e-5, rtol=0)
    def rows(k, valid):  # layer 1's kept K rows [n, Hkv * Dh], in one order (the rows differ in their first value)
        r = k[:, valid > 0].transpose(0, 1).reshape(int(valid.sum()), -1)
        return r[torch.argsort(r[:, 0])]

    assert int(s_valid1.sum()) == int(p_valid1.sum()) > s.text_slots_before_image
    torch.testing.assert_close(rows(sk1, s_valid1), rows(pk1, p_valid1), atol=1e-5, rtol=0)


def test_info_shows_the_rewrites(bundles):
    from edgeprune.bundle_info import bundle_info

    info = bundle_info(bundles["both"])
    r = info["rewrites"]
    s = info["shapes"]
    assert r["skip_decode"] == [[1, 1]]
    assert [(layer["visual_slots"], layer["runs"]) for layer in r["lm_layers"]] == [(s["visual_slots"], True), (12, True)]
    assert r["lm_layers"][0]["heads_kept"] == [0, 1, 2, 3]


def test_a_bundle_with_a_non_monotone_schedule_is_refused(bundles, tmp_path):
    import shutil

    from edgeprune_runtime.errors import RuntimeStatusError, Status
    from edgeprune_runtime.manifest import load_manifest

    bundle = tmp_path / "b"
    shutil.copytree(bundles["both"], bundle)
    m = _manifest(bundle)
    m["skip_decode"] = [[4, 1], [2, 1]]
    (bundle / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(RuntimeStatusError) as e:
        load_manifest(bundle)
    assert e.value.status == Status.BUNDLE_INVALID and "not monotone" in e.value.message
    m["skip_decode"] = [[1, 1]]
    m["shapes"]["layer_visual_slots"] = [12, m["shapes"]["visual_slots"]]
    (bundle / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(RuntimeStatusError, match="layer_visual_slots"):
        load_manifest(bundle)


def test_compare_checks_every_graph_of_a_rewritten_bundle(bundles, tmp_path):
    from edgeprune.compare import compare_bundle
    from edgeprune.sample_image import write_sample_image

    image = write_sample_image(tmp_path / "s.png", 200, 150)
    report = compare_bundle(bundles["both"], str(image))
    assert report and {r.stage for r in report.rows} == {"vision", "prefill", "decode", "decode-skip1", "step"}
    assert any(r.output == "slot_valid_1" for r in report.rows)


@pytest.mark.tensorrt
@pytest.mark.parametrize("name", ["both", "yopo"])
def test_rewritten_bundle_checks_and_builds_with_tensorrt(bundles, name):
    pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX is not installed (pip install 'edgeprune[trt-rtx]')")
    import shutil
    import tempfile
    from pathlib import Path

    from edgeprune.trt.build import build_bundle
    from edgeprune.trt.check import check_bundle
    from edgeprune.trt.targets import get_target

    with tempfile.TemporaryDirectory() as tmp:  # the module's bundles stay as exported
        bundle = Path(shutil.copytree(bundles[name], f"{tmp}/b"))
        report = check_bundle(bundle, get_target("rtx"))
        assert report
        if name == "both":  # SkipDecode's graph goes through the real parser too
            assert any(f.graph == "decode_skip1" and "parsed" in f.message for f in report.findings)
        entry = build_bundle(bundle, get_target("rtx"))
        assert set(entry["engines"]) == {"vision", "lm"}
        assert all((bundle / e["file"]).stat().st_size > 0 for e in entry["engines"].values())


def test_pyramid_stages_and_a_two_step_schedule_on_a_deeper_twin(tiny, tiny_recipe, tmp_path):
    """Several drop stages (PyramidDrop: KEEP decreasing) and a SkipDecode schedule with two steps need more than
    the twin's two layers: a four-layer copy (layers 2, 3 = fresh copies of 0, 1 with other weights)."""
    import dataclasses

    from edgeprune.export import export_bundle
    from edgeprune.rewrites.reference import generate
    from edgeprune_runtime import Bundle

    model = copy.deepcopy(tiny.model)
    layers = model.model.language_model.layers
    torch.manual_seed(4)
    for source in (0, 1):
        extra = copy.deepcopy(layers[source])
        with torch.no_grad():
            for p in extra.parameters():
                p.mul_(1.0 + 0.3 * torch.randn_like(p))
        layers.append(extra)
    for i, layer in enumerate(layers):
        layer.layer_idx = layer.self_attn.layer_idx = i
    model.config.text_config.num_hidden_layers = model.model.language_model.config.num_hidden_layers = 4
    deeper = dataclasses.replace(tiny, model=model)
    recipe = tiny_recipe(1.0).override(drop_visual_after="0:60,2:10", skip_decode="1:1,3:2")
    bundle = export_bundle("llava-next-tiny", tmp_path / "b", recipe, loaded=deeper)
    m = _manifest(bundle)
    v = m["shapes"]["visual_slots"]
    assert m["shapes"]["layer_visual_slots"] == [v, 60, 60, 10] and set(m["graphs"]["decode_skip"]) == {"1", "2"}
    image, steps = random_image((150, 230), seed=3), 7
    with Bundle(bundle) as b:
        hf = tiny.processor(images=image, text=m["prompt_template"].replace("{prompt}", QUESTION), return_tensors="pt")
        ref = generate(model, hf, steps, {0: 60, 2: 10}, SkipDecode(((1, 1), (3, 2))).skip_at)
        assert [len(k) for k in ref.kept_visual] == [60, 10] and set(ref.kept_visual[1]) <= set(ref.kept_visual[0])
        with b.generator(image, QUESTION, max_new_tokens=steps) as gen:
            for step in range(steps):
                gen.generate_next_token()
                np.testing.assert_allclose(gen.logits, ref.logits[step].numpy(), atol=1e-4, rtol=0)
            assert list(gen.token_ids) == ref.tokens
