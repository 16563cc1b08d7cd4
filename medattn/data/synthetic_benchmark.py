"""The ``benchmark`` preset of the embedded fundus set: hard enough to rank methods.

Same CC0 photograph and record shape as the ``easy`` preset (:mod:`medattn.data.synthetic_fundus`),
but the set is built to be imperfectly separable, as a real grading set is:

* **left and right eyes**: half the photographs are mirrored (a right eye has its optic disc on
  the image's right), so ``prepare`` must detect the side and flip back, exactly as for IDRiD;
* **acquisition**: wider crops/rotations, uneven light, colour casts, defocus blur and JPEG
  compression, all drawn independently of the grade;
* **lesions** follow a grading rule with a *spatial* clause (:mod:`medattn.data.benchmark_lesions`),
  are small and faint, and share every grade with look-alikes that are not in the mask;
* **class imbalance** like IDRiD's (no_DR most common, see :data:`GRADE_SHARES`);
* **label noise**: :data:`LABEL_NOISE` of the *train and val* labels are replaced by another grade
  (manifest column ``label_noise`` = 1, ``true_label`` keeps the rule's grade). Test labels are
  kept clean, so test figures measure the model, not the noise.

Randomness: independent streams per image keyed by ``(seed, index, stream)``; appearance and
eye side therefore carry no grade information. The same params give byte-identical PNGs.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from PIL import Image, ImageFilter

from medattn.config import SyntheticParams
from medattn.data.benchmark_lesions import grade_of, sample_benchmark_lesions, sample_dust, sample_lookalikes
from medattn.data.fundus_anatomy import FundusAnatomy, canonical_fundus
from medattn.data.lesions import render_lesions
from medattn.data.synthetic_fundus import decoy_flags
from medattn.errors import ParamError

# no_DR, mild, severe: the smallest class holds 0.25 / 0.45 = 56% of the largest, well above
# the validate stage's default min_class_ratio of 0.3
GRADE_SHARES: tuple[float, float, float] = (0.45, 0.30, 0.25)
LABEL_NOISE = 0.05
RIGHT_EYE_SHARE = 0.5
# streams 0-2 as in the easy preset (2 = decoy, drawn in synthetic_fundus.decoy_flags)
_APPEARANCE, _LESIONS, _NOISE, _LOOKALIKES = 0, 1, 3, 4
_MIN_LESION_RADIUS_PX = 1.2


@dataclass(frozen=True)
class Acquisition:
    """Grade-independent variation of one benchmark photograph (camera, eye, operator)."""

    right_eye: bool
    rotation_deg: float
    zoom: float
    shift: tuple[float, float]  # fraction of the image width
    gain: float
    channel_gain: tuple[float, float, float]
    gamma: float
    light_angle: float
    light_strength: float
    blur_px: float  # Gaussian defocus, in output pixels
    jpeg_quality: int


def draw_acquisition(rng: np.random.Generator) -> Acquisition:
    return Acquisition(
        right_eye=bool(rng.random() < RIGHT_EYE_SHARE),
        rotation_deg=float(rng.uniform(-8.0, 8.0)),
        zoom=float(rng.uniform(0.92, 1.15)),
        shift=(float(rng.uniform(-0.05, 0.05)), float(rng.uniform(-0.05, 0.05))),
        gain=float(rng.uniform(0.72, 1.25)),
        channel_gain=(float(rng.uniform(0.85, 1.12)), float(rng.uniform(0.85, 1.15)), float(rng.uniform(0.8, 1.2))),
        gamma=float(rng.uniform(0.8, 1.25)),
        light_angle=float(rng.uniform(0.0, 2 * np.pi)),
        light_strength=float(rng.uniform(0.0, 0.45)),
        blur_px=float(rng.uniform(0.0, 0.5)),
        jpeg_quality=int(rng.integers(60, 96)),
    )


@dataclass(frozen=True)
class BenchmarkLabels:
    """Per image: the rule's grade, the recorded (possibly noisy) label and the split."""

    true_grades: np.ndarray
    labels: np.ndarray
    splits: np.ndarray

    @property
    def noisy(self) -> np.ndarray:
        return self.labels != self.true_grades


def assign_benchmark_labels(params: SyntheticParams) -> BenchmarkLabels:
    """Imbalanced grades, a split stratified by grade, then noise on train/val labels only."""
    n, n_classes = params.n_images, len(GRADE_SHARES)
    if n < 3 * n_classes:
        raise ParamError(f"params.yaml: data.synthetic.n_images must be >= {3 * n_classes}, got {n}")
    rng = np.random.default_rng([params.seed, n, 1])
    counts = np.floor(np.asarray(GRADE_SHARES) * n).astype(int)
    counts[0] += n - counts.sum()
    grades = rng.permutation(np.repeat(np.arange(n_classes), counts))
    splits = np.empty(n, dtype=object)
    for grade in range(n_classes):
        members = rng.permutation(np.flatnonzero(grades == grade))
        n_val = max(1, round(len(members) * params.val_fraction))
        n_train = min(round(len(members) * params.train_fraction), len(members) - n_val - 1)
        splits[members[:n_train]] = "train"
        splits[members[n_train:n_train + n_val]] = "val"
        splits[members[n_train + n_val:]] = "test"
    labels = grades.copy()
    for index in np.flatnonzero(splits != "test"):
        noise = np.random.default_rng([params.seed, int(index), _NOISE])
        if noise.random() < LABEL_NOISE:
            labels[index] = (grades[index] + int(noise.integers(1, n_classes))) % n_classes
    return BenchmarkLabels(true_grades=grades, labels=labels, splits=splits)


def render_benchmark(grade: int, acquisition: Acquisition, lesion_rng: np.random.Generator,
                     lookalike_rng: np.random.Generator, anatomy: FundusAnatomy,
                     image_size: int) -> tuple[Image.Image, Image.Image]:
    """One raw photograph (as the camera took it: right eyes mirrored) and its lesion mask."""
    min_radius = _MIN_LESION_RADIUS_PX / image_size
    canvas = anatomy.image.copy()
    lesions = sample_benchmark_lesions(grade, lesion_rng, anatomy, min_radius)
    assert grade_of(lesions) == grade, f"lesion sampler broke the grading rule for grade {grade}"
    lesion_mask = render_lesions(canvas, lesions)
    render_lesions(canvas, sample_lookalikes(lookalike_rng, anatomy, lesions, min_radius))
    if acquisition.right_eye:  # the fellow eye is the mirror image of the canonical (left) eye
        canvas, lesion_mask = canvas[:, ::-1], lesion_mask[:, ::-1]
    coefficients = _inverse_affine(acquisition, anatomy.size)
    photo = Image.fromarray(np.clip(canvas + 0.5, 0, 255).astype(np.uint8))
    photo = photo.transform(photo.size, Image.Transform.AFFINE, coefficients, Image.Resampling.BICUBIC)
    # lens dust sits in the camera, so it is drawn after the eye has moved
    pixels = np.asarray(photo, dtype=np.float32).copy()
    render_lesions(pixels, sample_dust(lookalike_rng))
    photo = Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8)).resize(
        (image_size, image_size), Image.Resampling.LANCZOS)
    mask = Image.fromarray(np.ascontiguousarray(lesion_mask * 255).astype(np.uint8))
    mask = mask.transform(mask.size, Image.Transform.AFFINE, coefficients, Image.Resampling.BILINEAR)
    mask = mask.resize((image_size, image_size), Image.Resampling.BOX).point(lambda v: 255 if v >= 128 else 0)
    return _compress(_relight(photo, acquisition), acquisition), mask


def _inverse_affine(a: Acquisition, size: int) -> tuple[float, ...]:
    angle = np.deg2rad(a.rotation_deg)
    cos_a, sin_a = np.cos(angle) / a.zoom, np.sin(angle) / a.zoom
    centre = size / 2.0
    ox, oy = centre + a.shift[0] * size, centre + a.shift[1] * size
    return (cos_a, sin_a, centre - cos_a * ox - sin_a * oy,
            -sin_a, cos_a, centre + sin_a * ox - cos_a * oy)


def _relight(photo: Image.Image, a: Acquisition) -> Image.Image:
    pixels = np.asarray(photo, dtype=np.float32) / 255.0
    coords = (np.arange(pixels.shape[0], dtype=np.float32) + 0.5) / pixels.shape[0] - 0.5
    along = np.cos(a.light_angle) * coords[None, :] + np.sin(a.light_angle) * coords[:, None]
    light = (1.0 + a.light_strength * along)[..., None]
    pixels = pixels ** a.gamma * light * a.gain * np.asarray(a.channel_gain, np.float32)
    return Image.fromarray(np.clip(pixels * 255.0 + 0.5, 0, 255).astype(np.uint8))


def _compress(photo: Image.Image, a: Acquisition) -> Image.Image:
    if a.blur_px > 0.05:
        photo = photo.filter(ImageFilter.GaussianBlur(a.blur_px))
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG", quality=a.jpeg_quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")


def iter_benchmark_records(params: SyntheticParams, image_size: int, working_size: int,
                           class_names: tuple[str, ...]) -> Iterator[dict]:

    """Raw records in id order: photographs as taken (right eyes mirrored), the decoy not yet stamped."""
    labels = assign_benchmark_labels(params)
    # the decoy follows the *recorded* label: that is the shortcut a model could learn
    decoys = decoy_flags(labels.labels, labels.splits, params.seed, params.decoy_probability)
    anatomy = canonical_fundus(working_size)
    for index in range(params.n_images):
        grade, label, split = int(labels.true_grades[index]), int(labels.labels[index]), str(labels.splits[index])
        acquisition = draw_acquisition(np.random.default_rng([params.seed, index, _APPEARANCE]))
        photo, mask = render_benchmark(grade, acquisition,
                                       np.random.default_rng([params.seed, index, _LESIONS]),
                                       np.random.default_rng([params.seed, index, _LOOKALIKES]),
                                       anatomy, image_size)
        has_decoy = bool(decoys[index])
        yield {"id": f"syn_{index:05d}", "image": photo, "label": label, "label_name": class_names[label],
               "split": split, "mask": mask, "eye": "right" if acquisition.right_eye else "left",
               "true_label": grade, "label_noise": int(label != grade), "has_decoy": int(has_decoy)}
