"""`edgeprune inspect`: run a bundle's vision graph on one image and show which patches it kept.

Uses only the runtime's preprocessing/layout and ONNX Runtime, so what it shows is exactly
what `edgeprune run` feeds the language model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

MIN_SIDE = 224  # partitions are drawn at least this large (the tiny twin's crops are 112 px)
DIM = 0.25  # brightness of dropped patches
PAD = 0.08  # brightness of padding patches (not part of the image)


@dataclass
class KeptPatches:
    strategy: str
    budget: float
    k: int
    grid: tuple[int, int]  # crop grid (rows, cols)
    partitions: int  # this image's partitions: base + rows * cols
    patch_grid: tuple[int, int]
    kept: list[tuple[int, int, int]]  # (partition, row, col), partition 0 = base image
    newline_slots: int  # valid newline slots the LM also sees
    pixel_values: np.ndarray  # [P, 3, H, W] normalised, for drawing
    patch_valid: np.ndarray  # [P, N]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def to_dict(self) -> dict:
        return {"strategy": self.strategy, "budget": self.budget, "k": self.k, "grid": list(self.grid),
                "partitions": self.partitions, "patch_grid": list(self.patch_grid),
                "kept": [list(t) for t in self.kept], "newline_slots": self.newline_slots}


def kept_patches(bundle_dir: str | Path, image_path: str | Path) -> KeptPatches:
    """Runs the vision graph of `bundle_dir` on the image. Raises RuntimeStatusError for a bad bundle or image."""
    import onnxruntime as ort

    from edgeprune_runtime.errors import RuntimeStatusError, Status
    from edgeprune_runtime.layout import layout_for
    from edgeprune_runtime.manifest import load_manifest
    from edgeprune_runtime.preprocess import PreprocessParams, load_image, preprocess

    m = load_manifest(bundle_dir)
    s = m.shapes
    params = PreprocessParams.from_dict(m.preprocess)
    pixel_values, image_hw = preprocess(load_image(image_path), params)
    layout = layout_for(image_hw, params.image_grid_pinpoints, s)
    try:
        session = ort.InferenceSession(str(m.path(m.graphs["vision"]["file"])), providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own exception types
        raise RuntimeStatusError(Status.BUNDLE_INVALID, f"cannot load the vision graph: {str(e).splitlines()[0]}")
    feeds = {"pixel_values": pixel_values, **layout.feeds()}
    _, valid, source = session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})
    n, g = s.patches_per_partition, s.patch_grid
    src = source[valid > 0.5]
    patches = src[src < s.partitions * n]
    kept = [(int(v) // n, (int(v) % n) // g, int(v) % g) for v in patches]
    recipe = m.data["recipe"]
    return KeptPatches(recipe["strategy"], recipe["budget"], s.visual_topk, layout.grid,
                       1 + layout.grid[0] * layout.grid[1], (g, g), kept, int(len(src) - len(patches)),
                       pixel_values, layout.patch_valid, tuple(params.image_mean), tuple(params.image_std))


def _partition_picture(result: KeptPatches, p: int, scale: int):
    """One partition as RGB uint8 [H*scale, W*scale, 3], patches dimmed unless kept."""
    mean = np.array(result.mean, np.float32)[:, None, None]
    std = np.array(result.std, np.float32)[:, None, None]
    rgb = np.clip((result.pixel_values[p] * std + mean) * 255.0, 0, 255).transpose(1, 2, 0)  # [H, W, 3]
    g = result.patch_grid[0]
    size = rgb.shape[0] // g
    shade = np.full((g, g), DIM, np.float32)
    shade[result.patch_valid[p].reshape(g, g) < 0.5] = PAD
    for q, r, c in result.kept:
        if q == p:
            shade[r, c] = 1.0
    rgb = rgb * np.kron(shade, np.ones((size, size), np.float32))[:, :, None]
    rgb = rgb.astype(np.uint8).repeat(scale, axis=0).repeat(scale, axis=1)
    return rgb


def draw_kept(result: KeptPatches, out_path: str | Path) -> Path:
    """PNG: the base image, then the crop grid, kept patches bright, dropped dimmed; a caption below."""
    from PIL import Image, ImageDraw

    h = result.pixel_values.shape[2]
    scale = max(1, -(-MIN_SIDE // h))
    side, gap, caption = h * scale, 12, 28
    rows, cols = result.grid
    width = side + gap + cols * side + 2 * gap
    height = max(side, rows * side) + 2 * gap + caption
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    canvas.paste(Image.fromarray(_partition_picture(result, 0, scale)), (gap, gap))
    for a in range(rows):
        for b in range(cols):
            p = 1 + a * cols + b
            canvas.paste(Image.fromarray(_partition_picture(result, p, scale)), (2 * gap + side + b * side, gap + a * side))
    draw = ImageDraw.Draw(canvas)
    draw.text((gap, gap + side + 2), "base image", fill=(0, 0, 0))
    text = (f"{result.strategy}, budget {result.budget}: {len(result.kept)} of {int(result.patch_valid.sum())} "
            f"patches kept (K = {result.k}), crop grid {rows}x{cols}"
            + (f", + {result.newline_slots} newline slots" if result.newline_slots else ""))
    draw.text((gap, height - caption + 6), text, fill=(0, 0, 0))
    out = Path(out_path)
    if out.is_dir():
        from edgeprune.errors import ConfigError

        raise ConfigError(f"--out {out} is a directory; give a file name such as {out / 'kept.png'}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    canvas.save(tmp, format="PNG")
    tmp.replace(out)
    return out
