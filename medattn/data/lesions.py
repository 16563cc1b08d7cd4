"""Synthetic diabetic-retinopathy lesions: where they go and how they look.

Lesions live where they occur clinically: the posterior pole around the macula and along the
vessel arcades, never on the optic disc or outside the fundus circle. Microaneurysms sit off
the large vessels (they grow on capillaries); haemorrhages prefer the neighbourhood of
vessels; hard exudates cluster around the macula. Positions and radii are in canonical
normalised coordinates (fractions of the image width), so lesions scale with image_size:
a microaneurysm is about 3-4 px across at 96 px.

The grade is carried *only* by lesions (the grade decides which lesions are drawn):
grade 0 none, grade 1 a few microaneurysms, grade 2 haemorrhages and exudates plus
microaneurysms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from medattn.data.fundus_anatomy import (
    FOVEA_CENTRE,
    OPTIC_DISC_RADIUS,
    FundusAnatomy,
    distance_to_fundus_centre,
    distance_to_optic_disc,
)

MICROANEURYSM = "microaneurysm"
HAEMORRHAGE = "haemorrhage"
EXUDATE = "exudate"
# Look-alikes of the benchmark preset (``benchmark_lesions``): painted, never in the lesion mask.
PIGMENT_SPOT = "pigment_spot"
VESSEL_CROSSING = "vessel_crossing"
DRUSEN = "drusen"
DUST = "dust"

# Lesions stay well inside the fundus circle (radius 0.494) and clear of the disc, so the
# decoy corner and the black border can never overlap a lesion.
_MAX_RADIUS_FROM_CENTRE = 0.40
_DISC_CLEARANCE = 0.02
# an irregular boundary reaches out to radius * (1 + sum of wobble amplitudes) at most
MAX_EXTENT = 1.5
# posterior pole: a Gaussian around the fovea wide enough to reach the arcades
_POLE_SIGMA = (0.17, 0.14)
MAX_TRIES = 400


@dataclass(frozen=True)
class Lesion:
    kind: str
    x: float  # centre, canonical normalised coordinates
    y: float
    radius: float  # fraction of the image width
    elongation: float  # minor/major axis ratio (1 = round)
    angle: float  # radians
    wobble: tuple[tuple[float, float], ...]  # (amplitude, phase) of boundary harmonics 2, 3, ...
    strength: float = 1.0  # share of the kind's full colour change (the benchmark fades lesions)


def sample_lesions(grade: int, rng: np.random.Generator, anatomy: FundusAnatomy,
                   min_radius: float = 0.0) -> list[Lesion]:
    """The lesions of one image of ``grade`` (0, 1 or 2).

    ``min_radius`` (fraction of the width) keeps every lesion at least about a pixel wide at
    small output sizes, so a graded image never ends up with an empty mask.
    """

    def radius(low: float, high: float) -> float:
        return max(float(rng.uniform(low, high)), min_radius)

    lesions: list[Lesion] = []
    if grade == 0:
        return lesions
    n_microaneurysms = int(rng.integers(3, 7)) if grade == 1 else int(rng.integers(4, 10))
    if grade >= 2:
        for _ in range(int(rng.integers(1, 3))):
            _add_exudate_cluster(lesions, rng, radius)
        for _ in range(int(rng.integers(2, 5))):
            lesions.append(place_lesion(HAEMORRHAGE, rng, lesions, anatomy, radius=radius(0.035, 0.055),
                                  elongation=rng.uniform(0.55, 0.95), wobble=0.12))
    for _ in range(n_microaneurysms):
        lesions.append(place_lesion(MICROANEURYSM, rng, lesions, anatomy, radius=radius(0.016, 0.022),
                              elongation=rng.uniform(0.85, 1.0), wobble=0.03))
    return lesions


def _add_exudate_cluster(lesions: list[Lesion], rng: np.random.Generator,
                         radius: Callable[[float, float], float]) -> None:
    # hard exudates form clusters / partial rings a little away from the fovea
    for _ in range(MAX_TRIES):
        angle, distance = rng.uniform(0, 2 * np.pi), rng.uniform(0.07, 0.2)
        cx = FOVEA_CENTRE[0] + distance * np.cos(angle)
        cy = FOVEA_CENTRE[1] + distance * np.sin(angle)
        if is_allowed_site(cx, cy, extent=0.06):
            break
    for _ in range(int(rng.integers(4, 9))):
        spread = rng.uniform(0.0, 0.05)
        theta = rng.uniform(0, 2 * np.pi)
        x, y = cx + spread * np.cos(theta), cy + spread * np.sin(theta)
        blob_radius = radius(0.012, 0.022)
        if is_allowed_site(x, y, extent=MAX_EXTENT * blob_radius):
            lesions.append(make_lesion(EXUDATE, x, y, rng, radius=blob_radius,
                                 elongation=rng.uniform(0.6, 1.0), wobble=0.15))


def is_allowed_site(x: float, y: float, extent: float) -> bool:
    """True when a lesion reaching ``extent`` from (x, y) stays in the fundus and off the disc."""
    return (distance_to_fundus_centre(x, y) + extent < _MAX_RADIUS_FROM_CENTRE
            and distance_to_optic_disc(x, y) - extent > OPTIC_DISC_RADIUS + _DISC_CLEARANCE)


def _vessel_rule(kind: str, radius: float) -> Callable[[float], bool]:
    if kind == MICROANEURYSM:
        return lambda d: d > radius + 0.006  # beside capillaries, not on top of a large vessel
    if kind == VESSEL_CROSSING:
        return lambda d: d < 0.003  # on a large vessel: where a red dot is *not* a microaneurysm
    if kind == PIGMENT_SPOT:
        return lambda d: True
    return lambda d: d < 0.05  # haemorrhages: near a vessel (they may cover it)


def place_lesion(kind: str, rng: np.random.Generator, existing: list[Lesion], anatomy: FundusAnatomy,
                 radius: float, elongation: float, wobble: float, strength: float = 1.0) -> Lesion:
    """Rejection-sample a posterior-pole site that obeys the anatomy and overlaps no other lesion."""
    vessel_ok = _vessel_rule(kind, radius)
    x, y = FOVEA_CENTRE[0] + 0.1, FOVEA_CENTRE[1]  # fallback if every try is rejected
    for _ in range(MAX_TRIES):
        cx = FOVEA_CENTRE[0] + rng.normal(0.0, _POLE_SIGMA[0])
        cy = FOVEA_CENTRE[1] + rng.normal(0.0, _POLE_SIGMA[1])
        if not is_allowed_site(cx, cy, MAX_EXTENT * radius) or not vessel_ok(anatomy.distance_to_vessel(cx, cy)):
            continue
        if all(np.hypot(cx - o.x, cy - o.y) > radius + o.radius + 0.01 for o in existing):
            x, y = cx, cy
            break
    return make_lesion(kind, x, y, rng, radius, elongation, wobble, strength)


def make_lesion(kind: str, x: float, y: float, rng: np.random.Generator, radius: float,
          elongation: float, wobble: float, strength: float = 1.0) -> Lesion:
    harmonics = tuple((float(rng.uniform(0, wobble)), float(rng.uniform(0, 2 * np.pi))) for _ in range(3))
    return Lesion(kind=kind, x=float(x), y=float(y), radius=float(radius), elongation=float(elongation),
                  angle=float(rng.uniform(0, np.pi)), wobble=harmonics, strength=float(strength))


# How each kind is painted: dark kinds multiply the background per channel (so they darken
# with the local illumination, as blood does); bright kinds blend towards their colour with an
# opacity. Blood darkens green and blue far more than red (it looks red); pigment and dust
# darken all channels alike (brown-grey), which is how a grader tells them apart.
_DARKEN = {MICROANEURYSM: np.array([0.55, 0.27, 0.27], np.float32),
           HAEMORRHAGE: np.array([0.50, 0.22, 0.20], np.float32),
           PIGMENT_SPOT: np.array([0.42, 0.36, 0.36], np.float32),
           VESSEL_CROSSING: np.array([0.62, 0.40, 0.40], np.float32),
           DUST: np.array([0.55, 0.55, 0.58], np.float32)}
_BLEND = {EXUDATE: (np.array([250.0, 226.0, 120.0], np.float32), 0.9),
          DRUSEN: (np.array([236.0, 222.0, 178.0], np.float32), 0.75)}
_EDGE_SOFTNESS = {MICROANEURYSM: 0.35, HAEMORRHAGE: 0.3, EXUDATE: 0.18,
                  PIGMENT_SPOT: 0.3, VESSEL_CROSSING: 0.4, DRUSEN: 0.45, DUST: 0.8}


def render_lesions(image: np.ndarray, lesions: list[Lesion]) -> np.ndarray:
    """Paint ``lesions`` into ``image`` (float32 HxWx3, modified in place); return their mask.

    The mask (float32 HxW, 0/1) is the union of the lesions' cores (opacity >= 0.5).
    """
    size = image.shape[0]
    mask = np.zeros(image.shape[:2], np.float32)
    for lesion in lesions:
        reach = int(np.ceil(lesion.radius * size * 1.6)) + 2
        col, row = int(lesion.x * size), int(lesion.y * size)
        r0, r1 = max(row - reach, 0), min(row + reach + 1, size)
        c0, c1 = max(col - reach, 0), min(col + reach + 1, size)
        if r0 >= r1 or c0 >= c1:
            continue
        alpha = _opacity(lesion, size, r0, r1, c0, c1)
        patch = image[r0:r1, c0:c1]
        a = alpha[..., None] * np.float32(lesion.strength)
        if lesion.kind in _BLEND:
            colour, opacity = _BLEND[lesion.kind]
            patch *= 1.0 - opacity * a
            patch += opacity * a * colour
        else:
            patch *= 1.0 - a * (1.0 - _DARKEN[lesion.kind])
        np.maximum(mask[r0:r1, c0:c1], (alpha >= 0.5).astype(np.float32), out=mask[r0:r1, c0:c1])
    return mask


def _opacity(lesion: Lesion, size: int, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    """Soft-edged irregular ellipse: 1 inside, 0 outside, a smooth ramp across the boundary."""
    rows, cols = np.mgrid[r0:r1, c0:c1].astype(np.float32)
    dx = (cols + 0.5) / size - lesion.x
    dy = (rows + 0.5) / size - lesion.y
    cos_a, sin_a = np.cos(lesion.angle), np.sin(lesion.angle)
    u = dx * cos_a + dy * sin_a
    v = (-dx * sin_a + dy * cos_a) / lesion.elongation
    theta = np.arctan2(v, u)
    boundary = np.ones_like(theta)
    for order, (amplitude, phase) in enumerate(lesion.wobble, start=2):
        boundary += amplitude * np.cos(order * theta + phase)
    relative = np.hypot(u, v) / (lesion.radius * boundary)
    softness = _EDGE_SOFTNESS[lesion.kind]
    return np.clip((1.0 + softness - relative) / (2.0 * softness), 0.0, 1.0).astype(np.float32)
