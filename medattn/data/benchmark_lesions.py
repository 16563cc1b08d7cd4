"""Lesions and look-alikes of the ``benchmark`` preset, and the grading rule they obey.

The easy preset (:mod:`medattn.data.lesions`) gives every grade its own lesion kinds and
counts, so counting dark dots decides the grade. Here the grade follows a rule a grader would
apply, and the inputs to that rule overlap between grades:

* ``no_DR`` (0): no lesion.
* ``severe`` (2): at least :data:`SEVERE_HAEMORRHAGES` haemorrhages, *or* a hard exudate within
  one optic-disc diameter (:data:`MACULA_RADIUS`) of the fovea (a macular-oedema-like
  upgrade: the same lesions one disc diameter further out only make an image ``mild``).
* ``mild`` (1): any other lesion set.

Lesions are smaller and fainter than in the easy preset (``strength`` < 1), and every grade
carries look-alikes that are *not* lesions and never enter the mask: brown-grey pigment spots,
dark vessel crossings (red dots *on* a large vessel, where microaneurysms never sit), pale
drusen (also near the fovea, where they must not be read as exudates) and lens dust (drawn
by the caller in the camera frame, see :func:`sample_dust`).
"""

from __future__ import annotations

import numpy as np

from medattn.data.fundus_anatomy import FOVEA_CENTRE, OPTIC_DISC_RADIUS, FundusAnatomy
from medattn.data.lesions import (
    MAX_EXTENT,
    MAX_TRIES,
    DRUSEN,
    DUST,
    EXUDATE,
    HAEMORRHAGE,
    MICROANEURYSM,
    PIGMENT_SPOT,
    VESSEL_CROSSING,
    Lesion,
    is_allowed_site,
    make_lesion,
    place_lesion,
)

# one optic-disc diameter: the reach of the macular rule
MACULA_RADIUS = 2 * OPTIC_DISC_RADIUS
SEVERE_HAEMORRHAGES = 3
# exudates of a mild image keep this much more than MACULA_RADIUS from the fovea, so a blob's
# painted edge never straddles the rule's boundary
_MACULA_MARGIN = 0.03


def grade_of(lesions: list[Lesion]) -> int:
    """The grade the rule gives a lesion set (look-alikes are ignored, as a grader would)."""
    kinds = [lesion.kind for lesion in lesions]
    if not any(kind in (MICROANEURYSM, HAEMORRHAGE, EXUDATE) for kind in kinds):
        return 0
    macular = any(lesion.kind == EXUDATE and distance_to_fovea(lesion) <= MACULA_RADIUS for lesion in lesions)
    return 2 if macular or kinds.count(HAEMORRHAGE) >= SEVERE_HAEMORRHAGES else 1


def distance_to_fovea(lesion: Lesion) -> float:
    return float(np.hypot(lesion.x - FOVEA_CENTRE[0], lesion.y - FOVEA_CENTRE[1]))


def sample_benchmark_lesions(grade: int, rng: np.random.Generator, anatomy: FundusAnatomy,
                             min_radius: float) -> list[Lesion]:
    """True lesions for ``grade`` under the rule above (``grade_of`` of the result is ``grade``)."""

    def radius(low: float, high: float) -> float:
        return max(float(rng.uniform(low, high)), min_radius)

    lesions: list[Lesion] = []
    if grade == 0:
        return lesions
    route = "mild" if grade == 1 else ("haemorrhages" if rng.random() < 0.5 else "macular")
    n_haemorrhages = int(rng.integers(SEVERE_HAEMORRHAGES, 7)) if route == "haemorrhages" else int(rng.integers(0, 2))
    # exudates first: the macular rule needs room near the fovea before haemorrhages take it
    if route == "macular":
        _add_exudates(lesions, rng, radius, near_fovea=True, count=int(rng.integers(3, 7)))
    elif rng.random() < 0.45:  # exudates outside the macula: present in mild images too
        _add_exudates(lesions, rng, radius, near_fovea=False, count=int(rng.integers(2, 6)))
    for _ in range(n_haemorrhages):
        lesions.append(place_lesion(HAEMORRHAGE, rng, lesions, anatomy, radius=radius(0.036, 0.05),
                              elongation=rng.uniform(0.55, 0.95), wobble=0.12, strength=rng.uniform(0.85, 1.0)))
    n_microaneurysms = int(rng.integers(2, 8)) if route != "haemorrhages" else int(rng.integers(2, 9))
    for _ in range(n_microaneurysms):
        lesions.append(place_lesion(MICROANEURYSM, rng, lesions, anatomy, radius=radius(0.015, 0.02),
                              elongation=rng.uniform(0.85, 1.0), wobble=0.03, strength=rng.uniform(0.9, 1.0)))
    return lesions


def _add_exudates(lesions: list[Lesion], rng: np.random.Generator, radius, near_fovea: bool, count: int) -> None:
    """A small cluster of hard exudates inside the macula (``near_fovea``) or clearly outside it."""
    low, high = (0.03, MACULA_RADIUS - 0.025) if near_fovea else (MACULA_RADIUS + _MACULA_MARGIN + 0.02, 0.3)
    for _ in range(MAX_TRIES):
        angle, distance = rng.uniform(0, 2 * np.pi), rng.uniform(low, high)
        cx, cy = FOVEA_CENTRE[0] + distance * np.cos(angle), FOVEA_CENTRE[1] + distance * np.sin(angle)
        if is_allowed_site(cx, cy, extent=0.05):
            break
    placed = 0
    for _ in range(MAX_TRIES):
        if placed == count:
            break
        spread, theta = rng.uniform(0.0, 0.035), rng.uniform(0, 2 * np.pi)
        x, y = cx + spread * np.cos(theta), cy + spread * np.sin(theta)
        blob_radius = radius(0.014, 0.02)
        d = float(np.hypot(x - FOVEA_CENTRE[0], y - FOVEA_CENTRE[1]))
        inside_rule = d + blob_radius <= MACULA_RADIUS if near_fovea else d - MAX_EXTENT * blob_radius > MACULA_RADIUS + _MACULA_MARGIN
        if inside_rule and is_allowed_site(x, y, extent=MAX_EXTENT * blob_radius) and _clear_of(lesions, x, y, blob_radius):
            lesions.append(make_lesion(EXUDATE, x, y, rng, radius=blob_radius, elongation=rng.uniform(0.6, 1.0),
                                 wobble=0.15, strength=rng.uniform(0.85, 1.0)))
            placed += 1


def _clear_of(lesions: list[Lesion], x: float, y: float, radius: float) -> bool:
    return all(np.hypot(x - o.x, y - o.y) > radius + o.radius + 0.004 for o in lesions)


def sample_lookalikes(rng: np.random.Generator, anatomy: FundusAnatomy, lesions: list[Lesion],
                      min_radius: float) -> list[Lesion]:
    """Retinal look-alikes for one image, whatever its grade (none may overlap a true lesion)."""
    occupied = list(lesions)
    found: list[Lesion] = []

    def radius(low: float, high: float) -> float:
        return max(float(rng.uniform(low, high)), min_radius)

    for _ in range(int(rng.integers(0, 4))):
        found.append(place_lesion(PIGMENT_SPOT, rng, occupied + found, anatomy, radius=radius(0.011, 0.018),
                            elongation=rng.uniform(0.7, 1.0), wobble=0.08, strength=rng.uniform(0.5, 0.9)))
    for _ in range(int(rng.integers(0, 3))):
        found.append(place_lesion(VESSEL_CROSSING, rng, occupied + found, anatomy, radius=radius(0.011, 0.016),
                            elongation=rng.uniform(0.8, 1.0), wobble=0.03, strength=rng.uniform(0.5, 0.9)))
    for _ in range(int(rng.integers(0, 5))):
        angle, distance = rng.uniform(0, 2 * np.pi), rng.uniform(0.02, 0.25)
        x, y = FOVEA_CENTRE[0] + distance * np.cos(angle), FOVEA_CENTRE[1] + distance * np.sin(angle)
        blob_radius = radius(0.007, 0.012)
        if is_allowed_site(x, y, extent=MAX_EXTENT * blob_radius) and _clear_of(occupied + found, x, y, blob_radius):
            found.append(make_lesion(DRUSEN, x, y, rng, radius=blob_radius, elongation=rng.uniform(0.8, 1.0),
                               wobble=0.05, strength=rng.uniform(0.45, 0.8)))
    return found


def sample_dust(rng: np.random.Generator) -> list[Lesion]:
    """Out-of-focus dust on the lens: large faint grey blots anywhere in the camera frame."""
    dust = []
    for _ in range(int(rng.integers(0, 3))):
        angle, distance = rng.uniform(0, 2 * np.pi), rng.uniform(0.0, 0.4)
        dust.append(make_lesion(DUST, 0.5 + distance * np.cos(angle), 0.5 + distance * np.sin(angle), rng,
                          radius=float(rng.uniform(0.015, 0.035)), elongation=1.0, wobble=0.02,
                          strength=float(rng.uniform(0.2, 0.45))))
    return dust
