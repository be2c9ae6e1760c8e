"""A deterministic synthetic photo (a table scene drawn with PIL) for demos, benchmarks and tests."""

from __future__ import annotations

from pathlib import Path

SAMPLE_PROMPT = "What is on the table?"  # the question the demo, compare and the benchmarks ask about it


def make_sample_image(width: int = 640, height: int = 480):
    """Returns a PIL RGB image: sky/floor gradient, a table, a cup, a box and a ball."""
    import numpy as np
    from PIL import Image, ImageDraw

    y = np.linspace(0.0, 1.0, height)[:, None, None]
    sky = np.array([120, 170, 230]) * (1 - y) + np.array([235, 225, 200]) * y
    img = Image.fromarray(np.broadcast_to(sky, (height, width, 3)).astype(np.uint8))
    d = ImageDraw.Draw(img)
    w, h = width, height
    d.rectangle([0.1 * w, 0.55 * h, 0.9 * w, 0.62 * h], fill=(120, 80, 40))  # table top
    d.rectangle([0.15 * w, 0.62 * h, 0.2 * w, 0.95 * h], fill=(90, 60, 30))
    d.rectangle([0.8 * w, 0.62 * h, 0.85 * w, 0.95 * h], fill=(90, 60, 30))
    d.rectangle([0.25 * w, 0.4 * h, 0.33 * w, 0.55 * h], fill=(200, 30, 30))  # red cup
    d.rectangle([0.5 * w, 0.3 * h, 0.7 * w, 0.55 * h], fill=(40, 60, 200))  # blue box
    d.ellipse([0.72 * w, 0.45 * h, 0.8 * w, 0.55 * h], fill=(250, 210, 0))  # yellow ball
    return img


def write_sample_image(path: str | Path, width: int = 640, height: int = 480) -> Path:
    """Writes the sample photo (format from the file extension) via a temporary file; ConfigError on bad input."""
    from edgeprune.errors import ConfigError

    path = Path(path)
    if width < 1 or height < 1:
        raise ConfigError(f"image size must be at least 1x1, got {width}x{height}")
    if path.is_dir():
        raise ConfigError(f"{path} is a directory; give a file name such as {path / 'sample.png'}")
    from PIL import Image

    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ConfigError(f"cannot tell the image format of {path.name}; use a .png or .jpg name")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    make_sample_image(width, height).save(tmp, format=fmt)
    tmp.replace(path)
    return path
