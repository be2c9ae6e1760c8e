"""Camera frames and encoded bytes: the same picture as a PNG path, a PIL image, an RGB array, a BGR array
(channels="bgr") and PNG bytes gives bit-identical pixel values and the same token ids; bad frames get a
status that names what was expected."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from edgeprune_runtime import Bundle, RuntimeStatusError, Status, capi
from edgeprune_runtime.generator import LoadedBundle
from edgeprune_runtime.preprocess import image_from_array, load_image, load_image_bytes, preprocess

PROMPT = "What is in the picture?"


def _frame(h: int, w: int, seed: int = 3) -> np.ndarray:
    """uint8 [h, w, 3] with every channel different, so a swapped channel order cannot go unnoticed."""
    rng = np.random.default_rng(seed)
    frame = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    frame[..., 0] //= 2  # red darker than blue on average: RGB and BGR differ in every statistic
    return frame


def _png(tmp_path, frame: np.ndarray, name: str = "frame.png"):
    path = tmp_path / name
    Image.fromarray(frame).save(path)
    return path


def _kinds(path, frame: np.ndarray) -> dict:
    """Every way to hand over the picture at `path` (whose pixels are `frame`, RGB): (image, channels)."""
    return {
        "png path": (str(path), None),
        "PIL image": (Image.open(path), None),
        "png bytes": (path.read_bytes(), None),
        "rgb array": (frame.copy(), "rgb"),
        "bgr array": (np.ascontiguousarray(frame[..., ::-1]), "bgr"),
    }


@pytest.mark.parametrize("hw", [(40, 90), (90, 40), (61, 61), (7, 300)])
def test_every_kind_gives_the_png_paths_pixel_values_bit_for_bit(tmp_path, fake_bundle, hw):
    bundle = LoadedBundle(fake_bundle[0], with_engine=False)
    params = bundle.preprocess_params
    frame = _frame(*hw)
    path = _png(tmp_path, frame)
    expected, expected_hw = preprocess(load_image(path), params)  # the path the processor tests pin down
    got = {
        "PIL image": preprocess(Image.open(path), params),
        "png bytes": preprocess(load_image_bytes(path.read_bytes()), params),
        "rgb array": preprocess(image_from_array(frame, "rgb"), params),
        "bgr array": preprocess(image_from_array(np.ascontiguousarray(frame[..., ::-1]), "bgr"), params),
        "bgr view": preprocess(image_from_array(frame[..., ::-1], "bgr"), params),  # negative strides, no copy
    }
    for kind, (pixels, got_hw) in got.items():
        assert got_hw == expected_hw == hw, kind
        assert pixels.dtype == expected.dtype and np.array_equal(pixels, expected), kind
    swapped, _ = preprocess(image_from_array(frame, "bgr"), params)  # the wrong order really changes the input
    assert not np.array_equal(swapped, expected)


def test_a_strided_crop_of_a_frame_equals_the_png_of_that_crop(tmp_path, fake_bundle):
    bundle = LoadedBundle(fake_bundle[0], with_engine=False)
    big = _frame(120, 160)
    crop = big[10:90:2, 20:150:3]  # not contiguous
    expected, _ = preprocess(load_image(_png(tmp_path, np.ascontiguousarray(crop))), bundle.preprocess_params)
    got, _ = preprocess(image_from_array(crop, "rgb"), bundle.preprocess_params)
    assert np.array_equal(got, expected)


def test_jpeg_bytes_decode_like_the_jpeg_file(tmp_path, fake_bundle):
    bundle = LoadedBundle(fake_bundle[0], with_engine=False)
    path = tmp_path / "frame.jpg"
    Image.fromarray(_frame(50, 70)).save(path, quality=80)
    a, _ = preprocess(load_image(path), bundle.preprocess_params)
    b, _ = preprocess(load_image_bytes(bytearray(path.read_bytes())), bundle.preprocess_params)
    assert np.array_equal(a, b)


def test_same_token_ids_from_every_kind_on_the_tiny_twin(tmp_path, tiny_bundles):
    frame = _frame(60, 100)
    path = _png(tmp_path, frame)
    with Bundle(tiny_bundles[0.2]) as bundle:
        ids = {kind: bundle.generate(image, PROMPT, max_new_tokens=8, channels=channels).token_ids
               for kind, (image, channels) in _kinds(path, frame).items()}
        with bundle.generator(frame.copy(), PROMPT, max_new_tokens=8, channels="rgb") as gen:
            stepped = tuple(gen)
    assert len(ids["png path"]) == 8
    assert all(v == ids["png path"] for v in ids.values()), ids
    assert stepped == ids["png path"]


def test_capi_takes_frames_and_bytes(tmp_path, fake_bundle):
    frame = _frame(40, 90)
    path = _png(tmp_path, frame)
    out = capi.Out()
    assert capi.Bundle_Create(str(fake_bundle[0]), out) == Status.OK
    bundle = out.value
    assert capi.GeneratorParams_Create(out) == Status.OK
    params = out.value
    capi.GeneratorParams_SetMaxNewTokens(params, 6)
    tokens = {}
    try:
        for kind, (image, channels) in _kinds(path, frame).items():
            assert capi.Generator_Create(bundle, params, image, PROMPT, False, out, channels=channels) == Status.OK, \
                capi.GetLastError()
            gen = out.value
            while not (capi.Generator_IsDone(gen, out), out.value)[1]:
                assert capi.Generator_GenerateNextToken(gen) == Status.OK
            capi.Generator_GetTokenIds(gen, out)
            tokens[kind] = out.value
            capi.Generator_Destroy(gen)
    finally:
        capi.GeneratorParams_Destroy(params)
        capi.Bundle_Destroy(bundle)
    assert all(v == tokens["png path"] for v in tokens.values()), tokens


BAD_FRAMES = [
    # (image, channels, status, words the message must hold)
    (np.zeros((20, 30, 3), np.float32), "rgb", Status.IMAGE_INVALID, ["uint8", "float32"]),
    (np.zeros((20, 30, 3), np.uint16), "bgr", Status.IMAGE_INVALID, ["uint8", "uint16"]),
    (np.zeros((20, 30), np.uint8), "rgb", Status.IMAGE_INVALID, ["[height, width, 3]", "(20, 30)"]),
    (np.zeros((2, 20, 30, 3), np.uint8), "rgb", Status.IMAGE_INVALID, ["[height, width, 3]", "4 axes"]),
    (np.zeros((20, 30, 4), np.uint8), "bgr", Status.IMAGE_INVALID, ["4 channels", "frame[..., :3]"]),
    (np.zeros((20, 30, 1), np.uint8), "rgb", Status.IMAGE_INVALID, ["1 channels", "[height, width, 3]"]),
    (np.zeros((0, 30, 3), np.uint8), "rgb", Status.IMAGE_INVALID, ["empty"]),
    (np.zeros((20, 30, 3), np.uint8), "rgba", Status.INVALID_ARGUMENT, ["'rgb' or 'bgr'", "'rgba'"]),
    (np.zeros((20, 30, 3), np.uint8), None, Status.INVALID_ARGUMENT, ["channels='rgb'", "BGR"]),
    ("cam.png", "bgr", Status.INVALID_ARGUMENT, ["numpy frames only"]),
    ([[[0, 0, 0]]], None, Status.INVALID_ARGUMENT, ["numpy uint8 [H, W, 3]", "list"]),
    (b"", None, Status.IMAGE_INVALID, ["not a readable image"]),
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, None, Status.IMAGE_INVALID, ["encoded bytes"]),
    (memoryview(b"abcdef")[::2], None, Status.INVALID_ARGUMENT, ["contiguous"]),
]


@pytest.mark.parametrize("image, channels, status, words", BAD_FRAMES,
                         ids=[f"{i}-{s.name}" for i, (_, _, s, _) in enumerate(BAD_FRAMES)])
def test_bad_frames_get_a_status_naming_what_was_expected(fake_bundle, image, channels, status, words):
    with Bundle(fake_bundle[0]) as bundle:
        with pytest.raises(RuntimeStatusError) as e:
            bundle.generate(image, PROMPT, max_new_tokens=2, channels=channels)
    assert e.value.status == status, e.value.message
    assert "\n" not in e.value.message
    for word in words:
        assert word in e.value.message


def test_truncated_png_bytes_say_so(tmp_path, fake_bundle):
    data = _png(tmp_path, _frame(40, 90)).read_bytes()
    with Bundle(fake_bundle[0]) as bundle:
        with pytest.raises(RuntimeStatusError) as e:
            bundle.generate(data[: len(data) // 2], PROMPT, max_new_tokens=2)
    assert e.value.status == Status.IMAGE_INVALID and "truncated" in e.value.message


def test_pixel_limit_applies_to_frames_and_bytes_before_decoding(tmp_path, fake_bundle):
    frame = _frame(40, 90)  # 3600 pixels
    png = io.BytesIO()
    Image.fromarray(frame).save(png, format="PNG")
    with Bundle(fake_bundle[0], max_image_pixels=3599) as bundle:
        for image, channels in ((frame, "rgb"), (png.getvalue(), None)):
            with pytest.raises(RuntimeStatusError) as e:
                bundle.generate(image, PROMPT, max_new_tokens=2, channels=channels)
            assert e.value.status == Status.IMAGE_INVALID and "3600 pixels" in e.value.message
    with Bundle(fake_bundle[0], max_image_pixels=3600) as bundle:  # the limit itself is allowed
        assert len(bundle.generate(frame, PROMPT, max_new_tokens=2, channels="rgb").token_ids) == 2
