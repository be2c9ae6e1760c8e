"""The step graph (the LM of TensorRT engines) against transformers' own language model.

A step is T new slots attending to a fixed-size cache and to each other; prefill is a step over an
empty cache, decode a step of one or two slots. The reference is transformers' LlamaModel run on
just the valid tokens, in order, so cache order, validity masks and positions all have to be right.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeprune.graphs import PrefillGraph, StepGraph

ATOL = 1e-4


@pytest.fixture(scope="module")
def lm(tiny, tiny_shapes):
    s = tiny_shapes(0.2)
    return s, StepGraph(tiny.model, s).eval(), PrefillGraph(tiny.model, s).eval()


def _reference(tiny, embeds):
    """transformers' LM on `embeds` [n, D] -> (last logits [vocab], keys/values per layer [Hkv, n, Dh])."""
    inner = tiny.model.model.language_model
    with torch.no_grad():
        out = inner(inputs_embeds=embeds[None], use_cache=True)
        logits = tiny.model.lm_head(out.last_hidden_state)[0, -1]
    return logits, [(layer.keys[0], layer.values[0]) for layer in out.past_key_values.layers]


def _empty_cache(s, g):
    """Per layer K and V [Hkv, C, Dh] of noise: every slot is masked out, so none may leak in."""
    return [torch.randn(h, s.cache_capacity, s.head_dim, generator=g) for h in s.kv_heads for _ in range(2)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_step_as_prefill_equals_transformers(tiny, lm, seed):
    """T = S slots, text and visual interleaved, some invalid, over an empty cache."""
    s, step, _ = lm
    g = torch.Generator().manual_seed(seed)
    t = s.prefill_slots
    ids = torch.randint(5, s.vocab_size, (t,), generator=g)
    is_visual = (torch.rand(t, generator=g) < 0.4).float()
    visual = torch.randn(t, s.hidden_size, generator=g) * 0.05 * is_visual[:, None]
    valid = (torch.rand(t, generator=g) < 0.6).float()
    valid[-1] = 1.0
    with torch.no_grad():
        logits, *news = step(ids, visual, is_visual, valid, torch.zeros(1, dtype=torch.int64),
                             torch.zeros(s.cache_capacity), *_empty_cache(s, g))
    embed = tiny.model.model.language_model.embed_tokens(ids)
    seq = torch.where(is_visual[:, None] > 0, visual, embed)[valid > 0]
    ref_logits, ref_kv = _reference(tiny, seq)
    torch.testing.assert_close(logits, ref_logits, atol=ATOL, rtol=0)
    for i, (k, v) in enumerate(ref_kv):
        torch.testing.assert_close(news[2 * i][:, valid > 0], k, atol=ATOL, rtol=0)
        torch.testing.assert_close(news[2 * i + 1][:, valid > 0], v, atol=ATOL, rtol=0)


def test_step_equals_prefill_graph(tiny, lm, tiny_case):
    """The same request through the prefill graph and through one step: same logits and K/V."""
    s, step, prefill = lm
    case = tiny_case((100, 200), s)
    g = torch.Generator().manual_seed(3)
    visual = torch.randn(s.visual_slots, s.hidden_size, generator=g) * 0.05
    visual_valid = (torch.rand(s.visual_slots, generator=g) < 0.7).float()
    t1 = s.text_slots_before_image
    with torch.no_grad():
        ref = prefill(case.text_ids, case.text_valid, visual, visual_valid)
        ids = torch.cat([case.text_ids[:t1], torch.zeros(s.visual_slots, dtype=torch.int64), case.text_ids[t1:]])
        is_visual = torch.cat([torch.zeros(t1), torch.ones(s.visual_slots), torch.zeros(s.text_slots_after_image)])
        emb = torch.cat([torch.zeros(t1, s.hidden_size), visual, torch.zeros(s.text_slots_after_image, s.hidden_size)])
        valid = torch.cat([case.text_valid[:t1], visual_valid, case.text_valid[t1:]])
        out = step(ids, emb, is_visual, valid, torch.zeros(1, dtype=torch.int64), torch.zeros(s.cache_capacity),
                   *_empty_cache(s, g))
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


@pytest.mark.parametrize("t", [1, 2])
def test_decode_step_reads_a_shuffled_cache(tiny, lm, t):
    """n tokens' K/V in random cache slots (noise elsewhere); one new token (plus an invalid slot when T = 2)."""
    s, step, _ = lm
    g = torch.Generator().manual_seed(t)
    n = 37
    embeds = torch.randn(n + 1, s.hidden_size, generator=g) * 0.05
    _, kv = _reference(tiny, embeds[:n])
    ref_logits, _ = _reference(tiny, embeds)
    slots = torch.randperm(s.cache_capacity, generator=g)[:n]
    cache = _empty_cache(s, g)
    for i, (k, v) in enumerate(kv):
        cache[2 * i][:, slots], cache[2 * i + 1][:, slots] = k, v
    cache_valid = torch.zeros(s.cache_capacity)
    cache_valid[slots] = 1.0
    new = torch.cat([embeds[n:], torch.randn(t - 1, s.hidden_size, generator=g)])  # [T, D]
    valid = torch.tensor([1.0] + [0.0] * (t - 1))
    with torch.no_grad():
        logits, *_ = step(torch.zeros(t, dtype=torch.int64), new, torch.ones(t), valid,
                          torch.tensor([n]), cache_valid, *cache)
    torch.testing.assert_close(logits, ref_logits, atol=ATOL, rtol=0)


def test_step_onnx_runs_at_every_profile_length(tiny_bundles):
    """The exported step graph has a dynamic T: ONNX Runtime runs it at T = S and T = 1, 2 alike."""
    import onnxruntime as ort

    bundle = tiny_bundles[0.2]
    import json

    m = json.loads((bundle / "manifest.json").read_text())
    s = m["shapes"]
    sess = ort.InferenceSession(str(bundle / m["graphs"]["step"]["file"]), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    past = {f"past_{kind}_{i}": rng.standard_normal((h, s["cache_capacity"], s["head_dim"])).astype(np.float32)
            for i, h in enumerate(s["kv_heads"]) for kind in ("key", "value")}
    for t in (1, 2, s["prefill_slots"]):
        feed = {"token_ids": rng.integers(5, s["vocab_size"], t), "visual_embeds": np.zeros((t, s["hidden_size"]), np.float32),
                "is_visual": np.zeros(t, np.float32), "slot_valid": np.ones(t, np.float32),
                "position": np.array([0]), "cache_valid": np.zeros(s["cache_capacity"], np.float32), **past}
        logits, *news = sess.run(None, feed)
        assert logits.shape == (s["vocab_size"],) and np.isfinite(logits).all()
        assert news[0].shape == (s["kv_heads"][0], t, s["head_dim"])
