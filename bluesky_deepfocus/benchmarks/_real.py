"""Real images used as specimens in benchmarks (never for training).

scikit-image ships a few real micrographs in its wheel (no download): a cell, an
immunohistochemistry-stained tissue section (two stain channels as two specimens), and the
Hubble deep field (sparse point-like sources, a stand-in for beads). They are rendered by the simulated microscope
at an assumed sample-plane pixel size, so their content is real while the defocus comes
from our optics -- the same protocol as the DESIGN's measurements on real specimens.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from numpy.typing import NDArray

__all__ = ["REAL_SPECIMENS", "real_specimen", "specimen_for"]

# name -> (file in skimage/data, channel or None, assumed pixel size in um)
# (pixel sizes chosen so each image covers a 10x/0.3 field of 333 um; use at 10x only:
# at higher magnification the images' own pixels would be coarser than the camera's)
REAL_SPECIMENS: dict[str, tuple[str, int | None, float]] = {
    "real_cell": ("cell.png", None, 0.65),
    "real_ihc_hematoxylin": ("ihc.png", 2, 0.7),
    "real_ihc_dab": ("ihc.png", 0, 0.7),
    "real_hubble_sparse": ("hubble_deep_field.jpg", 1, 0.4),
}


def real_specimen(name: str) -> tuple[NDArray[np.float64], float]:
    """``(image, pixel_size_um)`` of a bundled real image, as emitted intensity.

    Bright-field / stained images (dark objects on a bright background) are inverted so
    that structure is bright (absorbance-like); values are scaled to [0, 1].
    """
    from skimage.data import __file__ as data_init
    from skimage.io import imread

    try:
        fname, channel, px = REAL_SPECIMENS[name]
    except KeyError:
        raise KeyError(
            f"Unknown real specimen {name!r}; choose from {sorted(REAL_SPECIMENS)}."
        ) from None
    img = np.asarray(imread(Path(data_init).parent / fname), dtype=np.float64)
    if img.ndim == 3:
        img = (
            img[..., channel if channel is not None else 0] if img.shape[-1] >= 3 else img[..., 0]
        )
    img = img - img.min()
    img /= max(float(img.max()), 1e-9)
    if np.median(img) > 0.5:  # bright background: transmitted light
        img = 1.0 - img
    return img, px


def specimen_for(name: str) -> tuple[str | NDArray[np.float64], float | None]:
    """``(specimen, specimen_pixel_um)`` for :func:`..sim.simulated_microscope`: the bundled
    image and its pixel size for a ``real_*`` name, else the family name and None."""
    if name.startswith("real_"):
        return real_specimen(name)
    return name, None
