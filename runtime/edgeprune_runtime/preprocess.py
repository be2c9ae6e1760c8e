"""Image preprocessing of the runtime: LLaVA-NeXT "anyres" pixel values, without torch or transformers.

Reproduces, operation for operation, `transformers`' `LlavaNextImageProcessorPil` (the PIL backend):

1. `convert_to_rgb`: an image with an alpha band (or a `transparency` entry) is composited onto
   white, anything else goes through `Image.convert("RGB")`. Where that would be garbage we differ
   from transformers: 16-bit ("I;16*"), 32-bit integer ("I") and float ("F") images are scaled to
   8 bits (Pillow's convert clips them, a 16-bit photo turns white), premultiplied "La" is
   un-premultiplied first (Pillow cannot convert it to RGB).
2. anyres: `select_best_resolution` picks a grid pinpoint (h, w); the image is resized (PIL,
   `resample`) to fit it keeping its aspect ratio (`get_patch_output_size`, which rounds the free
   side *up* with `math.ceil`), zero-padded (uint8 0, i.e. black, centred, odd pixel at the
   bottom/right) and cut into `crop x crop` partitions, row-major.
3. the base image: the original resized (squashed, aspect ratio *not* kept) to
   `shortest_edge x shortest_edge`, placed before the partitions.
4. per partition, still uint8: resize so the shortest edge is `shortest_edge` (a same-size
   resize when `crop == shortest_edge`), center-crop to `crop x crop`; then rescale in float64
   (`x.astype(f64) * rescale_factor`) cast to float32, then normalize in float32
   (`(x - mean_f32) / std_f32`, a true division, not a multiply by the reciprocal).
5. the patch axis is zero-padded (exact 0.0, not the normalized black) to `partitions`.

Every resize goes through `PIL.Image.resize((w, h), resample, reducing_gap=None)` on a uint8 RGB
image, as transformers does, so the result is bitwise equal to the processor's.

Only numpy, pillow and the standard library are used here (runtime rule: no torch, transformers, onnx).
"""

from __future__ import annotations

import io
import math
import os
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from . import checks
from .budget import DEFAULT_MAX_IMAGE_PIXELS, image_bytes
from .errors import RuntimeStatusError, Status, bundle_invalid
from .layout import max_partitions, select_best_resolution

# Resample codes PIL.Image.resize accepts (NEAREST, LANCZOS, BILINEAR, BICUBIC, BOX, HAMMING).
_PIL_RESAMPLE_CODES = (0, 1, 2, 3, 4, 5)

MAX_SIDE = 1 << 15  # pixels per side of a crop, pinpoint or shortest edge; also the most partitions
MAX_PINPOINTS = 1024

# Processor types whose to_dict() we understand. Both the PIL and the torchvision backend of
# transformers 5 report "LlavaNextImageProcessor" (the PIL class strips its "Pil" suffix in
# to_dict), so the dict cannot tell them apart; we reproduce the PIL backend.
_KNOWN_PROCESSOR_TYPES = ("LlavaNextImageProcessor", "LlavaNextImageProcessorPil", "LlavaNextImageProcessorFast")


@dataclass(frozen=True)
class PreprocessParams:
    image_grid_pinpoints: list[list[int]]  # [[h, w], ...]
    crop_size: int  # H == W of each partition (e.g. 336 or 112)
    shortest_edge: int  # the processor's size["shortest_edge"]
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    rescale_factor: float
    resample: int  # PIL resample code, 3 = BICUBIC
    partitions: int  # P: pad the patch axis to this many (1 + max crops)

    def __post_init__(self):
        pinpoints = [[int(h), int(w)] for h, w in self.image_grid_pinpoints]
        object.__setattr__(self, "image_grid_pinpoints", pinpoints)
        object.__setattr__(self, "image_mean", tuple(float(x) for x in self.image_mean))
        object.__setattr__(self, "image_std", tuple(float(x) for x in self.image_std))
        if not pinpoints:
            raise ValueError("image_grid_pinpoints is empty")
        if self.crop_size <= 0 or self.shortest_edge <= 0:
            raise ValueError(f"crop_size ({self.crop_size}) and shortest_edge ({self.shortest_edge}) must be > 0")
        for h, w in pinpoints:
            if h <= 0 or w <= 0 or h % self.crop_size or w % self.crop_size:
                raise ValueError(
                    f"image_grid_pinpoints entry {[h, w]} is not a positive multiple of crop_size {self.crop_size}"
                )
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError(f"image_mean/image_std must have 3 values, got {self.image_mean} / {self.image_std}")
        if any(s == 0 for s in self.image_std):
            raise ValueError(f"image_std has a zero: {self.image_std}")
        if int(self.resample) not in _PIL_RESAMPLE_CODES:
            raise ValueError(f"resample={self.resample!r} is not a PIL resample code {_PIL_RESAMPLE_CODES}")
        need = max_partitions(pinpoints, self.crop_size)
        if self.partitions < need:
            raise ValueError(f"partitions={self.partitions} < {need} (1 base image + the largest crop grid)")

    @classmethod
    def from_processor_dict(cls, d: dict, partitions: int) -> "PreprocessParams":
        """From `image_processor.to_dict()` of a LLaVA-NeXT image processor.

        Raises ValueError naming any option we do not reproduce when it is set to a value that
        would change the output.
        """
        kind = d.get("image_processor_type")
        if kind is not None and kind not in _KNOWN_PROCESSOR_TYPES:
            raise ValueError(f"image_processor_type={kind!r} is not a LLaVA-NeXT image processor")

        size = {k: v for k, v in (d.get("size") or {}).items() if v is not None}
        if set(size) != {"shortest_edge"}:
            raise ValueError(f"size={d.get('size')!r}: only {{'shortest_edge': N}} is supported")
        shortest_edge = int(size["shortest_edge"])

        crop = {k: v for k, v in (d.get("crop_size") or {}).items() if v is not None}
        if set(crop) != {"height", "width"} or crop["height"] != crop["width"]:
            raise ValueError(f"crop_size={d.get('crop_size')!r}: a square {{'height': N, 'width': N}} is required")
        crop_size = int(crop["height"])

        for flag in ("do_convert_rgb", "do_rescale", "do_normalize"):
            if d.get(flag, True) is not True:
                raise ValueError(f"{flag}={d.get(flag)!r} is not supported (only True)")
        # do_resize / do_center_crop only act on the partitions; with crop == shortest_edge both are
        # no-ops (same-size resize, full-size crop), so turning them off changes nothing then.
        for flag in ("do_resize", "do_center_crop"):
            if d.get(flag, True) is not True and shortest_edge != crop_size:
                raise ValueError(
                    f"{flag}={d.get(flag)!r} is not supported when shortest_edge ({shortest_edge})"
                    f" != crop_size ({crop_size})"
                )
        # do_pad only pads the patch axis across a batch; we always pad to `partitions`.
        if d.get("pad_size") is not None:
            raise ValueError(f"pad_size={d.get('pad_size')!r} is not supported")

        resample = d.get("resample", 3)
        if resample is None:  # the PIL backend's resize falls back to BILINEAR
            resample = 2
        return cls(
            image_grid_pinpoints=[[int(h), int(w)] for h, w in d["image_grid_pinpoints"]],
            crop_size=crop_size,
            shortest_edge=shortest_edge,
            image_mean=_three(d.get("image_mean"), "image_mean"),
            image_std=_three(d.get("image_std"), "image_std"),
            rescale_factor=float(d.get("rescale_factor", 1 / 255)),
            resample=int(resample),
            partitions=int(partitions),
        )

    def to_dict(self) -> dict:
        return {
            "image_grid_pinpoints": [list(p) for p in self.image_grid_pinpoints],
            "crop_size": self.crop_size,
            "shortest_edge": self.shortest_edge,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "rescale_factor": self.rescale_factor,
            "resample": self.resample,
            "partitions": self.partitions,
        }

    @classmethod
    def from_dict(cls, d) -> "PreprocessParams":
        """From the manifest's `preprocess` (untrusted): every value typed and bounded.

        Raises RuntimeStatusError(BUNDLE_INVALID) naming the first bad value. Sizes are bounded here only
        loosely (MAX_SIDE); what they allocate together is checked against the memory budget (budget.py)."""
        d = checks.need_dict(d, "manifest `preprocess`")
        missing = [k for k in cls.__dataclass_fields__ if k not in d]
        if missing:
            raise bundle_invalid(f"manifest `preprocess` lacks {missing}; re-export the bundle")
        where = "manifest preprocess."
        pinpoints = []
        for p in checks.need_list(d["image_grid_pinpoints"], where + "image_grid_pinpoints", MAX_PINPOINTS, 1):
            pair = checks.need_list(p, where + "image_grid_pinpoints[]", 2, 2)
            pinpoints.append([checks.need_int(v, where + "image_grid_pinpoints[][]", 1, MAX_SIDE) for v in pair])
        mean = checks.need_list(d["image_mean"], where + "image_mean", 3, 3)
        std = checks.need_list(d["image_std"], where + "image_std", 3, 3)
        try:
            return cls(
                image_grid_pinpoints=pinpoints,
                crop_size=checks.need_int(d["crop_size"], where + "crop_size", 1, MAX_SIDE),
                shortest_edge=checks.need_int(d["shortest_edge"], where + "shortest_edge", 1, MAX_SIDE),
                image_mean=tuple(checks.need_number(x, where + "image_mean[]") for x in mean),
                image_std=tuple(checks.need_number(x, where + "image_std[]") for x in std),
                rescale_factor=checks.need_number(d["rescale_factor"], where + "rescale_factor"),
                resample=checks.need_int(d["resample"], where + "resample", 0, 5),
                partitions=checks.need_int(d["partitions"], where + "partitions", 1, MAX_SIDE),
            )
        except ValueError as e:  # __post_init__: the values do not fit together
            raise bundle_invalid(f"manifest `preprocess` is invalid: {e}; re-export the bundle") from None


def _three(value, name: str) -> tuple[float, float, float]:
    if isinstance(value, (int, float)):  # transformers accepts a scalar for all channels
        value = [value] * 3
    if value is None or len(value) != 3:
        raise ValueError(f"{name}={value!r}: 3 values (one per RGB channel) are required")
    return tuple(float(x) for x in value)


# --- image loading ----------------------------------------------------------------------------


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
# Full-scale values tried in order for "I" and "F" images, whose bit depth Pillow does not record: the
# smallest that holds the data's maximum maps to 255 ("F" in [0, 1], 8- or 16-bit data widened to 32 bits,
# then the whole signed 32-bit range Pillow's "I" holds; a float image beyond 65535 uses its own maximum).
_FULL_SCALES = {"F": (1.0, 255.0, 65535.0), "I": (255.0, 65535.0, 2.0 ** 31 - 1)}


def _to_8bit(image: Image.Image) -> Image.Image:
    """A single-band 16-bit, 32-bit integer or float image as 8-bit "L", scaled to [0, 255] (not clipped).

    NaN becomes 0 and values are clipped to [0, full scale]; work is float32 (4 bytes a pixel)."""
    a = np.array(image, dtype=np.float32)  # [H, W]
    np.nan_to_num(a, copy=False, nan=0.0, posinf=np.finfo(np.float32).max, neginf=0.0)
    if image.mode in _SIXTEEN_BIT:
        full = 65535.0
    else:
        top = float(a.max()) if a.size else 0.0
        full = next((f for f in _FULL_SCALES[image.mode] if top <= f), top)
    a *= np.float32(255.0 / full)
    np.clip(np.rint(a, out=a), 0, 255, out=a)
    return Image.fromarray(a.astype(np.uint8), "L")


def _convert_to_rgb(image: Image.Image) -> Image.Image:
    """transformers' `convert_to_rgb` for PIL input: transparency is composited onto white.

    Before it, images Pillow would convert into garbage or not at all are made 8-bit (see the module docstring).
    An RGB image without transparency is returned as it is (Pillow's convert would only copy it)."""
    if image.mode == "RGB" and image.info.get("transparency") is None:
        return image
    if image.mode in _SIXTEEN_BIT or image.mode in ("I", "F"):
        image = _to_8bit(image)
    elif image.mode == "La":  # premultiplied alpha: Pillow converts La only to LA
        image = image.convert("LA")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


def check_image_size(width: int, height: int, max_pixels: int, max_bytes: int | None, name: str) -> None:
    """Raises IMAGE_INVALID for more than `max_pixels` pixels, RESOURCE_LIMIT when decoding would pass `max_bytes`."""
    if width * height > max_pixels:
        raise RuntimeStatusError(
            Status.IMAGE_INVALID,
            f"image {name} is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}; downscale it "
            "(or raise EDGEPRUNE_MAX_IMAGE_PIXELS)")
    if max_bytes is not None and image_bytes(width, height) > max_bytes:
        raise RuntimeStatusError(
            Status.RESOURCE_LIMIT,
            f"image {name} ({width}x{height}) needs about {image_bytes(width, height) >> 20} MiB to decode, "
            f"{max(max_bytes, 0) >> 20} MiB of the memory budget are left; downscale it or raise EDGEPRUNE_MEMORY_BUDGET_MB")


def load_image(path, *, exif_transpose: bool = False, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
               max_bytes: int | None = None) -> Image.Image:
    """Open and fully decode an image file, returned as an RGB PIL image.

    Transparency is composited onto white exactly as the processor's `convert_to_rgb` would, so
    `preprocess(load_image(p))` equals the processor applied to `Image.open(p)` (for the modes where that
    is not garbage, see the module docstring). EXIF orientation is ignored by default (as the processor
    ignores it on a PIL image); `exif_transpose=True` applies it, as `transformers.image_utils.load_image` does.
    The size in the file's header is checked against `max_pixels` and `max_bytes` before anything is decoded.

    Raises RuntimeStatusError(IMAGE_INVALID) for a missing path, a directory, a file that is not a decodable
    image (unknown format, corrupt or truncated data) or one over `max_pixels`; RESOURCE_LIMIT when decoding
    needs more than `max_bytes`. Note: a truncated file is only detected while PIL's global
    `ImageFile.LOAD_TRUNCATED_IMAGES` is False (its default).
    """
    try:
        p = os.fspath(path)
    except TypeError:
        raise RuntimeStatusError(Status.INVALID_ARGUMENT, f"image path must be a str or os.PathLike, got {type(path).__name__}") from None
    if not isinstance(p, str) or "\0" in p:
        raise RuntimeStatusError(Status.INVALID_ARGUMENT, f"image path must be text without NUL characters, got {checks.show(p)}")
    if not os.path.exists(p):
        raise RuntimeStatusError(Status.IMAGE_INVALID, f"image file not found: {p!r}; check the path")
    if os.path.isdir(p):
        raise RuntimeStatusError(
            Status.IMAGE_INVALID, f"image path {p!r} is a directory; pass the path of an image file inside it"
        )
    return _decode(p, repr(p), exif_transpose, max_pixels, max_bytes)


def _decode(source, name: str, exif_transpose: bool, max_pixels: int, max_bytes: int | None) -> Image.Image:
    """Decodes `source` (a path, or a binary file object for encoded bytes) as load_image describes; `name`
    says which image in messages."""
    try:
        with warnings.catch_warnings():
            # Pillow warns (on stderr) about odd files it still decodes, and about large images, where our own
            # limit applies: a user error must stay one line, so what matters becomes a status, the rest is quiet
            warnings.simplefilter("ignore")
            with Image.open(source) as img:
                check_image_size(img.width, img.height, max_pixels, max_bytes, name)
                img.load()
                if exif_transpose:
                    img = ImageOps.exif_transpose(img)
                rgb = _convert_to_rgb(img)
                rgb.load()
    except RuntimeStatusError:
        raise
    except Image.DecompressionBombError as e:
        raise RuntimeStatusError(
            Status.IMAGE_INVALID, f"image {name} is too large to decode ({_one_line(e)}); downscale it first"
        ) from None
    except Image.UnidentifiedImageError:
        raise RuntimeStatusError(
            Status.IMAGE_INVALID,
            f"{name} is not a readable image file (format not recognised); pass a PNG/JPEG/WebP/BMP image",
        ) from None
    except OSError as e:
        if "truncated" in str(e).lower():
            why = f"truncated ({_one_line(e)})"
        else:
            why = f"unreadable or corrupt ({type(e).__name__}: {_one_line(e)})"
        raise RuntimeStatusError(Status.IMAGE_INVALID, f"image {name} is {why}; re-export or re-copy the file") from None
    except MemoryError:
        raise RuntimeStatusError(Status.RESOURCE_LIMIT, f"out of memory decoding image {name}; downscale it") from None
    except Exception as e:  # PIL plugins raise assorted errors (SyntaxError, ValueError, struct.error ...)
        raise RuntimeStatusError(
            Status.IMAGE_INVALID,
            f"image {name} is corrupt ({type(e).__name__}: {_one_line(e)}); re-export or re-copy the file",
        ) from None
    if rgb.width == 0 or rgb.height == 0:
        raise RuntimeStatusError(
            Status.IMAGE_INVALID, f"image {name} is empty ({rgb.width}x{rgb.height}); pass a non-empty image"
        )
    return rgb


def load_image_bytes(data, *, exif_transpose: bool = False, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                     max_bytes: int | None = None) -> Image.Image:
    """An encoded image (PNG, JPEG, ... as `bytes`, `bytearray` or `memoryview`) decoded exactly as
    `load_image` decodes the same bytes from a file: same checks, same RGB conversion, same errors.

    Raises RuntimeStatusError: INVALID_ARGUMENT for another type, IMAGE_INVALID / RESOURCE_LIMIT as load_image."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise RuntimeStatusError(Status.INVALID_ARGUMENT, f"encoded image data must be bytes, got {type(data).__name__}")
    try:
        view = memoryview(data).cast("B")  # any buffer format, read as bytes
    except TypeError:  # a strided memoryview
        raise RuntimeStatusError(Status.INVALID_ARGUMENT, "encoded image data must be one contiguous buffer; "
                                 "pass bytes(data)") from None
    return _decode(io.BytesIO(view), f"(encoded bytes, {view.nbytes} bytes)", exif_transpose, max_pixels, max_bytes)


CHANNEL_ORDERS = ("rgb", "bgr")  # "bgr": OpenCV's frames (cv2.imread, VideoCapture.read)


def image_from_array(frame, channels: str, *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                     max_bytes: int | None = None) -> Image.Image:
    """A camera frame, numpy uint8 [H, W, 3] whose last axis is in `channels` order ("rgb" or "bgr"), as
    the RGB PIL image holding the same pixels: `preprocess` then does to it exactly what it does to the
    PNG of that frame (bit for bit). The frame is copied; the caller may reuse its buffer.

    Raises RuntimeStatusError: INVALID_ARGUMENT for `channels` other than "rgb"/"bgr"; IMAGE_INVALID naming
    what was expected for another dtype, number of axes or channels, an empty frame or one over `max_pixels`;
    RESOURCE_LIMIT past `max_bytes`."""
    if channels not in CHANNEL_ORDERS:
        raise RuntimeStatusError(Status.INVALID_ARGUMENT,
                                 f"channels must be 'rgb' or 'bgr' (OpenCV frames are 'bgr'), got {checks.show(channels)}")
    if not isinstance(frame, np.ndarray):
        raise RuntimeStatusError(Status.INVALID_ARGUMENT, f"a frame must be a numpy array, got {type(frame).__name__}")
    expected = f"a uint8 array [height, width, 3] in {channels} order"
    if frame.dtype != np.uint8:
        raise RuntimeStatusError(Status.IMAGE_INVALID, f"expected {expected}, got dtype {frame.dtype}; "
                                 "scale other data to 0..255 and convert with .astype(np.uint8)")
    if frame.ndim != 3:
        raise RuntimeStatusError(Status.IMAGE_INVALID, f"expected {expected}, got shape {tuple(frame.shape)} "
                                 f"({frame.ndim} axes); a gray frame needs np.stack([f, f, f], axis=-1)")
    height, width, bands = (int(n) for n in frame.shape)
    if bands != 3:
        hint = "; drop alpha with frame[..., :3]" if bands == 4 else ""
        raise RuntimeStatusError(Status.IMAGE_INVALID, f"expected {expected}, got {bands} channels "
                                 f"(shape {tuple(frame.shape)}){hint}")
    if height == 0 or width == 0:
        raise RuntimeStatusError(Status.IMAGE_INVALID, f"the frame is empty ({width}x{height}); pass a non-empty image")
    check_image_size(width, height, max_pixels, max_bytes, f"(frame {width}x{height})")
    rgb = frame if channels == "rgb" else frame[..., ::-1]
    return Image.fromarray(np.ascontiguousarray(rgb))  # uint8 [H, W, 3] -> mode "RGB", a copy


# --- the transforms (uint8 HWC arrays until the rescale) -------------------------------------


def _resize(image: np.ndarray | Image.Image, height: int, width: int, resample: int) -> np.ndarray:
    """transformers' `image_transforms.resize` on uint8 RGB data (HWC array or PIL image): a PIL resize, no
    value changes around it; returns uint8 [height, width, 3]."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    return np.asarray(image.resize((width, height), resample=resample, reducing_gap=None))


def _patch_output_size(hw: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """transformers' `get_patch_output_size`: fit inside `target`, free side rounded up (ceil)."""
    original_height, original_width = hw
    target_height, target_width = target
    scale_w = target_width / original_width
    scale_h = target_height / original_height
    if scale_w < scale_h:
        return min(math.ceil(original_height * scale_w), target_height), target_width
    return target_height, min(math.ceil(original_width * scale_h), target_width)


def _shortest_edge_size(hw: tuple[int, int], size: int) -> tuple[int, int]:
    """transformers' `get_resize_output_image_size(default_to_square=False)` (torchvision-style, int-truncated)."""
    height, width = hw
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def _center_crop(arr: np.ndarray, crop: int) -> np.ndarray:
    """transformers' `center_crop` (pads with zeros when the image is smaller than the crop), HWC."""
    orig_height, orig_width = arr.shape[:2]
    top, left = (orig_height - crop) // 2, (orig_width - crop) // 2
    bottom, right = top + crop, left + crop
    if top >= 0 and bottom <= orig_height and left >= 0 and right <= orig_width:
        return arr[top:bottom, left:right]
    new_height, new_width = max(crop, orig_height), max(crop, orig_width)
    canvas = np.zeros((new_height, new_width) + arr.shape[2:], dtype=arr.dtype)
    top_pad, left_pad = math.ceil((new_height - orig_height) / 2), math.ceil((new_width - orig_width) / 2)
    canvas[top_pad:top_pad + orig_height, left_pad:left_pad + orig_width] = arr
    top, bottom, left, right = top + top_pad, bottom + top_pad, left + left_pad, right + left_pad
    return canvas[max(0, top):min(new_height, bottom), max(0, left):min(new_width, right)]


def preprocess(image: Image.Image, params: PreprocessParams, *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
               max_bytes: int | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """returns pixel_values float32 [P, 3, crop, crop] (zero-padded on the patch axis like the processor's
    do_pad) and image_hw = (height, width) of the original image.

    Raises RuntimeStatusError: INVALID_ARGUMENT for a non-image, IMAGE_INVALID for an empty image, one over
    `max_pixels` or one in a mode that cannot be converted to RGB; RESOURCE_LIMIT past `max_bytes`."""
    if not isinstance(image, Image.Image):
        raise RuntimeStatusError(
            Status.INVALID_ARGUMENT,
            f"preprocess expects a PIL image, got {type(image).__name__}; use load_image(path)",
        )
    if image.width == 0 or image.height == 0:
        raise RuntimeStatusError(
            Status.IMAGE_INVALID, f"image is empty ({image.width}x{image.height}); pass a non-empty image"
        )
    check_image_size(image.width, image.height, max_pixels, max_bytes, "(PIL image)")
    resample, crop, se = int(params.resample), params.crop_size, params.shortest_edge

    try:
        with warnings.catch_warnings():  # Pillow warns about odd palettes it still converts
            warnings.simplefilter("ignore")
            rgb = _convert_to_rgb(image)  # PIL RGB; resized as a PIL image (no numpy copy of a full-size image)
    except (ValueError, OSError) as e:  # a mode Pillow cannot convert, or a lazily loaded image that fails to decode
        raise RuntimeStatusError(Status.IMAGE_INVALID, f"cannot convert the {image.mode} image to RGB: {_one_line(e)}") from None
    hw = (rgb.height, rgb.width)

    # anyres partitions: fit the best pinpoint, pad with black, cut row-major
    best = select_best_resolution(hw, params.image_grid_pinpoints)
    rh, rw = _patch_output_size(hw, best)
    resized = _resize(rgb, rh, rw, resample)
    ph, pw = _patch_output_size(resized.shape[:2], best)  # the processor recomputes it on the resized image
    top, left = (best[0] - ph) // 2, (best[1] - pw) // 2
    padded = np.zeros((best[0], best[1], 3), np.uint8)
    padded[top:top + ph, left:left + pw] = resized
    patches = [padded[i:i + crop, j:j + crop] for i in range(0, best[0], crop) for j in range(0, best[1], crop)]

    base = _resize(rgb, se, se, resample)  # squashed to (shortest_edge, shortest_edge)

    out = []
    for patch in [base] + patches:
        oh, ow = _shortest_edge_size(patch.shape[:2], se)
        patch = _resize(patch, oh, ow, resample)  # same size when crop == shortest_edge (PIL copies)
        out.append(_center_crop(patch, crop))
    stacked = np.stack(out).transpose(0, 3, 1, 2)  # uint8 [n, 3, crop, crop]

    x = (stacked.astype(np.float64) * params.rescale_factor).astype(np.float32)
    mean = np.array(params.image_mean, dtype=np.float32)[:, None, None]
    std = np.array(params.image_std, dtype=np.float32)[:, None, None]
    x = (x - mean) / std

    n = x.shape[0]
    if n > params.partitions:
        raise ValueError(f"image needs {n} partitions, params allow {params.partitions}")
    pixel_values = np.zeros((params.partitions, 3, crop, crop), np.float32)
    pixel_values[:n] = x
    return pixel_values, hw
