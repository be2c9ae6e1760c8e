"""`export --report`: parameters, matmul FLOPs per stage and KV-cache bytes of a model under `Shapes`.

Computed from the modules' own weight shapes (after any rewrite) and the static sizes, for the graphs
as exported: every static slot is computed whether valid or not (the graphs are static).

    vision   the patch embedding (a convolution, one matrix product per patch), then
             CLIP layers up to the feature layer on P x (1+N) tokens (P x (1+n) from a layer where the
             tower prunes tokens down to n, recipe vision_keep), projector on the K kept tokens
    prefill  S slots through every LM layer (S x S attention), lm_head on the last valid slot
    decode   one token through every LM layer attending to C cache slots, lm_head
FLOPs count multiply-adds as 2 and only matrix products (linear layers, QK^T, PV), the terms that
dominate; norms, softmax, RoPE, selection scores and the decode step's own-slot term are left out.
"""

from __future__ import annotations

from torch import nn

BYTES = {"fp32": 4, "fp16": 2}


def _params(*modules) -> int:
    seen = {}
    for m in modules:
        for p in (m.parameters() if isinstance(m, nn.Module) else [m]):
            seen[id(p)] = p.numel()
    return sum(seen.values())


def _linear_macs(module) -> int:
    """Multiply-adds of one token through every nn.Linear inside `module`."""
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def model_costs(model, shapes, cache_dtype: str = "fp32", vision_keep: dict[int, int] | None = None) -> dict:
    """{"params": {...}, "flops": {"vision", "prefill", "decode_per_token"}, "kv_cache_bytes", "lm_layers",
    "kv_heads"} of `model` (a LlavaNextForConditionalGeneration, possibly rewritten) under `shapes`;
    `vision_keep` {layer: patch tokens per partition from that layer on} (VisionGraph.keep)."""
    from edgeprune.graphs import feature_layer_count

    inner = model.model
    tower, lm = inner.vision_tower, inner.language_model
    v_layers = tower.encoder.layers[: feature_layer_count(model.config)]
    s = shapes
    tokens = 1 + s.patches_per_partition  # per partition, CLS included
    vision = 2 * s.partitions * s.patches_per_partition * tower.embeddings.patch_embedding.weight.numel()
    for i, layer in enumerate(v_layers):
        if vision_keep and i in vision_keep:
            tokens = 1 + vision_keep[i]
        attn = layer.self_attn
        vision += 2 * s.partitions * tokens * _linear_macs(layer)
        vision += 2 * 2 * s.partitions * attn.num_heads * tokens * tokens * attn.head_dim  # QK^T and PV
    vision += 2 * s.visual_topk * _linear_macs(inner.multi_modal_projector)
    head = 2 * _linear_macs(model.lm_head)  # one row of logits
    prefill = decode = 0
    for i, layer in enumerate(lm.layers):  # layer i runs on S_i prefill slots over a C_i-slot cache (visual drops)
        attn = layer.self_attn
        heads = attn.q_proj.out_features // attn.head_dim
        rows, cache = s.prefill_slots_at(i), s.cache_slots_at(i)
        prefill += 2 * rows * _linear_macs(layer) + 2 * 2 * heads * rows ** 2 * attn.head_dim
        decode += 2 * _linear_macs(layer) + 2 * 2 * heads * cache * attn.head_dim
    kv_heads = [layer.self_attn.k_proj.out_features // layer.self_attn.head_dim for layer in lm.layers]
    return {
        "params": {"vision": _params(tower.embeddings, tower.pre_layrnorm, *v_layers, inner.multi_modal_projector,
                                     inner.image_newline),
                   "language_model": _params(lm, model.lm_head)},
        "flops": {"vision": vision, "prefill": prefill + head, "decode_per_token": decode + head},
        "kv_cache_bytes": 2 * sum(h * s.cache_slots_at(i) for i, h in enumerate(kv_heads)) * s.head_dim * BYTES[cache_dtype],
        "lm_layers": len(lm.layers),
        "kv_heads": kv_heads,
    }
