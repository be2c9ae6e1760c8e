"""The static graph modules (eager torch) against transformers' own LLaVA-NeXT on the tiny twin.

Budget 1.0 with newlines kept must reproduce transformers exactly (README "How it works": static shapes with validity masks); at lower
budgets the vision graph must fill exactly K slots with real patches, in sequence order.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeprune.graphs import DecodeGraph, PrefillGraph, VisionGraph, cls_attention, feature_layer_count

# (height, width): 1x2 (square and wide), 2x1 (tall), smaller than one crop, 2x2, 2x2 unpadded to 8 rows
SIZES = [(100, 100), (60, 200), (300, 90), (50, 40), (224, 224), (130, 250)]
ATOL_VISION = 1e-5
ATOL_LOGITS = 1e-4


@pytest.fixture(scope="module")
def graphs(tiny, tiny_shapes, tiny_recipe):
    """budget -> (shapes, VisionGraph, PrefillGraph, DecodeGraph); global-topk selection, newlines auto."""
    made = {}

    def get(budget):
        if budget not in made:
            s = tiny_shapes(budget)
            recipe = tiny_recipe(budget).override(strategy="global-topk")
            made[budget] = (s, VisionGraph(tiny.model, s, recipe).eval(),
                            PrefillGraph(tiny.model, s).eval(), DecodeGraph(tiny.model, s).eval())
        return made[budget]

    return get


def _hf_vision(tiny, case):
    """transformers' vision tower outputs for the case's real partitions (eager attention)."""
    pv = case.hf_inputs["pixel_values"][0]
    with torch.no_grad():
        return tiny.model.model.vision_tower(pv, output_attentions=True, output_hidden_states=True)


def _feature_layer(tiny) -> int:
    return feature_layer_count(tiny.config) - 1  # 0-based index of the layer producing hidden_states[-2]


# (500, 3) and (500, 1): thin images whose unpadded rows have zero columns; transformers keeps their newlines
@pytest.mark.parametrize("hw", [*SIZES, (1, 500), (1, 1), (500, 3), (500, 1)])
def test_vision_full_budget_equals_packed_features(tiny, graphs, tiny_case, hw):
    s, vision, _, _ = graphs(1.0)
    assert s.newline_slots > 0, "budget 1.0 keeps newline slots under newlines='auto'"
    case = tiny_case(hw, s)
    with torch.no_grad():
        embeds, valid, source = vision(*case.args_for(vision))
        ref = tiny.model.model.get_image_features(case.hf_inputs["pixel_values"],
                                                  case.hf_inputs["image_sizes"]).pooler_output[0]
    n = int(valid.sum())
    assert n == ref.shape[0] == int((case.hf_inputs["input_ids"] == tiny.config.image_token_id).sum())
    assert torch.all(valid[:n] == 1) and torch.all(valid[n:] == 0), "valid slots must come first"
    assert torch.all(source[n:] == -1)
    torch.testing.assert_close(embeds[:n], ref, atol=ATOL_VISION, rtol=0)


@pytest.mark.parametrize("hw", SIZES)
def test_vision_pruned_selects_k_real_patches_in_order(tiny, graphs, tiny_case, hw):
    s, vision, _, _ = graphs(0.2)
    case = tiny_case(hw, s)
    with torch.no_grad():
        embeds, valid, source = vision(*case.args_for(vision))
    assert s.newline_slots == 0 and s.visual_slots == s.visual_topk == round(0.2 * s.partitions * 64)
    assert embeds.shape == (s.visual_slots, s.hidden_size)
    assert int(valid.sum()) == s.visual_topk, "exactly K valid slots"
    src = source.numpy()
    patch_valid = case.layout.patch_valid.reshape(-1)
    assert np.all((src >= 0) & (src < patch_valid.size))
    assert np.all(patch_valid[src] == 1), "a padding patch was selected"
    keys = case.layout.patch_key.reshape(-1)[src]
    assert np.all(np.diff(keys) > 0), "sources are not in ascending sequence order"

    # The K patches are the top-K of transformers' own CLS attention (feature layer, summed over heads)
    # among real patches, and each slot holds the projector's output for its source patch.
    hf = _hf_vision(tiny, case)
    real_parts = hf.attentions[0].shape[0]
    scores = np.full((s.partitions, s.patches_per_partition), -np.inf, np.float32)
    scores[:real_parts] = hf.attentions[_feature_layer(tiny)][:, :, 0, 1:].sum(dim=1).numpy()
    scores = np.where(patch_valid.reshape(scores.shape) > 0, scores, -np.inf).reshape(-1)
    expected = set(np.argsort(-scores, kind="stable")[: s.visual_topk].tolist())
    assert set(src.tolist()) == expected
    with torch.no_grad():
        projected = tiny.model.model.multi_modal_projector(hf.hidden_states[-2][:, 1:])  # [n, N, D]
    part, patch = np.divmod(src, s.patches_per_partition)
    torch.testing.assert_close(embeds, projected[part, patch], atol=ATOL_VISION, rtol=0)


def test_vision_keeps_newline_only_for_rows_with_kept_tokens(tiny, tiny_case, tiny_recipe):
    """budget 0.2 with newlines='keep': a newline sits right after the last kept token of its row."""
    from edgeprune.plan import plan_shapes

    recipe = tiny_recipe(0.2).override(newlines="keep")
    s = plan_shapes(tiny.config, tiny.processor.image_processor, recipe)
    assert s.newline_slots == 16 and s.visual_slots == s.visual_topk + 16
    vision = VisionGraph(tiny.model, s, recipe).eval()
    case = tiny_case((224, 224), s)
    with torch.no_grad():
        embeds, valid, source = vision(*case.args_for(vision))
    n_patches = s.partitions * s.patches_per_partition
    src = source[valid > 0].numpy()
    is_newline = src >= n_patches
    rows = case.layout.patch_row.reshape(-1)
    kept_rows = {int(rows[i]) for i in src[~is_newline] if rows[i] >= 0}
    assert sorted(int(i - n_patches) for i in src[is_newline]) == sorted(kept_rows)
    for i in np.flatnonzero(is_newline):  # the token before a newline is a crop patch of the same row
        assert i > 0 and not is_newline[i - 1] and rows[src[i - 1]] == src[i] - n_patches
    newline = tiny.model.model.image_newline.detach()
    torch.testing.assert_close(embeds[valid > 0][torch.from_numpy(is_newline)],
                               newline.expand(int(is_newline.sum()), -1))


@pytest.mark.parametrize("hw", [(100, 100), (300, 90)])
def test_cls_attention_equals_eager_attention_weights(tiny, tiny_shapes, tiny_case, hw):
    case = tiny_case(hw, tiny_shapes(1.0))
    hf = _hf_vision(tiny, case)
    layers = tiny.model.model.vision_tower.encoder.layers
    for index in {0, _feature_layer(tiny)}:
        with torch.no_grad():
            ours = cls_attention(layers[index], hf.hidden_states[index])  # input of layer `index`
        expected = hf.attentions[index][:, :, 0, 1:].sum(dim=1)
        torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-5)


def _prefill(prefill, vision, case):
    with torch.no_grad():
        embeds, valid, _ = vision(*case.args_for(vision))
        out = prefill(case.text_ids, case.text_valid, embeds, valid)
    seq_valid = torch.cat([case.text_valid[: prefill.shapes.text_slots_before_image], valid,
                           case.text_valid[prefill.shapes.text_slots_before_image:]]) > 0
    return out[0], list(out[1:]), seq_valid


@pytest.mark.parametrize("hw", [(100, 100), (60, 200), (300, 90), (224, 224)])
def test_prefill_equals_transformers_forward(tiny, graphs, tiny_case, hw):
    s, vision, prefill, _ = graphs(1.0)
    case = tiny_case(hw, s)
    logits, presents, seq_valid = _prefill(prefill, vision, case)
    with torch.no_grad():
        ref = tiny.model(**case.hf_inputs, use_cache=True)
    assert int(seq_valid.sum()) == case.hf_inputs["input_ids"].shape[1]
    assert logits.shape == (s.vocab_size,)
    torch.testing.assert_close(logits, ref.logits[0, -1], atol=ATOL_LOGITS, rtol=0)
    for i, layer in enumerate(ref.cache.layers):  # K (after RoPE) and V of every real slot
        torch.testing.assert_close(presents[2 * i][:, seq_valid], layer.keys[0], atol=ATOL_LOGITS, rtol=0)
        torch.testing.assert_close(presents[2 * i + 1][:, seq_valid], layer.values[0], atol=ATOL_LOGITS, rtol=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prefill_with_scattered_valid_slots_equals_compacted_sequence(tiny, graphs, seed):
    """Random embeddings in random valid slots == transformers' LM on just the valid slots, in order."""
    s, _, prefill, _ = graphs(0.2)
    g = torch.Generator().manual_seed(seed)
    t = s.text_slots_before_image + s.text_slots_after_image
    text_ids = torch.randint(5, s.vocab_size, (t,), generator=g)
    text_valid = (torch.rand(t, generator=g) < 0.5).float()
    text_valid[0] = 1.0
    visual = torch.randn(s.visual_slots, s.hidden_size, generator=g) * 0.05
    visual_valid = (torch.rand(s.visual_slots, generator=g) < 0.5).float()
    text_valid[-1] = 1.0  # the last slot is real: logits come from it
    t1 = s.text_slots_before_image
    lm = tiny.model.model.language_model
    with torch.no_grad():
        logits = prefill(text_ids, text_valid, visual, visual_valid)[0]
        text = lm.embed_tokens(text_ids)
        seq = torch.cat([text[:t1][text_valid[:t1] > 0], visual[visual_valid > 0], text[t1:][text_valid[t1:] > 0]])
        hidden = lm(inputs_embeds=seq[None]).last_hidden_state
        ref = tiny.model.lm_head(hidden)[0, -1]
    torch.testing.assert_close(logits, ref, atol=ATOL_LOGITS, rtol=0)


@pytest.mark.parametrize("hw", [(100, 100), (300, 90)])
def test_decode_equals_transformers_generate(tiny, graphs, tiny_case, hw):
    """3 greedy steps; the prefill cache sits in shuffled slots and free slots hold noise (masked out)."""
    steps = 3
    s, vision, prefill, decode = graphs(1.0)
    case = tiny_case(hw, s)
    logits, presents, seq_valid = _prefill(prefill, vision, case)
    with torch.no_grad():
        ref = tiny.model.generate(**case.hf_inputs, max_new_tokens=steps + 1, do_sample=False,
                                  output_logits=True, return_dict_in_generate=True)
    ref_logits = [step[0] for step in ref.logits]  # [0] is the prefill's, [1..] the decode steps'
    torch.testing.assert_close(logits, ref_logits[0], atol=ATOL_LOGITS, rtol=0)

    g = torch.Generator().manual_seed(0)
    c = s.cache_capacity
    n = int(seq_valid.sum())
    slots = torch.randperm(c, generator=g)  # where each token's K/V lives in the fixed-size cache
    cache = [torch.randn(p.shape[0], c, p.shape[2], generator=g) for p in presents]
    for buf, p in zip(cache, presents):
        buf[:, slots[:n]] = p[:, seq_valid]
    cache_valid = torch.zeros(c)
    cache_valid[slots[:n]] = 1.0
    for step in range(1, steps + 1):
        token = int(logits.argmax())
        assert token == int(ref.sequences[0, case.hf_inputs["input_ids"].shape[1] + step - 1])
        with torch.no_grad():
            out = decode(torch.tensor([token]), torch.tensor([n]), cache_valid, *cache)
        logits = out[0]
        torch.testing.assert_close(logits, ref_logits[step], atol=ATOL_LOGITS, rtol=0)
        slot = slots[n]
        for buf, new in zip(cache, out[1:]):
            assert new.shape == (buf.shape[0], 1, buf.shape[2])
            buf[:, slot] = new[:, 0]
        cache_valid[slot] = 1.0
        n += 1
