"""transformers' own packing of an anyres image, as a test oracle for layouts (imports nothing from edgeprune).

`packed_order` runs transformers' `LlavaNextModel.pack_image_features` on features that carry their own
identity (partition * N + patch) and an image_newline of -1, and reads back the sequence it builds:
which patches survive the unpadding, in which order, and where the newline tokens go.
"""

from __future__ import annotations

from types import SimpleNamespace


def packed_order(image_hw: tuple[int, int], pinpoints, crop: int, patch: int) -> list[tuple]:
    """[("patch", partition, index) | ("newline", stitched_row), ...] in transformers' sequence order."""
    import torch
    from transformers.models.llava_next.modeling_llava_next import LlavaNextModel, image_size_to_num_patches

    g = crop // patch
    n = g * g
    parts = image_size_to_num_patches(image_size=image_hw, grid_pinpoints=pinpoints, patch_size=crop)
    ids = torch.arange(parts * n, dtype=torch.float64).reshape(parts, n, 1)
    config = SimpleNamespace(vision_config=SimpleNamespace(image_size=crop, patch_size=patch),
                             image_grid_pinpoints=pinpoints)
    packed, _ = LlavaNextModel.pack_image_features(SimpleNamespace(config=config), [ids], torch.tensor([image_hw]),
                                                   "default", image_newline=torch.tensor([-1.0], dtype=torch.float64))
    out, row = [], 0
    for v in packed[0][:, 0].tolist():  # one image
        if v < 0:
            out.append(("newline", row))
            row += 1
        else:
            out.append(("patch",) + divmod(int(v), n))
    return out


def unpadded_grid(order: list[tuple]) -> list[list[tuple[int, int]]]:
    """The stitched, unpadded crop grid as rows of (partition, index), read off `packed_order` (base excluded)."""
    rows, current = [], []
    for item in order:
        if item[0] == "newline":
            rows.append(current)
            current = []
        elif item[1] > 0:
            current.append(item[1:])
    return rows
