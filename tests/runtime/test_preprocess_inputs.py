"""The runtime's image inputs and the manifest's `preprocess` block, checked against hand-written
expectations: every error message in full (it names the field and the bound a user must fix), the
scaling of 16-bit, 32-bit and float images to 8 bits, encoded bytes, EXIF orientation and camera frames.

Fast unit tests without a bundle; `make mutants` runs them against runtime/edgeprune_runtime/preprocess.py.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from edgeprune_runtime import preprocess as preprocess_module
from edgeprune_runtime.errors import RuntimeStatusError, Status
from edgeprune_runtime.preprocess import PreprocessParams, image_from_array, load_image, load_image_bytes, preprocess

# A valid `preprocess` block at the low edge of every bound: one 1x1 pinpoint, 1-pixel crops, resample 0.
SMALLEST = {"image_grid_pinpoints": [[1, 1]], "crop_size": 1, "shortest_edge": 1, "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.25, 0.25, 0.25], "rescale_factor": 0.5, "resample": 0, "partitions": 2}
TAIL = "; re-export the bundle"


def _params(**changes) -> PreprocessParams:
    return PreprocessParams.from_dict({**SMALLEST, **changes})


def test_the_edges_of_every_bound_are_accepted():
    p = _params()
    assert (p.image_grid_pinpoints, p.crop_size, p.shortest_edge, p.resample, p.partitions) == ([[1, 1]], 1, 1, 0, 2)
    assert (p.image_mean, p.image_std, p.rescale_factor) == ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 0.5)
    top = _params(image_grid_pinpoints=[[32768, 32768]], crop_size=32768, shortest_edge=32768, resample=5,
                  partitions=32768)
    assert (top.crop_size, top.shortest_edge, top.resample, top.partitions) == (32768, 32768, 5, 32768)
    assert len(_params(image_grid_pinpoints=[[1, 1]] * 1024).image_grid_pinpoints) == 1024


BAD_BLOCKS = [
    # (changes to SMALLEST, the whole message)
    ({"crop_size": 0}, "manifest preprocess.crop_size must be an integer in [1, 32768], got 0" + TAIL),
    ({"crop_size": 32769}, "manifest preprocess.crop_size must be an integer in [1, 32768], got 32769" + TAIL),
    ({"shortest_edge": 0}, "manifest preprocess.shortest_edge must be an integer in [1, 32768], got 0" + TAIL),
    ({"resample": -1}, "manifest preprocess.resample must be an integer in [0, 5], got -1" + TAIL),
    ({"resample": 6}, "manifest preprocess.resample must be an integer in [0, 5], got 6" + TAIL),
    ({"partitions": 0}, "manifest preprocess.partitions must be an integer in [1, 32768], got 0" + TAIL),
    ({"rescale_factor": "1/255"}, "manifest preprocess.rescale_factor must be a finite number, got '1/255'" + TAIL),
    ({"image_grid_pinpoints": []},
     "manifest preprocess.image_grid_pinpoints must be a list of 1 to 1024 items, got []" + TAIL),
    ({"image_grid_pinpoints": [[1, 1]] * 1025},
     "manifest preprocess.image_grid_pinpoints must be a list of 1 to 1024 items, got " + repr([[1, 1]] * 1025)[:57] + "..." + TAIL),
    ({"image_grid_pinpoints": [[1]]}, "manifest preprocess.image_grid_pinpoints[] must be a list of 2 to 2 items, got [1]" + TAIL),
    ({"image_grid_pinpoints": [[1, 1, 1]]},
     "manifest preprocess.image_grid_pinpoints[] must be a list of 2 to 2 items, got [1, 1, 1]" + TAIL),
    ({"image_grid_pinpoints": [[0, 1]]},
     "manifest preprocess.image_grid_pinpoints[][] must be an integer in [1, 32768], got 0" + TAIL),
    ({"image_mean": [0.5, 0.5]}, "manifest preprocess.image_mean must be a list of 3 to 3 items, got [0.5, 0.5]" + TAIL),
    ({"image_mean": [0.5] * 4}, "manifest preprocess.image_mean must be a list of 3 to 3 items, got [0.5, 0.5, 0.5, 0.5]" + TAIL),
    ({"image_mean": [0.5, "a", 0.5]}, "manifest preprocess.image_mean[] must be a finite number, got 'a'" + TAIL),
    ({"image_std": [1.0]}, "manifest preprocess.image_std must be a list of 3 to 3 items, got [1.0]" + TAIL),
    ({"image_std": [1.0, 1.0, 1.0, 1.0]}, "manifest preprocess.image_std must be a list of 3 to 3 items, got [1.0, 1.0, 1.0, 1.0]" + TAIL),
    ({"image_std": [1.0, None, 1.0]}, "manifest preprocess.image_std[] must be a finite number, got None" + TAIL),
    ({"image_std": [1.0, 1.0, 0.0]}, "manifest `preprocess` is invalid: image_std has a zero: (1.0, 1.0, 0.0)" + TAIL),
]


@pytest.mark.parametrize("changes, message", BAD_BLOCKS, ids=[str(i) for i in range(len(BAD_BLOCKS))])
def test_a_bad_value_is_named_with_its_bound(changes, message):
    with pytest.raises(RuntimeStatusError) as e:
        _params(**changes)
    assert (e.value.status, e.value.message) == (Status.BUNDLE_INVALID, message)


def test_a_block_that_is_not_an_object_or_lacks_keys_says_so():
    with pytest.raises(RuntimeStatusError) as e:
        PreprocessParams.from_dict([1])
    assert e.value.message == "manifest `preprocess` must be a JSON object, got [1]" + TAIL
    with pytest.raises(RuntimeStatusError) as e:
        PreprocessParams.from_dict({k: v for k, v in SMALLEST.items() if k not in ("crop_size", "resample")})
    assert e.value.message == "manifest `preprocess` lacks ['crop_size', 'resample']" + TAIL


# --- images that are not 8-bit: scaled to [0, 255] by the smallest full scale that holds their maximum

def _png_bytes(image: Image.Image, **save) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG", **save)
    return out.getvalue()


def _gray(image: Image.Image) -> list[int]:
    rgb = np.asarray(image)
    assert image.mode == "RGB" and (rgb == rgb[..., :1]).all()
    return rgb[0, :, 0].tolist()


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
def test_sixteen_bit_images_scale_by_65535(mode):
    values = [0, 257, 32768, 65535, 300, 60010]  # x 255 / 65535: 0, 1, 127.5019, 255, 1.1670, 233.5019 (/ 65536: 233.498)
    image = Image.new(mode, (6, 1))
    image.putdata(values)
    assert _gray(load_image_bytes(_png_bytes(image)) if mode == "I;16" else _decode_direct(image)) == [0, 1, 128, 255, 1, 234]


def _decode_direct(image: Image.Image) -> Image.Image:
    from edgeprune_runtime.preprocess import _convert_to_rgb

    return _convert_to_rgb(image)


@pytest.mark.parametrize("mode, values, expected", [
    ("F", [0.0, 0.5, 1.0, 0.25], [0, 128, 255, 64]),  # max <= 1: full scale 1.0 (0.5 -> 127.5 -> 128, even)
    ("F", [0.0, 2.0, 200.0, 255.0], [0, 2, 200, 255]),  # max <= 255: 8-bit data widened
    ("F", [0.0, 1000.0, 65535.0, 256.0], [0, 4, 255, 1]),  # max <= 65535: 1000 x 255 / 65535 = 3.89
    ("F", [0.0, 50000.0, 100000.0, 20000.0], [0, 128, 255, 51]),  # beyond 65535: its own maximum
    ("F", [float("nan"), -3.0, 1.0, 0.5], [0, 0, 255, 128]),  # NaN -> 0, negatives clip to 0
    ("F", [float("-inf"), 0.5, 0.25, 1.0], [0, 128, 64, 255]),  # -inf -> 0
    ("F", [float("inf"), 1e30, 0.0, 3e38], [255, 0, 0, 225]),  # +inf -> float32's maximum, the full scale
    ("I", [0, 17, 255, 128], [0, 17, 255, 128]),
    ("I", [0, 257, 65535, -5], [0, 1, 255, 0]),
    ("I", [0, 2 ** 30, 2 ** 31 - 1, 65536], [0, 128, 255, 0]),  # 2^30 x 255 / (2^31 - 1) = 127.50000006
])
def test_wide_images_scale_by_the_smallest_full_scale_that_holds_them(mode, values, expected):
    image = Image.new(mode, (len(values), 1))
    image.putdata(values)
    assert _gray(_decode_direct(image)) == expected


def test_an_empty_wide_image_stays_empty():
    assert _decode_direct(Image.new("F", (0, 0))).size == (0, 0)


# --- encoded bytes

def test_bytes_bytearray_and_memoryview_decode_to_the_same_pixels():
    rng = np.random.default_rng(5)
    frame = rng.integers(0, 256, (9, 13, 3), dtype=np.uint8)
    data = _png_bytes(Image.fromarray(frame))
    for form in (data, bytearray(data), memoryview(data), memoryview(np.frombuffer(data, np.uint8))):
        assert (np.asarray(load_image_bytes(form)) == frame).all()
    even = data + b"\0" * (len(data) % 2)  # a 2-byte-item buffer is read as its bytes
    assert (np.asarray(load_image_bytes(memoryview(np.frombuffer(even, np.uint16)))) == frame).all()


@pytest.mark.parametrize("data, status, message", [
    ("a.png", Status.INVALID_ARGUMENT, "encoded image data must be bytes, got str"),
    (memoryview(b"abcdef")[::2], Status.INVALID_ARGUMENT,
     "encoded image data must be one contiguous buffer; pass bytes(data)"),
    (b"GIF87a-not-really", Status.IMAGE_INVALID, "(encoded bytes, 17 bytes) is not a readable image file (format not "
     "recognised); pass a PNG/JPEG/WebP/BMP image"),
])
def test_bad_encoded_data_gets_a_status(data, status, message):
    with pytest.raises(RuntimeStatusError) as e:
        load_image_bytes(data)
    assert (e.value.status, e.value.message) == (status, message)


def test_a_truncated_png_names_the_truncation_on_one_line():
    data = _png_bytes(Image.fromarray(np.random.default_rng(1).integers(0, 256, (60, 80, 3), dtype=np.uint8)))
    cut = data[: len(data) // 2]
    with pytest.raises(RuntimeStatusError) as e:
        load_image_bytes(cut)
    assert e.value.status == Status.IMAGE_INVALID
    assert e.value.message.startswith(f"image (encoded bytes, {len(cut)} bytes) is truncated (image file is truncated")
    assert e.value.message.endswith("); re-export or re-copy the file") and "\n" not in e.value.message


def test_a_corrupt_stream_that_is_not_truncated_is_called_corrupt():
    data = bytearray(_png_bytes(Image.fromarray(np.full((40, 40, 3), 7, np.uint8))))
    start = data.index(b"IDAT") + 4
    data[start:start + 8] = b"\xff" * 8  # the zlib stream's header and first block: not inflatable
    with pytest.raises(RuntimeStatusError) as e:
        load_image_bytes(bytes(data))
    assert e.value.status == Status.IMAGE_INVALID and "\n" not in e.value.message
    assert e.value.message.startswith(f"image (encoded bytes, {len(data)} bytes) is ")
    assert e.value.message.endswith("is unreadable or corrupt (OSError: broken data stream when reading image file); "
                                    "re-export or re-copy the file")  # Pillow's own words for a bad zlib stream
    assert e.value.message.endswith("; re-export or re-copy the file")


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (8-bit gray) with one empty data chunk."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_a_decompression_bomb_is_refused_before_decoding():
    data = _png_claiming(30_000, 30_000)  # 900 Mpixels: past Pillow's own bomb limit
    with pytest.raises(RuntimeStatusError) as e:
        load_image_bytes(data, max_pixels=10 ** 12)
    assert e.value.status == Status.IMAGE_INVALID and "\n" not in e.value.message
    assert e.value.message.startswith(f"image (encoded bytes, {len(data)} bytes) is too large to decode (")
    assert "30000" in e.value.message or "900000000" in e.value.message
    assert e.value.message.endswith("); downscale it first")


def test_the_header_size_is_checked_against_the_limits_before_decoding():
    data = _png_claiming(3000, 2000)
    with pytest.raises(RuntimeStatusError) as e:
        load_image_bytes(data, max_pixels=5_999_999)
    assert e.value.status == Status.IMAGE_INVALID
    assert e.value.message.startswith(f"image (encoded bytes, {len(data)} bytes) is 3000x2000 = 6000000 pixels, "
                                      "over the limit of 5999999")
    with pytest.raises(RuntimeStatusError) as e:
        load_image_bytes(data, max_bytes=1 << 20)
    assert e.value.status == Status.RESOURCE_LIMIT
    assert e.value.message.startswith(f"image (encoded bytes, {len(data)} bytes) (3000x2000) needs about ")


def test_exif_orientation_is_applied_only_when_asked():
    frame = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: the stored pixels are shown rotated 90 degrees clockwise
    data = _png_bytes(Image.fromarray(frame), exif=exif)
    assert (np.asarray(load_image_bytes(data)) == frame).all()
    assert (np.asarray(load_image_bytes(data, exif_transpose=True)) == np.rot90(frame, k=-1)).all()


# --- camera frames

def test_frames_in_either_channel_order_hold_the_same_pixels_and_are_copied():
    rng = np.random.default_rng(2)
    frame = rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)
    rgb = image_from_array(frame, "rgb")
    bgr = image_from_array(frame[..., ::-1].copy(), "bgr")
    expected = frame.copy()
    frame[:] = 0  # the caller reuses its buffer
    assert rgb.mode == bgr.mode == "RGB"
    assert (np.asarray(rgb) == expected).all() and (np.asarray(bgr) == expected).all()


@pytest.mark.parametrize("frame, channels, status, message", [
    (np.zeros((2, 2, 3), np.uint8), "RGB", Status.INVALID_ARGUMENT,
     "channels must be 'rgb' or 'bgr' (OpenCV frames are 'bgr'), got 'RGB'"),
    ([[[0, 0, 0]]], "rgb", Status.INVALID_ARGUMENT, "a frame must be a numpy array, got list"),
    (np.zeros((2, 2, 3), np.int16), "bgr", Status.IMAGE_INVALID,
     "expected a uint8 array [height, width, 3] in bgr order, got dtype int16; scale other data to 0..255 and "
     "convert with .astype(np.uint8)"),
    (np.zeros((2, 2), np.uint8), "rgb", Status.IMAGE_INVALID,
     "expected a uint8 array [height, width, 3] in rgb order, got shape (2, 2) (2 axes); a gray frame needs "
     "np.stack([f, f, f], axis=-1)"),
    (np.zeros((2, 5, 4), np.uint8), "rgb", Status.IMAGE_INVALID,
     "expected a uint8 array [height, width, 3] in rgb order, got 4 channels (shape (2, 5, 4)); drop alpha with "
     "frame[..., :3]"),
    (np.zeros((2, 5, 2), np.uint8), "rgb", Status.IMAGE_INVALID,
     "expected a uint8 array [height, width, 3] in rgb order, got 2 channels (shape (2, 5, 2))"),
    (np.zeros((3, 0, 3), np.uint8), "rgb", Status.IMAGE_INVALID,
     "the frame is empty (0x3); pass a non-empty image"),
])
def test_bad_frames_get_the_whole_message(frame, channels, status, message):
    with pytest.raises(RuntimeStatusError) as e:
        image_from_array(frame, channels)
    assert (e.value.status, e.value.message) == (status, message)


def test_frame_limits_name_the_frame():
    frame = np.zeros((10, 20, 3), np.uint8)
    assert image_from_array(frame, "rgb", max_pixels=200).size == (20, 10)
    with pytest.raises(RuntimeStatusError) as e:
        image_from_array(frame, "rgb", max_pixels=199)
    assert e.value.status == Status.IMAGE_INVALID
    assert e.value.message.startswith("image (frame 20x10) is 20x10 = 200 pixels, over the limit of 199")
    with pytest.raises(RuntimeStatusError) as e:
        image_from_array(frame, "rgb", max_bytes=0)
    assert e.value.status == Status.RESOURCE_LIMIT and e.value.message.startswith("image (frame 20x10) (20x10) needs")


def test_a_one_pixel_frame_is_not_empty():
    assert image_from_array(np.full((1, 1, 3), 9, np.uint8), "rgb").size == (1, 1)


# --- files, decoding failures, and preprocess's own checks

def test_load_image_refuses_paths_that_are_not_text():
    with pytest.raises(RuntimeStatusError) as e:
        load_image(12)
    assert (e.value.status, e.value.message) == (Status.INVALID_ARGUMENT, "image path must be a str or os.PathLike, got int")
    with pytest.raises(RuntimeStatusError) as e:
        load_image(b"a.png")
    assert (e.value.status, e.value.message) == (Status.INVALID_ARGUMENT, "image path must be text without NUL characters, got b'a.png'")
    with pytest.raises(RuntimeStatusError) as e:
        load_image("a\0.png")
    assert (e.value.status, e.value.message) == (
        Status.INVALID_ARGUMENT, "image path must be text without NUL characters, got 'a\\x00.png'")


def test_load_image_passes_exif_and_limits_on(tmp_path):
    frame = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "turned.png"
    path.write_bytes(_png_bytes(Image.fromarray(frame), exif=exif))
    assert (np.asarray(load_image(path)) == frame).all()
    assert (np.asarray(load_image(path, exif_transpose=True)) == np.rot90(frame, k=-1)).all()
    with pytest.raises(RuntimeStatusError) as e:
        load_image(path, max_bytes=0)
    assert e.value.status == Status.RESOURCE_LIMIT and e.value.message.startswith(f"image {str(path)!r} (3x2) needs about ")


class _Fails:
    """Stands in for PIL.Image.open (or the RGB conversion), raising `error`."""

    def __init__(self, error: BaseException):
        self.error = error

    def __call__(self, *args, **kwargs):
        raise self.error


@pytest.mark.parametrize("error, status, message", [
    (MemoryError(), Status.RESOURCE_LIMIT, "out of memory decoding image (encoded bytes, 3 bytes); downscale it"),
    (SyntaxError("bad\n  chunk"), Status.IMAGE_INVALID,
     "image (encoded bytes, 3 bytes) is corrupt (SyntaxError: bad chunk); re-export or re-copy the file"),
    (OSError("no\n decoder"), Status.IMAGE_INVALID,
     "image (encoded bytes, 3 bytes) is unreadable or corrupt (OSError: no decoder); re-export or re-copy the file"),
    (OSError("image file is\nTruncated"), Status.IMAGE_INVALID,
     "image (encoded bytes, 3 bytes) is truncated (image file is Truncated); re-export or re-copy the file"),
])
def test_what_the_decoder_raises_becomes_one_line(monkeypatch, error, status, message):
    monkeypatch.setattr(Image, "open", _Fails(error))
    with pytest.raises(RuntimeStatusError) as e:
        load_image_bytes(b"abc")
    assert (e.value.status, e.value.message) == (status, message)


@pytest.mark.parametrize("size", [(0, 4), (4, 0)])
def test_an_image_that_decodes_to_nothing_is_empty(monkeypatch, size):
    monkeypatch.setattr(preprocess_module, "_convert_to_rgb", lambda image: Image.new("RGB", size))
    with pytest.raises(RuntimeStatusError) as e:
        load_image_bytes(_png_bytes(Image.new("RGB", (4, 4))))
    assert e.value.status == Status.IMAGE_INVALID
    assert e.value.message.endswith(f"is empty ({size[0]}x{size[1]}); pass a non-empty image")


def test_preprocess_checks_its_image_before_any_work(monkeypatch):
    params = _params()
    with pytest.raises(RuntimeStatusError) as e:
        preprocess(np.zeros((2, 2, 3), np.uint8), params)
    assert (e.value.status, e.value.message) == (
        Status.INVALID_ARGUMENT, "preprocess expects a PIL image, got ndarray; use load_image(path)")
    for size in ((0, 3), (3, 0)):
        with pytest.raises(RuntimeStatusError) as e:
            preprocess(Image.new("RGB", size), params)
        assert (e.value.status, e.value.message) == (
            Status.IMAGE_INVALID, f"image is empty ({size[0]}x{size[1]}); pass a non-empty image")
    assert preprocess(Image.new("RGB", (1, 1)), params)[1] == (1, 1)
    with pytest.raises(RuntimeStatusError) as e:
        preprocess(Image.new("RGB", (30, 20)), params, max_bytes=0)
    assert e.value.status == Status.RESOURCE_LIMIT and e.value.message.startswith("image (PIL image) (30x20) needs about ")
    monkeypatch.setattr(preprocess_module, "_convert_to_rgb", _Fails(ValueError("mode\n  unknown")))
    with pytest.raises(RuntimeStatusError) as e:
        preprocess(Image.new("RGB", (3, 3)), params)
    assert (e.value.status, e.value.message) == (Status.IMAGE_INVALID, "cannot convert the RGB image to RGB: mode unknown")


# --- the transforms, against transformers' own (image_transforms)

@pytest.mark.parametrize("hw", [(5, 7), (7, 5), (4, 4), (2, 9), (9, 2), (3, 3), (1, 6)])
@pytest.mark.parametrize("crop", [1, 3, 4, 6, 8])
def test_center_crop_is_transformers_center_crop(hw, crop):
    from transformers.image_transforms import center_crop

    arr = np.random.default_rng(hw[0] * 10 + hw[1]).integers(1, 256, (*hw, 3), dtype=np.uint8)
    ours = preprocess_module._center_crop(arr, crop)
    theirs = center_crop(arr, (crop, crop), input_data_format="channels_last")
    assert ours.shape == theirs.shape == (crop, crop, 3) and ours.dtype == theirs.dtype == np.uint8
    assert (ours == theirs).all()


@pytest.mark.parametrize("hw", [(90, 300), (300, 90), (112, 112), (113, 112), (112, 113), (7, 500)])
def test_shortest_edge_size_is_transformers(hw):
    from transformers.image_transforms import get_resize_output_image_size

    theirs = get_resize_output_image_size(np.zeros((*hw, 3), np.uint8), 112, default_to_square=False,
                                          input_data_format="channels_last")
    assert preprocess_module._shortest_edge_size(hw, 112) == tuple(theirs)


# --- PreprocessParams built in code (from_processor_dict, the constructor) and RGB conversion

# A processor's to_dict() of the shape LLaVA-NeXT's has; each test changes one thing.
PROCESSOR = {"image_processor_type": "LlavaNextImageProcessor", "size": {"shortest_edge": 4},
             "crop_size": {"height": 4, "width": 4}, "image_grid_pinpoints": [[4, 8], [8, 4]],
             "image_mean": [0.5, 0.25, 0.125], "image_std": [2.0, 4.0, 8.0], "rescale_factor": 0.5, "resample": 1,
             "do_convert_rgb": True, "do_rescale": True, "do_normalize": True, "do_resize": True,
             "do_center_crop": True, "pad_size": None}


def _from_processor(partitions: int = 3, drop=(), **changes) -> PreprocessParams:
    d = {k: v for k, v in {**PROCESSOR, **changes}.items() if k not in drop}
    return PreprocessParams.from_processor_dict(d, partitions)


def test_a_processor_dict_and_its_defaults():
    p = _from_processor()
    assert (p.crop_size, p.shortest_edge, p.resample, p.rescale_factor, p.partitions) == (4, 4, 1, 0.5, 3)
    assert (p.image_mean, p.image_std, p.image_grid_pinpoints) == ((0.5, 0.25, 0.125), (2.0, 4.0, 8.0), [[4, 8], [8, 4]])
    # every flag and option may be absent: the processor's defaults (True, resample 3 = BICUBIC, 1/255)
    bare = _from_processor(drop=("image_processor_type", "do_convert_rgb", "do_rescale", "do_normalize", "do_resize",
                                 "do_center_crop", "pad_size", "resample", "rescale_factor"))
    assert (bare.resample, bare.rescale_factor) == (3, 1 / 255)
    assert _from_processor(resample=None).resample == 2  # the PIL backend's resize falls back to BILINEAR
    assert _from_processor(image_mean=0.5, image_std=2).image_mean == (0.5, 0.5, 0.5)
    assert _from_processor(image_std=2).image_std == (2.0, 2.0, 2.0)
    # resize/center-crop off change nothing when crop == shortest_edge; absent, they are on (True)
    assert _from_processor(do_resize=False, do_center_crop=False).crop_size == 4
    assert _from_processor(size={"shortest_edge": 6}, drop=("do_resize", "do_center_crop")).shortest_edge == 6


@pytest.mark.parametrize("changes, message", [
    ({"image_processor_type": "CLIPImageProcessor"}, "image_processor_type='CLIPImageProcessor' is not a LLaVA-NeXT image processor"),
    ({"size": {"height": 4, "width": 4}}, "size={'height': 4, 'width': 4}: only {'shortest_edge': N} is supported"),
    ({"crop_size": {"height": 4, "width": 8}}, "crop_size={'height': 4, 'width': 8}: a square {'height': N, 'width': N} is required"),
    ({"do_convert_rgb": False}, "do_convert_rgb=False is not supported (only True)"),
    ({"do_rescale": None}, "do_rescale=None is not supported (only True)"),
    ({"do_normalize": 0}, "do_normalize=0 is not supported (only True)"),
    ({"do_resize": False, "size": {"shortest_edge": 6}},
     "do_resize=False is not supported when shortest_edge (6) != crop_size (4)"),
    ({"do_center_crop": False, "size": {"shortest_edge": 6}},
     "do_center_crop=False is not supported when shortest_edge (6) != crop_size (4)"),
    ({"pad_size": {"height": 8, "width": 8}}, "pad_size={'height': 8, 'width': 8} is not supported"),
    ({"image_mean": [0.5, 0.5]}, "image_mean=[0.5, 0.5]: 3 values (one per RGB channel) are required"),
    ({"image_std": [1, 2, 3, 4]}, "image_std=[1, 2, 3, 4]: 3 values (one per RGB channel) are required"),
])
def test_a_processor_option_we_do_not_reproduce_is_named(changes, message):
    with pytest.raises(ValueError) as e:
        _from_processor(**changes)
    assert str(e.value) == message


def test_the_constructor_normalises_its_values():
    p = PreprocessParams(image_grid_pinpoints=((2, 4),), crop_size=2, shortest_edge=3, image_mean=[1, 2, 3],
                         image_std=[1, 1, 1], rescale_factor=1.0, resample=3, partitions=3)
    assert p.image_grid_pinpoints == [[2, 4]] and type(p.image_grid_pinpoints[0]) is list
    assert p.image_mean == (1.0, 2.0, 3.0) and type(p.image_mean) is tuple and type(p.image_mean[0]) is float
    assert p.image_std == (1.0, 1.0, 1.0) and type(p.image_std) is tuple


@pytest.mark.parametrize("changes, message", [
    ({"image_grid_pinpoints": []}, "image_grid_pinpoints is empty"),
    ({"crop_size": 0}, "crop_size (0) and shortest_edge (2) must be > 0"),
    ({"shortest_edge": 0}, "crop_size (2) and shortest_edge (0) must be > 0"),
    ({"image_grid_pinpoints": [[0, 4]]}, "image_grid_pinpoints entry [0, 4] is not a positive multiple of crop_size 2"),
    ({"image_grid_pinpoints": [[4, 0]]}, "image_grid_pinpoints entry [4, 0] is not a positive multiple of crop_size 2"),
    ({"image_grid_pinpoints": [[4, 3]]}, "image_grid_pinpoints entry [4, 3] is not a positive multiple of crop_size 2"),
    ({"image_mean": (1.0, 2.0)}, "image_mean/image_std must have 3 values, got (1.0, 2.0) / (1.0, 0.5, 1.0)"),
    ({"image_std": (1.0, 1.0, 1.0, 1.0)}, "image_mean/image_std must have 3 values, got (0.0, 0.0, 0.0) / (1.0, 1.0, 1.0, 1.0)"),
    ({"resample": 7}, "resample=7 is not a PIL resample code (0, 1, 2, 3, 4, 5)"),
    ({"partitions": 2}, "partitions=2 < 3 (1 base image + the largest crop grid)"),
])
def test_the_constructor_refuses_values_that_do_not_fit_together(changes, message):
    values = dict(image_grid_pinpoints=[[2, 4]], crop_size=2, shortest_edge=2, image_mean=(0, 0, 0),
                  image_std=(1.0, 0.5, 1.0), rescale_factor=1.0, resample=0, partitions=3)
    assert PreprocessParams(**values).image_std == (1.0, 0.5, 1.0)  # a std of 1 is fine, only 0 is not
    with pytest.raises(ValueError) as e:
        PreprocessParams(**{**values, **changes})
    assert str(e.value) == message


def test_rgb_is_returned_as_it_is_unless_it_has_a_transparent_colour():
    plain = Image.new("RGB", (2, 1), (10, 20, 30))
    assert _decode_direct(plain) is plain
    keyed = Image.new("RGB", (2, 1), (10, 20, 30))
    keyed.putpixel((0, 0), (0, 0, 0))
    keyed.info["transparency"] = (0, 0, 0)  # a PNG tRNS colour key: that colour is fully transparent
    assert np.asarray(_decode_direct(keyed)).tolist() == [[[255, 255, 255], [10, 20, 30]]]


@pytest.mark.parametrize("mode, pixel, expected", [
    ("LA", (100, 128), 177),  # over white: 100 x 128/255 + 255 x (1 - 128/255) = 177.2
    ("La", (100, 128), 227),  # premultiplied: L already holds L x a/255, so over white: 100 + 255 - 128
    ("LA", (100, 0), 255),    # fully transparent is white
])
def test_alpha_is_composited_onto_white(mode, pixel, expected):
    image = Image.frombytes(mode, (1, 1), bytes(pixel))
    rgb = _decode_direct(image)
    assert rgb.mode == "RGB" and abs(int(np.asarray(rgb)[0, 0, 0]) - expected) <= 1
    assert (np.asarray(rgb) == np.asarray(rgb)[..., :1]).all()


def test_the_size_limits_give_the_whole_message():
    from edgeprune_runtime.budget import image_bytes
    from edgeprune_runtime.preprocess import check_image_size

    with pytest.raises(RuntimeStatusError) as e:
        check_image_size(30, 20, 599, None, "X")
    assert e.value.message == ("image X is 30x20 = 600 pixels, over the limit of 599; downscale it "
                               "(or raise EDGEPRUNE_MAX_IMAGE_PIXELS)")
    need = image_bytes(3000, 2000)
    check_image_size(3000, 2000, 10 ** 8, need, "X")  # exactly the bytes it needs is enough
    with pytest.raises(RuntimeStatusError) as e:
        check_image_size(3000, 2000, 10 ** 8, need - 1, "X")
    assert e.value.status == Status.RESOURCE_LIMIT
    assert e.value.message == (f"image X (3000x2000) needs about {need // 2 ** 20} MiB to decode, "
                               f"{(need - 1) // 2 ** 20} MiB of the memory budget are left; downscale it or raise "
                               "EDGEPRUNE_MEMORY_BUDGET_MB")
    assert need // 2 ** 20 >= 8  # large enough that a wrong shift shows
