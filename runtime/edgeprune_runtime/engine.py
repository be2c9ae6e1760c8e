"""ONNX Runtime sessions for a bundle's three graphs, with the LM weights loaded once for two of them.

Weight sharing: `lm/lm.weights` is referenced (as ONNX external data, under the same tensor names)
by both `prefill.onnx` and `decode.onnx`. We memory-map it once and hand every tensor to both
sessions with `SessionOptions.add_initializer(name, OrtValue)`; ORT then uses our buffer instead
of loading the external data, so each weight byte exists once, in the page cache, shared by the
two sessions (and by other processes serving the same bundle). Tensor names, offsets and dtypes
come from the exporter's `lm/lm.weights.json`, because the runtime must not import `onnx`.

Prepacking: ORT's CPU MatMul/Gemm kernels copy constant weights into a packed layout per session
("prepacking"). With shared weights that is one private copy of the whole LM per session on top of
the shared map, which defeats the point, so it is off for the LM graphs; decode (GEMV) does not
gain from it anyway. EDGEPRUNE_LM_PREPACK=1 turns it back on for the prefill graph only (faster
prefill at the cost of one extra copy). The vision graph has its own weights used by one session,
so it keeps ORT's defaults (prepacked; ORT then drops its map of vision.weights: still one copy).

Measured (ORT 1.32, 2-core x86 VM shared with other jobs, so times are noisy; llava-next-7b-shape
with 2 LM layers: lm.weights 2.55 GB, vision.weights 1.25 GB; PSS after one 48-token answer):

    LM sessions                                     PSS       decode ms/token   prefill (704 slots)
    shared map, no prepacking (default)             4.70 GB   62                3.4-6.5 s
    shared map, prefill prepacked (LM_PREPACK=1)    6.74 GB   63                3.0-6.2 s (5-25% faster)
    shared map, both prepacked                      8.79 GB   same              same as above
    ORT loads lm.weights itself, prepacking on      6.75 GB   (two private packed copies, no map)

Quantized bundles (--precision int8/int4) run on the CPU through the one `step` graph too (backends.select
.cpu_backend): their matmul weights must be prepacked, ORT prepacks per session into private memory, so two
LM sessions would hold two packed copies of weights that lm.weights stores once; one session holds one.

Paired A/B on the same process: decode 62.0 vs 63.1 ms/token without/with prepacking. ORT 1.32
also memory-maps external data it loads itself when prepacking is off (same PSS as ours, double
RSS), but that is loader behaviour of one version; `add_initializer` makes sharing explicit.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from edgeprune_runtime import checks
from edgeprune_runtime.backends.select import CPU, Backend, cpu_backend
from edgeprune_runtime.env import env_flag, env_int
from edgeprune_runtime.errors import RuntimeStatusError, Status, bundle_invalid
from edgeprune_runtime.kvcache import KVCache, prefill_slot_valid
from edgeprune_runtime.manifest import Manifest, WeightEntry, per_layer_validity

_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


def _one_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


# --- the shared LM weights -------------------------------------------------------------------


# dtypes a weights index may name (what the exporter writes for fp32/fp16 graphs and their int/bool constants)
WEIGHT_DTYPES = ("<f2", "<f4", "<f8", "|i1", "<i2", "<i4", "<i8", "|u1", "<u2", "<u4", "<u8", "|b1")
MAX_INDEX_BYTES = 64 << 20  # a 7B model's index is ~50 KB
MAX_TENSORS = 1 << 20
MAX_RANK = 8


def read_weight_index(index_path: Path, weights_name: str, size: int) -> list[WeightEntry]:
    """The tensors of `<weights>.json` (untrusted): names unique, dtypes from WEIGHT_DTYPES, shapes matching
    lengths, every byte range aligned and inside the `size`-byte weights file.

    Raises RuntimeStatusError(BUNDLE_INVALID) naming the index and the first bad tensor."""
    what = index_path.name
    data = checks.load_json(index_path, MAX_INDEX_BYTES, "weights index")
    if not isinstance(data, dict) or not isinstance(data.get("tensors"), list) or len(data["tensors"]) > MAX_TENSORS:
        raise bundle_invalid(f"{what} is malformed: an object with a list 'tensors' (at most {MAX_TENSORS}) is required")
    if data.get("file", weights_name) != weights_name:
        raise bundle_invalid(f"{what} indexes {checks.show(data['file'])}, not {weights_name}; re-export the bundle")
    entries, names = [], set()
    for t in data["tensors"]:
        if not isinstance(t, dict) or any(k not in t for k in ("name", "offset", "length", "dtype", "shape")):
            raise bundle_invalid(f"{what} is malformed: tensor {checks.show(t)} needs name, offset, length, dtype, shape")
        name = checks.need_str(t["name"], f"{what} tensor name", 4096)
        if name in names:
            raise bundle_invalid(f"{what}: tensor {checks.show(name)} is listed twice; re-export the bundle")
        names.add(name)
        at = f"{what} tensor {checks.show(name)}"
        offset = checks.need_int(t["offset"], f"{at} offset", 0, 1 << 62)
        length = checks.need_int(t["length"], f"{at} length", 0, 1 << 62)
        if t["dtype"] not in WEIGHT_DTYPES:
            raise bundle_invalid(f"{at} has unknown dtype {checks.show(t['dtype'])} (expected one of {', '.join(WEIGHT_DTYPES)})")
        dims = checks.need_list(t["shape"], f"{at} shape", MAX_RANK)
        shape = tuple(checks.need_int(d, f"{at} shape", 0, 1 << 62) for d in dims)
        dtype = np.dtype(t["dtype"])
        if offset + length > size:
            raise bundle_invalid(f"{at} [{offset}, +{length}) lies outside {weights_name} ({size} bytes)")
        if math.prod(shape) * dtype.itemsize != length:
            raise bundle_invalid(f"{at} has {length} bytes, shape {list(shape)} x {dtype} needs another size")
        if offset % dtype.itemsize:
            raise bundle_invalid(f"{at} at offset {offset} is not aligned to its {dtype.itemsize}-byte dtype")
        entries.append(WeightEntry(name, offset, length, t["dtype"], shape))
    return entries


class SharedWeights:
    """One read-only memory map of a weights file and one OrtValue per tensor in it.

    The OrtValues wrap views of the map (no copy); they and the map must outlive every session
    they were added to, so a session owner keeps this object as long as its sessions.
    """

    def __init__(self, weights_path: Path, index_path: Path):
        size = checks.regular_file(weights_path, "LM weights").st_size
        checks.regular_file(index_path, f"{index_path.name} (the tensor index of {weights_path.name})")
        entries = read_weight_index(index_path, weights_path.name, size)
        self.path = weights_path
        self.entries = entries
        self.map = np.memmap(weights_path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
        self.arrays: dict[str, np.ndarray] = {}
        self.values = {}
        import onnxruntime as ort

        for t in entries:
            view = self.map[t.offset:t.offset + t.length].view(np.dtype(t.dtype)).reshape(t.shape)
            self.arrays[t.name] = view
            self.values[t.name] = ort.OrtValue.ortvalue_from_numpy(view)  # CPU: wraps, does not copy

    def add_to(self, options, skip_dtypes: tuple[str, ...] = ()) -> None:
        """Makes `options`' session use these buffers for the same-named initializers, except tensors of
        `skip_dtypes` (ORT then loads those itself from the graph's external data).

        Names the graph does not have are ignored by ORT (checked with ORT 1.32).
        """
        for t in self.entries:
            if t.dtype not in skip_dtypes:
                options.add_initializer(t.name, self.values[t.name])


# --- sessions ----------------------------------------------------------------------------------


def session_options(prepacking: bool = True):
    """ORT session options: default threading unless EDGEPRUNE_THREADS is set; no CPU arena unless
    EDGEPRUNE_CPU_ARENA=1 (env.py).

    Why no arena: each session's arena keeps the high-water mark of its own activations, so the vision session's
    (5 crops through CLIP) and the LM's stay reserved side by side; with malloc, what vision frees is reused by
    prefill. scripts/peak_memory.py measures both settings (README "Speed": docs/results/peak-memory-7b-shape-fast.json)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    threads = env_int("EDGEPRUNE_THREADS", minimum=1)
    if threads is not None:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3  # errors only; ORT's warnings are not the embedding application's business
    so.enable_cpu_mem_arena = env_flag("EDGEPRUNE_CPU_ARENA", default=False)
    if not prepacking:
        so.add_session_config_entry("session.disable_prepacking", "1")
    return so


def open_session(path: Path, options, what: str, backend: Backend = CPU):
    """A session of `backend`'s providers. On a GPU backend no node may fall back to the CPU (a silent
    fallback would move the cache through the host on every step): ORT then refuses the graph instead.

    Raises RuntimeStatusError(BUNDLE_INVALID) when ORT cannot load the graph, DEVICE_UNSUPPORTED when the
    GPU backend's provider cannot run one of its nodes."""
    import onnxruntime as ort

    if not path.is_file():
        raise bundle_invalid(f"{what} graph {path} is missing; re-export the bundle")
    if backend.device != "cpu":
        options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    try:
        return ort.InferenceSession(str(path), options, providers=list(backend.providers))
    except Exception as e:  # ORT raises its own pybind exception types (Fail, InvalidGraph, ...)
        if backend.device != "cpu":
            raise RuntimeStatusError(Status.DEVICE_UNSUPPORTED, f"the {backend.name} backend cannot run the {what} graph "
                                     f"{path.name}: {_one_line(e)}; use --backend cpu") from None
        raise bundle_invalid(f"ONNX Runtime cannot load {what} graph {path.name}: {_one_line(e)}") from None


def _declared(args) -> dict[str, tuple[list, str]]:
    return {a.name: (list(a.shape), a.type) for a in args}


def _same_shape(got: list, want: list) -> bool:
    """A declared shape against the contract's: an int dim matches only itself, a str dim (a dynamic axis such as
    the step graph's "T") matches any symbolic dim (ORT gives its name, or None when it has none)."""
    return len(got) == len(want) and all((g is None or isinstance(g, str)) if isinstance(w, str) else g == w
                                         for g, w in zip(got, want))


def _check_io(what: str, declared: dict, expected: dict[str, list[int]], kind: str, optional=()) -> None:
    """Every expected name is declared (unless optional) with the expected static shape; nothing else."""
    for name, shape in expected.items():
        if name not in declared:
            if name in optional:
                continue
            raise bundle_invalid(f"{what} graph lacks the {kind} {name!r} required by the bundle contract (manifest.py); re-export")
        got = declared[name][0]
        if not _same_shape(got, shape):
            raise bundle_invalid(f"{what} graph {kind} {name!r} has shape {got}, the manifest's shapes say {shape}; re-export")
    extra = sorted(set(declared) - set(expected))
    if extra and kind == "input":
        raise bundle_invalid(f"{what} graph has inputs {extra} this runtime does not know; update edgeprune-runtime or re-export")


class Engine:
    """The sessions of one bundle on one backend; stateless between requests (the cache lives in a Decoder).

    The language model runs as one of two graph contracts (Backend.lm):
        "prefill-decode"  prefill.onnx (S slots -> K/V of every slot) and decode.onnx (one token over the cache), plus
                          SkipDecode's decode graphs: the CPU backend, where the sessions share one memory map of
                          the weights, and the GPU backends for bundles whose layers hold different tokens
        "step"            one graph, T slots over the cache (lm/step.onnx, or the TensorRT engine built from it):
                          prefill is a step of S slots over an empty cache (on the CPU: steps of Backend.prefill_chunk
                          valid slots, `_prefill_in_steps`), decode a step of one slot. One session, so the weights
                          are on the GPU once (two sessions would each copy them there)
    Either way `start` returns the prefill's logits and a filled cache, and `decoder` binds that cache.
    """

    def __init__(self, manifest: Manifest, backend: Backend | None = None):
        """Sessions of `backend` (backends.select; default: the CPU's, `cpu_backend`): its providers run every graph,
        its device holds the cache."""
        backend = backend if backend is not None else cpu_backend(manifest)
        self.manifest = manifest
        self.shapes = manifest.shapes
        self.backend = backend
        self.device = backend.make_device()
        graphs = manifest.graphs  # their presence and paths were checked by load_manifest
        engines = backend.engines  # trt: the EPContext wrapper models of the engines, bundle-relative
        vision_path = manifest.path(engines.get("vision", graphs["vision"]["file"]), "graphs.vision.file")
        weights_path = manifest.path(graphs["lm_weights"], "graphs.lm_weights")
        index_path = manifest.path(graphs["lm_weights"] + ".json", "graphs.lm_weights index")

        # a TensorRT LM engine holds its own weights: nothing to map for it
        self.weights = SharedWeights(weights_path, index_path) if "lm" not in engines else None
        lm_prepack = env_flag("EDGEPRUNE_LM_PREPACK")
        # Quantized LM graphs (--precision int8/int4) need prepacking in both sessions: MatMulNBits unpacked
        # dequantizes every weight on every call (decode 24x slower on the tiny twin, measured), and the packed
        # copies are INT8/INT4-sized, not fp32 (the shared map is then only read while the sessions load).
        onnx_info = manifest.data.get("onnx")
        quantized = isinstance(onnx_info, dict) and onnx_info.get("precision") in ("int8", "int4")
        self.vision = open_session(vision_path, session_options(prepacking=True), "vision", backend)
        # Quantized matmul weights (int8/uint8) are prepacked into a private copy anyway: ORT reads them itself and
        # frees them after packing, where a shared map would keep them resident too. Float tensors (embeddings,
        # norms) stay shared.
        skip = ("|i1", "|u1") if quantized else ()
        self.skip_decode = manifest.skip_decode
        self.per_layer_valid = per_layer_validity(self.shapes, self.skip_decode)
        self.prefill = self.decode = self.step = None
        self.decode_skip = {}
        if backend.lm == "step":
            if self.per_layer_valid:
                raise RuntimeStatusError(Status.DEVICE_UNSUPPORTED, f"the {backend.name} backend's step graph path does "
                                         "not run bundles whose layers hold different tokens (visual-token dropping, "
                                         "SkipDecode) yet; use --backend cuda or cpu")
            if "lm" in engines:
                self.step = open_session(manifest.path(engines["lm"], "engines lm context_file"),
                                         session_options(prepacking=False), "lm engine", backend)
            else:
                if "step" not in graphs:
                    raise bundle_invalid(f"the {backend.name} backend runs the step graph, which this bundle lacks "
                                         "(exported by an older edgeprune); re-export it or use --backend cpu")
                step_opts = session_options(prepacking=quantized)
                self.weights.add_to(step_opts, skip)
                self.step = open_session(manifest.path(graphs["step"]["file"], "graphs.step.file"), step_opts, "step", backend)
        else:
            prefill_opts = session_options(prepacking=lm_prepack or quantized)
            decode_opts = session_options(prepacking=quantized)
            self.weights.add_to(prefill_opts, skip)
            self.weights.add_to(decode_opts, skip)
            self.prefill = open_session(manifest.path(graphs["prefill"]["file"], "graphs.prefill.file"), prefill_opts,
                                        "prefill", backend)
            self.decode = open_session(manifest.path(graphs["decode"]["file"], "graphs.decode.file"), decode_opts,
                                       "decode", backend)
            # SkipDecode: one decode graph per skip count (the lowest k layers skipped), the same shared weights
            for k in self.skip_decode.skips[1:]:
                rel = graphs["decode_skip"][str(k)]["file"]
                opts = session_options(prepacking=quantized)
                self.weights.add_to(opts, skip)
                self.decode_skip[k] = open_session(manifest.path(rel, f"graphs.decode_skip.{k}.file"), opts,
                                                   f"decode (skip {k})", backend)
        self._check_contract()

    def _check_contract(self) -> None:
        """Every input/output the runtime feeds or reads is declared with the manifest's static shape
        (Shapes.check already tied the sizes to each other), so no buffer the runtime sizes from the
        manifest can disagree with the graphs."""
        s = self.shapes
        P, N, R, V = s.partitions, s.patches_per_partition, s.newline_slots, s.visual_slots
        T, S, C = s.text_slots_before_image + s.text_slots_after_image, s.prefill_slots, s.cache_capacity
        vin = _declared(self.vision.get_inputs())
        # Each selection strategy declares only the layout inputs it reads (layout.Layout.feeds lists them all;
        # hired-reference, say, reads released_valid/released_key instead of patch_valid/patch_key).
        layout_inputs = {
            "patch_valid": [P, N], "patch_key": [P, N], "patch_row": [P, N], "newline_key": [R], "newline_valid": [R], "partition_real": [P],
            "base_region": [N], "released_valid": [P, N], "released_key": [P, N],
        }
        _check_io("vision", vin, {
            "pixel_values": [P, 3, s.crop_size, s.crop_size], **layout_inputs,
        }, "input", optional=tuple(layout_inputs))
        _check_io("vision", _declared(self.vision.get_outputs()),
                  {"visual_embeds": [V, s.hidden_size], "visual_valid": [V], "visual_source": [V]}, "output")
        self.vision_inputs = tuple(vin)

        self.cache_dtype = None
        if self.step is not None:
            self._check_step()
            return
        # prefill: layer l outputs K/V of its S_l slots; a layer on fewer slots (visual tokens dropped) also their validity
        kv = {}
        for layer, h in enumerate(s.kv_heads):
            kv[f"key_{layer}"] = kv[f"value_{layer}"] = [h, s.prefill_slots_at(layer), s.head_dim]
            if s.visual_slots_at(layer) < V:
                kv[f"slot_valid_{layer}"] = [s.prefill_slots_at(layer)]
        _check_io("prefill", _declared(self.prefill.get_inputs()), {
            "text_ids": [T], "text_valid": [T], "visual_embeds": [V, s.hidden_size], "visual_valid": [V],
        }, "input")
        _check_io("prefill", _declared(self.prefill.get_outputs()), {"logits": [s.vocab_size], **kv}, "output")
        for k, session in {0: self.decode, **self.decode_skip}.items():
            self._check_decode(session, "decode" if not k else f"decode (skip {k})", k)

    def _check_step(self) -> None:
        """The step graph (or its engine's wrapper model, which declares the same): T slots, T dynamic (a name), every
        layer on the one shared cache of C slots (Engine refuses per-layer bundles on this path)."""
        s = self.shapes
        din, dout = _declared(self.step.get_inputs()), _declared(self.step.get_outputs())
        t = din.get("token_ids", ([None], ""))[0][0]
        if isinstance(t, int) and t > 0:
            raise bundle_invalid(f"step graph input 'token_ids' has the fixed size {t}; its first dimension must be dynamic (re-export)")
        past, new = {}, {}
        for layer, h in enumerate(s.kv_heads):
            past[f"past_key_{layer}"] = past[f"past_value_{layer}"] = [h, s.cache_capacity, s.head_dim]
            new[f"new_key_{layer}"] = new[f"new_value_{layer}"] = [h, t, s.head_dim]
        _check_io("step", din, {"token_ids": [t], "visual_embeds": [t, s.hidden_size], "is_visual": [t], "slot_valid": [t],
                                "position": [1], "cache_valid": [s.cache_capacity], **past}, "input")
        mass = self.mass_output()
        _check_io("step", dout, {"logits": [s.vocab_size], **new, **mass}, "output")
        kinds = {din[name][1] for name in past}
        if len(kinds) != 1 or next(iter(kinds)) not in ("tensor(float)", "tensor(float16)"):
            raise bundle_invalid(f"step graph cache inputs have types {sorted(kinds)}; float or float16 (one type) is required")
        cache_type = next(iter(kinds))
        self.cache_dtype = _ORT_DTYPES[cache_type]
        bound = {**{n: (din, "tensor(int64)") for n in ("token_ids", "position")},
                 **{n: (din, "tensor(float)") for n in ("is_visual", "slot_valid", "cache_valid")},
                 "logits": (dout, "tensor(float)"), **{name: (dout, cache_type) for name in new},
                 **{name: (dout, "tensor(float)") for name in mass}}
        for name, (declared, want) in bound.items():
            if declared[name][1] != want:
                raise bundle_invalid(f"step graph {name!r} has type {declared[name][1]}, the runtime binds {want}; re-export")
        self.embeds_dtype = _ORT_DTYPES.get(din["visual_embeds"][1], np.float32)

    def mass_output(self) -> dict:
        """{"attn_mass": [C]} for a bundle whose decode/step graphs output it (heavy-hitter, cache_policy.py), else {};
        the Decoder binds it to a float host buffer."""
        if not self.manifest.cache.attn_mass:
            return {}
        return {"attn_mass": [self.shapes.cache_capacity]}

    def _check_decode(self, session, what: str, skip: int) -> None:
        """A decode graph running layers skip.. reads their caches [Hkv_l, C_l, Dh] and validity (per layer
        or one shared [C]) and writes their new K/V slices; every decode graph has one cache dtype."""
        s = self.shapes
        run = range(skip, s.num_layers)
        past, new = {}, {}
        for layer in run:
            h = s.kv_heads[layer]
            past[f"past_key_{layer}"] = past[f"past_value_{layer}"] = [h, s.cache_slots_at(layer), s.head_dim]
            new[f"new_key_{layer}"] = new[f"new_value_{layer}"] = [h, 1, s.head_dim]
        valid = ({f"cache_valid_{layer}": [s.cache_slots_at(layer)] for layer in run} if self.per_layer_valid
                 else {"cache_valid": [s.cache_capacity]})
        din, dout = _declared(session.get_inputs()), _declared(session.get_outputs())
        _check_io(what, din, {"token_id": [1], "position": [1], **valid, **past}, "input")
        mass = self.mass_output() if not skip else {}  # SkipDecode graphs: plain decode, no eviction on such bundles
        _check_io(what, dout, {"logits": [s.vocab_size], **new, **mass}, "output")
        kinds = {din[name][1] for name in past}
        if len(kinds) != 1 or next(iter(kinds)) not in ("tensor(float)", "tensor(float16)"):
            raise bundle_invalid(f"{what} graph cache inputs have types {sorted(kinds)}; float or float16 (one type) is required")
        cache_type = next(iter(kinds))
        if self.cache_dtype is not None and _ORT_DTYPES[cache_type] != self.cache_dtype:
            raise bundle_invalid(f"{what} graph caches are {cache_type}, the decode graph's are not; re-export")
        self.cache_dtype = _ORT_DTYPES[cache_type]
        # the Decoder binds numpy buffers of these types to the decode graph once (engine.Decoder)
        bound = {"token_id": (din, "tensor(int64)"), "position": (din, "tensor(int64)"),
                 **{name: (din, "tensor(float)") for name in valid},
                 "logits": (dout, "tensor(float)"), **{name: (dout, cache_type) for name in new},
                 **{name: (dout, "tensor(float)") for name in mass}}
        for name, (declared, want) in bound.items():
            if declared[name][1] != want:
                raise bundle_invalid(f"{what} graph {name!r} has type {declared[name][1]}, the runtime binds {want}; re-export")

    # --- one call per graph ---

    def run_vision(self, pixel_values: np.ndarray, layout_feeds: dict[str, np.ndarray]):
        """pixel_values [P,3,H,W] + layout masks -> (visual_embeds [V,D], visual_valid [V], visual_source [V]).

        Only the inputs the graph declares are fed (a bundle without newline slots has none).
        """
        feeds = {"pixel_values": pixel_values}
        feeds.update({k: v for k, v in layout_feeds.items() if k in self.vision_inputs})
        return tuple(_run(self.vision, "vision", ["visual_embeds", "visual_valid", "visual_source"], feeds))

    def run_prefill(self, text_ids, text_valid, visual_embeds, visual_valid, cache: KVCache | None = None):
        """-> (logits [vocab] on the host, keys, values, slot_valid): keys/values per layer [Hkv_l, S_l, Dh] Buffers on
        the backend's device; slot_valid per layer [S_l] on the host (the prefill sequence's validity,
        `kvcache.prefill_slot_valid`, for a layer on every slot; the graph's `slot_valid_<l>` for a layer after a
        visual-token drop).

        The K/V outputs stay where the graph computed them (ORT allocates them on the device); only the logits
        (and drop validity) come back to the host. KVCache.fill_from_prefill then copies the valid slots on the
        device. The step graph reads a cache too: `cache`'s buffers, all masked (cache_valid 0), stand in for an
        empty one.
        """
        s = self.shapes
        n = s.num_layers
        full = prefill_slot_valid(text_valid, visual_valid, s.text_slots_before_image)
        if self.step is not None:
            session, what = self.step, "step"
            inputs = self._step_prefill_inputs(text_ids, text_valid, visual_embeds, visual_valid)
            kv_out = [f"new_key_{i}" for i in range(n)] + [f"new_value_{i}" for i in range(n)]
            dropped = []
        else:
            session, what = self.prefill, "prefill"
            inputs = {"text_ids": text_ids, "text_valid": text_valid, "visual_embeds": visual_embeds, "visual_valid": visual_valid}
            kv_out = [f"key_{i}" for i in range(n)] + [f"value_{i}" for i in range(n)]
            dropped = [i for i in range(n) if s.visual_slots_at(i) < s.visual_slots]
        if self.step is not None:
            cache = cache if cache is not None else self.new_cache()
        out = self._run_bound(session, what, inputs, kv_out, cache if self.step is not None else None,
                              [f"slot_valid_{i}" for i in dropped])
        kv = [self.device.wrap(v) for v in out[1:1 + 2 * n]]
        given = {i: v.numpy() for i, v in zip(dropped, out[1 + 2 * n:])}
        return out[0].numpy(), kv[:n], kv[n:], [given.get(i, full) for i in range(n)]

    def _run_bound(self, session, what: str, inputs: dict[str, np.ndarray], kv_out: list[str], cache: KVCache | None,
                   host_out: list[str] = ()) -> list:
        """One run of an LM graph: host `inputs`, `cache`'s buffers as past_key_l/past_value_l (step graph), `kv_out`
        left on the device -> OrtValues [logits, *kv_out, *host_out]."""
        binding = session.io_binding()
        for name, array in inputs.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        if cache is not None:
            for i in range(self.shapes.num_layers):
                binding.bind_ortvalue_input(f"past_key_{i}", cache.key_buffers[i].value)
                binding.bind_ortvalue_input(f"past_value_{i}", cache.value_buffers[i].value)
        binding.bind_output("logits", "cpu")
        for name in kv_out:
            binding.bind_output(name, self.device.name, self.device.device_id)
        for name in host_out:
            binding.bind_output(name, "cpu")
        try:
            session.run_with_iobinding(binding)
        except Exception as e:  # ORT's pybind exceptions
            raise RuntimeStatusError(Status.INFERENCE_FAILED, f"ONNX Runtime failed running the {what} graph: {_one_line(e)}") from None
        return binding.get_outputs()  # OrtValues, in binding order

    def _step_prefill_inputs(self, text_ids, text_valid, visual_embeds, visual_valid) -> dict[str, np.ndarray]:
        """The prefill sequence as S step slots: text-before | visual | text-after, position 0, an empty cache."""
        s = self.shapes
        t1, v = s.text_slots_before_image, s.visual_slots
        embeds = np.zeros((s.prefill_slots, s.hidden_size), self.embeds_dtype)  # [S, D]; text rows use token_ids
        embeds[t1:t1 + v] = visual_embeds
        is_visual = np.zeros(s.prefill_slots, np.float32)
        is_visual[t1:t1 + v] = 1.0
        return {"token_ids": np.concatenate([text_ids[:t1], np.zeros(v, np.int64), text_ids[t1:]]).astype(np.int64),
                "visual_embeds": embeds, "is_visual": is_visual,
                "slot_valid": prefill_slot_valid(text_valid, visual_valid, t1),
                "position": np.zeros(1, np.int64), "cache_valid": np.zeros(s.cache_capacity, np.float32)}

    def start(self, text_ids, text_valid, visual_embeds, visual_valid, cache: KVCache | None = None) -> tuple[np.ndarray, KVCache]:
        """Prefill into `cache` (an earlier request's, reused as it is) or a new one: -> (logits [vocab] of the last
        prompt slot, the cache holding the valid slots)."""
        cache = cache if cache is not None else self.new_cache()
        if self.step is not None and self.backend.prefill_chunk:
            inputs = self._step_prefill_inputs(text_ids, text_valid, visual_embeds, visual_valid)
            return self._prefill_in_steps(inputs, cache, self.backend.prefill_chunk), cache
        logits, keys, values, layer_valid = self.run_prefill(text_ids, text_valid, visual_embeds, visual_valid, cache)
        cache.fill_from_prefill(keys, values, layer_valid)
        return logits, cache

    def _prefill_in_steps(self, inputs: dict[str, np.ndarray], cache: KVCache, chunk: int) -> np.ndarray:
        """The step prefill (`_step_prefill_inputs`, S slots) as steps of at most `chunk` of its valid slots, each
        appending its K/V to `cache` (cleared first) before the next step reads them -> the last prompt slot's
        logits [vocab].

        The same sequence as one call over S slots: a masked slot is no key to any other and its K/V is never kept,
        so only valid slots are fed, and positions continue from the tokens already cached. What changes is the
        size of each step's attention tensors: [H, chunk, C + chunk] instead of [H, S, C + S]."""
        rows = np.flatnonzero(inputs["slot_valid"] > 0.5)  # [n] the prompt's tokens, in sequence order
        n = self.shapes.num_layers
        kv_out = [f"new_key_{i}" for i in range(n)] + [f"new_value_{i}" for i in range(n)]
        cache.clear()
        logits = None
        for first in range(0, len(rows), chunk):
            part = rows[first:first + chunk]
            feeds = {name: inputs[name][part] for name in ("token_ids", "visual_embeds", "is_visual", "slot_valid")}
            feeds |= {"position": np.array([cache.position], np.int64), "cache_valid": cache.valid[0]}
            out = self._run_bound(self.step, "step", feeds, kv_out, cache)
            logits = out[0].numpy()
            kv = [self.device.wrap(v) for v in out[1:]]
            cache.append(kv[:n], kv[n:])
        return logits

    def new_cache(self) -> KVCache:
        s = self.shapes
        return KVCache(s.kv_heads, [s.cache_slots_at(i) for i in range(s.num_layers)], s.head_dim, self.cache_dtype,
                       self.device)

    def decoder(self, cache: KVCache, evictor=None) -> "Decoder":
        """The decode sessions bound to `cache`; `evictor` (cache_policy.Evictor) makes room when it is full."""
        if self.step is not None:
            inputs = {"token_ids": np.zeros(1, np.int64), "visual_embeds": np.zeros((1, self.shapes.hidden_size), self.embeds_dtype),
                      "is_visual": np.zeros(1, np.float32), "slot_valid": np.ones(1, np.float32)}
            return Decoder({0: self.step}, cache, self.shapes.vocab_size, inputs=inputs, token_input="token_ids",
                           evictor=evictor)
        return Decoder({0: self.decode, **self.decode_skip}, cache, self.shapes.vocab_size, self.per_layer_valid,
                       self.skip_decode, evictor=evictor)


def _run(session, what: str, names: list[str], feeds: dict):
    try:
        return session.run(names, feeds)
    except Exception as e:  # ORT's pybind exceptions
        raise RuntimeStatusError(Status.INFERENCE_FAILED, f"ONNX Runtime failed running the {what} graph: {_one_line(e)}") from None


class Decoder:
    """The decode sessions bound once to one cache; only the small host inputs are bound again per step.

    Buffers (backends/device.py), all allocated once:
        past_key_l / past_value_l   the cache's [Hkv_l, C_l, Dh] buffers, on the backend's device (read in place)
        new_key_l / new_value_l     [Hkv_l, 1, Dh] staging buffers on the same device; after each run the cache
                                    copies them into each layer's next slot (KVCache.append: a 2-D copy on the device)
        logits                      [vocab] host numpy buffer: the only output that comes back per token
        token_id, position [1], cache validity [C_l] (and a step graph's one-slot inputs): host arrays, bound again
                                    before every run, because ORT copies a host input to the device when it is bound
    The graph cannot write its new slice straight into the cache: the slot is Hkv_l strided rows of a
    [Hkv_l, C_l, Dh] buffer, and ORT binds contiguous tensors only; a slot-major cache would need the decode
    graph to transpose the whole cache every step instead (README "GPU backends").

    SkipDecode: `sessions` {skip count k: decode session running layers k..}; each step runs the one the
    schedule names for its decode position, and only layers k.. get the token's K/V. Validity is bound per
    layer (`cache_valid_<l>`) or, when every layer holds the same tokens, layer 0's mask as `cache_valid`.
    """

    def __init__(self, sessions: dict, cache: KVCache, vocab: int, per_layer_valid: bool = False, schedule=None,
                 inputs: dict[str, np.ndarray] | None = None, token_input: str = "token_id", evictor=None):
        """`inputs`: the graphs' per-step host inputs besides position and validity (default: token_id; a step graph:
        token_ids, visual_embeds, is_visual, slot_valid for one text slot); `token_input` names the one the token goes in.
        `evictor` (cache_policy.Evictor, None = stop when full): evicts before a step that finds the cache full; for
        heavy-hitter the graph's `attn_mass` [C] is bound to a host buffer and handed to it after every step."""
        import onnxruntime as ort

        from edgeprune_runtime.manifest import SkipDecode

        self.sessions = sessions
        self.cache = cache
        self.schedule = schedule or SkipDecode()
        self.steps = 0  # decode position of the next step
        self.inputs = inputs if inputs is not None else {"token_id": np.zeros(1, np.int64)}
        self.token_id = self.inputs[token_input]  # [1]
        self.position = np.zeros(1, np.int64)
        self.logits = np.zeros(vocab, np.float32)
        device = cache.device
        self.new_keys = [device.zeros((k.shape[0], 1, k.shape[2]), k.dtype) for k in cache.key_buffers]  # [Hkv_l, 1, Dh]
        self.new_values = [device.zeros((v.shape[0], 1, v.shape[2]), v.dtype) for v in cache.value_buffers]
        layers = len(cache.key_buffers)
        self.bindings, self.host_inputs = {}, {}
        self._keep = [ort.OrtValue.ortvalue_from_numpy(self.logits)]  # the OrtValues must live as long as the bindings
        self.evictor = evictor
        self.attn_mass = np.zeros(cache.capacity, np.float32) if evictor is not None and evictor.needs_mass else None
        if self.attn_mass is not None:
            self._keep.append(ort.OrtValue.ortvalue_from_numpy(self.attn_mass))
        for skip, session in sessions.items():
            run = range(skip, layers)
            valid = [(f"cache_valid_{i}", cache.valid[i]) for i in run] if per_layer_valid else [("cache_valid", cache.valid[0])]
            binding = session.io_binding()
            for i in run:
                binding.bind_ortvalue_input(f"past_key_{i}", cache.key_buffers[i].value)
                binding.bind_ortvalue_input(f"past_value_{i}", cache.value_buffers[i].value)
            binding.bind_ortvalue_output("logits", self._keep[0])
            if self.attn_mass is not None:
                binding.bind_ortvalue_output("attn_mass", self._keep[1])  # [C]
            for i in run:
                binding.bind_ortvalue_output(f"new_key_{i}", self.new_keys[i].value)
                binding.bind_ortvalue_output(f"new_value_{i}", self.new_values[i].value)
            self.bindings[skip] = binding
            self.host_inputs[skip] = [*self.inputs.items(), ("position", self.position), *valid]

    def step(self, token_id: int) -> np.ndarray:
        """Runs `token_id` at the next position, appends its K/V to the cache; returns the logits buffer.

        The returned array is overwritten by the next step. Raises RuntimeStatusError(CACHE_FULL)
        when no slot is left and INFERENCE_FAILED when ORT fails.
        """
        skip = self.schedule.skip_at(self.steps)
        if self.cache.room(range(skip, len(self.cache.key_buffers))) <= 0:
            if self.evictor is None:
                raise RuntimeStatusError(Status.CACHE_FULL, f"the KV cache is full ({self.cache.capacity} slots)")
            self.evictor.make_room(1)  # CACHE_FULL when pinned slots fill the cache
        self.token_id[0] = token_id
        self.position[0] = self.cache.position  # the token's position; each layer's slots are compacted apart
        binding = self.bindings[skip]
        try:
            for name, array in self.host_inputs[skip]:
                binding.bind_cpu_input(name, array)
            self.sessions[skip].run_with_iobinding(binding)
        except Exception as e:
            raise RuntimeStatusError(Status.INFERENCE_FAILED, f"ONNX Runtime failed running the decode graph: {_one_line(e)}") from None
        if self.attn_mass is not None:
            self.evictor.observe(self.attn_mass)  # before the append: the new slot has received no attention yet
        self.cache.append(self.new_keys[skip:], self.new_values[skip:], first_layer=skip)
        self.steps += 1
        return self.logits
