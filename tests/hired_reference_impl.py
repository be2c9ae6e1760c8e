"""Test oracle: HiRED token selection exactly as released (hasanar1f/HiRED, commit 42be984).

An independent plain-torch re-implementation of the released
`transformers/src/transformers/models/llava_next/modeling_llava_next.py`:
`ViT_Attn_Hook.get_attn`, `HiRED_token_selection`, `HiRED_sub_img_budgets`,
`pack_HiRED_image_features` (called with image_newline=None) and its `unpad_image`.
It imports nothing from `edgeprune` on purpose.

The released quirks are kept on purpose:
  * the crops' shares come from flat raster *bands* of the base grid, not from the crops' regions;
  * shares are floored (in float32), so fewer than the budget may be emitted;
  * the crop grid is stitched with rows/cols swapped (pre-transformers#32314 naming:
    `num_patch_width, num_patch_height = get_anyres_image_grid_shape(...)`, which returns
    (rows, cols)); only non-square crop grids (1x2, 2x1, 1x3, ...) are affected;
  * `unpad_image` is the old one (int() truncation on 0-d tensors, symmetric slicing) and is
    applied to that swapped stitched grid; tokens it cuts away were still charged to the budget;
  * no image_newline tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _select_best_resolution(hw, pinpoints):
    """transformers' select_best_resolution: sizes and pinpoints are (height, width)."""
    h0, w0 = hw
    best, best_eff, best_waste = None, 0, float("inf")
    for h, w in pinpoints:
        scale = min(w / w0, h / h0)
        eff = min(int(w0 * scale) * int(h0 * scale), w0 * h0)
        waste = w * h - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (h, w), eff, waste
    return best


def _unpad_bounds(cur_h, cur_w, image_size_hw):
    """Slice bounds of the released (old) `unpad_image`, including its 0-d int64/float32 tensor arithmetic
    (the processor's `image_sizes` is a LongTensor, so `image_sizes[i]` unpacks to 0-d int64 tensors)."""
    oh, ow = (torch.tensor(int(v), dtype=torch.int64) for v in image_size_hw)
    if ow / oh > cur_w / cur_h:
        new_h = int(oh * (cur_w / ow))
        pad = (cur_h - new_h) // 2
        return (pad, cur_h - pad), (0, cur_w)
    new_w = int(ow * (cur_h / oh))
    pad = (cur_w - new_w) // 2
    return (0, cur_h), (pad, cur_w - pad)


@torch.no_grad()
def _cls_attention(vision_tower, pixel_values, layer_ids):
    """CLS-query attention rows as `ViT_Attn_Hook` computes them: forward hooks grab the q_proj / k_proj
    outputs (applied to layer_norm1's output), then softmax(q k^T * head_dim**-0.5) over all keys.
    Returns {layer: [P, heads, T]}. (Released code hard-codes 16 heads; here the layer's own count.)"""
    grabbed, handles = {}, []
    for lid in layer_ids:
        attn = vision_tower.encoder.layers[lid].self_attn
        for name in ("q_proj", "k_proj"):
            hook = (lambda key: lambda _m, _i, out: grabbed.__setitem__(key, out))((lid, name))
            handles.append(getattr(attn, name).register_forward_hook(hook))
    try:
        vision_tower(pixel_values)
    finally:
        for h in handles:
            h.remove()
    rows = {}
    for lid in layer_ids:
        q, k = grabbed[(lid, "q_proj")], grabbed[(lid, "k_proj")]
        b, t, e = q.shape
        heads = vision_tower.encoder.layers[lid].self_attn.num_heads
        d = e // heads
        q = q.view(b, t, heads, d).transpose(1, 2)
        k = k.view(b, t, heads, d).transpose(1, 2)
        rows[lid] = F.softmax((q @ k.transpose(-2, -1)) * d**-0.5, dim=-1)[:, :, 0, :]  # CLS query row
    return rows


def hired_reference_keep(vision_tower, pixel_values, image_size_hw, config, rate, alpha=0.5):
    """Kept tokens of released HiRED for one image, as (partition, row, col), in the released output order.

    vision_tower: transformers CLIPVisionModel (layers at .encoder.layers).
    pixel_values: [P, 3, S, S], the processor's partitions for this image (0 = base, then crops row-major).
    image_size_hw: the original image's (height, width), i.e. the processor's image_sizes row.
    config: LlavaNextConfig (vision_feature_select_strategy "default" assumed: patches = last N tokens).
    """
    vc = config.vision_config
    S, g = vc.image_size, vc.image_size // vc.patch_size
    N = g * g  # 576 for CLIP-L/14-336
    P = pixel_values.shape[0]
    L = len(vision_tower.encoder.layers)
    vfl = config.vision_feature_layer
    feat_layer = L + vfl if vfl < 0 else vfl - 1  # layer whose output is hidden_states[vfl]: 22 of 24 for -2
    budget_layer = 0  # released: vit_top_layer = 0

    # Crop grid of this image: R rows x C cols of S-pixel crops.
    bh, bw = _select_best_resolution(tuple(int(v) for v in image_size_hw), config.image_grid_pinpoints)
    R, C = bh // S, bw // S
    assert P - 1 == R * C, f"pixel_values has {P} partitions, grid {R}x{C} needs {R * C + 1}"

    rows = _cls_attention(vision_tower, pixel_values, sorted({budget_layer, feat_layer}))
    top = rows[budget_layer][:, :, -N:].sum(dim=1)  # [P, N], CLS->patch attention summed over heads
    bottom = rows[feat_layer][:, :, -N:].sum(dim=1)

    # --- HiRED_token_selection (P is this image's actual partition count) ---
    mask = torch.zeros(P, N, dtype=torch.bool)
    total = int(P * N * rate)
    full_budget = min(int(total * alpha), N)
    sub_budget = min(total - full_budget, (P - 1) * N)
    mask[0, bottom[0].topk(full_budget, largest=True).indices] = True  # base: top-k by feature-layer attention
    if sub_budget > 0:
        # Base image's top int(N*(1-alpha)) tokens by layer-0 attention ...
        spatial = torch.zeros(N, dtype=torch.bool)
        spatial[top[0].topk(int(N * (1 - alpha)), largest=True).indices] = True
        # ... counted per flat raster band: reshape(num_patch_height=C, num_patch_width=R, -1) then flatten,
        # so crop k's count = spatial[k*N/(P-1) : (k+1)*N/(P-1)].sum()  (the released band quirk).
        counts = spatial.reshape(C, R, -1).sum(dim=-1).reshape(-1)  # int64
        shares = ((counts / counts.sum()) * sub_budget).int()  # float32 ratio, truncated
        shares = torch.clamp(shares, max=N)
        for i, k in enumerate(shares.tolist()):
            mask[i + 1, bottom[i + 1].topk(k, largest=True).indices] = True

    return released_packing(mask, R, C, g, image_size_hw)


def released_packing(mask, R, C, g, image_size_hw):
    """`pack_HiRED_image_features` (image_newline=None) of a keep mask [P, N] for an R x C crop grid:
    the kept tokens as (partition, row, col) in the released output order."""
    P = mask.shape[0]
    keep = [(0, n // g, n % g) for n in torch.nonzero(mask[0]).flatten().tolist()]  # base, raster order

    # Crops: view(num_patch_height, num_patch_width, g, g) with the swapped names = view(C, R, g, g),
    # i.e. crop k sits at block (k // R, k % R); permute(0,2,1,3) stitches a [C*g, R*g] grid.
    def stitch(t):  # t: [P-1, g, g]
        return t.view(C, R, g, g).permute(0, 2, 1, 3).reshape(C * g, R * g)

    part = torch.arange(1, P).view(-1, 1, 1).expand(P - 1, g, g)
    rr = torch.arange(g).view(1, g, 1).expand(P - 1, g, g)
    cc = torch.arange(g).view(1, 1, g).expand(P - 1, g, g)
    grids = [stitch(t.contiguous()) for t in (mask[1:].view(P - 1, g, g), part, rr, cc)]
    (y0, y1), (x0, x1) = _unpad_bounds(C * g, R * g, image_size_hw)
    m, p, r, c = (t[y0:y1, x0:x1].flatten() for t in grids)
    keep += [(int(pp), int(r0), int(c0)) for pp, r0, c0 in zip(p[m], r[m], c[m])]  # row-major
    return keep
