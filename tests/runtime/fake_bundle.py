"""A tiny bundle that obeys the manifest.py contract, built with `onnx` (no torch), plus its numpy twin.

The "language model" is not attention, but every output depends on exactly the cache state the
runtime must maintain, *including the order of the cache slots and each token's position*, so a
wrong slot, a swapped pair of slots, a missed valid flag or a wrong position changes the tokens:

    x_j    = embedding of the token at position j (text: embed[id]; visual: the vision graph's output)
    k_lj   = x_j @ Wk_l, v_lj = x_j @ Wv_l      (what the cache holds: layer l, [Hkv_l, Dh] per slot)
    w(j)   = 1 + 0.5 sin(0.9 j)                  a weight that differs from position to position
    h      = sin(x_n + n pos_vec + sum_j w(j) sum_l (k_lj @ A_l + v_lj @ B_l))     over positions j <= n
    logits = h @ head

for the newest token at position n. Prefill applies this to the valid prefill slots (position = count
of valid slots before it); decode reads every layer's K and V from the cache, weighting slot j by w(j)
(slot index = position, since the runtime keeps the cache compacted), plus the new token itself.
`reference_tokens` is the numpy twin for greedy decoding (float64).

The vision graph: visual_embeds = vis_table + mean(pixel_values); visual_valid = the first K
patch_valid flags (then newline_valid when the bundle has newline slots).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

try:  # the runtime never imports onnx; only building this fake bundle needs it
    import onnx
    from onnx import TensorProto, helper, numpy_helper
except ImportError:  # tests that build a fake bundle skip (make_fake_bundle -> pytest.skip)
    onnx = None

SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
CORPUS = [
    "USER: What is in the picture? ASSISTANT: A cat sits on the table next to a red cup.",
    "Describe the image. The robot arm holds a blue box above the shelf.",
    "How many people are there? Three people walk on the street. yes no left right",
]
TEMPLATE = "USER: <image>\n{prompt} ASSISTANT:"
PINPOINTS = [[28, 56], [56, 28], [56, 56]]
CROP, PATCH = 28, 14


def train_tokenizer():
    """Byte-level BPE with a TemplateProcessing post-processor adding "<s>", and "<image>" special."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 3, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    return tok


@dataclass
class FakeLM:
    embed: np.ndarray  # [vocab, D]
    wk: list  # per layer [D, Hkv_l*Dh]
    wv: list
    ak: list  # per layer [Hkv_l*Dh, D]: how a cached key feeds the next token
    bv: list  # per layer [Hkv_l*Dh, D]: how a cached value feeds the next token
    pos_vec: np.ndarray  # [1, D]
    head: np.ndarray  # [D, vocab]
    kv_heads: tuple
    head_dim: int
    vis_table: np.ndarray  # [V, D] the vision graph's per-slot embedding

    def kv(self, x: np.ndarray, layer: int):
        """x [T, D] -> key, value [Hkv, T, Dh]."""
        h, dh = self.kv_heads[layer], self.head_dim
        k = (x @ self.wk[layer]).reshape(len(x), h, dh).transpose(1, 0, 2)
        v = (x @ self.wv[layer]).reshape(len(x), h, dh).transpose(1, 0, 2)
        return k, v

    def logits(self, xs: np.ndarray) -> np.ndarray:
        """xs [n, D]: the valid sequence so far in position order, the newest last."""
        xs = xs.astype(np.float64)
        n = len(xs)
        mixed = sum(xs @ self.wk[l].astype(np.float64) @ self.ak[l] + xs @ self.wv[l].astype(np.float64) @ self.bv[l]
                    for l in range(len(self.kv_heads)))  # [n, D]
        h = np.sin(xs[-1] + (n - 1) * self.pos_vec[0] + position_weight(np.arange(n)) @ mixed)
        return h @ self.head


def position_weight(positions: np.ndarray) -> np.ndarray:
    return 1.0 + 0.5 * np.sin(0.9 * positions)


def reference_tokens(lm: FakeLM, sequence: np.ndarray, count: int, eos=()) -> list[int]:
    """Greedy tokens for the valid prefill sequence `sequence` [n, D] (what the runtime must produce)."""
    xs, out = sequence.astype(np.float64), []
    for _ in range(count):
        token = int(np.argmax(lm.logits(xs)))
        out.append(token)
        if token in eos:
            break
        xs = np.concatenate([xs, lm.embed[token][None].astype(np.float64)])
    return out


def _external(name, array, location, offset):
    t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape)
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(array.nbytes))):
        e = t.external_data.add()
        e.key, e.value = k, v
    return t


def _write_weights(path: Path, arrays: dict[str, np.ndarray]) -> list[dict]:
    entries = []
    with open(path, "wb") as f:
        for name, a in arrays.items():
            f.write(b"\0" * ((-f.tell()) % 64))
            entries.append({"name": name, "offset": f.tell(), "length": a.nbytes, "dtype": a.dtype.str, "shape": list(a.shape)})
            f.write(a.tobytes())
    return entries


def _model(nodes, name, inputs, outputs, initializers):
    g = helper.make_graph(nodes, name, inputs, outputs, initializers)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _vi(name, dtype, shape):
    return helper.make_tensor_value_info(name, dtype, shape)


def _const(name, array):
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(array), name + "_value"))


F, I64 = (TensorProto.FLOAT, TensorProto.INT64) if onnx else (1, 7)


def make_fake_bundle(root: Path, *, newlines: bool = True, t1: int = 8, t2: int = 32, new_slots: int = 12,
                     visual_topk: int = 6, kv_heads=(2, 1), head_dim: int = 8, seed: int = 0) -> tuple[Path, FakeLM]:
    """Writes a bundle into `root` (created) and returns (root, the numpy twin of its LM)."""
    if onnx is None:
        pytest.skip("building the fake bundle needs `onnx` (pip install onnx); the runtime itself does not")
    root.mkdir(parents=True, exist_ok=True)
    (root / "vision").mkdir(exist_ok=True)
    (root / "lm").mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    tok = train_tokenizer()
    tok.save(str(root / "tokenizer.json"))
    vocab = tok.get_vocab_size()
    g = CROP // PATCH
    P, N = 1 + max((h // CROP) * (w // CROP) for h, w in PINPOINTS), g * g
    R = max(h // CROP for h, _ in PINPOINTS) * g if newlines else 0
    K, V = visual_topk, visual_topk + R
    D = kv_heads[0] * head_dim
    S, C = t1 + V + t2, t1 + V + t2 + new_slots
    L = len(kv_heads)

    # --- vision ---
    vis_table = rng.standard_normal((V, D)).astype(np.float32)
    entries = _write_weights(root / "vision" / "vision.weights", {"vis_table": vis_table})
    nodes = [
        helper.make_node("ReduceMean", ["pixel_values"], ["pix_mean"], keepdims=0),
        helper.make_node("Add", ["vis_table", "pix_mean"], ["visual_embeds"]),
        _const("flat_shape", np.array([-1], np.int64)), _const("zero", np.array([0], np.int64)),
        _const("k_end", np.array([K], np.int64)),
        helper.make_node("Reshape", ["patch_valid", "flat_shape"], ["pv_flat"]),
        helper.make_node("Slice", ["pv_flat", "zero", "k_end"], ["topk_valid"]),
        _const("visual_source", np.arange(V, dtype=np.int64)),
    ]
    inputs = [_vi("pixel_values", F, [P, 3, CROP, CROP]), _vi("patch_valid", F, [P, N]), _vi("patch_key", F, [P, N]),
              _vi("patch_row", F, [P, N])]
    if newlines:
        nodes.append(helper.make_node("Concat", ["topk_valid", "newline_valid"], ["visual_valid"], axis=0))
        inputs += [_vi("newline_key", F, [R]), _vi("newline_valid", F, [R])]
    else:
        nodes.append(helper.make_node("Identity", ["topk_valid"], ["visual_valid"]))
    vis = _model(nodes, "vision", inputs,
                 [_vi("visual_embeds", F, [V, D]), _vi("visual_valid", F, [V]), _vi("visual_source", I64, [V])],
                 [_external("vis_table", vis_table, "vision.weights", entries[0]["offset"])])
    onnx.save(vis, str(root / "vision" / "vision.onnx"))

    # --- LM weights, stored once ---
    lm = FakeLM(
        embed=rng.standard_normal((vocab, D)).astype(np.float32),
        wk=[(rng.standard_normal((D, h * head_dim)) * 0.3).astype(np.float32) for h in kv_heads],
        wv=[(rng.standard_normal((D, h * head_dim)) * 0.3).astype(np.float32) for h in kv_heads],
        ak=[(rng.standard_normal((h * head_dim, D)) * 0.08).astype(np.float32) for h in kv_heads],
        bv=[(rng.standard_normal((h * head_dim, D)) * 0.08).astype(np.float32) for h in kv_heads],
        pos_vec=(rng.standard_normal((1, D)) * 0.5).astype(np.float32),
        head=rng.standard_normal((D, vocab)).astype(np.float32),
        kv_heads=tuple(kv_heads), head_dim=head_dim, vis_table=vis_table,
    )
    lm.head[:, tok.token_to_id("<pad>")] = 0.0  # logit 0 while some other is > 0: greedy never picks <pad>
    arrays = {"embed": lm.embed, "pos_vec": lm.pos_vec, "head": lm.head}
    for layer in range(L):
        arrays[f"wk_{layer}"], arrays[f"wv_{layer}"] = lm.wk[layer], lm.wv[layer]
        arrays[f"ak_{layer}"], arrays[f"bv_{layer}"] = lm.ak[layer], lm.bv[layer]
    entries = _write_weights(root / "lm" / "lm.weights", arrays)
    (root / "lm" / "lm.weights.json").write_text(json.dumps({"file": "lm.weights", "tensors": entries}))
    inits = [_external(e["name"], arrays[e["name"]], "lm.weights", e["offset"]) for e in entries]

    def kv_nodes(x, t, prefix, out_k, out_v, layer):
        h = kv_heads[layer]
        return [
            _const(f"{prefix}shape{layer}", np.array([t, h, head_dim], np.int64)),
            helper.make_node("MatMul", [x, f"wk_{layer}"], [f"{prefix}k2d{layer}"]),
            helper.make_node("Reshape", [f"{prefix}k2d{layer}", f"{prefix}shape{layer}"], [f"{prefix}k3d{layer}"]),
            helper.make_node("Transpose", [f"{prefix}k3d{layer}"], [out_k], perm=[1, 0, 2]),
            helper.make_node("MatMul", [x, f"wv_{layer}"], [f"{prefix}v2d{layer}"]),
            helper.make_node("Reshape", [f"{prefix}v2d{layer}", f"{prefix}shape{layer}"], [f"{prefix}v3d{layer}"]),
            helper.make_node("Transpose", [f"{prefix}v3d{layer}"], [out_v], perm=[1, 0, 2]),
        ]

    def weight_nodes(pos, out, prefix):
        """w(pos) = 1 + 0.5 sin(0.9 pos), elementwise."""
        return [
            _const(f"{prefix}w_freq", np.array([0.9], np.float32)), _const(f"{prefix}w_half", np.array([0.5], np.float32)),
            _const(f"{prefix}w_one", np.array([1.0], np.float32)),
            helper.make_node("Mul", [pos, f"{prefix}w_freq"], [f"{prefix}w_arg"]),
            helper.make_node("Sin", [f"{prefix}w_arg"], [f"{prefix}w_sin"]),
            helper.make_node("Mul", [f"{prefix}w_sin", f"{prefix}w_half"], [f"{prefix}w_half_sin"]),
            helper.make_node("Add", [f"{prefix}w_half_sin", f"{prefix}w_one"], [out]),
        ]

    def mixed_nodes(k2d, v2d, layer, out, prefix):
        """k2d/v2d [T, Hkv_l*Dh] -> out [T, D] = k2d @ A_l + v2d @ B_l."""
        return [
            helper.make_node("MatMul", [k2d, f"ak_{layer}"], [f"{prefix}ka{layer}"]),
            helper.make_node("MatMul", [v2d, f"bv_{layer}"], [f"{prefix}vb{layer}"]),
            helper.make_node("Add", [f"{prefix}ka{layer}", f"{prefix}vb{layer}"], [out]),
        ]

    def sum_nodes(names, out, prefix):
        if len(names) == 1:
            return [helper.make_node("Identity", names, [out])]
        nodes, acc = [], names[0]
        for i, name in enumerate(names[1:]):
            nxt = out if i == len(names) - 2 else f"{prefix}acc{i}"
            nodes.append(helper.make_node("Add", [acc, name], [nxt]))
            acc = nxt
        return nodes

    # prefill: positions are the count of valid slots before each slot
    T = t1 + t2
    nodes = [
        _const("zero", np.array([0], np.int64)), _const("t1", np.array([t1], np.int64)), _const("tt", np.array([T], np.int64)),
        helper.make_node("Gather", ["embed", "text_ids"], ["te"]),
        helper.make_node("Slice", ["te", "zero", "t1"], ["te_before"]),
        helper.make_node("Slice", ["te", "t1", "tt"], ["te_after"]),
        helper.make_node("Concat", ["te_before", "visual_embeds", "te_after"], ["x"], axis=0),  # [S, D]
        helper.make_node("Slice", ["text_valid", "zero", "t1"], ["tv_before"]),
        helper.make_node("Slice", ["text_valid", "t1", "tt"], ["tv_after"]),
        helper.make_node("Concat", ["tv_before", "visual_valid", "tv_after"], ["valid"], axis=0),  # [S]
        _const("axis0", np.array(0, np.int64)),
        helper.make_node("CumSum", ["valid", "axis0"], ["valid_count"]),
        _const("one", np.array([1.0], np.float32)),
        helper.make_node("Sub", ["valid_count", "one"], ["slot_pos"]),  # [S] position of each valid slot
    ]
    nodes += weight_nodes("slot_pos", "slot_w", "p")
    nodes.append(helper.make_node("Mul", ["slot_w", "valid"], ["slot_wv"]))  # [S] invalid slots weigh 0
    mixed = []
    for layer in range(L):
        nodes += [helper.make_node("MatMul", ["x", f"wk_{layer}"], [f"pmk{layer}"]),
                  helper.make_node("MatMul", ["x", f"wv_{layer}"], [f"pmv{layer}"])]
        nodes += mixed_nodes(f"pmk{layer}", f"pmv{layer}", layer, f"pmixed{layer}", "p")
        mixed.append(f"pmixed{layer}")
    nodes += sum_nodes(mixed, "pmixed", "p")  # [S, D]
    nodes += [
        helper.make_node("Unsqueeze", ["slot_wv", "zero"], ["slot_wv_row"]),  # [1, S]
        helper.make_node("MatMul", ["slot_wv_row", "pmixed"], ["vsum"]),  # [1, D]
        _const("slot1", np.arange(1, S + 1, dtype=np.float32)),
        helper.make_node("Mul", ["valid", "slot1"], ["slot_key"]),
        helper.make_node("ArgMax", ["slot_key"], ["last"], keepdims=1),  # [1]
        helper.make_node("Gather", ["x", "last"], ["x_last"]),  # [1, D]
        helper.make_node("ReduceSum", ["valid"], ["count"], keepdims=1),  # [1]
        helper.make_node("Sub", ["count", "one"], ["pos"]),
        helper.make_node("Mul", ["pos", "pos_vec"], ["posv"]),  # [1, D]
        helper.make_node("Add", ["x_last", "posv"], ["h0"]),
        helper.make_node("Add", ["h0", "vsum"], ["h_lin"]),
        helper.make_node("Sin", ["h_lin"], ["h"]),
        helper.make_node("MatMul", ["h", "head"], ["logits2d"]),
        _const("vocab_shape", np.array([vocab], np.int64)),
        helper.make_node("Reshape", ["logits2d", "vocab_shape"], ["logits"]),
    ]
    outs = [_vi("logits", F, [vocab])]
    for layer in range(L):
        nodes += kv_nodes("x", S, "p", f"key_{layer}", f"value_{layer}", layer)
    outs += [_vi(f"key_{i}", F, [kv_heads[i], S, head_dim]) for i in range(L)]
    outs += [_vi(f"value_{i}", F, [kv_heads[i], S, head_dim]) for i in range(L)]
    pre = _model(nodes, "prefill", [_vi("text_ids", I64, [T]), _vi("text_valid", F, [T]), _vi("visual_embeds", F, [V, D]),
                                    _vi("visual_valid", F, [V])], outs, inits)
    onnx.save(pre, str(root / "lm" / "prefill.onnx"))

    # decode: slot j of the cache holds the token at position j (compacted)
    nodes = [
        _const("zero", np.array([0], np.int64)),
        helper.make_node("Gather", ["embed", "token_id"], ["e"]),  # [1, D]
        _const("slot_index", np.arange(C, dtype=np.float32)),
    ]
    nodes += weight_nodes("slot_index", "cache_w", "d")
    nodes += [helper.make_node("Mul", ["cache_w", "cache_valid"], ["cache_wv"]),  # [C]
              helper.make_node("Unsqueeze", ["cache_wv", "zero"], ["cache_wv_row"]),  # [1, C]
              helper.make_node("Cast", ["position"], ["posf"], to=F)]
    nodes += weight_nodes("posf", "self_w", "s")  # [1] the new token's weight at its own position
    mixed = []
    for layer in range(L):
        width = kv_heads[layer] * head_dim
        nodes += [
            _const(f"c_shape{layer}", np.array([C, width], np.int64)),
            helper.make_node("Transpose", [f"past_key_{layer}"], [f"pk_t{layer}"], perm=[1, 0, 2]),  # [C, H, Dh]
            helper.make_node("Reshape", [f"pk_t{layer}", f"c_shape{layer}"], [f"pk_flat{layer}"]),  # [C, H*Dh]
            helper.make_node("Transpose", [f"past_value_{layer}"], [f"pv_t{layer}"], perm=[1, 0, 2]),
            helper.make_node("Reshape", [f"pv_t{layer}", f"c_shape{layer}"], [f"pv_flat{layer}"]),
            helper.make_node("MatMul", ["e", f"wk_{layer}"], [f"ek{layer}"]),  # the new token's own K/V
            helper.make_node("MatMul", ["e", f"wv_{layer}"], [f"ev{layer}"]),
        ]
        nodes += mixed_nodes(f"pk_flat{layer}", f"pv_flat{layer}", layer, f"cmixed{layer}", "c")  # [C, D]
        nodes += mixed_nodes(f"ek{layer}", f"ev{layer}", layer, f"smixed{layer}", "s")  # [1, D]
        nodes.append(helper.make_node("MatMul", ["cache_wv_row", f"cmixed{layer}"], [f"csum{layer}"]))  # [1, D]
        mixed += [f"csum{layer}", f"smixed_w{layer}"]
        nodes.append(helper.make_node("Mul", [f"smixed{layer}", "self_w"], [f"smixed_w{layer}"]))
    nodes += sum_nodes(mixed, "ctx", "d")
    nodes += [
        helper.make_node("Mul", ["posf", "pos_vec"], ["posv"]),
        helper.make_node("Add", ["e", "posv"], ["h0"]),
        helper.make_node("Add", ["h0", "ctx"], ["h_lin"]),
        helper.make_node("Sin", ["h_lin"], ["h"]),
        helper.make_node("MatMul", ["h", "head"], ["logits2d"]),
        _const("vocab_shape", np.array([vocab], np.int64)),
        helper.make_node("Reshape", ["logits2d", "vocab_shape"], ["logits"]),
    ]
    ins = [_vi("token_id", I64, [1]), _vi("position", I64, [1]), _vi("cache_valid", F, [C])]
    ins += [_vi(f"past_key_{i}", F, [kv_heads[i], C, head_dim]) for i in range(L)]
    ins += [_vi(f"past_value_{i}", F, [kv_heads[i], C, head_dim]) for i in range(L)]
    outs = [_vi("logits", F, [vocab])]
    for layer in range(L):
        nodes += kv_nodes("e", 1, "d", f"new_key_{layer}", f"new_value_{layer}", layer)
    outs += [_vi(f"new_key_{i}", F, [kv_heads[i], 1, head_dim]) for i in range(L)]
    outs += [_vi(f"new_value_{i}", F, [kv_heads[i], 1, head_dim]) for i in range(L)]
    dec = _model(nodes, "decode", ins, outs, inits)
    onnx.save(dec, str(root / "lm" / "decode.onnx"))

    shapes = dict(partitions=P, crop_size=CROP, patch_grid=g, patches_per_partition=N, visual_topk=K, newline_slots=R,
                  visual_slots=V, text_slots_before_image=t1, text_slots_after_image=t2, prefill_slots=S,
                  cache_capacity=C, hidden_size=D, vocab_size=vocab, num_layers=L, kv_heads=list(kv_heads),
                  head_dim=head_dim)
    files = ["tokenizer.json", "vision/vision.onnx", "vision/vision.weights", "lm/prefill.onnx", "lm/decode.onnx",
             "lm/lm.weights", "lm/lm.weights.json"]
    manifest = {
        "schema_version": 1,
        "source": {"model": "fake", "weights_sha256": "0" * 64},
        "recipe": {"budget": 0.5},
        "shapes": shapes,
        "preprocess": {"image_grid_pinpoints": PINPOINTS, "crop_size": CROP, "shortest_edge": CROP,
                       "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "rescale_factor": 1 / 255,
                       "resample": 3, "partitions": P},
        "tokenizer": {"file": "tokenizer.json", "image_token": "<image>", "image_token_id": tok.token_to_id("<image>"),
                      "eos_token_ids": [tok.token_to_id("</s>")]},
        "prompt_template": TEMPLATE,
        "graphs": {"vision": {"file": "vision/vision.onnx"}, "prefill": {"file": "lm/prefill.onnx"},
                   "decode": {"file": "lm/decode.onnx"}, "lm_weights": "lm/lm.weights"},
        "files": {rel: hashlib.sha256((root / rel).read_bytes()).hexdigest() for rel in files},
        # a `cache` section (cache_policy.BundleCache) with the stop policy: parsed at every load, so the fuzz suite's
        # manifest mutations reach it, while runs behave as without it
        "cache": {"policy": "stop", "sinks": 2, "pin_image": True, "attn_mass": False,
                  "rope_inv_freq": (10000.0 ** (-np.arange(0, head_dim, 2) / head_dim)).tolist()},
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return root, lm


def set_manifest(root: Path, **changes) -> None:
    """Rewrites top-level manifest keys (the manifest itself is not hashed)."""
    path = root / "manifest.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data, indent=1))


def prefill_sequence(lm: FakeLM, tok, prompt_ids_before, prompt_ids_after, visual_embeds, visual_valid) -> np.ndarray:
    """The valid prefill sequence [n, D] in order text-before | valid visual | text-after."""
    parts = [lm.embed[prompt_ids_before], visual_embeds[visual_valid > 0.5], lm.embed[prompt_ids_after]]
    return np.concatenate(parts).astype(np.float32)
