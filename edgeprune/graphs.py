"""The three exportable graphs as torch modules built from a loaded LLaVA-NeXT's own submodules.

Every input varies only in content, never in shape (README "How it works": static shapes with validity masks); the interfaces are the
ones documented in `edgeprune_runtime.manifest`. The modules call transformers' own layers
(CLIP encoder layers, RMSNorm, MLP, projector) and re-write only what must change for static
export: token selection, mask/position construction, and attention over a fixed-size cache.
"""

from __future__ import annotations

import torch
from torch import nn

from edgeprune.selection import SelectionInputs, SelectionParams, get_strategy
from edgeprune_runtime.layout import INVALID_KEY
from edgeprune_runtime.manifest import Shapes

NEG = -1.0e9  # additive mask value for fp32; finite so a fully masked padding row cannot produce NaN


def feature_layer_count(config) -> int:
    """How many CLIP layers produce `hidden_states[vision_feature_layer]` (-2 -> all but the last)."""
    layer = config.vision_feature_layer
    total = config.vision_config.num_hidden_layers
    return layer if layer >= 0 else total + 1 + layer


def cls_attention(layer, hidden: torch.Tensor, with_keys: bool = False):
    """CLS-query attention over patch keys, softmax over all keys, summed over heads.

    Recomputed from the layer's own q/k projections of its `layer_norm1` input, so the result
    does not depend on the attention implementation. hidden [P, 1+N, Dv] -> scores [P, N]
    (and, `with_keys`, the patch keys [P, N, Dv] for similarity-based merging).
    """
    attn = layer.self_attn
    x = layer.layer_norm1(hidden)
    p, t, _ = x.shape
    heads, dh = attn.num_heads, attn.head_dim
    keys = attn.k_proj(x)  # [P, 1+N, Dv]
    q = attn.q_proj(x[:, :1]).view(p, 1, heads, dh).transpose(1, 2)  # [P, H, 1, dh]
    k = keys.view(p, t, heads, dh).transpose(1, 2)  # [P, H, 1+N, dh]
    probs = torch.softmax(torch.matmul(q, k.transpose(2, 3)) * attn.scale, dim=-1)  # [P, H, 1, 1+N]
    scores = probs.sum(dim=1)[:, 0, 1:]  # [P, N]
    return (scores, keys[:, 1:]) if with_keys else scores


BASE_INPUTS = ("pixel_values", "patch_valid", "patch_key", "patch_row")
NEWLINE_INPUTS = ("newline_key", "newline_valid")
VISION_OUTPUTS = ("visual_embeds", "visual_valid", "visual_source")


class VisionGraph(nn.Module):
    """pixels -> CLIP (up to the feature layer) -> K selected tokens -> projector (+ newline slots), sorted.

    Inputs are `input_names` (positional, in that order): the pixels, the layout masks every
    strategy uses, the extra layout inputs of the recipe's strategy, and the newline slots'
    keys/validity when newlines are kept.
    """

    def __init__(self, model, shapes: Shapes, recipe):
        super().__init__()
        inner = model.model
        self.tower = inner.vision_tower
        self.projector = inner.multi_modal_projector
        self.image_newline = inner.image_newline  # [D]
        self.layers = nn.ModuleList(self.tower.encoder.layers[: feature_layer_count(model.config)])
        self.shapes = shapes
        self.strategy = get_strategy(recipe.strategy)
        self.spec = self.strategy.spec
        self.keep_newlines = shapes.newline_slots > 0
        self.params = SelectionParams(k=shapes.visual_topk, budget=recipe.budget, alpha=recipe.alpha,
                                      contextual=recipe.contextual, seed=recipe.seed,
                                      # the most heads of any layer: CLS-attention sums stay below it after head pruning
                                      heads=max(layer.self_attn.num_heads for layer in self.layers),
                                      patch_grid=shapes.patch_grid)
        self.input_names = (*BASE_INPUTS, *self.spec.layout_inputs,
                            *(NEWLINE_INPUTS if self.keep_newlines else ()))
        from edgeprune.vision_prune import keep_counts

        # {layer: patch tokens kept per partition from that layer on}; {} = every token runs every layer
        self.keep = keep_counts(recipe.vision_keep, shapes.patches_per_partition, len(self.layers),
                                shapes.partitions, shapes.visual_topk)

    def forward(self, *inputs):
        s = self.shapes
        named = dict(zip(self.input_names, inputs))
        h = self.tower.pre_layrnorm(self.tower.embeddings(named["pixel_values"]))  # [P, 1+N, Dv]
        valid = named["patch_valid"]  # [P, N]
        early = keys = scores = None
        origin = None  # [P, n] original patch index of each surviving token once the tower prunes
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            if i == 0 and self.spec.early_scores:
                early = cls_attention(layer, h)  # layer 0: HiRED's budget allocation [P, N]
            if i in self.keep:
                h, origin = _prune_tokens(layer, h, valid, origin, self.keep[i])
            if i == last:
                scores = cls_attention(layer, h, with_keys=self.spec.keys)  # feature layer [P, n]
                if self.spec.keys:
                    scores, keys = scores
            h = layer(h, None)
        features = h[:, 1:]  # [P, n, Dv], CLS dropped
        if origin is not None:  # survivors back to their raster places; dropped patches become padding
            place = (origin[:, :, None] == torch.arange(s.patches_per_partition)[None, None, :]).to(h.dtype)  # [P, n, N]
            features = torch.matmul(place.transpose(1, 2), features)  # [P, N, Dv], zeros where dropped
            scores = torch.matmul(scores[:, None, :], place)[:, 0]  # [P, N]
            keys = torch.matmul(place.transpose(1, 2), keys) if keys is not None else None
            valid = valid * place.sum(dim=1)  # [P, N]

        x = SelectionInputs(scores=scores, valid=valid, features=features, early_scores=early,
                            keys=keys, layout={n: named[n] for n in self.spec.layout_inputs})
        sel = self.strategy.fn(x, self.params)
        flat_features = sel.features if sel.features is not None else features.reshape(-1, features.shape[-1])
        flat_key = sel.key if sel.key is not None else named["patch_key"].reshape(-1)

        # sorted: TensorRT 10's parser requires TopK sorted=1 (onnx-tensorrt operators.md @ 10.1-GA)
        idx = torch.topk(sel.priority, s.visual_topk, largest=True, sorted=True).indices  # [K]
        sel_valid = (sel.priority[idx] > 0.5).to(torch.float32)
        key = torch.where(sel_valid > 0, flat_key[idx], torch.full_like(sel_valid, INVALID_KEY))
        embeds = self.projector(flat_features[idx])  # [K, D]; the projector runs only on kept tokens
        source = idx

        if self.keep_newlines:
            # A newline slot is real when its stitched row exists and holds at least one kept token.
            rows = torch.arange(s.newline_slots, dtype=torch.float32)
            sel_row = torch.where(sel_valid > 0, named["patch_row"].reshape(-1)[idx], torch.full_like(sel_valid, -1.0))
            hit = (sel_row[None, :] == rows[:, None]).to(torch.float32)  # [R, K]
            nl_valid = named["newline_valid"] * (hit.sum(dim=1) > 0).to(torch.float32)  # [R]
            if s.visual_topk >= s.partitions * s.patches_per_partition:
                # Keep-all reproduces transformers, which ends every unpadded row with a newline, even a
                # row left with zero columns by unpadding (very thin images).
                nl_valid = named["newline_valid"]
            nl_key = torch.where(nl_valid > 0, named["newline_key"], torch.full_like(nl_valid, INVALID_KEY))
            nl_embeds = self.image_newline[None, :].expand(s.newline_slots, -1)  # [R, D]
            embeds = torch.cat([embeds, nl_embeds], dim=0)
            sel_valid = torch.cat([sel_valid, nl_valid])
            key = torch.cat([key, nl_key])
            nl_source = torch.arange(s.newline_slots, dtype=torch.int64) + s.partitions * s.patches_per_partition
            source = torch.cat([source, nl_source])

        # Back to sequence order: ascending key, padding last. [V]
        order = torch.topk(-key, s.visual_slots, largest=True, sorted=True).indices
        out_valid = sel_valid[order]
        out_source = torch.where(out_valid > 0, source[order], torch.full_like(source[order], -1))
        # Invalid slots are zeros: which padding patch fills them is a TopK tie, backend-dependent.
        return embeds[order] * out_valid[:, None], out_valid, out_source


def _prune_tokens(layer, h: torch.Tensor, valid: torch.Tensor, origin, keep: int):
    """Keeps the CLS token and the `keep` patch tokens of each partition with the highest CLS attention at
    `layer`'s input (padding patches last). h [P, 1+n, Dv], valid [P, N], origin [P, n] or None (n = N)
    -> h [P, 1+keep, Dv], origin [P, keep]. Static: one TopK (k = keep <= 576) and gathers."""
    scores = cls_attention(layer, h)  # [P, n]
    alive = valid if origin is None else torch.gather(valid, 1, origin)  # [P, n]
    scores = torch.where(alive > 0, scores, torch.full_like(scores, -1.0))  # CLS attention >= 0: padding last
    idx = torch.topk(scores, keep, dim=1, largest=True, sorted=True).indices  # [P, keep]
    patches = torch.gather(h[:, 1:], 1, idx[:, :, None].expand(-1, -1, h.shape[-1]))  # [P, keep, Dv]
    return torch.cat([h[:, :1], patches], dim=1), (idx if origin is None else torch.gather(origin, 1, idx))


def _rope(inv_freq: torch.Tensor, scaling: float, positions: torch.Tensor):
    """cos/sin [T, Dh] for float positions [T] (as transformers' default rotary embedding)."""
    freqs = positions[:, None] * inv_freq[None, :]  # [T, Dh/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos() * scaling, emb.sin() * scaling


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def _apply_rope(x, cos, sin):  # x [heads, T, Dh]; cos/sin [T, Dh]
    return x * cos + _rotate_half(x) * sin


def _last_valid_row(x, valid, slot):
    """x [T, D], valid/slot [T] -> [1, D]: the row of the last real slot.

    ArgMax over a [1, T] view: TensorRT's ArgMax (a TopK) needs at least 2 dimensions.
    """
    last = torch.argmax((valid * (slot + 1.0))[None, :], dim=1)  # [1]
    return torch.index_select(x, 0, last)


def kv_names(prefix: str, layers) -> list[str]:
    """["<prefix>key_<l>", "<prefix>value_<l>", ...] for each layer l, the order every LM graph uses."""
    return [f"{prefix}{kind}_{i}" for i in layers for kind in ("key", "value")]


def cache_valid_names(per_layer: bool, layers) -> list[str]:
    """The decode/step graphs' cache validity inputs: one per layer, or the one shared `cache_valid`
    (edgeprune_runtime.manifest.per_layer_validity decides which)."""
    return [f"cache_valid_{i}" for i in layers] if per_layer else ["cache_valid"]


class _LanguageModel(nn.Module):
    """Shared pieces of prefill and decode: the LM's own embedding, layers, norm, head and RoPE table.

    `drops` {layer l: V_{l+1}}: after layer l only V_{l+1} visual slots go on (shapes.layer_visual_slots).
    """

    def __init__(self, model, shapes: Shapes, per_layer_valid: bool = False):
        super().__init__()
        lm = model.model.language_model
        self.embed = lm.embed_tokens
        self.layers = lm.layers
        self.norm = lm.norm
        self.lm_head = model.lm_head
        self.register_buffer("inv_freq", lm.rotary_emb.inv_freq.detach().clone().float(), persistent=False)
        self.rope_scaling = float(getattr(lm.rotary_emb, "attention_scaling", 1.0))
        self.shapes = shapes
        self.per_layer_valid = per_layer_valid
        s = shapes
        self.drops = {i: s.visual_slots_at(i + 1) for i in range(s.num_layers - 1)
                      if s.visual_slots_at(i + 1) < s.visual_slots_at(i)}
        # layers that run on fewer visual slots than the prefill has: their slots' validity is an output
        self.dropped_layers = [i for i in range(s.num_layers) if s.visual_slots_at(i) < s.visual_slots]

    def qkv(self, layer, x, cos, sin):
        """x [T, D] -> q [H, T, Dh], k/v [Hkv, T, Dh] with RoPE applied to q and k."""
        attn = layer.self_attn
        t, dh = x.shape[0], attn.head_dim
        q = attn.q_proj(x).view(t, -1, dh).transpose(0, 1)
        k = attn.k_proj(x).view(t, -1, dh).transpose(0, 1)
        v = attn.v_proj(x).view(t, -1, dh).transpose(0, 1)
        return _apply_rope(q, cos, sin), _apply_rope(k, cos, sin), v

    def mlp_block(self, layer, x):
        return x + layer.mlp(layer.post_attention_layernorm(x))

    def logits(self, x_last):  # [1, D] -> [vocab]
        return self.lm_head(self.norm(x_last))[0]

    def cache_masks(self, rest, layers):
        """(additive mask [C_l] per layer in `layers`, past K/V list) from the graph's trailing inputs
        (one validity input per layer, or one shared input whose mask is computed once)."""
        n = len(layers)
        if self.per_layer_valid:
            return [(1.0 - valid) * NEG for valid in rest[:n]], rest[n:]
        return [(1.0 - rest[0]) * NEG] * n, rest[1:]


def _visual_scores(probs: torch.Tensor, valid: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """FastV's score of every slot: the attention the last valid slot pays it, mean over heads.

    probs [H, T, T] (a layer's attention among the T slots), valid/slot [T] -> [T]. The query is the last
    valid slot: the last text token whenever the prompt ends in text (every chat template does).
    """
    last = torch.argmax((valid * (slot + 1.0))[None, :], dim=1)  # [1]
    return torch.index_select(probs, 1, last).mean(dim=0)[0]  # [T]


class PrefillGraph(_LanguageModel):
    """[text-before | visual | text-after] slots -> logits of the last valid slot + K/V of every slot.

    In-LLM visual-token dropping (FastV / PyramidDrop; YOPO with KEEP = 0): after layer l in `drops`, only
    the KEEP visual slots the last valid slot attends to most (layer l's attention, mean over heads) go on,
    gathered with the text slots into T1 + KEEP + T2 rows, so later layers physically run on fewer slots:

        x [T1+V+T2, D] ── layer l ──┬─ probs[:, last, T1:T1+V].mean(heads) ─ TopK(KEEP) ─ idx
                                    └─ x[:T1] | x[T1+idx] | x[T1+V:] ─ [T1+KEEP+T2, D] ─ layer l+1 ...

    Positions, slot indices (the causal order) and validity are gathered with the rows, so a kept token
    keeps its position and the causal mask stays that of the full sequence. Outputs: logits, K/V of layer l
    [Hkv_l, S_l, Dh] and, for each layer on fewer slots, its slots' validity `slot_valid_<l>` [S_l].
    """

    def __init__(self, model, shapes: Shapes):
        super().__init__(model, shapes)
        self.input_names = ("text_ids", "text_valid", "visual_embeds", "visual_valid")
        self.output_names = ("logits", *kv_names("", range(shapes.num_layers)),
                             *(f"slot_valid_{i}" for i in self.dropped_layers))

    def forward(self, text_ids, text_valid, visual_embeds, visual_valid):
        s = self.shapes
        t1 = s.text_slots_before_image
        text = self.embed(text_ids)  # [T1+T2, D]
        x = torch.cat([text[:t1], visual_embeds, text[t1:]], dim=0)  # [S, D]
        valid = torch.cat([text_valid[:t1], visual_valid, text_valid[t1:]])  # [S]
        positions = torch.clamp(torch.cumsum(valid, dim=0) - 1.0, min=0.0)  # count of valid slots before
        cos, sin = _rope(self.inv_freq, self.rope_scaling, positions)
        # Slot indices derived from an input, not arange: a constant-folded [S, S] causal mask would be
        # stored in the graph file (861 KB for the tiny twin, 38 MB at S = 3080).
        slot = torch.cumsum(torch.ones_like(valid), dim=0) - 1.0  # [S] 0, 1, 2, ...
        allowed = (slot[None, :] <= slot[:, None]).to(torch.float32) * valid[None, :]  # causal & real keys
        mask = (1.0 - allowed) * NEG  # [S, S] additive

        presents, kept_valid = [], []
        v = s.visual_slots  # visual slots present, at rows [T1, T1 + v)
        rows = s.prefill_slots  # S_l
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            if i in self.dropped_layers:
                kept_valid.append(valid)
            q, k, v_ = self.qkv(layer, layer.input_layernorm(x), cos, sin)
            presents += [k, v_]
            groups = q.shape[0] // k.shape[0]
            k_all = k.repeat_interleave(groups, dim=0) if groups > 1 else k  # [H, S_l, Dh]
            v_all = v_.repeat_interleave(groups, dim=0) if groups > 1 else v_
            probs = torch.softmax(torch.matmul(q, k_all.transpose(1, 2)) * attn.scaling + mask, dim=-1)
            out = torch.matmul(probs, v_all).transpose(0, 1).reshape(rows, -1)  # [S_l, H*Dh]
            x = x + attn.o_proj(out)
            x = self.mlp_block(layer, x)
            if i in self.drops:
                keep = self.drops[i]
                pick = _visual_picker(_visual_scores(probs, valid, slot), valid, t1, v, keep)
                x, valid, slot, cos, sin = (pick(a) for a in (x, valid, slot, cos, sin))
                rows, v = rows - v + keep, keep
                allowed = (slot[None, :] <= slot[:, None]).to(torch.float32) * valid[None, :]
                mask = (1.0 - allowed) * NEG  # [S_l, S_l]

        return (self.logits(_last_valid_row(x, valid, slot)), *presents, *kept_valid)


def _visual_picker(scores, valid, t1: int, v: int, keep: int):
    """A function gathering rows [T1 + v + T2, ...] -> [T1 + keep + T2, ...]: the text rows and the `keep`
    valid visual rows (rows T1..T1+v) of highest score, in descending score (TensorRT's TopK is sorted);
    padding visual slots only when fewer than `keep` are valid (they stay invalid)."""
    if keep == 0:  # YOPO: the visual tokens leave the sequence
        return lambda a: torch.cat([a[:t1], a[t1 + v:]], dim=0)
    vis = scores[t1:t1 + v]
    vis = torch.where(valid[t1:t1 + v] > 0, vis, torch.full_like(vis, -1.0))  # attention >= 0: padding last
    idx = torch.topk(vis, keep, largest=True, sorted=True).indices + t1  # [keep]
    return lambda a: torch.cat([a[:t1], torch.index_select(a, 0, idx), a[t1 + v:]], dim=0)


class DecodeGraph(_LanguageModel):
    """One token + the fixed-size cache -> logits + only the new K/V slice (the runtime writes it).

    Attention is split into cache part and self part so the cache is only read, never copied:

        q ──┬─ q·Kcacheᵀ [Hkv,G,C] + mask ─┐
            └─ q·k_new   [Hkv,G,1] ────────┴─ softmax ─┬─ p[:C]·Vcache ─┬─ + ─ o_proj
                                                        └─ p[C]·v_new ───┘

    `skip` > 0 (SkipDecode): the lowest `skip` layers do not run; the token's embedding enters layer `skip`,
    and the graph reads and writes only the caches of the layers that run. Layer l's cache holds C_l slots.

    `attn_mass` (the heavy-hitter cache policy, edgeprune_runtime/cache_policy.py): one more output `attn_mass` [C],
    the attention probability the token pays each cache slot, summed over heads and layers (one mass per slot, so
    every layer evicts the same slots). Without it the graph is exactly as it always was.
    """

    def __init__(self, model, shapes: Shapes, per_layer_valid: bool = False, skip: int = 0, attn_mass: bool = False):
        super().__init__(model, shapes, per_layer_valid)
        self.skip = skip
        self.attn_mass = attn_mass
        run = range(skip, shapes.num_layers)
        self.input_names = ("token_id", "position", *cache_valid_names(per_layer_valid, run), *kv_names("past_", run))
        self.output_names = ("logits", *kv_names("new_", run), *(("attn_mass",) if attn_mass else ()))

    def forward(self, token_id, position, *rest):
        run = range(self.skip, self.shapes.num_layers)
        x = self.embed(token_id)  # [1, D]
        cos, sin = _rope(self.inv_freq, self.rope_scaling, position.to(torch.float32))
        masks, past = self.cache_masks(rest, run)  # [C_l] each
        news, mass = [], []
        for j, i in enumerate(run):
            layer = self.layers[i]
            attn = layer.self_attn
            past_k, past_v = past[2 * j], past[2 * j + 1]  # [Hkv, C_l, Dh]
            mask = masks[j]
            q, k, v = self.qkv(layer, layer.input_layernorm(x), cos, sin)  # q [H,1,Dh], k/v [Hkv,1,Dh]
            news += [k, v]
            hkv, dh = k.shape[0], k.shape[2]
            capacity = self.shapes.cache_slots_at(i)
            qg = q.reshape(hkv, -1, dh)  # [Hkv, G, Dh]: the G query heads sharing one KV head
            past_scores = torch.matmul(qg, past_k.transpose(1, 2)) * attn.scaling + mask  # [Hkv, G, C_l]
            self_score = (qg * k).sum(dim=-1, keepdim=True) * attn.scaling  # [Hkv, G, 1]
            probs = torch.softmax(torch.cat([past_scores, self_score], dim=-1), dim=-1)
            out = torch.matmul(probs[..., :capacity], past_v) + probs[..., capacity:] * v
            if self.attn_mass:
                mass.append(probs[..., :capacity].sum(dim=(0, 1)))  # [C]: over the Hkv x G query heads
            x = x + attn.o_proj(out.reshape(1, -1))
            x = self.mlp_block(layer, x)
        return (self.logits(x), *news, *((torch.stack(mass).sum(dim=0),) if self.attn_mass else ()))


class StepGraph(_LanguageModel):
    """T new slots (text tokens or visual embeddings) attending to the fixed-size cache and to each other.

    The language model for TensorRT: one graph whose first dimension T is dynamic, so one engine with
    two optimization profiles (T = S for prefill, T in [1, 2] for decode) holds the weights once
    (README "Targets": two engines would each embed the whole LM). Prefill is a step over an empty
    cache; decode is a step of one slot. Positions continue from `position` (the valid slots already
    in the cache) counting only valid new slots, as the prefill graph does.

        x ─ q ──┬─ q·Kcacheᵀ [Hkv,G·T,C] + cache mask ──┐
                └─ q·k_newᵀ  [Hkv,G·T,T] + causal mask ─┴─ softmax ─┬─ p[:C]·Vcache ─┬─ + ─ o_proj
                                                                     └─ p[C:]·v_new ──┘

    Visual-token dropping here masks instead of gathering: TensorRT's TopK needs a constant k, and with T
    dynamic the kept row count T - V + KEEP is not one. After layer l in `drops` a new visual slot stays valid
    when its rank among the valid new visual slots (by the same score as the prefill graph's) is below KEEP;
    later layers mask the others as keys, and `new_valid_<l>` [T] says which of the T new K/V rows layer l
    keeps (the prefill graph's `slot_valid_<l>`, uncompacted). Decode steps have no visual slot: no change.

    `attn_mass` (heavy-hitter, as DecodeGraph's): one more output `attn_mass` [C], the attention probability the
    T new slots pay each cache slot, summed over heads, valid query rows and layers (for T = 1, DecodeGraph's).
    """

    def __init__(self, model, shapes: Shapes, per_layer_valid: bool = False, attn_mass: bool = False):
        super().__init__(model, shapes, per_layer_valid)
        self.attn_mass = attn_mass
        layers = range(shapes.num_layers)
        self.input_names = ("token_ids", "visual_embeds", "is_visual", "slot_valid", "position",
                            *cache_valid_names(per_layer_valid, layers), *kv_names("past_", layers))
        self.output_names = ("logits", *kv_names("new_", layers), *(f"new_valid_{i}" for i in self.dropped_layers),
                             *(("attn_mass",) if attn_mass else ()))

    def forward(self, token_ids, visual_embeds, is_visual, slot_valid, position, *rest):
        # [T, D]: the token embedding of text slots, the given embedding of visual slots
        x = torch.where(is_visual[:, None] > 0.5, visual_embeds, self.embed(token_ids))
        count = torch.cumsum(slot_valid, dim=0)  # [T]
        positions = position.to(torch.float32) + torch.clamp(count - 1.0, min=0.0)
        cos, sin = _rope(self.inv_freq, self.rope_scaling, positions)
        slot = torch.cumsum(torch.ones_like(slot_valid), dim=0) - 1.0  # [T] 0, 1, 2, ...
        valid = slot_valid
        allowed = (slot[None, :] <= slot[:, None]).to(torch.float32) * valid[None, :]
        self_mask = (1.0 - allowed) * NEG  # [T, T] causal & real keys
        cache_masks, past = self.cache_masks(rest, range(self.shapes.num_layers))  # [C_l] each
        t = x.shape[0]
        news, kept_valid, mass = [], [], []
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            if i in self.dropped_layers:
                kept_valid.append(valid)
            past_k, past_v = past[2 * i], past[2 * i + 1]  # [Hkv, C_l, Dh]
            cache_mask = cache_masks[i]
            capacity = self.shapes.cache_slots_at(i)
            q, k, v = self.qkv(layer, layer.input_layernorm(x), cos, sin)  # q [H,T,Dh], k/v [Hkv,T,Dh]
            news += [k, v]
            hkv, dh = k.shape[0], k.shape[2]
            qg = q.reshape(hkv, -1, dh)  # [Hkv, G*T, Dh]: G query heads per KV head, T rows each
            past_scores = torch.matmul(qg, past_k.transpose(1, 2)) * attn.scaling + cache_mask  # [Hkv, G*T, C]
            self_scores = torch.matmul(qg, k.transpose(1, 2)).reshape(hkv, -1, t, t) * attn.scaling + self_mask
            probs = torch.softmax(torch.cat([past_scores, self_scores.reshape(hkv, -1, t)], dim=-1), dim=-1)
            out = torch.matmul(probs[..., :capacity], past_v) + torch.matmul(probs[..., capacity:], v)
            if self.attn_mass:
                # [C]: over Hkv and the G x T query rows; padding rows (slot_valid 0) pay nothing
                rows = probs[..., :capacity].reshape(hkv, -1, t, capacity) * valid[:, None]
                mass.append(rows.sum(dim=(0, 1, 2)))
            out = out.reshape(-1, t, dh).transpose(0, 1).reshape(t, -1)  # [T, H*Dh]
            x = x + attn.o_proj(out)
            x = self.mlp_block(layer, x)
            if i in self.drops:
                scores = _visual_scores(probs[..., capacity:].reshape(-1, t, t), valid, slot)  # [T]
                valid = _keep_top_visual(scores, valid, is_visual, slot, self.drops[i])
                allowed = (slot[None, :] <= slot[:, None]).to(torch.float32) * valid[None, :]
                self_mask = (1.0 - allowed) * NEG
        return (self.logits(_last_valid_row(x, valid, slot)), *news, *kept_valid,
                *((torch.stack(mass).sum(dim=0),) if self.attn_mass else ()))


def _keep_top_visual(scores, valid, is_visual, slot, keep: int):
    """valid [T] with every valid visual slot whose score ranks `keep` or lower cleared (ties: the earlier slot
    ranks first). Ranks by counting, not TopK, so T can stay dynamic: rank_i = #{valid visual j: s_j > s_i,
    or s_j == s_i and j before i}."""
    candidate = valid * is_visual  # [T]
    ahead = (scores[None, :] > scores[:, None]).to(torch.float32) + \
        (scores[None, :] == scores[:, None]).to(torch.float32) * (slot[None, :] < slot[:, None]).to(torch.float32)
    rank = (ahead * candidate[None, :]).sum(dim=1)  # [T]
    return valid * (1.0 - is_visual) + candidate * (rank < keep).to(torch.float32)
