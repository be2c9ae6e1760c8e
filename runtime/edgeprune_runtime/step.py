"""The step graph (`lm/step.onnx`) run over a request's KV cache: T new text slots after the cached ones.

The step graph takes T new slots (dynamic T in [1, prefill_slots]), reads the fixed-size cache and
returns the logits of its last valid slot plus the new slots' K/V; it writes nothing. Exact prompt
boundaries (byteprobs.py) use it two ways:

- `StepRunner.run(ids, cache)`: the logits after `ids` appended to what the cache holds, without
  touching the cache (one call per tokenization being scored);
- `append_slots(cache, keys, values)`: the one place where a step's K/V is written into the cache
  (the tokens chosen for the prompt's last word, before token-by-token decoding goes on).

The session shares the LM weights the Engine mapped once (engine.SharedWeights), so opening it costs
no second copy of the language model. It is opened on first use: bundles without `graphs.step`
(exported before the step graph existed) serve every request except exact boundaries.
"""

from __future__ import annotations

import threading

import numpy as np

from edgeprune_runtime.engine import Engine, _check_io, _declared, _run, open_session, session_options
from edgeprune_runtime.errors import RuntimeStatusError, Status, bundle_invalid
from edgeprune_runtime.kvcache import KVCache


class StepRunner:
    """The step session of one bundle; stateless (the cache is an argument), safe to share between threads."""

    def __init__(self, engine: Engine):
        m = engine.manifest
        if engine.backend.device != "cpu":  # this runner reads and writes the cache as host arrays
            raise RuntimeStatusError(Status.DEVICE_UNSUPPORTED, f"follow-up questions and exact prompt boundaries run on "
                                     f"the cpu backend only for now, not on {engine.backend.name}; use --backend cpu")
        if "step" not in m.graphs:
            raise RuntimeStatusError(Status.INVALID_ARGUMENT, "this bundle has no step graph (lm/step.onnx), which "
                                     "follow-up questions and exact prompt boundaries need; re-export it with this "
                                     "edgeprune version")
        if engine.step is not None:  # the Engine runs its LM through the step graph already (quantized bundles, CPU)
            self.session = engine.step  # one session: a second would prepack a second copy of the quantized weights
        else:
            onnx_info = m.data.get("onnx")
            quantized = isinstance(onnx_info, dict) and onnx_info.get("precision") in ("int8", "int4")
            options = session_options(prepacking=quantized)  # the same rule as the prefill/decode sessions (engine.py)
            engine.weights.add_to(options, ("|i1", "|u1") if quantized else ())
            self.session = open_session(m.path(m.graphs["step"]["file"], "graphs.step.file"), options, "step")
        self.shapes = engine.shapes
        self.per_layer_valid = engine.per_layer_valid  # cache_valid_<l> per layer, or layer 0's mask as cache_valid
        self.cache_dtype = engine.cache_dtype
        self.max_slots = engine.shapes.prefill_slots  # the exported range of T
        self.attn_mass = engine.mass_output()  # {"attn_mass": [C]} on heavy-hitter bundles (run's mass_out), else {}
        self._check_contract()

    def _check_contract(self) -> None:
        """Every input the runtime feeds and output it reads is declared with the manifest's shapes (T symbolic) and
        the type `run` feeds or reads, as the prefill/decode graphs are checked (engine.Engine._check_contract).
        Raises RuntimeStatusError(BUNDLE_INVALID) naming the first mismatch."""
        s = self.shapes
        layers = range(s.num_layers)
        cache = {np.float32: "tensor(float)", np.float16: "tensor(float16)"}[np.dtype(self.cache_dtype).type]
        valid = ({f"cache_valid_{i}": [s.cache_slots_at(i)] for i in layers} if self.per_layer_valid
                 else {"cache_valid": [s.cache_capacity]})
        past = {f"past_{kv}_{i}": [s.kv_heads[i], s.cache_slots_at(i), s.head_dim] for kv in ("key", "value") for i in layers}
        new = {f"new_{kv}_{i}": [s.kv_heads[i], "T", s.head_dim] for kv in ("key", "value") for i in layers}
        inputs = {"token_ids": ["T"], "visual_embeds": ["T", s.hidden_size], "is_visual": ["T"], "slot_valid": ["T"],
                  "position": [1], **valid, **past}
        din, dout = _declared(self.session.get_inputs()), _declared(self.session.get_outputs())
        _check_io("step", din, inputs, "input")
        mass = self.attn_mass
        _check_io("step", dout, {"logits": [s.vocab_size], **new, **mass}, "output")
        types = {**{name: (dout, "tensor(float)") for name in mass},
                 "token_ids": (din, "tensor(int64)"), "position": (din, "tensor(int64)"),
                 **{name: (din, "tensor(float)") for name in ("visual_embeds", "is_visual", "slot_valid", *valid)},
                 **{name: (din, cache) for name in past}, "logits": (dout, "tensor(float)"),
                 **{name: (dout, cache) for name in new}}
        for name, (declared, want) in types.items():
            if declared[name][1] != want:
                raise bundle_invalid(f"step graph {name!r} has type {declared[name][1]}, the runtime needs {want} "
                                     "(the decode graph's cache type); re-export")

    def run(self, token_ids, cache: KVCache, mass_out: np.ndarray | None = None):
        """ids (a sequence of T >= 1 token ids) after the `position` tokens the cache holds
        -> (logits [vocab] f32 after the last id, keys, values: per layer [Hkv_l, T, Dh]). The cache is only read.
        `mass_out` [C] (a bundle with attn_mass only): receives the attention the T new slots paid each cache slot,
        summed over heads, rows and layers (cache_policy.Evictor.observe).

        Raises RuntimeStatusError: INVALID_ARGUMENT when T is outside [1, prefill_slots], INFERENCE_FAILED when ORT
        fails, BUNDLE_INVALID when an output's shape is not the manifest's."""
        t = len(token_ids)
        if not 1 <= t <= self.max_slots:
            raise RuntimeStatusError(Status.INVALID_ARGUMENT, f"a step takes 1 to {self.max_slots} slots, got {t}")
        s = self.shapes
        layers = range(s.num_layers)
        feeds = {
            "token_ids": np.asarray(token_ids, np.int64),
            "visual_embeds": np.zeros((t, s.hidden_size), np.float32),  # [T, D], unused: no slot is visual
            "is_visual": np.zeros(t, np.float32),
            "slot_valid": np.ones(t, np.float32),
            "position": np.array([cache.position], np.int64),  # tokens seen so far: the first new slot's position
            **({f"cache_valid_{i}": cache.valid[i] for i in layers} if self.per_layer_valid
               else {"cache_valid": cache.valid[0]}),
            **{f"past_key_{i}": cache.keys[i] for i in layers},
            **{f"past_value_{i}": cache.values[i] for i in layers},
        }
        names = ["logits"] + [f"new_key_{i}" for i in layers] + [f"new_value_{i}" for i in layers]
        expected = [(s.vocab_size,)] + [(s.kv_heads[i], t, s.head_dim) for i in layers] * 2
        if mass_out is not None:
            if not self.attn_mass:
                raise RuntimeStatusError(Status.INTERNAL_ERROR, "attention mass asked of a step graph without attn_mass")
            names.append("attn_mass")
            expected.append((s.cache_capacity,))
        out = _run(self.session, "step", names, feeds)
        # ORT does not hold outputs to their declared shapes: a graph could broadcast into the cache or desync it
        for name, value, shape in zip(names, out, expected):
            if value.shape != shape:
                raise bundle_invalid(f"the step graph returned {name!r} of shape {list(value.shape)} for {t} slots, "
                                     f"the manifest's shapes say {list(shape)}; re-export the bundle")
        n = s.num_layers
        if mass_out is not None:
            mass_out[:] = out[-1]
        return out[0], out[1:1 + n], out[1 + n:1 + 2 * n]


def append_slots(cache: KVCache, keys, values) -> None:
    """Writes the K/V of T step slots (per layer [Hkv_l, T, Dh]) into the cache's next T slots, in order.

    The only place where step outputs enter a cache. Raises RuntimeStatusError(CACHE_FULL) when they do not fit."""
    cache.append(keys, values)


_open_lock = threading.Lock()


def step_runner(bundle) -> StepRunner:
    """The bundle's StepRunner, opened once (thread-safe) and kept on the bundle."""
    with _open_lock:
        runner = getattr(bundle, "_step_runner", None)
        if runner is None:
            if bundle.engine is None:
                raise RuntimeStatusError(Status.INVALID_ARGUMENT, "this bundle was loaded without sessions")
            runner = bundle._step_runner = StepRunner(bundle.engine)
        return runner
