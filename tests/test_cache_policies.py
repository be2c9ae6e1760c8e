"""Cache policies for a full cache (stop | sink-window | heavy-hitter) on the tiny twin.

Expected values come from elsewhere than the code under test: layer-0 keys recomputed in torch from the model's
own embedding, input norm, k_proj and transformers' rotary embedding at the positions a slot should carry; the
attention mass recomputed in torch, layer by layer with the model's modules, from the same cache; the evicted set
of heavy-hitter from a plain argsort of hand-made masses, read back from the values each slot carries; the
sink-window survivors from the policy's definition (first S, then everything after the evicted chunk).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from cli_helpers import cli, needs_rtx
from edgeprune_runtime import RuntimeStatusError, Status
from edgeprune_runtime.cache_policy import CachePolicy, Evictor
from edgeprune_runtime.generator import Generator, GeneratorParams, LoadedBundle
from edgeprune_runtime.kvcache import KVCache
from tiny_inputs import random_image

SINKS = 4


@pytest.fixture(scope="module")
def hh_bundle(tmp_path_factory, tiny, tiny_recipe):
    """The tiny twin exported with --cache-policy heavy-hitter (serves all three policies)."""
    from edgeprune.export import export_bundle

    root = tmp_path_factory.mktemp("cache-policy")
    return export_bundle("llava-next-tiny", root / "hh", tiny_recipe(0.2).override(cache_policy="heavy-hitter"),
                         loaded=tiny)


@pytest.fixture(scope="module")
def loaded(hh_bundle):
    return LoadedBundle(hh_bundle)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "cam.png"
    random_image((112, 224), seed=3).save(path)
    return path


def _chunk(capacity: int, sinks: int) -> int:
    return max(1, (capacity - sinks) // 8)  # README "Cache policies": an eighth of the window


def _run(gen: Generator, steps: int | None = None) -> list[int]:
    while not gen.done and (steps is None or len(gen.token_ids) < steps):
        gen.generate_next_token()
    return gen.token_ids


# --- the CLI runs far past the capacity ------------------------------------------------------


@pytest.mark.parametrize("policy", ["sink-window", "heavy-hitter"])
def test_cli_runs_to_ten_times_the_capacity(hh_bundle, image, policy):
    capacity = json.loads((hh_bundle / "manifest.json").read_text())["shapes"]["cache_capacity"]
    n = 10 * capacity
    out = cli("run", hh_bundle, "--image", image, "--prompt", "What is on the table?", "--cache-policy", policy,
              "--max-new-tokens", n, "--ignore-eos", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["stop_reason"] == "max_new_tokens" and len(result["token_ids"]) == n
    assert result["cache_policy"] == policy
    assert result["evicted_slots"] > n - capacity  # every token past the capacity needed a slot freed
    assert result["cache_slots_used"] <= capacity


RSS_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    from edgeprune_runtime import Bundle
    bundle_dir, image, policy = sys.argv[1:4]
    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    with Bundle(bundle_dir) as bundle:
        n = 10 * bundle.shapes.cache_capacity
        samples, finite = {}, True
        with bundle.generator(image, "What is on the table?", max_new_tokens=n, ignore_eos=True,
                              cache_policy=policy) as gen:
            for token in gen:
                k = len(gen.token_ids)
                finite = finite and bool(np.isfinite(gen.logits).all())
                if k in (n // 10, n):
                    samples[k] = rss()
            print(json.dumps({"rss": [samples[n // 10], samples[n]], "finite": finite, "tokens": len(gen.token_ids),
                              "stop": gen.stop_reason, "evicted": gen.cache_stats["evicted_slots"]}))
""")


@pytest.mark.parametrize("policy", ["sink-window", "heavy-hitter"])
def test_memory_stays_flat_and_logits_finite_over_a_long_run(hh_bundle, image, policy):
    proc = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(hh_bundle), str(image), policy],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["finite"] and r["stop"] == "max_new_tokens" and r["evicted"] > 0
    early, late = r["rss"]
    assert abs(late - early) <= 0.05 * early, r  # RSS at 10% and 100% of the run within 5%


# --- sinks, and the tokens before the first eviction --------------------------------------------


@pytest.mark.parametrize("policy", ["sink-window", "heavy-hitter"])
def test_sink_slots_are_never_evicted(loaded, image, policy):
    gen = Generator(loaded, GeneratorParams(max_new_tokens=4 * loaded.shapes.cache_capacity, ignore_eos=True,
                                            cache_policy=policy, cache_sinks=SINKS), image, "What is on the table?")
    keys = [k[:, :SINKS].copy() for k in gen.cache.keys]
    values = [v[:, :SINKS].copy() for v in gen.cache.values]
    _run(gen)
    assert gen.evicted_slots > 2 * loaded.shapes.cache_capacity
    for before, now in zip(keys + values, [k[:, :SINKS] for k in gen.cache.keys + gen.cache.values]):
        assert before.tobytes() == now.tobytes()


@pytest.mark.parametrize("policy", ["sink-window", "heavy-hitter"])
def test_tokens_before_the_cache_fills_are_stop_s(loaded, image, policy):
    prompt = "What is on the table?"
    stop = Generator(loaded, GeneratorParams(max_new_tokens=0, ignore_eos=True, cache_policy="stop"), image, prompt)
    expected = _run(stop)
    assert stop.stop_reason == "cache_full"
    gen = Generator(loaded, GeneratorParams(max_new_tokens=len(expected) + 8, ignore_eos=True, cache_policy=policy),
                    image, prompt)
    first = _run(gen, len(expected))
    assert first == expected and gen.evicted_slots == 0
    _run(gen)
    assert gen.evicted_slots > 0 and gen.stop_reason == "max_new_tokens"


# --- re-rotation, against keys computed fresh in torch ------------------------------------------


def _fresh_layer0_keys(tiny, token_ids: list[int], positions: list[int]) -> np.ndarray:
    """Layer-0 keys [Hkv, n, Dh] of text tokens at the given positions: the model's embedding, input norm, k_proj
    and transformers' own rotary embedding and apply_rotary_pos_emb."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    lm = tiny.model.model.language_model
    layer = lm.layers[0]
    with torch.no_grad():
        x = layer.input_layernorm(lm.embed_tokens(torch.tensor([token_ids])))  # [1, n, D]
        attn = layer.self_attn
        k = attn.k_proj(x).view(1, len(token_ids), -1, attn.head_dim).transpose(1, 2)  # [1, Hkv, n, Dh]
        cos, sin = lm.rotary_emb(x, torch.tensor([positions]))
        _, k = apply_rotary_pos_emb(k, k, cos, sin)
    return k[0].numpy()


def _sequence(gen: Generator) -> list[int | None]:
    """What each original cache slot holds, in order: a text token id, or None for a visual slot."""
    ids, image_id = list(gen.prompt_token_ids), gen.bundle.tokenizer.image_token_id
    at = ids.index(image_id)
    return ids[:at] + [None] * gen.visual_tokens + ids[at + 1:]


def test_prefill_keys_carry_their_slot_position(loaded, image, tiny):
    gen = Generator(loaded, GeneratorParams(max_new_tokens=4), image, "What is on the table?")
    seq = _sequence(gen)
    assert len(seq) == gen.cache.length
    text = [i for i, t in enumerate(seq) if t is not None]
    fresh = _fresh_layer0_keys(tiny, [seq[i] for i in text], text)
    np.testing.assert_allclose(gen.cache.keys[0][:, text], fresh, atol=2e-5, rtol=1e-4)


def test_evicted_cache_keys_are_rerotated_to_their_new_positions(loaded, image, tiny):
    s = loaded.shapes
    chunk = _chunk(s.cache_capacity, SINKS)
    gen = Generator(loaded, GeneratorParams(max_new_tokens=3 * s.cache_capacity, ignore_eos=True,
                                            cache_policy="sink-window", cache_sinks=SINKS), image, "What is on the table?")
    kept = _sequence(gen)  # what each cache slot holds, kept up to date below from the policy's definition
    for evictions in (1, 2):  # the second eviction re-rotates keys that moved once already
        while gen.evicted_slots < evictions * chunk:
            previous = gen.token_ids[-1] if gen.token_ids else None
            before = gen.evicted_slots
            gen.generate_next_token()
            if gen.evicted_slots > before:  # sink-window: the oldest non-sink slots go, before the step's append
                assert gen.evicted_slots - before == chunk
                kept = kept[:SINKS] + kept[SINKS + chunk:]
            if previous is not None:  # a step appends the K/V of the token before the one it returns
                kept.append(previous)
        assert len(kept) == gen.cache.length
        text = [i for i, t in enumerate(kept) if t is not None and i >= SINKS]
        assert len(text) > 10
        fresh = _fresh_layer0_keys(tiny, [kept[i] for i in text], text)  # at their new in-cache positions
        np.testing.assert_allclose(gen.cache.keys[0][:, text], fresh, atol=5e-5, rtol=1e-4)


# --- heavy-hitter: the attention mass and the evicted set ---------------------------------------


def _torch_attn_mass(tiny, token: int, position: int, keys, values, valid) -> np.ndarray:
    """[C]: attention probability the token pays each valid cache slot, summed over heads and layers, recomputed
    with the model's modules (eager attention over cache + the token itself)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    lm = tiny.model.model.language_model
    mass = np.zeros(len(valid))
    with torch.no_grad():
        x = lm.embed_tokens(torch.tensor([[token]]))  # [1, 1, D]
        cos, sin = lm.rotary_emb(x, torch.tensor([[position]]))
        keep = torch.from_numpy(valid > 0.5)
        for i, layer in enumerate(lm.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(1, 1, -1, attn.head_dim).transpose(1, 2)  # [1, H, 1, Dh]
            k = attn.k_proj(h).view(1, 1, -1, attn.head_dim).transpose(1, 2)  # [1, Hkv, 1, Dh]
            v = attn.v_proj(h).view(1, 1, -1, attn.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            past_k = torch.from_numpy(keys[i])[:, keep]  # [Hkv, n, Dh]
            past_v = torch.from_numpy(values[i])[:, keep]
            all_k = torch.cat([past_k, k[0]], dim=1)
            all_v = torch.cat([past_v, v[0]], dim=1)
            groups = q.shape[1] // all_k.shape[0]
            all_k, all_v = all_k.repeat_interleave(groups, 0), all_v.repeat_interleave(groups, 0)  # [H, n+1, Dh]
            probs = torch.softmax((q[0] @ all_k.transpose(1, 2)) * attn.scaling, dim=-1)  # [H, 1, n+1]
            mass[np.flatnonzero(valid > 0.5)] += probs[:, 0, :-1].sum(dim=0).double().numpy()
            out = (probs @ all_v).transpose(0, 1).reshape(1, 1, -1)
            x = x + attn.o_proj(out)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
    return mass


@pytest.mark.parametrize("graph", ["decode", "step"])
def test_attn_mass_equals_torch_attention_over_the_same_cache(loaded, image, tiny, graph):
    gen = Generator(loaded, GeneratorParams(max_new_tokens=20, ignore_eos=True), image, "What is on the table?")
    _run(gen, 6)
    cache, s = gen.cache, loaded.shapes
    token, position = gen.token_ids[-1], cache.position
    n = s.num_layers
    feeds = {"position": np.array([position], np.int64), "cache_valid": cache.valid[0],
             **{f"past_key_{i}": cache.keys[i] for i in range(n)}, **{f"past_value_{i}": cache.values[i] for i in range(n)}}
    if graph == "decode":
        session = loaded.engine.decode
        feeds["token_id"] = np.array([token], np.int64)
    else:
        from edgeprune_runtime.step import step_runner

        session = step_runner(loaded).session
        feeds.update(token_ids=np.array([token], np.int64), visual_embeds=np.zeros((1, s.hidden_size), np.float32),
                     is_visual=np.zeros(1, np.float32), slot_valid=np.ones(1, np.float32))
    (mass,) = session.run(["attn_mass"], feeds)
    expected = _torch_attn_mass(tiny, token, position, cache.keys, cache.values, cache.valid[0])
    assert mass.shape == (s.cache_capacity,)
    np.testing.assert_allclose(mass, expected, atol=1e-5)
    assert 0 < mass.sum() <= s.num_layers * tiny.model.config.text_config.num_attention_heads


def test_heavy_hitter_evicts_the_lowest_mass_unpinned_slots():
    """A hand-made cache: value slot i holds the tag i; sinks 2 and the image (slots 5..7) pinned, and heavy-hitter's
    most recent chunk. The survivors must be the complement of a plain argsort's lowest accumulated masses, twice
    (the second time on masses that moved with their slots)."""
    capacity, sinks, dh = 34, 2, 4
    chunk = _chunk(capacity, sinks)  # 4
    cache = KVCache([1], capacity, dh)
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((1, capacity, dh)).astype(np.float32)
    tags = np.broadcast_to(np.arange(capacity, dtype=np.float32)[None, :, None], (1, capacity, dh)).copy()
    cache.fill_from_prefill([keys], [tags], np.ones(capacity, np.float32))
    evictor = Evictor(CachePolicy("heavy-hitter", sinks, True), cache, np.ones(dh // 2), image_slots=(5, 3))
    total = {t: 0.0 for t in range(capacity)}  # the test's own account of each tag's mass

    def held() -> list[int]:
        return [int(t) for t in cache.values[0][0, :cache.length, 0]]

    def observe() -> None:
        mass = rng.uniform(0.0, 1.0, capacity).astype(np.float32)  # per slot
        for slot, tag in enumerate(held()):
            total[tag] += float(mass[slot])
        evictor.observe(mass)

    def expected_survivors() -> set[int]:
        h = held()
        protected = set(h[:sinks]) | {5, 6, 7} | set(h[-chunk:])
        order = np.argsort([np.inf if t in protected else total[t] for t in h], kind="stable")
        return set(h) - {h[i] for i in order[:chunk]}

    observe()
    expected = expected_survivors()
    assert evictor.make_room(1) == chunk
    assert set(held()) == expected and cache.length == capacity - chunk
    observe()
    while cache.room() > 0:  # new slots, tagged 100, 101, ...
        tag = 100 + cache.length
        cache.append([keys[:, :1]], [np.full((1, 1, dh), tag, np.float32)])
        total[tag] = 0.0
    observe()
    expected = expected_survivors()
    evictor.make_room(1)
    assert set(held()) == expected and evictor.evicted == 2 * chunk


def test_follow_up_under_a_policy_evicts_instead_of_stopping(hh_bundle, image):
    from edgeprune_runtime import Bundle

    with Bundle(hh_bundle, cache_policy="sink-window") as bundle:
        capacity = bundle.shapes.cache_capacity
        with bundle.chat(image) as chat:
            first = chat.ask("What is on the table?", max_new_tokens=capacity, ignore_eos=True)
            second = chat.ask("What color is it?", max_new_tokens=capacity, ignore_eos=True)
        assert first.stop_reason == second.stop_reason == "max_new_tokens"
        assert second.evicted_slots > first.evicted_slots > 0 and second.cache_policy == "sink-window"
    with Bundle(hh_bundle, cache_policy="stop") as bundle, bundle.chat(image) as chat:
        chat.ask("What is on the table?", max_new_tokens=0, ignore_eos=True)
        with pytest.raises(RuntimeStatusError) as e:
            chat.ask("What color is it?", max_new_tokens=4)
        assert e.value.status == Status.CACHE_FULL


# --- bad input: one line, non-zero exit --------------------------------------------------------


def _one_line_error(out) -> str:
    assert out.returncode != 0 and out.stderr.startswith("error: ") and out.stderr.count("\n") == 1, out.stderr
    assert "Traceback" not in out.stderr
    return out.stderr


def test_unknown_policy_is_one_line(hh_bundle, image):
    err = _one_line_error(cli("run", hh_bundle, "--image", image, "--prompt", "hi", "--cache-policy", "lru"))
    assert "sink-window" in err and "heavy-hitter" in err
    err = _one_line_error(cli("export", "llava-next-tiny", "--out", "/nonexistent/x", "--cache-policy", "lru"))
    assert "cache.policy" in err
    proc = subprocess.run([sys.executable, "-m", "edgeprune_runtime", str(hh_bundle), "--image", str(image), "--prompt",
                           "hi", "--cache-policy", "sink_window"], capture_output=True, text=True, timeout=120)
    assert "'sink_window' is not one of" in _one_line_error(proc)


def test_sinks_that_leave_no_window_are_one_line(hh_bundle, image):
    capacity = json.loads((hh_bundle / "manifest.json").read_text())["shapes"]["cache_capacity"]
    err = _one_line_error(cli("run", hh_bundle, "--image", image, "--prompt", "hi", "--cache-policy", "sink-window",
                              "--cache-sinks", capacity))
    assert f"smaller than the cache's {capacity} slots" in err
    _one_line_error(cli("run", hh_bundle, "--image", image, "--prompt", "hi", "--cache-sinks", "-1"))


def test_heavy_hitter_on_a_bundle_without_attn_mass_is_one_line(tiny_bundles, image):
    err = _one_line_error(cli("run", tiny_bundles[0.2], "--image", image, "--prompt", "hi", "--cache-policy",
                              "heavy-hitter"))
    assert "re-export with --cache-policy heavy-hitter" in err
    err = _one_line_error(cli("run", tiny_bundles[0.2], "--image", image, "--prompt", "hi", "--cache-policy",
                              "sink-window"))
    assert "re-export with --cache-policy sink-window" in err


def test_policies_need_layers_that_hold_the_same_tokens(tiny_recipe):
    from edgeprune.errors import ConfigError

    with pytest.raises(ConfigError, match="--cache-policy stop"):
        tiny_recipe(0.2).override(cache_policy="sink-window", drop_visual_after="0:8")
    with pytest.raises(ConfigError, match="--cache-policy stop"):
        tiny_recipe(0.2).override(cache_policy="heavy-hitter", skip_decode="4:1")


def test_the_manifest_records_the_default_and_stop_bundles_have_none(hh_bundle, tiny_bundles, tiny):
    m = json.loads((hh_bundle / "manifest.json").read_text())
    assert m["recipe"]["cache"]["policy"] == "heavy-hitter"
    assert {k: m["cache"][k] for k in ("policy", "sinks", "pin_image", "attn_mass")} == {
        "policy": "heavy-hitter", "sinks": 4, "pin_image": True, "attn_mass": True}
    expected = tiny.model.config.text_config.rope_parameters["rope_theta"] ** (
        -np.arange(0, m["shapes"]["head_dim"], 2) / m["shapes"]["head_dim"])  # Llama's inv_freq, from the config
    np.testing.assert_allclose(m["cache"]["rope_inv_freq"], expected, rtol=1e-6)
    assert "cache" not in json.loads((tiny_bundles[0.2] / "manifest.json").read_text())
    # the bundle's default applies unless a generator asks for another policy
    bundle = LoadedBundle(hh_bundle)
    assert Generator(bundle, GeneratorParams(max_new_tokens=2), random_image((60, 80), 1), "hi").policy.name == "heavy-hitter"
    assert Generator(bundle, GeneratorParams(max_new_tokens=2, cache_policy="stop"), random_image((60, 80), 1),
                     "hi").policy.name == "stop"


@needs_rtx
@pytest.mark.tensorrt
def test_tensorrt_check_and_build_pass_on_a_heavy_hitter_bundle(hh_bundle, tmp_path):
    import shutil

    bundle = tmp_path / "b"
    shutil.copytree(hh_bundle, bundle)
    check = cli("check", bundle, "--target", "rtx", "--json")
    assert check.returncode == 0 and json.loads(check.stdout)["ok"], check.stdout
    build = cli("build", bundle, "--target", "rtx", "--json")
    assert build.returncode == 0, build.stderr
    assert set(json.loads(build.stdout)["engines"]) == {"vision", "lm"}


def test_c_shaped_api_sets_the_policy_and_reports_evictions(hh_bundle, image):
    from edgeprune_runtime import capi
    from edgeprune_runtime.capi import Out

    out = Out()
    assert capi.Bundle_Create(str(hh_bundle), out) == Status.OK
    bundle = out.value
    assert capi.GeneratorParams_Create(out) == Status.OK
    params = out.value
    assert capi.GeneratorParams_SetCachePolicy(params, "lru") == Status.INVALID_ARGUMENT
    assert "not one of stop, sink-window, heavy-hitter" in capi.GetLastError()
    assert capi.GeneratorParams_SetCacheSinks(params, -1) == Status.INVALID_ARGUMENT
    assert capi.GeneratorParams_SetCachePinImage(params, "yes") == Status.INVALID_ARGUMENT
    assert capi.GeneratorParams_SetCachePolicy(params, "sink-window") == Status.OK
    assert capi.GeneratorParams_SetCacheSinks(params, 2) == Status.OK
    assert capi.GeneratorParams_SetIgnoreEos(params, True) == Status.OK
    assert capi.Bundle_GetShapes(bundle, out) == Status.OK
    capacity = out.value.cache_capacity
    assert capi.GeneratorParams_SetMaxNewTokens(params, 2 * capacity) == Status.OK
    assert capi.Generator_Create(bundle, params, str(image), "hi", False, out) == Status.OK
    gen = out.value
    while capi.Generator_IsDone(gen, out) == Status.OK and not out.value:
        assert capi.Generator_GenerateNextToken(gen) == Status.OK
    assert capi.Generator_GetStopReason(gen, out) == Status.OK and out.value == "max_new_tokens"
    assert capi.Generator_GetCacheStats(gen, out) == Status.OK
    assert out.value["cache_policy"] == "sink-window" and out.value["cache_sinks"] == 2
    assert out.value["evicted_slots"] >= capacity
    for destroy, handle in ((capi.Generator_Destroy, gen), (capi.GeneratorParams_Destroy, params),
                            (capi.Bundle_Destroy, bundle)):
        assert destroy(handle) == Status.OK


def test_compare_checks_attn_mass_against_eager_pytorch(hh_bundle, image):
    out = cli("compare", hh_bundle, "--image", image, "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["passed"]
    assert {(r["stage"], r["passed"]) for r in report["outputs"] if r["output"] == "attn_mass"} == {("decode", True),
                                                                                                    ("step", True)}


def test_a_cache_full_of_pinned_slots_is_a_status_not_a_loop():
    capacity, dh = 12, 4
    cache = KVCache([1], capacity, dh)
    ones = np.ones((1, capacity, dh), np.float32)
    cache.fill_from_prefill([ones], [ones], np.ones(capacity, np.float32))
    # 2 sinks + the image on slots 2..11: nothing left to evict
    evictor = Evictor(CachePolicy("heavy-hitter", 2, True), cache, np.ones(dh // 2), image_slots=(2, 10))
    with pytest.raises(RuntimeStatusError) as e:
        evictor.make_room(1)
    assert e.value.status == Status.CACHE_FULL and "--no-cache-pin-image" in e.value.message
    assert cache.length == capacity and evictor.evicted == 0  # nothing half-done


def test_heavy_hitter_on_a_quantized_bundle_decodes_through_the_step_graph(tmp_path, tiny, tiny_recipe, image):
    """int8 CPU bundles run the LM through lm/step.onnx (engine.Engine); its attn_mass feeds the same eviction."""
    from edgeprune.export import export_bundle

    recipe = tiny_recipe(0.2).override(cache_policy="heavy-hitter", precision="int8")
    bundle = LoadedBundle(export_bundle("llava-next-tiny", tmp_path / "q", recipe, loaded=tiny))
    assert bundle.engine.step is not None and bundle.engine.decode is None
    n = 3 * bundle.shapes.cache_capacity
    gen = Generator(bundle, GeneratorParams(max_new_tokens=n, ignore_eos=True), image, "What is on the table?")
    _run(gen)
    evictor = gen.decoder.evictor
    assert gen.stop_reason == "max_new_tokens" and len(gen.token_ids) == n and gen.evicted_slots >= n - gen.cache.capacity
    assert evictor.mass[:gen.cache.length].sum() > 0  # the step graph's attn_mass was bound and accumulated


def test_an_endless_follow_up_under_an_evicting_policy_is_refused(loaded, image):
    """max_new_tokens 0 with ignore_eos never stops under an evicting policy (no EOS, no full cache): a first turn
    is refused, and so must a follow-up be (it used to generate forever)."""
    gen = Generator(loaded, GeneratorParams(max_new_tokens=3, ignore_eos=True, cache_policy="sink-window"), image,
                    "What is on the table?")
    _run(gen)
    with pytest.raises(RuntimeStatusError) as e:
        gen.follow_up("And then?", GeneratorParams(max_new_tokens=0, ignore_eos=True))
    assert e.value.status == Status.INVALID_ARGUMENT and "--max-new-tokens N > 0" in e.value.message
    assert not gen._handed_over and gen.cache.length == gen.prompt_slots + 2  # nothing changed: it can still go on
    turn = gen.follow_up("And then?", GeneratorParams(max_new_tokens=2, ignore_eos=True))
    assert _run(turn) and turn.stop_reason == "max_new_tokens"


def _edited_copy(bundle, tmp_path, change):
    import shutil

    root = tmp_path / "b"
    shutil.copytree(bundle, root)
    data = json.loads((root / "manifest.json").read_text())
    change(data)
    (root / "manifest.json").write_text(json.dumps(data))
    return root


def _refused(root) -> str:
    from edgeprune_runtime import capi
    from edgeprune_runtime.capi import Out

    out = Out()
    status = capi.Bundle_Create(str(root), out, backend="cpu")
    message = capi.GetLastError()
    assert status == Status.BUNDLE_INVALID and out.value is None, (status, message)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("freqs", [
    lambda n: [1e308] * n,  # finite, but every angle overflows: NaN keys after the first eviction
    lambda n: [0.0] + [0.5] * (n - 1),
    lambda n: [-0.5] * n,
    lambda n: [2.0] + [0.5] * (n - 1),
])
def test_rotary_frequencies_outside_rope_s_range_are_bundle_invalid(hh_bundle, tmp_path, freqs):
    """RoPE's inverse frequencies are base**(-2i/Dh) (scaled variants divide them further): in (0, 1]. Others in
    the untrusted manifest are refused at load, not turned into NaN keys mid-generation."""
    root = _edited_copy(hh_bundle, tmp_path, lambda d: d["cache"].update(
        rope_inv_freq=freqs(len(d["cache"]["rope_inv_freq"]))))
    assert "cache.rope_inv_freq" in _refused(root)


def test_an_attn_mass_of_another_type_is_bundle_invalid_at_load(hh_bundle, tmp_path):
    """The Decoder binds attn_mass to a float32 [C] host buffer, as it binds the logits: a graph declaring it as
    double is refused when the bundle loads (it used to load and fail at the first heavy-hitter decode step)."""
    import hashlib

    import onnx
    from onnx import TensorProto, helper

    root = _edited_copy(hh_bundle, tmp_path, lambda d: None)
    path = root / "lm" / "decode.onnx"
    model = onnx.load(str(path), load_external_data=False)
    for node in model.graph.node:
        node.output[:] = ["attn_mass_f32" if o == "attn_mass" else o for o in node.output]
    model.graph.node.append(helper.make_node("Cast", ["attn_mass_f32"], ["attn_mass"], to=TensorProto.DOUBLE))
    (out,) = [o for o in model.graph.output if o.name == "attn_mass"]
    out.type.tensor_type.elem_type = TensorProto.DOUBLE
    onnx.save(model, str(path))
    data = json.loads((root / "manifest.json").read_text())
    data["files"]["lm/decode.onnx"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (root / "manifest.json").write_text(json.dumps(data))
    assert "'attn_mass' has type tensor(double)" in _refused(root)


def test_heavy_hitter_s_recent_chunk_gives_way_when_nothing_older_can_go():
    """Sinks (0..3) and the image (4..35) pinned in a 40-slot cache: the only unpinned slots, 36..39, are the most
    recent chunk (4 slots). They are kept while older slots can go, but when none can, the least-mass one of them
    goes (it used to stop with CACHE_FULL blaming pinned slots that do not fill the cache)."""
    capacity, sinks, dh = 40, 4, 4
    assert _chunk(capacity, sinks) == 4
    cache = KVCache([1], capacity, dh)
    tags = np.broadcast_to(np.arange(capacity, dtype=np.float32)[None, :, None], (1, capacity, dh)).copy()
    cache.fill_from_prefill([np.ones((1, capacity, dh), np.float32)], [tags], np.ones(capacity, np.float32))
    evictor = Evictor(CachePolicy("heavy-hitter", sinks, True), cache, np.ones(dh // 2), image_slots=(4, 32))
    mass = np.full(capacity, 5.0, np.float32)
    mass[[36, 37, 38, 39]] = [0.3, 0.2, 0.1, 0.4]  # tag 38 has the least
    evictor.observe(mass)
    assert evictor.make_room(1) == 1
    assert [int(t) for t in cache.values[0][0, :cache.length, 0]] == [t for t in range(capacity) if t != 38]


def test_any_cache_section_loads_to_a_finite_rerotation_or_is_bundle_invalid():
    """The manifest's `cache` section, each key replaced by arbitrary JSON: BundleCache.from_manifest either refuses it
    with BUNDLE_INVALID (one line) or gives frequencies that re-rotate keys to finite values at every shift below C."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from edgeprune_runtime.cache_policy import BundleCache, rerotate

    head_dim, capacity = 8, 64
    good = {"policy": "sink-window", "sinks": 4, "pin_image": True, "attn_mass": False,
            "rope_inv_freq": (10000.0 ** (-np.arange(0, head_dim, 2) / head_dim)).tolist()}
    leaves = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-2 ** 70, 2 ** 70), st.booleans(),
                       st.none(), st.text(max_size=6), st.sampled_from(["stop", "sink-window", "heavy-hitter"]))
    values = st.one_of(st.recursive(leaves, lambda inner: st.lists(inner, max_size=head_dim), max_leaves=head_dim),
                       st.lists(st.one_of(st.floats(allow_nan=False, allow_infinity=False),
                                          st.sampled_from([1.7e308, -1.7e308, 1e300, 5e-324])),
                                min_size=head_dim // 2, max_size=head_dim // 2))  # well-formed lists, finite values

    @settings(max_examples=300, derandomize=True, database=None, deadline=None)
    @given(st.dictionaries(st.sampled_from(sorted(good)), values, max_size=3))
    def check(changes):
        try:
            cache = BundleCache.from_manifest({**good, **changes}, head_dim, capacity)
        except RuntimeStatusError as e:
            assert e.status == Status.BUNDLE_INVALID and "\n" not in e.message
            return
        keys = np.ones((1, capacity, head_dim), np.float32)
        with np.errstate(all="raise"):  # an overflow would raise here instead of writing inf/NaN keys
            out = rerotate(keys, np.arange(capacity), cache.inv_freq)
        assert np.isfinite(out).all()

    check()


def test_a_follow_up_question_s_attention_counts_toward_heavy_hitter_mass(loaded, image):
    """H2O counts every query's attention: a follow-up question is T queries over the cache, run as one step (the
    step graph's attn_mass sums its rows). The mass each cached slot gains is what the step graph, run here on a
    copy of the cache as it was, reports for those slots (it used to gain nothing)."""
    gen = Generator(loaded, GeneratorParams(max_new_tokens=6, ignore_eos=True, cache_policy="heavy-hitter"), image,
                    "What is on the table?")
    _run(gen)
    s, evictor = loaded.shapes, gen.decoder.evictor
    n = gen.cache.length
    before = evictor.mass.copy()
    snapshot = {"cache_valid": gen.cache.valid[0].copy(), "position": np.array([gen.cache.position], np.int64),
                **{f"past_key_{i}": gen.cache.keys[i].copy() for i in range(s.num_layers)},
                **{f"past_value_{i}": gen.cache.values[i].copy() for i in range(s.num_layers)}}
    turn = gen.follow_up("What color is it?", GeneratorParams(max_new_tokens=2))
    assert gen.evicted_slots == 0  # room enough: no eviction moved the slots
    new = turn.prompt_token_ids[len(gen._context_ids) + len(gen.token_ids) - 1:]  # last answer token + the question
    t = len(new)
    from edgeprune_runtime.step import step_runner

    (expected,) = step_runner(loaded).session.run(["attn_mass"], {
        **snapshot, "token_ids": np.asarray(new, np.int64), "visual_embeds": np.zeros((t, s.hidden_size), np.float32),
        "is_visual": np.zeros(t, np.float32), "slot_valid": np.ones(t, np.float32)})
    gained = evictor.mass[:n] - before[:n]
    assert gained.sum() > 0
    np.testing.assert_allclose(gained, expected[:n], rtol=1e-6, atol=1e-6)
    assert not evictor.mass[n:].any()  # the question's own slots start with no mass


def test_a_bundle_that_evicts_by_default_runs_stop_on_a_device_cache_unless_asked_by_name():
    """One heavy-hitter bundle serves a GPU backend too: its default falls back to stop where the cache lives in
    device memory (no host eviction); asking for an evicting policy by name there is refused with the fix."""
    from edgeprune_runtime.cache_policy import BundleCache

    head_dim, capacity = 8, 64
    cache = BundleCache.from_manifest({"policy": "heavy-hitter", "sinks": 4, "pin_image": True, "attn_mass": True,
                                       "rope_inv_freq": [1.0, 0.1, 0.01, 0.001]}, head_dim, capacity)
    assert cache.resolve(None, None, None, capacity, per_layer=False, on_host=True).name == "heavy-hitter"
    on_gpu = cache.resolve(None, None, None, capacity, per_layer=False, on_host=False)
    assert (on_gpu.name, on_gpu.sinks) == ("stop", 4)
    for name in ("sink-window", "heavy-hitter"):
        with pytest.raises(RuntimeStatusError) as e:
            cache.resolve(name, None, None, capacity, per_layer=False, on_host=False)
        assert e.value.status == Status.INVALID_ARGUMENT and "--backend cpu" in e.value.message
    assert cache.resolve("stop", None, None, capacity, per_layer=False, on_host=False).name == "stop"
