"""run.py --mode=sample: draw images from a trained (or converted) model.

Image i of a run uses the per-image seed ``config.seed + i`` (see :mod:`tf_iddpm.chains`), so a
sample does not depend on the batch size, and the exported sampler given the same seed, sampler
and steps returns the same image.
"""

import os
from typing import Dict, Optional

from absl import logging
import numpy as np

from tf_iddpm import fileio
from tf_iddpm import image_utils
from tf_iddpm import inference
from tf_iddpm import samplers

SAMPLES_SUBDIR = "samples"
# Sample grids are written with each image enlarged to at least this many pixels a side, so that
# 16x16 digits make a grid one can look at (an 8x8 grid of 64-pixel tiles is 512 pixels wide).
GRID_TILE_PIXELS = 64
GRID_MAX_IMAGES = 256


def _grid_images(images: np.ndarray, labels: Optional[np.ndarray]):
    """(images for the PNG grid, columns): the first GRID_MAX_IMAGES in seed order or, for a
    class-conditional model, one row per class (its images in seed order, black cells after), so
    that whether samples follow their label shows at a glance."""
    if labels is None:
        return images[:GRID_MAX_IMAGES], None
    classes = sorted(set(labels.tolist()))
    rows = [images[labels == c] for c in classes]
    columns = max(1, min(max(len(r) for r in rows), GRID_MAX_IMAGES // max(len(rows), 1)))
    blank = np.zeros_like(images[0])
    cells = [row[i] if i < len(row) else blank for row in rows for i in range(columns)]
    return np.stack(cells[:GRID_MAX_IMAGES]), columns


def sample(config, workdir: str, strategy=None, checkpoint: Optional[str] = None) -> Dict[str, str]:
    """Draws config.sample.num_samples images; writes an .npz (arr_0 uint8 NHWC, arr_1 labels) and a PNG grid
    (for a class-conditional model one row per class).

    Both files are written atomically (:mod:`tf_iddpm.fileio`).  ``checkpoint``: a checkpoint
    prefix to sample from instead of the workdir's newest (``run.py --checkpoint``).

    Returns:
      {"npz": path, "png": path}.
    """
    del strategy  # sampling runs on the default device; batches are independent
    if config.data.low_res_size > 0:
        raise ValueError(
            "the super-resolution model needs low-resolution inputs: sample it through the "
            "exported sampler (its low_res input) instead of run.py --mode=sample"
        )
    spec = samplers.from_config(config.sample)
    model = inference.InferenceModel.restore(
        config, workdir, use_ema=config.sample.use_ema, checkpoint=checkpoint
    )
    logging.info("sampling with %s: %s", model.loaded, spec.label(config.diffusion.steps))
    drawn = model.draw_configured(spec, int(config.sample.num_samples), seed=int(config.seed))
    images, labels = drawn["images"], drawn["labels"]

    out_dir = os.path.join(workdir, SAMPLES_SUBDIR)
    stem = "samples_" + "x".join(str(d) for d in images.shape)
    npz_path = os.path.join(out_dir, stem + ".npz")
    arrays = [images] if labels is None else [images, labels]
    fileio.atomic_write(npz_path, lambda file: np.savez(file, *arrays))
    png_path = os.path.join(out_dir, stem + ".png")
    grid, columns = _grid_images(images, labels)
    image_utils.save_image_grid(
        grid, png_path, num_columns=columns, padding=1, min_tile_pixels=GRID_TILE_PIXELS
    )
    logging.info("wrote %d samples to %s and a grid to %s", len(images), npz_path, png_path)
    print(f"samples: {npz_path}\ngrid:    {png_path}")
    return {"npz": npz_path, "png": png_path}
