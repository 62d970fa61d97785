"""Image preprocessing with invertible geometry.

`Preprocess` turns raw images of any size into model-ready arrays and remembers
where each model-input pixel came from, so that maps computed on the model input
can be put back onto the original image (`Geometry.unmap`).
"""

from __future__ import annotations

from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np

from ._validate import check_choice, check_ndim, check_size, float_array
from .errors import CamError, InvalidInput
from .maps import upsample

__all__ = ["Preprocess", "Geometry", "EncodedImage", "read_image", "as_rgb", "bit_depth_scale", "as_input_dtype"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


@dataclass(frozen=True)
class EncodedImage:
    """An image file's bytes read elsewhere (a Ray Dataset's ``bytes`` column), and its name.

    `Explainer.explain_images` takes these beside paths and arrays, and decodes them as
    `read_image` decodes files, in its reader threads.
    """

    data: bytes
    name: str = "<bytes>"


def read_image(path, *, data: bytes | None = None, exif_orientation: bool = True) -> np.ndarray:
    """Read an image file with Pillow into an ``(H, W)``, ``(H, W, 3)`` or ``(H, W, 4)`` array.

    The image comes back as people see it: its EXIF orientation is applied (the file's
    pixels turned or mirrored upright, as every viewer shows them), unless
    `exif_orientation` is False (then the stored pixels, as scikit-image's ``imread``
    gives them).  8-bit images come back as uint8, 16-bit gray as uint16, 32-bit float
    as float32 (read as 0..1).  Pillow's 32-bit integer images (mode ``"I"``) come back
    as uint16 when every value fits 16 bits (how Pillow holds 16-bit data), else as
    float32 ``value / (2**31 - 1)``, negatives at 0.  Palette images become RGB, or RGBA
    when they have transparency; CMYK and YCbCr become RGB; only the first frame of an
    animation is read.  `Preprocess` scales every integer image from its full bit depth.

    With `data`, the file's bytes as read elsewhere (a Ray Dataset from
    ``read_binary_files``), those bytes are decoded the same way and `path` only
    names the image, also in errors.

    Raises `CamError` (with the path) when the file is missing or not a readable image.
    """
    return np.asarray(_read_picture(path, data=data, exif_orientation=exif_orientation))


def _read_picture(path, *, data: bytes | None = None, exif_orientation: bool = True):
    """`read_image`'s decoded Pillow image, before it becomes an array (its mode one NumPy reads)."""
    from PIL import Image

    path = Path(path)
    if data is None and not path.is_file():
        raise CamError(f"image not found: {path}")
    source = path if data is None else BytesIO(bytes(data))
    try:
        with Image.open(source) as img:
            if exif_orientation:
                img = _upright(img)
            return _direct_mode(img)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        reason = reason.replace(repr(source), repr(str(path)))  # name the image, not the buffer, as Pillow does
        raise CamError(f"cannot read image {path}: {reason}") from None


_EXIF_ORIENTATION = 0x0112


def _upright(img):
    """`img` turned as its EXIF orientation says (Pillow's ``ImageOps.exif_transpose``).

    Images without an orientation, or with orientation 1, are returned as they are (no copy).
    """
    from PIL import ImageOps

    if img.getexif().get(_EXIF_ORIENTATION, 1) in (None, 1):
        return img
    return ImageOps.exif_transpose(img)


# Pillow modes that NumPy reads directly (the rest are converted to RGB or RGBA).
_DIRECT_MODES = frozenset({"L", "RGB", "RGBA", "I;16", "I;16L", "I;16B", "I", "F"})
_INT32_MAX = 2**31 - 1


def _direct_mode(img):
    """`img` loaded, in one of `_DIRECT_MODES` (1-bit becomes L, the others RGB or RGBA).

    Mode ``"I"`` (32-bit integers) becomes ``"I;16"`` when its values fit 16 bits, else
    ``"F"`` on 0..1 (see `read_image`).
    """
    if img.mode == "1":
        return img.convert("L")
    if img.mode not in _DIRECT_MODES:
        alpha = "A" in img.mode or "transparency" in img.info
        return img.convert("RGBA" if alpha else "RGB")
    img.load()
    if img.mode == "I":
        from PIL import Image

        values = np.asarray(img)
        low, high = img.getextrema()
        if low >= 0 and high <= 65535:
            return Image.fromarray(values.astype(np.uint16))
        return Image.fromarray((np.maximum(values, 0) / _INT32_MAX).astype(np.float32))
    return img


def bit_depth_scale(dtype) -> float:
    """The factor that brings an integer image of `dtype` to 0..255: 1 for 8 bits, 255/65535 for uint16.

    Other integer dtypes (int32, int64 arrays made from 8-bit images) count as 8 bits.

    Examples
    --------
    >>> bit_depth_scale(np.uint8), round(bit_depth_scale(np.uint16) * 65535)
    (1.0, 255)
    """
    return 255.0 / 65535.0 if np.dtype(dtype) == np.uint16 else 1.0


def as_rgb(image, *, name: str = "image") -> np.ndarray:
    """Return ``image`` as an ``(H, W, 3)`` array (gray is repeated, alpha dropped).

    uint8/uint16 images keep their dtype; float images are returned as floats.
    """
    arr = np.asarray(image)
    if arr.dtype.kind not in "uif" or arr.dtype == np.bool_:
        raise InvalidInput(f"{name} must be a uint8 or float array, got dtype {arr.dtype}")
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    check_ndim(arr, (2, 3), name, "(H, W), (H, W, 3) or (H, W, 4)")
    if arr.ndim == 3 and arr.shape[-1] not in (3, 4):
        raise InvalidInput(f"{name} must have 3 or 4 channels, got shape {arr.shape}")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise InvalidInput(f"{name} must not be empty, got shape {arr.shape}")
    if arr.ndim == 2:
        return np.repeat(arr[..., None], 3, axis=-1)
    return arr[..., :3]


@dataclass(frozen=True)
class Geometry:
    """Where the model input came from in the original image.

    The model input of size ``input_size = (H, W)`` is the resize of the original
    window ``crop = (x0, y0, x1, y1)`` (half-open, original-image pixels) of an
    image of size ``original_size = (H0, W0)``.
    """

    original_size: tuple
    crop: tuple
    input_size: tuple

    def unmap(self, maps, *, method: str = "bilinear") -> np.ndarray:
        """Put maps computed on the model input back onto the original image.

        Parameters
        ----------
        maps : (..., h, w) ndarray
            Maps at any resolution that covers the whole model input.
        method : {"nearest", "bilinear", "bicubic"}

        Returns
        -------
        (..., H0, W0) ndarray
            The maps resized onto the crop window; pixels outside it are 0.

        Examples
        --------
        >>> g = Geometry(original_size=(4, 6), crop=(1, 0, 5, 4), input_size=(2, 2))
        >>> g.unmap(np.ones((2, 2))).astype(int)
        array([[0, 1, 1, 1, 1, 0],
               [0, 1, 1, 1, 1, 0],
               [0, 1, 1, 1, 1, 0],
               [0, 1, 1, 1, 1, 0]])
        """
        return self.place(upsample(maps, self.window_size, method=method))

    @property
    def window_size(self) -> tuple:
        """``(height, width)`` of the crop window in original-image pixels."""
        x0, y0, x1, y1 = self.crop
        return (y1 - y0, x1 - x0)

    def place(self, window) -> np.ndarray:
        """Put ``(..., *window_size)`` maps into ``(..., H0, W0)`` zeros at the crop window."""
        x0, y0, x1, y1 = self.crop
        h0, w0 = self.original_size
        if (x0, y0, x1, y1) == (0, 0, w0, h0):
            return window
        out = np.zeros(window.shape[:-2] + (h0, w0), dtype=window.dtype)
        out[..., y0:y1, x0:x1] = window
        return out


@dataclass(frozen=True)
class Preprocess:
    """What a model expects of its image input.

    Parameters
    ----------
    size : int or (H, W)
        Model input size.
    resize : {"stretch", "crop"}
        ``"stretch"`` resizes the whole image to `size`, ignoring the aspect ratio.
        ``"crop"`` takes the centered window that, resized to `size`, covers
        `crop_fraction` of the shorter scaled side (the usual ImageNet "resize 256,
        center-crop 224" for ``crop_fraction=0.875``).
    mean, std : 3 floats
        Per-channel normalization, applied after `scale`: ``(x * scale - mean) / std``.
    scale : float
        Applied to integer images on ``0..255`` (uint8 ``0..255`` -> ``0..1`` by default).
        16-bit images (uint16) are first brought to ``0..255`` from their full bit depth
        (``x * 255 / 65535``), so that a 16-bit image and its 8-bit twin give the same
        input.  Float arrays are taken as already scaled; 32-bit float image files are read
        as ``0..1`` and multiplied by ``255 * scale``.
    channel_order : {"RGB", "BGR"}
    crop_fraction : float in (0, 1]
        Only for ``resize="crop"``.
    interpolation : {"bilinear", "bicubic", "nearest"}
        Pillow's resampling filter (``Image.resize``), with half-pixel centers.
        ``"bilinear"`` and ``"bicubic"`` (Keys, ``a = -0.5``) are anti-aliased:
        when shrinking, the filter is widened by the scale factor, so every
        source pixel counts.  This is what torchvision's ``Resize`` does on PIL
        images (its default, ``InterpolationMode.BILINEAR``; on tensors with
        ``antialias=True`` the same filter in float) and what Keras's
        ``load_img(target_size=..., interpolation=...)`` does; Keras's
        ``tf.image.resize`` path does not anti-alias by default.  uint8 images
        are resized in uint8, as Pillow and torchvision do; other dtypes per
        channel in float32.
    exif_orientation : bool
        Images read from files (paths and `EncodedImage` in
        `camcore.Explainer.explain_images`) are turned upright as their EXIF orientation
        says, as viewers show them; sizes, maps and boxes then refer to the upright
        image.  False reads the stored pixels as they are.  Arrays are never turned.

    Notes
    -----
    The crop window is resized in one pass from the original image (Pillow's
    ``box``), so the filter at its edges reaches the pixels just outside it, as
    when the whole image is resized, then cropped.
    The presets: `imagenet` uses ``"bilinear"`` (torchvision's ``Resize(256)``,
    ``CenterCrop(224)``, except that the crop window is cut from the original
    image and resized once, so that `Geometry` maps it back exactly); the
    embedded EfficientNet-Lite0 (`camcore.default_model`) uses ``"bilinear"``
    on the whole image (``resize="stretch"``).

    Examples
    --------
    >>> p = Preprocess(4, mean=(0, 0, 0), std=(1, 1, 1))
    >>> x, geometry = p(np.full((8, 6, 3), 255, np.uint8))
    >>> x.shape, float(x.max()), geometry.crop
    ((4, 4, 3), 1.0, (0, 0, 6, 8))
    """

    size: object = 224
    resize: str = "stretch"
    mean: tuple = (0.0, 0.0, 0.0)
    std: tuple = (1.0, 1.0, 1.0)
    scale: float = 1 / 255
    channel_order: str = "RGB"
    crop_fraction: float = 0.875
    interpolation: str = "bilinear"
    exif_orientation: bool = True

    def __post_init__(self):
        size = (self.size, self.size) if np.isscalar(self.size) else tuple(self.size)
        object.__setattr__(self, "size", check_size(size, "size"))
        check_choice(self.resize, ("stretch", "crop"), "resize")
        check_choice(self.channel_order, ("RGB", "BGR"), "channel_order")
        check_choice(self.interpolation, INTERPOLATIONS, "interpolation")
        if not isinstance(self.exif_orientation, (bool, np.bool_)):
            raise InvalidInput(f"exif_orientation must be True or False, got {self.exif_orientation!r}")
        for field_name in ("mean", "std"):
            value = tuple(float(v) for v in np.ravel(getattr(self, field_name)))
            if len(value) == 1:
                value = value * 3
            if len(value) != 3 or not np.all(np.isfinite(value)):
                raise InvalidInput(f"{field_name} must be 1 or 3 finite floats, got {getattr(self, field_name)!r}")
            object.__setattr__(self, field_name, value)
        if any(s == 0 for s in self.std):
            raise InvalidInput(f"std must be non-zero, got {self.std!r}")
        if not 0 < self.crop_fraction <= 1:
            raise InvalidInput(f"crop_fraction must be in (0, 1], got {self.crop_fraction!r}")
        if not (np.isfinite(self.scale) and self.scale > 0):
            raise InvalidInput(f"scale must be a positive float, got {self.scale!r}")

    @classmethod
    def imagenet(cls, size=224, **overrides) -> "Preprocess":
        """The usual ImageNet preset: resize 256 / center-crop 224, torchvision mean and std."""
        options = dict(resize="crop", mean=IMAGENET_MEAN, std=IMAGENET_STD)
        options.update(overrides)
        return cls(size, **options)

    def for_input(self, dtype) -> "Preprocess":
        """The preprocessing for a model input of `dtype`: this one, or pixels for integer inputs.

        A model whose image input is an integer type (uint8 pixels, with its normalization
        inside the graph) is fed the resized pixels on ``0..255``: no scale, mean or std on
        the host (the geometry, channel order and EXIF handling are kept).  Float inputs
        keep this preprocessing.

        Examples
        --------
        >>> p = Preprocess.imagenet(8)
        >>> p.for_input(np.float32) is p, p.for_input(np.uint8).mean, p.for_input(np.uint8).scale
        (True, (0.0, 0.0, 0.0), 1.0)
        """
        if np.dtype(dtype).kind not in "ui":
            return self
        from dataclasses import replace

        return replace(self, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), scale=1.0)

    def geometry(self, original_size) -> Geometry:
        """The `Geometry` used for an image of size ``(H0, W0)``."""
        h0, w0 = check_size(original_size, "original_size")
        h, w = self.size
        if self.resize == "stretch":
            return Geometry((h0, w0), (0, 0, w0, h0), (h, w))
        # Scale so that the (h, w) window covers crop_fraction of the scaled image.
        s = max(h / (self.crop_fraction * h0), w / (self.crop_fraction * w0))
        ch, cw = min(h0, max(1, round(h / s))), min(w0, max(1, round(w / s)))
        y0, x0 = (h0 - ch) // 2, (w0 - cw) // 2
        return Geometry((h0, w0), (x0, y0, x0 + cw, y0 + ch), (h, w))

    def __call__(self, image) -> tuple[np.ndarray, Geometry]:
        """Preprocess one image.

        Parameters
        ----------
        image : (H0, W0), (H0, W0, 3) or (H0, W0, 4) ndarray
            uint8 (multiplied by `scale`), uint16 (by ``255 / 65535 * scale``) or
            float (already scaled).

        Returns
        -------
        x : (H, W, 3) float32 ndarray
            Channels-last, a new array; `batch` arranges the layout.
        geometry : Geometry
        """
        rgb = as_rgb(image)
        geometry = self.geometry(rgb.shape[:2])
        if rgb.dtype == np.uint8:
            window = self._resize_uint8(rgb, geometry)
            x = window.astype(np.float32) * np.float32(self.scale)
        else:
            x0, y0, x1, y1 = geometry.crop
            x = float_array(rgb[y0:y1, x0:x1], "image").astype(np.float32)
            if not np.all(np.isfinite(x)):
                raise InvalidInput("image must be finite, got NaN or inf values")
            if rgb.dtype.kind in "ui":
                x *= np.float32(self.scale * bit_depth_scale(rgb.dtype))
            x = self._resize_float(x)
        return self._normalize(x), geometry

    def _normalize(self, x: np.ndarray) -> np.ndarray:
        """Channel order, then ``(x - mean) / std``, in place where it can."""
        if self.channel_order == "BGR":
            x = x[..., ::-1]
        x -= np.asarray(self.mean, np.float32)
        x /= np.asarray(self.std, np.float32)
        return x

    def _resize_uint8(self, rgb: np.ndarray, geometry: Geometry) -> np.ndarray:
        """The crop window of an (H0, W0, 3) uint8 image resized to `size` by Pillow, in uint8."""
        from PIL import Image

        x0, y0, x1, y1 = geometry.crop
        if geometry.window_size == self.size:
            return rgb[y0:y1, x0:x1]
        return self._resize_picture(Image.fromarray(np.ascontiguousarray(rgb)), geometry)

    def _resize_picture(self, picture, geometry: Geometry) -> np.ndarray:
        h, w = self.size
        return np.asarray(picture.resize((w, h), _pillow_filter(self.interpolation), box=geometry.crop))

    def _from_picture(self, picture) -> tuple[np.ndarray, Geometry]:
        """`__call__` on a decoded Pillow image: the same result, without the array round trip.

        Only RGB pictures whose window needs resizing take the shortcut; the rest go through
        the array.
        """
        geometry = self.geometry((picture.height, picture.width))
        if picture.mode == "F":  # a float file holds 0..1, the full range of 8 bits
            return self(np.asarray(picture) * np.float32(255 * self.scale))
        if picture.mode != "RGB" or geometry.window_size == self.size:
            return self(np.asarray(picture))
        return self._normalize(self._resize_picture(picture, geometry).astype(np.float32) * np.float32(self.scale)), \
            geometry

    def _resize_float(self, window: np.ndarray) -> np.ndarray:
        """An (h, w, 3) float32 window resized to `size` by Pillow, channel by channel (mode "F")."""
        if window.shape[:2] == self.size:
            return window
        from PIL import Image

        h, w = self.size
        resample = _pillow_filter(self.interpolation)
        planes = [np.asarray(Image.fromarray(np.ascontiguousarray(window[..., c])).resize((w, h), resample))
                  for c in range(3)]
        return np.stack(planes, axis=-1)

    def batch(self, images, *, layout: str = "NCHW", dtype=np.float32):
        """Preprocess several images into one model-ready batch.

        Returns
        -------
        x : (N, 3, H, W) or (N, H, W, 3) ndarray of `dtype`
            For an integer `dtype`, the rounded pixels (see `for_input`).
        geometries : list of Geometry
        """
        check_choice(layout, ("NCHW", "NHWC"), "layout")
        preprocess = self.for_input(dtype)
        arrays, geometries = [], []
        for image in images:
            x, g = preprocess(image)
            arrays.append(x)
            geometries.append(g)
        if not arrays:
            raise InvalidInput("images must not be empty")
        x = np.stack(arrays)
        if layout == "NCHW":
            x = x.transpose(0, 3, 1, 2)
        return as_input_dtype(x, dtype), geometries


def _pillow_filter(name: str):
    from PIL import Image

    return {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
            "nearest": Image.Resampling.NEAREST}[name]


def as_input_dtype(x: np.ndarray, dtype) -> np.ndarray:
    """`x` as a contiguous array of `dtype`; integer dtypes get the values rounded and clipped to their range.

    Examples
    --------
    >>> as_input_dtype(np.array([-3.0, 0.4, 0.6, 254.5, 300.0]), np.uint8)
    array([  0,   0,   1, 254, 255], dtype=uint8)
    """
    dtype = np.dtype(dtype)
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        x = np.clip(np.rint(x), info.min, info.max)
    return np.ascontiguousarray(x, dtype=dtype)
