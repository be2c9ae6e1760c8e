"""The runtime's preprocessing reproduces transformers' LlavaNextImageProcessorPil (max abs diff <= 1e-5)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from edgeprune_runtime.errors import RuntimeStatusError, Status
from edgeprune_runtime.layout import max_partitions
from edgeprune_runtime.preprocess import PreprocessParams, load_image, preprocess

TOL = 1e-5


@pytest.fixture(scope="module")
def tiny_processor():
    from edgeprune.models.llava_next import TINY_IMAGE, TINY_PINPOINTS, _twin_processor

    return _twin_processor(TINY_IMAGE, TINY_PINPOINTS).image_processor


@pytest.fixture(scope="module")
def llava16_processor():
    from edgeprune.models.llava_next import LLAVA_16_PINPOINTS, _twin_processor

    return _twin_processor(336, LLAVA_16_PINPOINTS).image_processor


def _params(processor) -> PreprocessParams:
    d = processor.to_dict()
    crop = d["crop_size"]["height"]
    return PreprocessParams.from_processor_dict(d, max_partitions(d["image_grid_pinpoints"], crop))


def _random_image(h: int, w: int, seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": None}[mode]
    shape = (h, w) if channels is None else (h, w, channels)
    return Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode=mode)


def _gradient_image(h: int, w: int) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) * 255 // max(h + w - 2, 1)], -1)
    return Image.fromarray(arr.astype(np.uint8))


def _check(processor, image: Image.Image, reference_image: Image.Image | None = None) -> float:
    """Compare preprocess(image) with the processor on `reference_image` (default: the same image)."""
    params = _params(processor)
    ours, hw = preprocess(image, params)
    ref = processor(images=reference_image if reference_image is not None else image, return_tensors="np")
    ref_pv = ref["pixel_values"][0]
    n = ref_pv.shape[0]
    assert ours.dtype == np.float32
    assert ours.shape == (params.partitions,) + ref_pv.shape[1:]
    assert ref_pv.shape[1:] == (3, params.crop_size, params.crop_size)
    assert 2 <= n <= params.partitions
    diff = float(np.abs(ours[:n] - ref_pv).max())
    assert diff <= TOL, diff
    assert not ours[n:].any(), "padding partitions must be exact zeros"
    assert hw == tuple(int(v) for v in ref["image_sizes"][0])
    return diff


# (height, width): square, wide, tall, smaller than a crop, large, odd sizes, extreme ratios
SIZES = [(112, 112), (60, 200), (300, 90), (50, 40), (1000, 1400), (37, 333), (225, 113), (800, 600), (7, 500)]


@pytest.mark.parametrize("hw", SIZES, ids=lambda hw: f"{hw[0]}x{hw[1]}")
def test_random_rgb_tiny(tiny_processor, hw):
    diff = _check(tiny_processor, _random_image(*hw, seed=hw[0] * 1000 + hw[1]))
    assert diff == 0.0  # bitwise: same PIL resizes, same float64 rescale and float32 normalize


@pytest.mark.parametrize("hw", [(336, 336), (60, 200), (300, 90), (50, 40), (1200, 900), (400, 1300), (1008, 336)],
                         ids=lambda hw: f"{hw[0]}x{hw[1]}")
def test_random_rgb_llava16(llava16_processor, hw):
    assert _check(llava16_processor, _random_image(*hw, seed=hw[0] + hw[1])) == 0.0


@pytest.mark.parametrize("hw", [(112, 112), (90, 250), (260, 70)], ids=lambda hw: f"{hw[0]}x{hw[1]}")
def test_gradients(tiny_processor, llava16_processor, hw):
    image = _gradient_image(*hw)
    assert _check(tiny_processor, image) == 0.0
    assert _check(llava16_processor, image) == 0.0


@pytest.mark.parametrize("mode", ["RGBA", "L"])
def test_non_rgb_modes(tiny_processor, mode):
    # RGBA is composited onto white by the processor (not just alpha-dropped)
    assert _check(tiny_processor, _random_image(150, 80, seed=7, mode=mode)) == 0.0
    assert _check(tiny_processor, _random_image(45, 130, seed=8, mode=mode)) == 0.0


def test_palette_with_transparency(tiny_processor):
    image = _random_image(70, 90, seed=3).quantize(16)
    image.info["transparency"] = 0
    _check(tiny_processor, image)


def test_jpeg_file_via_load_image(tiny_processor, llava16_processor, tmp_path):
    path = tmp_path / "photo.jpg"
    _gradient_image(180, 260).save(path, quality=85)
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == (260, 180)
    with Image.open(path) as raw:
        raw.load()
        _check(tiny_processor, loaded, reference_image=raw)
        _check(llava16_processor, loaded, reference_image=raw)


def test_rgba_png_via_load_image(tiny_processor, tmp_path):
    path = tmp_path / "alpha.png"
    _random_image(100, 60, seed=11, mode="RGBA").save(path)
    loaded = load_image(path)
    assert loaded.mode == "RGB"
    with Image.open(path) as raw:
        raw.load()
        _check(tiny_processor, loaded, reference_image=raw)


@pytest.mark.parametrize("shortest_edge,resample", [(128, 3), (100, 2), (112, 0)])
def test_shortest_edge_differs_from_crop(shortest_edge, resample):
    """Partitions resized to shortest_edge then center-cropped (or zero-padded) to the crop size."""
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": shortest_edge}, crop_size={"height": 112, "width": 112},
        image_grid_pinpoints=[[112, 224], [224, 112], [224, 224]], resample=resample,
    )
    for hw, seed in (((90, 300), 1), ((301, 77), 2), ((513, 1027), 3)):
        assert _check(processor, _random_image(*hw, seed=seed)) == 0.0


def test_runtime_imports_no_torch():
    import subprocess
    import sys
    from pathlib import Path

    runtime = Path(__file__).resolve().parents[2] / "runtime"
    code = ("import sys; import edgeprune_runtime.preprocess; "
            "print(sorted(m for m in ('torch', 'transformers', 'onnx') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(runtime)})
    assert out.stdout.strip() == "[]"


def test_params_roundtrip(tiny_processor, llava16_processor):
    for processor, partitions in ((tiny_processor, 5), (llava16_processor, 5)):
        params = _params(processor)
        assert params.partitions == partitions
        assert params.resample == 3 and params.shortest_edge == params.crop_size
        again = PreprocessParams.from_dict(json.loads(json.dumps(params.to_dict())))
        assert again == params


def test_params_reject_unsupported(tiny_processor):
    base = tiny_processor.to_dict()
    for key, value in [("do_normalize", False), ("do_rescale", False), ("do_convert_rgb", False),
                       ("size", {"height": 112, "width": 112}), ("crop_size", {"height": 112, "width": 100})]:
        with pytest.raises(ValueError, match=key):
            PreprocessParams.from_processor_dict({**base, key: value}, 5)
    with pytest.raises(ValueError, match="partitions"):
        PreprocessParams.from_processor_dict(base, 4)
    with pytest.raises(ValueError, match="multiple of crop_size"):
        PreprocessParams.from_processor_dict({**base, "image_grid_pinpoints": [[112, 200]]}, 5)
    # no-ops when crop == shortest_edge: accepted
    PreprocessParams.from_processor_dict({**base, "do_center_crop": False, "do_resize": False}, 5)


# --- errors ------------------------------------------------------------------------------------


def _assert_invalid(path, fragment: str):
    with pytest.raises(RuntimeStatusError) as info:
        load_image(path)
    assert info.value.status == Status.IMAGE_INVALID
    assert str(path) in info.value.message and fragment in info.value.message
    assert "\n" not in info.value.message


def test_missing_file(tmp_path):
    _assert_invalid(tmp_path / "nope.jpg", "not found")


def test_directory(tmp_path):
    _assert_invalid(tmp_path, "directory")


def test_text_file_named_jpg(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not an image\n" * 20)
    _assert_invalid(path, "not a readable image")


def test_truncated_jpeg(tmp_path):
    good = tmp_path / "good.jpg"
    _random_image(200, 200, seed=1).save(good, quality=90)
    data = good.read_bytes()
    path = tmp_path / "truncated.jpg"
    path.write_bytes(data[: len(data) // 2])
    _assert_invalid(path, "truncated")


def test_preprocess_rejects_non_image(tiny_processor):
    with pytest.raises(RuntimeStatusError) as info:
        preprocess(np.zeros((10, 10, 3), np.uint8), _params(tiny_processor))
    assert info.value.status == Status.INVALID_ARGUMENT
