"""Image helpers shared by the data pipeline, sampling and export.

This module depends on TensorFlow, NumPy and Pillow only (no tensorflow_datasets), so export
code can import it cheaply.

* :func:`normalize_images` is the single place where uint8 pixels become model inputs in
  ``[-1, 1]``; :func:`denormalize_images` is its inverse for samples.
* :func:`area_resize` is the area (box-average) downsampling that improved-diffusion's
  super-resolution data path applies to the target image to get the low-resolution input.
* :func:`center_crop_and_resize` reproduces improved-diffusion's ``image_datasets.py`` resizing.
* :func:`save_image_grid` writes a PNG grid atomically (:mod:`tf_iddpm.fileio`).
"""

import io
import math

import numpy as np
from PIL import Image
import tensorflow as tf

from tf_iddpm import fileio


def normalize_images(images):
    """Maps uint8 pixels to float32 model inputs in [-1, 1] as ``x / 127.5 - 1``.

    This is the only place of this normalisation in the project.

    Args:
        images: uint8 tensor or array of any shape, e.g. ``[N, H, W, C]``.

    Returns:
        A float32 ``tf.Tensor`` with the same shape, values in [-1, 1].

    Raises:
        TypeError: if ``images`` is not uint8.
    """
    images = tf.convert_to_tensor(images)
    if images.dtype != tf.uint8:
        raise TypeError(f"normalize_images expects uint8 pixels, got dtype {images.dtype.name}.")
    # A lookup of the 256 float32 values numpy computes: inside a graph Grappler rewrites
    # `x / 127.5` as `x * (1 / 127.5)`, which moves 111 of the 256 levels by one ulp, so eager,
    # tf.data, exported graphs and the reference would otherwise disagree in the last bit.
    return tf.gather(_PIXEL_LEVELS, tf.cast(images, tf.int32))


_PIXEL_LEVELS = (np.arange(256, dtype=np.float32) / np.float32(127.5) - np.float32(1.0)).astype(
    np.float32
)


def denormalize_images(images, *, round_to_nearest=False):
    """Maps model outputs in [-1, 1] back to uint8 pixels.

    The default reproduces improved-diffusion's ``scripts/image_sample.py``:
    ``((x + 1) * 127.5).clamp(0, 255).to(uint8)``. A float-to-uint8 cast truncates towards
    zero, and after the clamp that is ``floor``. Because ``u / 127.5 - 1`` is rounded to
    float32, floor makes ``denormalize(normalize(u))`` return ``u - 1`` for 63 of the 256
    values of ``u``. Set ``round_to_nearest=True`` for an exact round trip (for example when
    you show dataset images rather than samples).

    Args:
        images: float tensor or array (any float dtype; computed in float32), e.g.
            ``[N, H, W, C]``.
        round_to_nearest: round to the nearest integer instead of truncating.

    Returns:
        A uint8 ``tf.Tensor`` with the same shape.
    """
    images = tf.convert_to_tensor(images)
    if not images.dtype.is_floating:
        raise TypeError(
            f"denormalize_images expects floats in [-1, 1], got dtype {images.dtype.name}."
        )
    pixels = (tf.cast(images, tf.float32) + 1.0) * 127.5
    if round_to_nearest:
        pixels = tf.round(pixels)
    # tf.cast truncates towards zero, as torch's .to(torch.uint8) does.
    return tf.cast(tf.clip_by_value(pixels, 0.0, 255.0), tf.uint8)


def _area_matrix(in_size, out_size):
    """Averaging matrix of torch's ``F.interpolate(mode="area")`` along one axis.

    Output ``i`` is the mean of inputs ``floor(i * in / out)`` up to ``ceil((i + 1) * in / out)``
    (exclusive). These are adaptive average pooling bins; when ``in`` is a multiple of ``out``
    they are plain ``in/out``-wide blocks.

    Returns:
        float64 array ``[out_size, in_size]`` whose rows sum to 1.
    """
    matrix = np.zeros([out_size, in_size], np.float64)
    for i in range(out_size):
        start = (i * in_size) // out_size
        end = -((-(i + 1) * in_size) // out_size)  # ceil division
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


def area_resize(images, size):
    """Area (box-average) resize of NHWC images, as torch ``F.interpolate(mode="area")``.

    improved-diffusion's ``super_res_train.py`` makes the low-resolution input with
    ``F.interpolate(target, low_res_size, mode="area")``. That is adaptive average pooling.
    It is separable, so here it is two matrix products. For integer factors it equals
    ``tf.image.resize(method="area")``. For other factors it keeps torch's bin edges, whereas
    TF would weight the pixels at bin edges fractionally.

    Args:
        images: real tensor or array ``[..., H, W, C]`` (e.g. ``[N, H, W, C]`` or ``[H, W, C]``).
        size: output height and width (a square).

    Returns:
        float32 ``tf.Tensor`` ``[..., size, size, C]``.
    """
    images = tf.cast(tf.convert_to_tensor(images), tf.float32)
    if images.shape.rank is None or images.shape.rank < 3:
        raise ValueError(f"area_resize expects [..., H, W, C] images, got shape {images.shape}.")
    in_h, in_w = images.shape[-3], images.shape[-2]
    if in_h is None or in_w is None:
        raise ValueError(f"area_resize needs static spatial dimensions, got shape {images.shape}.")
    if not 0 < size <= min(in_h, in_w):
        raise ValueError(
            f"area_resize downsamples only: output size {size} must be in "
            f"[1, {min(in_h, in_w)}] for input shape {images.shape}."
        )
    rows = tf.constant(_area_matrix(in_h, size), tf.float32)
    cols = tf.constant(_area_matrix(in_w, size), tf.float32)
    images = tf.einsum("ih,...hwc->...iwc", rows, images)
    return tf.einsum("jw,...iwc->...ijc", cols, images)


_GRAYSCALE_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F")


def is_grayscale_mode(mode):
    """Whether a Pillow image mode holds one colour channel (plus possibly alpha)."""
    return mode in _GRAYSCALE_MODES


def to_standard_mode(pil_image):
    """Converts a Pillow image to "L", "RGB" or "RGBA" and keeps its information.

    16-bit grayscale keeps its top 8 bits. (Pillow's own ``convert("L")`` clips it at 255.)
    """
    if pil_image.mode in ("L", "RGB", "RGBA"):
        return pil_image
    if pil_image.mode.startswith("I;16"):
        return Image.fromarray((np.asarray(pil_image).astype(np.uint16) >> 8).astype(np.uint8))
    if is_grayscale_mode(pil_image.mode):
        return pil_image.convert("L")
    has_alpha = "A" in pil_image.getbands() or "transparency" in pil_image.info
    return pil_image.convert("RGBA" if has_alpha else "RGB")


def center_crop_and_resize(image, size):
    """Resizes so that the short side is ``size``, then takes the centre square.

    Same semantics as improved-diffusion's ``ImageDataset.__getitem__``, done with Pillow:
    while the short side is at least ``2 * size``, halve both sides (integer division) with
    BOX filtering; then resize with BICUBIC so the short side becomes ``size`` (the long side
    is ``round(long * size / short)``, Python rounding); then crop ``size x size`` at offset
    ``(dim - size) // 2``. Small images (e.g. 8x8 digits) are upscaled by the bicubic step.
    Differences from the reference:
    - The reference converts to RGB after cropping. Here the channel count is kept, and
      channel conversion is left to the caller.
    - Other Pillow modes are converted to "L", "RGB" or "RGBA" before resizing. (Pillow
      resizes palette and bilevel images with NEAREST, whatever filter is asked for.)

    Args:
        image: a ``PIL.Image.Image`` or a uint8 array ``[H, W]``, ``[H, W, 1]``, ``[H, W, 3]`` or
            ``[H, W, 4]``.
        size: output side in pixels (> 0).

    Returns:
        uint8 numpy array ``[size, size, C]``. C is the input's channel count (1 for
        ``[H, W]`` or a grayscale PIL image).
    """
    if not isinstance(size, (int, np.integer)) or size <= 0:
        raise ValueError(f"center_crop_and_resize size must be a positive int, got {size!r}.")
    size = int(size)
    if isinstance(image, Image.Image):
        pil_image = image
    else:
        array = np.asarray(image)
        if array.dtype != np.uint8:
            raise TypeError(
                f"center_crop_and_resize expects uint8 pixels, got dtype {array.dtype}."
            )
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
            raise ValueError(
                f"center_crop_and_resize expects [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] "
                f"images, got shape {array.shape}."
            )
        pil_image = Image.fromarray(array)
    # Pillow would resize palette and bilevel images with NEAREST.
    pil_image = to_standard_mode(pil_image)
    # BOX halving first gives better downsampling than a single bicubic step.
    while min(pil_image.size) >= 2 * size:
        halved = tuple(side // 2 for side in pil_image.size)
        pil_image = pil_image.resize(halved, resample=Image.BOX)
    scale = size / min(pil_image.size)
    pil_image = pil_image.resize(
        tuple(round(side * scale) for side in pil_image.size), resample=Image.BICUBIC
    )
    array = np.asarray(pil_image)
    if array.ndim == 2:
        array = array[..., None]
    top = (array.shape[0] - size) // 2
    left = (array.shape[1] - size) // 2
    return np.ascontiguousarray(array[top : top + size, left : left + size])


def to_rgb(images) -> np.ndarray:
    """uint8 [N, H, W, 1 or 3] -> [N, H, W, 3]: grayscale repeated over RGB (Inception's input)."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be [N, H, W, 1 or 3], got shape {images.shape}")
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def make_image_grid(images, *, num_columns=None, padding=0):
    """Tiles uint8 images ``[N, H, W, C]`` into one ``[rows*H', cols*W', C]`` array.

    Args:
        images: uint8 array or tensor ``[N, H, W, C]`` with C in {1, 3}.
        num_columns: images per row; default ``ceil(sqrt(N))``.
        padding: black pixels between (and around) the images.

    Returns:
        uint8 numpy array ``[rows * (H + padding) + padding, cols * (W + padding) + padding, C]``.
        Unused cells are black.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise TypeError(
            f"make_image_grid expects uint8 images, got dtype {images.dtype}; "
            "use denormalize_images first."
        )
    if images.ndim != 4 or images.shape[0] == 0 or images.shape[-1] not in (1, 3):
        raise ValueError(
            f"make_image_grid expects [N>0, H, W, C in {{1, 3}}] images, got shape {images.shape}."
        )
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}.")
    count, height, width, channels = images.shape
    num_columns = num_columns or math.ceil(math.sqrt(count))
    if num_columns <= 0:
        raise ValueError(f"num_columns must be positive, got {num_columns}.")
    num_rows = math.ceil(count / num_columns)
    grid_height = num_rows * (height + padding) + padding
    grid_width = num_columns * (width + padding) + padding
    grid = np.zeros([grid_height, grid_width, channels], np.uint8)
    for index in range(count):
        row, column = divmod(index, num_columns)
        top = padding + row * (height + padding)
        left = padding + column * (width + padding)
        grid[top : top + height, left : left + width] = images[index]
    return grid


def save_image_grid(images, path, *, num_columns=None, padding=0, min_tile_pixels=0):
    """Writes uint8 images ``[N, H, W, C]`` as one PNG grid, atomically.

    Small images are enlarged by an integer factor (each pixel repeated, no interpolation) until
    a tile is at least ``min_tile_pixels`` high, so that a grid of 16x16 samples can be looked at.

    Written with :func:`tf_iddpm.fileio.atomic_write` (a reader never sees a half-written file;
    the mode is what ``open()`` gives; paths with a scheme, ``gs://...``, go through
    ``tf.io.gfile``).

    Args:
        images: uint8 array or tensor ``[N, H, W, C]`` with C in {1, 3}.
        path: destination ``.png`` path; parent directories are created.
        num_columns: images per row; default ``ceil(sqrt(N))``.
        padding: black pixels between the images (before enlarging).
        min_tile_pixels: enlarge every image to at least this height (0: keep the size).
    """
    grid = make_image_grid(images, num_columns=num_columns, padding=padding)
    height = np.asarray(images).shape[1]
    factor = max(1, -(-int(min_tile_pixels) // height)) if min_tile_pixels else 1
    if factor > 1:
        grid = np.repeat(np.repeat(grid, factor, axis=0), factor, axis=1)
    buffer = io.BytesIO()
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(buffer, format="PNG")
    fileio.atomic_write_bytes(path, buffer.getvalue())
