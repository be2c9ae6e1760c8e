"""Rewrites (edgeprune/rewrites/) on the tiny twin: LM head pruning by KV group and static layer skipping.

References come from elsewhere than the pass under test:
  - head pruning == the unpruned model with the pruned heads' o_proj input columns zeroed (a pruned
    head's output never reaches the residual stream; the KV groups it shares are whole, so nothing else moves);
  - layer skipping == the unpruned model with the skipped layers' outputs replaced by their inputs (hooks);
  - the bundle == transformers' own `generate` on the rewritten model (greedy tokens and logits);
  - FLOPs == torch's FlopCounterMode on the exported graph modules; KV bytes == the decode graph's inputs.
The session's `tiny` model is never modified: every test rewrites a deep copy.
"""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import onnx
import pytest
import torch

from edgeprune.errors import ConfigError
from edgeprune.rewrites import lm_kv_heads, lm_layers
from edgeprune.rewrites.heads import choose_kv_groups, prune_lm_heads, prune_vision_heads
from edgeprune.rewrites.layers import least_influential, skip_lm_layers, skip_vision_layers
from edgeprune.rewrites.plan import apply_record, identity_record, plan_lm, record_from_dicts
from tiny_inputs import random_image

QUESTION = "What is in the picture?"


@pytest.fixture()
def model(tiny):
    return copy.deepcopy(tiny.model)


@pytest.fixture(scope="module")
def inputs(tiny):
    text = "USER: <image>\nWhat is in the picture? ASSISTANT:"
    return tiny.processor(images=random_image((150, 230), seed=5), text=text, return_tensors="pt")


@pytest.fixture(scope="module")
def stats(tiny):
    from edgeprune.calibrate import builtin_samples, calibrate

    return calibrate(tiny, builtin_samples()[:2])


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits[0]


# --- head pruning -----------------------------------------------------------------------------


@pytest.mark.parametrize("kept", [[[1], [0]], [[0], [0, 1]], [[1], [1]]])
def test_pruned_heads_equal_zeroed_heads_in_the_unpruned_model(tiny, model, inputs, kept):
    g = tiny.config.text_config.num_attention_heads // tiny.config.text_config.num_key_value_heads
    dh = lm_layers(tiny.model)[0].self_attn.head_dim
    masked = copy.deepcopy(tiny.model)
    for layer, keep in zip(lm_layers(masked), kept):
        heads = layer.self_attn.q_proj.out_features // dh
        for h in range(heads):
            if h // g not in keep:
                with torch.no_grad():
                    layer.self_attn.o_proj.weight[:, h * dh:(h + 1) * dh] = 0.0
    report = prune_lm_heads(model, kept)
    assert report
    torch.testing.assert_close(logits(model, inputs), logits(masked, inputs), atol=2e-5, rtol=1e-4)
    assert not torch.allclose(logits(model, inputs), logits(tiny.model, inputs), atol=1e-3)  # it did change


def test_head_pruning_keeps_whole_kv_groups_and_shrinks_the_modules(tiny, model):
    cfg = tiny.config.text_config
    g, d = cfg.num_attention_heads // cfg.num_key_value_heads, cfg.hidden_size
    dh = lm_layers(model)[0].self_attn.head_dim
    prune_lm_heads(model, [[1], [0, 1]])
    a0, a1 = lm_layers(model)[0].self_attn, lm_layers(model)[1].self_attn
    assert tuple(a0.q_proj.weight.shape) == (g * dh, d) and tuple(a0.k_proj.weight.shape) == (dh, d)
    assert tuple(a0.v_proj.weight.shape) == (dh, d) and tuple(a0.o_proj.weight.shape) == (d, g * dh)
    assert a0.num_key_value_groups == g  # G query heads still share each KV head
    # layer 0 kept KV group 1: its K rows are the original KV head 1, its Q rows the heads 2..3
    orig = lm_layers(tiny.model)[0].self_attn
    assert torch.equal(a0.k_proj.weight, orig.k_proj.weight[dh:2 * dh])
    assert torch.equal(a0.q_proj.weight, orig.q_proj.weight[g * dh:2 * g * dh])
    assert a1.k_proj is lm_layers(model)[1].self_attn.k_proj and a1.k_proj.out_features == 2 * dh  # untouched
    assert lm_kv_heads(model) == (1, 2)


def test_pruning_zero_heads_is_a_no_op(tiny, model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [layer.self_attn.q_proj for layer in lm_layers(model)]
    report = prune_lm_heads(model, [[0, 1], [1, 0]])
    assert not report and report.changes == []
    assert [layer.self_attn.q_proj for layer in lm_layers(model)] == modules
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert choose_kv_groups([[1.0, 2.0, 3.0, 4.0]] * 2, 2, 0.0) == [[0, 1], [0, 1]]
    assert choose_kv_groups([[1.0, 2.0, 3.0, 4.0]] * 2, 2, 0.4) == [[0, 1], [0, 1]]  # floor(0.4 * 2) = 0


def test_pruning_every_head_is_refused(model):
    with pytest.raises(ConfigError, match="every KV group of language model layer 0"):
        prune_lm_heads(model, [[], [0]])
    with pytest.raises(ConfigError, match=r"in \[0, 1\)"):
        choose_kv_groups([[1.0] * 4] * 2, 2, 1.0)
    with pytest.raises(ConfigError, match=r"in \[0, 1\)"):
        choose_kv_groups([[1.0] * 4] * 2, 2, -0.1)
    with pytest.raises(ConfigError, match="cannot keep"):
        prune_lm_heads(model, [[2], [0]])
    with pytest.raises(ConfigError, match="names 1 layers"):
        prune_lm_heads(model, [[0]])


def test_choose_kv_groups_drops_the_lowest_scoring_groups():
    # 4 KV groups of 2 heads; group sums 3, 11, 1, 7 -> ratio 0.5 drops groups 2 and 0
    scores = [[1.0, 2.0, 5.0, 6.0, 0.5, 0.5, 3.0, 4.0]]
    assert choose_kv_groups(scores, 2, 0.5) == [[1, 3]]
    assert choose_kv_groups(scores, 2, 0.75) == [[1]]
    assert choose_kv_groups([[1.0, 1.0, 1.0, 1.0]], 2, 0.5) == [[0]]  # ties keep the lower index


def test_pruned_vision_heads_equal_zeroed_heads_in_the_unpruned_model(tiny, model, inputs):
    kept = [[2, 3], [0], [1, 2, 3]]  # the three CLIP layers up to the feature layer (-2 of 4)
    masked = copy.deepcopy(tiny.model)
    for layer, keep in zip(masked.model.vision_tower.encoder.layers, kept):
        attn = layer.self_attn
        for h in range(attn.num_heads):
            if h not in keep:
                with torch.no_grad():
                    attn.out_proj.weight[:, h * attn.head_dim:(h + 1) * attn.head_dim] = 0.0
    report = prune_vision_heads(model, kept)
    assert report and [layer.self_attn.num_heads for layer in model.model.vision_tower.encoder.layers] == [2, 1, 3, 4]
    a = model.model.vision_tower.encoder.layers[1].self_attn
    assert tuple(a.q_proj.weight.shape) == (a.head_dim, 4 * a.head_dim) and tuple(a.q_proj.bias.shape) == (a.head_dim,)
    torch.testing.assert_close(logits(model, inputs), logits(masked, inputs), atol=2e-5, rtol=1e-4)
    assert not prune_vision_heads(copy.deepcopy(tiny.model), [[0, 1, 2, 3]] * 3)
    with pytest.raises(ConfigError, match="every head of vision tower layer 1"):
        prune_vision_heads(copy.deepcopy(tiny.model), [[0], [], [0]])


def test_folding_pruned_heads_is_the_least_squares_bias(tiny, model):
    """On the calibration request itself, layer 0's attention output with the pruned heads folded into the
    o_proj bias is closer to the unpruned model's than without, and no other scale of that bias does better."""
    from edgeprune.calibrate import Sample, calibrate
    from edgeprune.recipe import RewritesRecipe

    sample = Sample(random_image((150, 230), seed=5), QUESTION)
    stats = calibrate(tiny, [sample])
    record = plan_lm(tiny.model, RewritesRecipe(prune_heads=0.5, fold_pruned_heads=True), lambda: stats)
    assert [len(r.folded_means) for r in record] == [2, 2]
    text = tiny.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}], add_generation_prompt=True)
    hf = tiny.processor(images=sample.image, text=text, return_tensors="pt")

    def attn_out(m):
        seen = []
        hook = lm_layers(m)[0].self_attn.register_forward_hook(lambda mod, a, o: seen.append(o[0][0]))
        with torch.no_grad():
            m(**hf)
        hook.remove()
        return seen[0]  # [T, D]

    reference = attn_out(tiny.model)
    plain = copy.deepcopy(tiny.model)
    apply_record(plain, [dataclasses.replace(r, folded_means=()) for r in record])
    apply_record(model, record)
    assert lm_layers(plain)[0].self_attn.o_proj.bias is None
    bias = lm_layers(model)[0].self_attn.o_proj.bias.detach().clone()
    err = lambda m: float(((attn_out(m) - reference) ** 2).sum())  # noqa: E731
    folded, unfolded = err(model), err(plain)
    assert folded < unfolded
    for scale in (0.9, 1.1):
        with torch.no_grad():
            lm_layers(model)[0].self_attn.o_proj.bias.copy_(bias * scale)
        assert err(model) > folded
    old = json.loads(json.dumps(stats))
    del old["lm"]["head_output_mean"]
    with pytest.raises(ConfigError, match="re-run `edgeprune calibrate`"):
        plan_lm(tiny.model, RewritesRecipe(prune_heads=0.5, fold_pruned_heads=True), lambda: old)


# --- layer skipping -----------------------------------------------------------------------------


def test_skipped_layer_equals_an_identity_layer_in_the_unpruned_model(tiny, model, inputs):
    masked = copy.deepcopy(tiny.model)
    hook = lm_layers(masked)[0].register_forward_hook(
        lambda m, args, kwargs, out: args[0] if args else kwargs["hidden_states"], with_kwargs=True)
    report = skip_lm_layers(model, [0])
    assert report and len(lm_layers(model)) == 1 and model.config.text_config.num_hidden_layers == 1
    assert lm_layers(model)[0].self_attn.layer_idx == 0
    torch.testing.assert_close(logits(model, inputs), logits(masked, inputs), atol=2e-5, rtol=1e-4)
    hook.remove()


def test_skipped_vision_layer_equals_an_identity_layer_in_the_unpruned_model(tiny, model, inputs):
    masked = copy.deepcopy(tiny.model)
    hook = masked.model.vision_tower.encoder.layers[1].register_forward_hook(
        lambda m, args, kwargs, out: args[0] if args else kwargs["hidden_states"], with_kwargs=True)
    report = skip_vision_layers(model, [1])
    assert report and len(model.model.vision_tower.encoder.layers) == 3
    assert model.config.vision_config.num_hidden_layers == 3 and model.config.vision_feature_layer == -2
    torch.testing.assert_close(logits(model, inputs), logits(masked, inputs), atol=2e-5, rtol=1e-4)
    hook.remove()
    fresh = copy.deepcopy(tiny.model)
    assert not skip_vision_layers(fresh, []) and len(fresh.model.vision_tower.encoder.layers) == 4
    with pytest.raises(ConfigError, match="there is no layer 3"):  # layer 3 is past the feature layer (-2)
        skip_vision_layers(fresh, [3])
    with pytest.raises(ConfigError, match="skip all 3 layers of the vision tower"):
        skip_vision_layers(fresh, [0, 1, 2])


def test_skipping_zero_layers_is_a_no_op_and_all_is_refused(model):
    layers = list(lm_layers(model))
    assert not skip_lm_layers(model, [])
    assert list(lm_layers(model)) == layers
    with pytest.raises(ConfigError, match="skip all 2"):
        skip_lm_layers(model, [0, 1])
    with pytest.raises(ConfigError, match="there is no layer 2"):
        skip_lm_layers(model, [2])
    with pytest.raises(ConfigError, match="twice"):
        skip_lm_layers(model, [0, 0])
    assert least_influential([0.3, 0.1, 0.2], 2) == [1, 2]
    with pytest.raises(ConfigError, match="skip all 3"):
        least_influential([0.3, 0.1, 0.2], 3)


# --- planning from stats; the record ----------------------------------------------------------


def test_plan_from_stats_and_stats_from_another_model(tiny, stats):
    from edgeprune.recipe import RewritesRecipe

    record = plan_lm(tiny.model, RewritesRecipe(prune_heads=0.5, skip_layers=1), lambda: stats)
    influence = stats["lm"]["block_influence"]
    assert [r.runs for r in record] == [influence[i] != min(influence) for i in range(2)]
    for r, norms in zip(record, stats["lm"]["head_output_norm"]):
        group_norm = [norms[0] + norms[1], norms[2] + norms[3]]
        assert r.kv_groups_kept == (int(np.argmax(group_norm)),)
        assert r.heads_kept == tuple(2 * r.kv_groups_kept[0] + j for j in range(2))
    assert plan_lm(tiny.model, RewritesRecipe(), lambda: pytest.fail("no stats needed")) == identity_record(tiny.model)
    other = json.loads(json.dumps(stats))
    other["lm"]["head_output_norm"] = [row[:2] for row in other["lm"]["head_output_norm"]]
    with pytest.raises(ConfigError, match="from another model"):
        plan_lm(tiny.model, RewritesRecipe(prune_heads=0.5), lambda: other)
    other = json.loads(json.dumps(stats))
    other["lm"]["num_layers"] = 3
    with pytest.raises(ConfigError, match="from another model"):
        plan_lm(tiny.model, RewritesRecipe(skip_layers=1), lambda: other)
    with pytest.raises(ConfigError, match="no layer 7"):
        plan_lm(tiny.model, RewritesRecipe(skip_layer_indices=(7,)), lambda: stats)


def test_plan_vision_from_stats(tiny, stats):
    from edgeprune.recipe import RewritesRecipe
    from edgeprune.rewrites.plan import identity_vision_record, plan_vision

    record = plan_vision(tiny.model, RewritesRecipe(prune_vision_heads=0.5), lambda: stats)
    assert len(record) == 3  # CLIP layers up to the feature layer only
    for r, norms in zip(record, stats["vision"]["head_output_norm"]):
        assert r.heads_kept == tuple(sorted(np.argsort(norms, kind="stable")[2:].tolist()))
    assert plan_vision(tiny.model, RewritesRecipe(), lambda: pytest.fail("no stats needed")) == \
        identity_vision_record(tiny.model)
    influence = stats["vision"]["block_influence"][:3]
    skipped = plan_vision(tiny.model, RewritesRecipe(skip_vision_layers=1), lambda: stats)
    assert [r.runs for r in skipped] == [v != min(influence) for v in influence]
    other = json.loads(json.dumps(stats))
    other["vision"]["head_output_norm"] = [row[:3] for row in other["vision"]["head_output_norm"]]
    with pytest.raises(ConfigError, match="from another model"):
        plan_vision(tiny.model, RewritesRecipe(prune_vision_heads=0.5), lambda: other)


def test_record_round_trips_and_refuses_another_model(tiny, model):
    from edgeprune.rewrites.plan import LMLayer

    record = [LMLayer(0, True, (1,), (2, 3)), LMLayer(1, False, (0, 1), (0, 1, 2, 3))]
    assert record_from_dicts(json.loads(json.dumps([r.to_dict() for r in record])), "m") == record
    folded = [dataclasses.replace(record[0], folded_means=((0, (0.5, -1.25)),)), record[1]]
    assert record_from_dicts(json.loads(json.dumps([r.to_dict() for r in folded])), "m") == folded
    reports = apply_record(model, record)
    assert [bool(r) for r in reports] == [True, True] and lm_kv_heads(model) == (1,)
    with pytest.raises(ConfigError, match="describes 1 language-model layers"):
        apply_record(copy.deepcopy(tiny.model), record[:1])
    with pytest.raises(ConfigError, match="malformed"):
        record_from_dicts([{"source_layer": 0}], "m")


# --- recipe and stats files -------------------------------------------------------------------


def test_recipe_rewrites_table_is_typed(tmp_path):
    from edgeprune.recipe import load_recipe

    good = tmp_path / "r.toml"
    good.write_text('[rewrites]\nprune_heads = 0.25\nskip_layer_indices = [1]\nhead_criterion = "visual"\n')
    r = load_recipe(good).rewrites
    assert (r.prune_heads, r.skip_layer_indices, r.head_criterion, r.active()) == (0.25, (1,), "visual", True)
    assert not load_recipe(None).rewrites.active()
    for text, message in [("prune_heads = 1", r"in \[0, 1\)"), ("prune_vision_heads = -0.1", "prune_vision_heads"),
                          ("skip_layer_indices = 1", "list of integers"), ("fold_pruned_heads = 1", "true or false"),
                          ("skip_layers = -1", ">= 0"), ("skip_layer = 1", "Did you mean 'skip_layers'"),
                          ("head_criterion = 'norm'", "output-norm"),
                          ("skip_layers = 1\nskip_layer_indices = [0]", "not both"),
                          ("skip_vision_layers = 1\nskip_vision_layer_indices = [0]", "not both"),
                          ("skip_vision_layers = -2", "skip_vision_layers")]:
        good.write_text(f"[rewrites]\n{text}\n")
        with pytest.raises(ConfigError, match=message):
            load_recipe(good)
    flagged = load_recipe(None).override(skip_layer_indices=(0,)).override(skip_layers=1).rewrites
    assert (flagged.skip_layers, flagged.skip_layer_indices) == (1, ())


def test_calibration_stats_match_transformers_outputs(tiny, inputs):
    """One request: the hooks' statistics against transformers' own output_attentions / output_hidden_states."""
    from PIL import Image  # noqa: F401  (the processor takes PIL images)

    from edgeprune.calibrate import Sample, calibrate

    image = random_image((150, 230), seed=5)
    stats = calibrate(tiny, [Sample(image, QUESTION)])
    text = tiny.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}], add_generation_prompt=True)
    hf = tiny.processor(images=image, text=text, return_tensors="pt")
    with torch.no_grad():
        out = tiny.model(**hf, output_attentions=True, output_hidden_states=True)
    visual = hf["input_ids"][0] == tiny.config.image_token_id
    for i, att in enumerate(out.attentions):  # [1, H, T, T]
        np.testing.assert_allclose(stats["lm"]["head_first_token_mass"][i], att[0, :, 1:, 0].mean(-1).numpy(), rtol=1e-5)
        last = att[0, :, -1][:, visual].mean(0).sum()
        np.testing.assert_allclose(stats["lm"]["last_text_visual_mass"][i], float(last), rtol=1e-5)
    h = out.hidden_states  # [0] embeddings ... [L] after the final norm: layer 0's in/out are [0], [1]
    cos = torch.nn.functional.cosine_similarity(h[0][0], h[1][0], dim=-1)
    np.testing.assert_allclose(stats["lm"]["block_influence"][0], float((1 - cos).mean()), rtol=1e-5)
    assert stats["samples"] == 1 and len(stats["vision"]["head_output_norm"]) == tiny.config.vision_config.num_hidden_layers


def test_stats_files_are_checked(tmp_path, stats):
    from edgeprune.calibrate import load_stats, write_heatmap, write_stats

    path = write_stats(stats, tmp_path / "s.json")
    assert load_stats(path)["lm"]["num_layers"] == 2
    png = write_heatmap(stats, tmp_path / "s.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not list(tmp_path.glob(".*"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_stats(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_stats(tmp_path / "bad.json")
    (tmp_path / "bad.json").write_text('{"format": "x"}')
    with pytest.raises(ConfigError, match="not an edgeprune calibration file"):
        load_stats(tmp_path / "bad.json")
    broken = json.loads(json.dumps(stats))
    broken["lm"]["block_influence"] = [0.1]
    (tmp_path / "bad.json").write_text(json.dumps(broken))
    with pytest.raises(ConfigError, match="lm.block_influence"):
        load_stats(tmp_path / "bad.json")
    broken = json.loads(json.dumps(stats))
    broken["vision"]["head_output_norm"][0][0] = "x"
    (tmp_path / "bad.json").write_text(json.dumps(broken))
    with pytest.raises(ConfigError, match="vision.head_output_norm"):
        load_stats(tmp_path / "bad.json")


# --- exported bundles ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rewritten(tmp_path_factory, tiny, tiny_recipe):
    """(name -> bundle) for the tiny twin at budget 1.0: heads pruned (layer 0 KV group 1 kept), layer 1 skipped,
    both, and no rewrite at all."""
    from edgeprune.export import export_bundle

    root = tmp_path_factory.mktemp("rewritten")
    base = tiny_recipe(1.0)
    stats_file = root / "stats.json"
    from edgeprune.calibrate import builtin_samples, calibrate, write_stats

    write_stats(calibrate(tiny, builtin_samples()[:2]), stats_file)
    variants = {"heads": dict(prune_heads=0.5, stats=str(stats_file)), "layers": dict(skip_layer_indices=(1,)),
                "both": dict(prune_heads=0.5, skip_layer_indices=(0,), stats=str(stats_file)),
                "vision": dict(prune_vision_heads=0.5, stats=str(stats_file)),
                "fold": dict(prune_heads=0.5, fold_pruned_heads=True, stats=str(stats_file)),
                "vision-skip": dict(skip_vision_layer_indices=(0,), prune_vision_heads=0.5, stats=str(stats_file)),
                "none": dict(prune_heads=0.0, skip_layers=0)}
    return {name: export_bundle("llava-next-tiny", root / name, base.override(**flags), loaded=tiny)
            for name, flags in variants.items()}


def _proj_weights(bundle, graph="decode") -> dict[str, list[list[int]]]:
    """{proj: [initializer shape per layer, in graph order]} of the q/k/v/o MatMuls of an LM graph."""
    m = onnx.load(str(bundle / "lm" / f"{graph}.onnx"), load_external_data=False)
    dims = {i.name: list(i.dims) for i in m.graph.initializer}
    out = {p: [] for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    for node in m.graph.node:
        for p in out:
            if node.op_type == "MatMul" and f"/{p}" in node.name:
                out[p].append(next(dims[x] for x in node.input if x in dims))
    return out


@pytest.mark.parametrize("name", ["heads", "layers", "both"])
def test_graphs_are_physically_smaller_as_the_manifest_says(tiny, rewritten, name):
    m = json.loads((rewritten[name] / "manifest.json").read_text())
    runs = [r for r in m["layers"]["lm"] if r["runs"]]
    s = m["shapes"]
    assert s["num_layers"] == len(runs) and s["kv_heads"] == [len(r["kv_groups_kept"]) for r in runs]
    dh, d = s["head_dim"], s["hidden_size"]
    for graph in ("prefill", "decode", "step"):
        w = _proj_weights(rewritten[name], graph)
        assert w["q_proj"] == [[d, len(r["heads_kept"]) * dh] for r in runs]
        assert w["k_proj"] == w["v_proj"] == [[d, len(r["kv_groups_kept"]) * dh] for r in runs]
        assert w["o_proj"] == [[len(r["heads_kept"]) * dh, d] for r in runs]
    decode = onnx.load(str(rewritten[name] / "lm" / "decode.onnx"), load_external_data=False)
    past = [[d.dim_value for d in i.type.tensor_type.shape.dim] for i in decode.graph.input if i.name.startswith("past_key_")]
    assert past == [[len(r["kv_groups_kept"]), s["cache_capacity"], dh] for r in runs]
    kv_bytes = 2 * sum(int(np.prod(p)) for p in past) * 4
    assert m["costs"]["after"]["kv_cache_bytes"] == kv_bytes < m["costs"]["before"]["kv_cache_bytes"]
    index = json.loads((rewritten[name] / "lm" / "lm.weights.json").read_text())["tensors"]
    pruned = copy.deepcopy(tiny.model)
    apply_record(pruned, record_from_dicts(m["layers"]["lm"], "test"))
    rms = sum(layer.input_layernorm.weight.numel() + layer.post_attention_layernorm.weight.numel()
              for layer in lm_layers(pruned)) + pruned.model.language_model.norm.weight.numel()
    # every LM weight is stored once; ONNX folds the RMSNorm scales into the graph as separate small constants
    stored = sum(int(np.prod(t["shape"])) for t in index)
    assert m["costs"]["after"]["params"]["language_model"] - rms <= stored <= m["costs"]["after"]["params"]["language_model"]


def test_vision_graph_is_physically_smaller_as_the_manifest_says(tiny, rewritten):
    import re

    m = json.loads((rewritten["vision"] / "manifest.json").read_text())
    graph = onnx.load(str(rewritten["vision"] / "vision" / "vision.onnx"), load_external_data=False).graph
    dims = {i.name: list(i.dims) for i in graph.initializer}
    found = {}  # (layer, proj) -> weight shape; v_proj and out_proj appear once per CLIP layer
    for node in graph.node:
        hit = re.fullmatch(r"/layers\.(\d+)/self_attn/(v_proj|out_proj)/MatMul", node.name)
        if hit:
            found[int(hit[1]), hit[2]] = next(dims[x] for x in node.input if x in dims)
    dv = tiny.config.vision_config.hidden_size
    dh = dv // tiny.config.vision_config.num_attention_heads
    for r in m["layers"]["vision"]:
        width = len(r["heads_kept"]) * dh
        assert found[r["source_layer"], "v_proj"] == [dv, width] and found[r["source_layer"], "out_proj"] == [width, dv]
    assert len(found) == 2 * len(m["layers"]["vision"])
    # vision-skip: layer 0 skipped, so graph layer j is the j-th running source layer
    m = json.loads((rewritten["vision-skip"] / "manifest.json").read_text())
    graph = onnx.load(str(rewritten["vision-skip"] / "vision" / "vision.onnx"), load_external_data=False).graph
    dims = {i.name: list(i.dims) for i in graph.initializer}
    out_proj = {}
    for node in graph.node:
        hit = re.fullmatch(r"/layers\.(\d+)/self_attn/out_proj/MatMul", node.name)
        if hit:
            out_proj[int(hit[1])] = next(dims[x] for x in node.input if x in dims)
    runs = [r for r in m["layers"]["vision"] if r["runs"]]
    assert len(runs) == 2 and out_proj == {j: [len(r["heads_kept"]) * dh, dv] for j, r in enumerate(runs)}
    assert m["costs"]["after"]["params"]["vision"] < m["costs"]["before"]["params"]["vision"]
    assert m["costs"]["after"]["flops"]["vision"] < m["costs"]["before"]["flops"]["vision"]


def test_no_rewrite_exports_the_same_graphs_as_before(rewritten, tiny_bundles):
    today = json.loads((tiny_bundles[1.0] / "manifest.json").read_text())
    none = json.loads((rewritten["none"] / "manifest.json").read_text())
    assert none["files"] == today["files"]  # every graph, weight file and tokenizer byte-identical
    assert none["rewrites"] == today["rewrites"] and none["costs"]["before"] == none["costs"]["after"]


@pytest.mark.parametrize("name", ["heads", "layers", "both", "vision", "fold", "vision-skip"])
def test_bundle_reproduces_transformers_generate_of_the_rewritten_model(tiny, rewritten, name):
    from edgeprune_runtime import Bundle

    from edgeprune.rewrites.plan import apply_vision_record, vision_record_from_dicts

    m = json.loads((rewritten[name] / "manifest.json").read_text())
    reference = copy.deepcopy(tiny.model)
    apply_vision_record(reference, vision_record_from_dicts(m["layers"]["vision"], "test"))
    apply_record(reference, record_from_dicts(m["layers"]["lm"], "test"))
    image, steps = random_image((150, 230), seed=3), 8
    with Bundle(rewritten[name]) as bundle:
        text = bundle.manifest["prompt_template"].replace("{prompt}", QUESTION)
        hf = tiny.processor(images=image, text=text, return_tensors="pt")
        with torch.no_grad():
            out = reference.generate(**hf, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                                     output_logits=True, return_dict_in_generate=True)
        with bundle.generator(image, QUESTION, max_new_tokens=steps) as gen:
            for step in range(steps):
                gen.generate_next_token()
                np.testing.assert_allclose(gen.logits, out.logits[step][0].numpy(), atol=1e-4, rtol=0)
            assert list(gen.token_ids) == out.sequences[0, hf["input_ids"].shape[1]:].tolist()


def test_compare_rebuilds_the_rewritten_reference(rewritten, tmp_path):
    from edgeprune.compare import compare_bundle
    from edgeprune.sample_image import write_sample_image

    image = write_sample_image(tmp_path / "s.png", 200, 150)
    report = compare_bundle(rewritten["both"], str(image))
    assert report and {r.stage for r in report.rows} == {"vision", "prefill", "decode", "step"}
    assert sum(r.output.startswith("key_") for r in report.rows) == 1  # one layer runs
    assert compare_bundle(rewritten["vision"], str(image)) and compare_bundle(rewritten["fold"], str(image))
    # a damaged record: compare refuses instead of comparing against the wrong reference
    import shutil

    bundle = tmp_path / "b"
    shutil.copytree(rewritten["both"], bundle)
    m = json.loads((bundle / "manifest.json").read_text())
    m["layers"]["lm"][1]["kv_groups_kept"] = [0, 1]
    m["layers"]["lm"][1]["heads_kept"] = [0, 1, 2, 3]
    (bundle / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ConfigError, match="does not match shapes.kv_heads"):
        compare_bundle(bundle, str(image))


def test_report_flops_match_torch_flop_counter(tiny, rewritten):
    """costs.after.flops of prefill and decode against FlopCounterMode on the exported graph modules."""
    from torch.utils.flop_counter import FlopCounterMode

    from edgeprune.graphs import DecodeGraph, PrefillGraph
    from edgeprune_runtime.manifest import load_manifest

    man = load_manifest(rewritten["both"], verify_hashes=False)
    s, costs = man.shapes, man.data["costs"]["after"]
    model = copy.deepcopy(tiny.model)
    apply_record(model, record_from_dicts(man.data["layers"]["lm"], "test"))
    t = s.text_slots_before_image + s.text_slots_after_image
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        PrefillGraph(model, s)(torch.zeros(t, dtype=torch.int64), torch.ones(t), torch.zeros(s.visual_slots, s.hidden_size),
                               torch.ones(s.visual_slots))
    assert costs["flops"]["prefill"] == counter.get_total_flops()
    past = [torch.zeros(h, s.cache_capacity, s.head_dim) for h in s.kv_heads for _ in range(2)]
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        DecodeGraph(model, s)(torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64),
                              torch.zeros(s.cache_capacity), *past)
    assert costs["flops"]["decode_per_token"] == counter.get_total_flops()
    assert costs["params"]["language_model"] == sum(p.numel() for p in model.model.language_model.parameters()) \
        + model.lm_head.weight.numel()


@pytest.mark.tensorrt
def test_rewritten_bundle_builds_with_tensorrt(rewritten):
    pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX is not installed (pip install 'edgeprune[trt-rtx]')")
    from edgeprune.trt.build import build_bundle
    from edgeprune.trt.targets import get_target

    import shutil
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:  # the module's bundles stay as exported
        bundle = Path(shutil.copytree(rewritten["both"], f"{tmp}/b"))
        entry = build_bundle(bundle, get_target("rtx"))
        assert set(entry["engines"]) == {"vision", "lm"}
        assert all((bundle / e["file"]).stat().st_size > 0 for e in entry["engines"].values())


@pytest.mark.parametrize("vision_keep", ["", "1:0.5"])
def test_report_vision_flops_against_torch_flop_counter(tiny, tiny_recipe, vision_keep):
    """The vision report leaves out only the selection scores (CLS attention recomputed on scored layers,
    strategy arithmetic): it is a lower bound within 10% of FlopCounterMode on the exported module."""
    from torch.utils.flop_counter import FlopCounterMode

    from edgeprune.graphs import VisionGraph
    from edgeprune.plan import plan_shapes
    from edgeprune.rewrites.cost import model_costs
    from edgeprune_runtime.layout import layout_for

    recipe = tiny_recipe(0.2).override(vision_keep=vision_keep)
    model = copy.deepcopy(tiny.model)
    prune_vision_heads(model, [[0, 1], [1, 2, 3], [3]])
    s = plan_shapes(tiny.config, tiny.processor.image_processor, recipe)
    vision = VisionGraph(model, s, recipe).eval()
    feeds = {k: torch.from_numpy(v) for k, v in layout_for((s.crop_size, 2 * s.crop_size),
                                                           tiny.config.image_grid_pinpoints, s).feeds().items()}
    feeds["pixel_values"] = torch.zeros(s.partitions, 3, s.crop_size, s.crop_size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        vision(*[feeds[n] for n in vision.input_names])
    reported = model_costs(model, s, vision_keep=vision.keep)["flops"]["vision"]
    assert 0.9 * counter.get_total_flops() <= reported <= counter.get_total_flops()


def test_rewrite_quality_measures_against_the_unrewritten_model(tiny, stats, tmp_path):
    from edgeprune.calibrate import Sample, write_stats
    from edgeprune.recipe import RewritesRecipe
    from edgeprune.rewrites.quality import rewrite_quality

    path = str(write_stats(stats, tmp_path / "s.json"))
    samples = [Sample(random_image((150, 230), seed=5), QUESTION), Sample(random_image((90, 120), seed=6), "Colors?")]
    report = rewrite_quality(tiny, {"none": RewritesRecipe(), "heads": RewritesRecipe(prune_heads=0.5, stats=path),
                                    "yopo": RewritesRecipe(drop_visual_after="0:0"),
                                    "skip-decode": RewritesRecipe(skip_decode="0:1")}, samples, steps=2)
    none, heads = report["variants"]["none"], report["variants"]["heads"]
    # dropping every visual token after layer 0 moves the prompt's distribution; SkipDecode only later tokens
    assert report["variants"]["yopo"]["kl_mean"] > 0 and report["variants"]["yopo"]["rewrites"] == ["drop_visual_after: 0:0"]
    assert report["variants"]["skip-decode"]["kl_max"] < 1e-9  # the reference recomputes: float noise only
    assert (none["kl_mean"], none["greedy_agreement"], none["rewrites"]) == (0.0, 1.0, [])
    # KL from torch's own kl_div on the first request, against a model pruned here
    model = copy.deepcopy(tiny.model)
    apply_record(model, plan_lm(tiny.model, RewritesRecipe(prune_heads=0.5), lambda: stats))
    text = tiny.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}], add_generation_prompt=True)
    hf = tiny.processor(images=samples[0].image, text=text, return_tensors="pt")
    ref = torch.log_softmax(logits(tiny.model, hf)[-1].double(), -1)
    got = torch.log_softmax(logits(model, hf)[-1].double(), -1)
    kl = float(torch.nn.functional.kl_div(got, ref, log_target=True, reduction="sum"))
    assert heads["kl_max"] >= kl > 0 and heads["kl_mean"] > 0
    from edgeprune.models.llava_next import weights_digest

    assert weights_digest(tiny.model)[0] == tiny.weights_sha256  # the measured model was copied, never edited
