"""Tests for tf_iddpm.image_utils."""

import math
import os

import numpy as np
from numpy import testing as npt
from PIL import Image
import pytest
import tensorflow as tf

from tf_iddpm import image_utils


def _adaptive_average_pool_1d(values, out_size):
    """torch's area interpolation along axis 0, written as a plain loop over output bins."""
    in_size = values.shape[0]
    out = []
    for i in range(out_size):
        start = math.floor(i * in_size / out_size)
        end = math.ceil((i + 1) * in_size / out_size)
        out.append(values[start:end].mean(axis=0))
    return np.stack(out)


def _numpy_area(images, out_h, out_w):
    """[N, H, W, C] -> [N, out_h, out_w, C] by pooling H then W."""
    pooled_h = np.stack([_adaptive_average_pool_1d(image, out_h) for image in images])
    return np.stack(
        [np.stack([_adaptive_average_pool_1d(row, out_w) for row in image]) for image in pooled_h]
    )


def test_normalize_images_is_x_over_127_5_minus_1():
    pixels = np.arange(256, dtype=np.uint8).reshape([1, 16, 16, 1])
    normalized = image_utils.normalize_images(pixels)
    assert normalized.dtype == tf.float32
    npt.assert_array_equal(normalized.numpy(), pixels.astype(np.float32) / np.float32(127.5) - 1)
    assert normalized.numpy().min() == -1.0 and normalized.numpy().max() == 1.0


def test_normalize_images_rejects_floats():
    with pytest.raises(TypeError, match="uint8"):
        image_utils.normalize_images(np.zeros([2, 2], np.float32))


def test_denormalize_images_truncates_like_reference():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.uniform(-1.3, 1.3, 1000), [-1.0, 1.0, 0.0, -2.0, 2.0]])
    values = values.astype(np.float32)
    # torch: ((x + 1) * 127.5).clamp(0, 255).to(torch.uint8) truncates towards zero.
    expected = np.trunc(np.clip((values + np.float32(1)) * np.float32(127.5), 0, 255))
    expected = expected.astype(np.uint8)
    result = image_utils.denormalize_images(values)
    assert result.dtype == tf.uint8
    npt.assert_array_equal(result.numpy(), expected)
    exact = image_utils.denormalize_images(np.float32([0.0, 1.0, -1.0]))
    npt.assert_array_equal(exact.numpy(), [127, 255, 0])


def test_denormalize_round_trip():
    pixels = np.arange(256, dtype=np.uint8)
    normalized = image_utils.normalize_images(pixels)
    rounded = image_utils.denormalize_images(normalized, round_to_nearest=True).numpy()
    npt.assert_array_equal(rounded, pixels)
    truncated = image_utils.denormalize_images(normalized).numpy()
    # float32 rounding of u / 127.5 - 1 puts some values just below u, which truncation floors.
    assert np.all((truncated == pixels) | (truncated == pixels - 1))
    assert 0 < np.sum(truncated != pixels) < 128


def test_denormalize_computes_bfloat16_in_float32():
    values = tf.constant([1.0, -1.0, 0.5], tf.bfloat16)
    npt.assert_array_equal(image_utils.denormalize_images(values).numpy(), [255, 0, 191])


def test_area_resize_known_values():
    # 1-D bins for 5 -> 2 are [0, 3) and [2, 5) (they overlap): means 1 and 3 (rows 0..4 hold 0..4).
    image = np.broadcast_to(np.arange(5, dtype=np.float32).reshape([1, 5, 1, 1]), [1, 5, 5, 1])
    npt.assert_allclose(image_utils.area_resize(image, 2).numpy()[0, ..., 0], [[1, 1], [3, 3]])


@pytest.mark.parametrize(
    "in_size,out_size",
    [
        ((16, 16), 8),
        ((32, 32), 8),
        ((10, 7), 4),
        ((10, 7), 3),
        ((9, 5), 5),
    ],
)
def test_area_resize_matches_adaptive_average_pooling(in_size, out_size):
    rng = np.random.default_rng(1)
    images = rng.uniform(-1, 1, [3, *in_size, 2]).astype(np.float32)
    result = image_utils.area_resize(images, out_size)
    assert result.shape == (3, out_size, out_size, 2)
    expected = _numpy_area(images.astype(np.float64), out_size, out_size)
    npt.assert_allclose(result.numpy(), expected, atol=1e-6)


def test_area_resize_integer_factor_equals_tf_area_and_works_unbatched():
    rng = np.random.default_rng(2)
    images = rng.uniform(-1, 1, [2, 16, 16, 3]).astype(np.float32)
    ours = image_utils.area_resize(images, 4).numpy()
    npt.assert_allclose(ours, tf.image.resize(images, [4, 4], method="area").numpy(), atol=1e-6)
    npt.assert_allclose(image_utils.area_resize(images[0], 4).numpy(), ours[0], atol=1e-6)


def test_area_resize_rejects_upsampling():
    with pytest.raises(ValueError, match="downsamples only"):
        image_utils.area_resize(np.zeros([1, 4, 4, 1], np.float32), 8)


def test_center_crop_and_resize_follows_reference_steps():
    rng = np.random.default_rng(3)
    array = rng.integers(0, 256, [48, 64, 3], dtype=np.uint8)  # H=48, W=64
    result = image_utils.center_crop_and_resize(array, 16)
    # Reference steps written out for this size: min side 48 >= 32 -> BOX to 32x24 (W x H);
    # 24 < 32 stops; scale 16/24 -> BICUBIC to (round(21.33), 16) = (21, 16); crop x from 2.
    expected = Image.fromarray(array).resize((32, 24), resample=Image.BOX)
    expected = np.asarray(expected.resize((21, 16), resample=Image.BICUBIC))[:, 2:18]
    assert result.shape == (16, 16, 3) and result.dtype == np.uint8
    npt.assert_array_equal(result, expected)


def test_center_crop_takes_the_middle_without_resizing_at_target_size():
    array = np.arange(8 * 24, dtype=np.uint8).reshape([8, 24])
    result = image_utils.center_crop_and_resize(array, 8)
    assert result.shape == (8, 8, 1)
    npt.assert_array_equal(result[..., 0], array[:, 8:16])


def test_center_crop_and_resize_upscales_small_images_bicubic():
    array = np.random.default_rng(4).integers(0, 256, [8, 8, 1], dtype=np.uint8)
    result = image_utils.center_crop_and_resize(array, 32)
    expected = np.asarray(Image.fromarray(array[..., 0]).resize((32, 32), resample=Image.BICUBIC))
    npt.assert_array_equal(result[..., 0], expected)
    constant = np.full([20, 30, 3], 77, np.uint8)
    npt.assert_array_equal(image_utils.center_crop_and_resize(constant, 8), np.full([8, 8, 3], 77))


def test_center_crop_and_resize_palette_image_resized_as_rgb():
    rgb = np.random.default_rng(5).integers(0, 256, [32, 32, 3], dtype=np.uint8)
    palette = Image.fromarray(rgb).quantize(16)
    result = image_utils.center_crop_and_resize(palette, 16)
    expected = image_utils.center_crop_and_resize(np.asarray(palette.convert("RGB")), 16)
    npt.assert_array_equal(result, expected)


def test_center_crop_and_resize_rejects_bad_input():
    with pytest.raises(ValueError, match="positive int"):
        image_utils.center_crop_and_resize(np.zeros([8, 8, 3], np.uint8), 0)
    with pytest.raises(ValueError, match="got shape"):
        image_utils.center_crop_and_resize(np.zeros([8, 8, 2], np.uint8), 4)
    with pytest.raises(TypeError, match="uint8"):
        image_utils.center_crop_and_resize(np.zeros([8, 8, 3], np.float32), 4)


def test_save_image_grid_layout_and_atomic_write(tmp_path):
    images = np.stack([np.full([4, 5, 3], 10 * (i + 1), np.uint8) for i in range(5)])
    path = tmp_path / "grids" / "samples.png"
    image_utils.save_image_grid(images, path)
    image_utils.save_image_grid(images, path)  # Overwrites in place.
    grid = np.asarray(Image.open(path))
    assert grid.shape == (8, 15, 3)  # ceil(sqrt(5)) = 3 columns, 2 rows.
    for i in range(5):
        row, column = divmod(i, 3)
        cell = grid[row * 4 : (row + 1) * 4, column * 5 : (column + 1) * 5]
        npt.assert_array_equal(cell, 10 * (i + 1))
    npt.assert_array_equal(grid[4:, 10:], 0)  # Empty sixth cell.
    assert os.listdir(path.parent) == ["samples.png"]  # No temporary file left behind.


def test_save_image_grid_enlarges_small_images_to_the_tile_size(tmp_path):
    images = np.stack([np.full([16, 16, 1], 30 * i, np.uint8) for i in range(4)])
    images[0, 0, 0, 0] = 255  # one bright pixel: enlarged to a 4x4 block
    path = tmp_path / "grid.png"
    image_utils.save_image_grid(images, path, min_tile_pixels=64)
    grid = np.asarray(Image.open(path))
    assert grid.shape == (128, 128)  # 2x2 tiles of 64 pixels: each pixel repeated 4 times
    npt.assert_array_equal(grid[:4, :4], 255)
    assert grid[4, 4] == 0 and grid[0, 4] == 0
    npt.assert_array_equal(grid[64:, 64:], 90)
    image_utils.save_image_grid(images, path, min_tile_pixels=10)  # 16 >= 10: kept as it is
    assert np.asarray(Image.open(path)).shape == (32, 32)


def test_save_image_grid_grayscale_with_padding(tmp_path):
    images = np.full([2, 3, 3, 1], 200, np.uint8)
    path = tmp_path / "gray.png"
    image_utils.save_image_grid(images, path, padding=1)  # ceil(sqrt(2)) = 2 columns.
    with Image.open(path) as saved:
        assert saved.mode == "L"
        grid = np.asarray(saved)
    expected = np.zeros([5, 9], np.uint8)
    expected[1:4, 1:4] = 200
    expected[1:4, 5:8] = 200
    npt.assert_array_equal(grid, expected)


def test_save_image_grid_rejects_floats(tmp_path):
    with pytest.raises(TypeError, match="denormalize_images"):
        image_utils.save_image_grid(np.zeros([1, 4, 4, 3], np.float32), tmp_path / "x.png")
    assert not os.listdir(tmp_path)


def test_normalization_is_bit_identical_in_graphs_and_to_numpy():
    import tensorflow as tf

    levels = np.arange(256, dtype=np.uint8)
    expected = levels.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    np.testing.assert_array_equal(image_utils.normalize_images(levels).numpy(), expected)
    in_graph = tf.function(image_utils.normalize_images)(tf.constant(levels))
    np.testing.assert_array_equal(in_graph.numpy(), expected)


def test_to_rgb_repeats_grayscale_and_rejects_other_channel_counts():
    gray = np.arange(8, dtype=np.uint8).reshape(2, 2, 2, 1)
    np.testing.assert_array_equal(image_utils.to_rgb(gray), np.concatenate([gray] * 3, axis=-1))
    with pytest.raises(ValueError, match="1 or 3"):
        image_utils.to_rgb(np.zeros((1, 2, 2, 2), np.uint8))
