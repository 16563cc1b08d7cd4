"""The canonical fundus the synthetic set is drawn on: scikit-image's CC0 retina photograph.

``skimage.data.retina()`` ships inside scikit-image (no download). Every synthetic image is
this one eye under a small random crop/rotation/illumination change, so the anatomy sits at
roughly the same place in all images, which is what a single *global* attention map (seed 001)
needs in order to be meaningful. Coordinates below are normalised to [0, 1] (x right, y down)
in the canonical, un-jittered photograph; they were measured on it once.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image
from scipy import ndimage as ndi
from skimage import data as skimage_data

FOVEA_CENTRE = (0.50, 0.50)
OPTIC_DISC_CENTRE = (0.16, 0.455)
OPTIC_DISC_RADIUS = 0.075
FUNDUS_CENTRE = (0.50, 0.497)
FUNDUS_RADIUS = 0.494
# vessels are at least this much darker (relative, green channel) than their smoothed surroundings
_VESSEL_CONTRAST = 0.10


@dataclass(frozen=True)
class FundusAnatomy:
    """The canonical retina at one working resolution plus where its vessels are."""

    size: int
    image: np.ndarray  # (size, size, 3) float32, 0..255
    vessel_distance: np.ndarray  # (size, size) float32: distance to the nearest vessel, in image widths

    def distance_to_vessel(self, x: float, y: float) -> float:
        col = min(max(int(x * self.size), 0), self.size - 1)
        row = min(max(int(y * self.size), 0), self.size - 1)
        return float(self.vessel_distance[row, col])


@lru_cache(maxsize=4)
def canonical_fundus(size: int) -> FundusAnatomy:
    """The retina resized to ``size`` x ``size`` with its vessel map (cached: built once per run)."""
    retina = Image.fromarray(skimage_data.retina())
    image = np.asarray(retina.resize((size, size), Image.Resampling.LANCZOS), dtype=np.float32)
    # Vessels: thin structures darker than their blurred neighbourhood in the green channel,
    # where the red-free contrast of a fundus photograph is highest.
    green = image[..., 1]
    surround = ndi.gaussian_filter(green, sigma=0.02 * size)
    vessel = (surround - green) / (surround + 1.0) > _VESSEL_CONTRAST
    vessel &= ~near_fovea_mask(size)  # the dark fovea is not a vessel
    distance = ndi.distance_transform_edt(~vessel).astype(np.float32) / size
    image.setflags(write=False)
    distance.setflags(write=False)
    return FundusAnatomy(size=size, image=image, vessel_distance=distance)


def near_fovea_mask(size: int, radius: float = 0.04) -> np.ndarray:
    rows, cols = np.mgrid[0:size, 0:size] / size
    return np.hypot(cols - FOVEA_CENTRE[0], rows - FOVEA_CENTRE[1]) < radius


def distance_to_fundus_centre(x: float, y: float) -> float:
    return float(np.hypot(x - FUNDUS_CENTRE[0], y - FUNDUS_CENTRE[1]))


def distance_to_optic_disc(x: float, y: float) -> float:
    return float(np.hypot(x - OPTIC_DISC_CENTRE[0], y - OPTIC_DISC_CENTRE[1]))
