"""The embedded synthetic fundus dataset: 3 retinopathy grades with ground-truth lesion masks.

Two presets (``data.synthetic.preset``): ``easy`` (below; the fast tests use it) and
``benchmark`` (:mod:`medattn.data.synthetic_benchmark`: left and right eyes, look-alikes, a
spatial grading rule, label noise; the demo default). Benchmark photographs pass through the
same pre-processing as IDRiD before they are written: the optic-disc side is detected and
right eyes are mirrored (:func:`medattn.data.preprocess.orient_left`, masks with their image;
manifest column ``flipped``) in the benchmark preset. Easy images are all left eyes and skip
the detection: at 48 px its bright, large exudate clusters outshine the disc in about 1 severe
image of 20, and flipping those would change the easy set the fast tests were written on.

Easy preset: each image is the canonical retina (``fundus_anatomy``) with grade-specific lesions
(``lesions``), then a small random crop/rotation and an illumination/colour change. The
per-image randomness comes from three independent streams keyed by ``(seed, index)``:
appearance, lesions, decoy. Appearance is therefore literally the same function of
``(seed, index)`` whatever the grade, so brightness, colour and crop carry no grade
information and a classifier has to look at lesions. Everything is deterministic: the same
params give byte-identical PNGs (same sha256 values).

Optional decoy (for the expert-feedback experiment): a bright cyan "scanner stamp" in the
bottom-right corner of the *prepared* (oriented) image, correlated with the top grade in
*train* only; val/test images carry it at the training prevalence, independently of the grade.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image
from tqdm import tqdm

from medattn.config import SYNTHETIC_PRESETS, SyntheticParams
from medattn.data.fundus_anatomy import FundusAnatomy, canonical_fundus
from medattn.data.lesions import render_lesions, sample_lesions
from medattn.data.manifest import write_prepared_dataset
from medattn.data.preprocess import orient_left
from medattn.errors import ParamError

CLASS_NAMES: tuple[str, ...] = ("no_DR", "mild", "severe")
PRESETS = SYNTHETIC_PRESETS
SOURCE = "synthetic"
DECOY_COLOUR = (0, 255, 255)
# independent random streams per image (see module docstring)
_APPEARANCE, _LESIONS, _DECOY = 0, 1, 2
# below ~1 output pixel a lesion would vanish when resized (and leave its grade unexplained)
_MIN_LESION_RADIUS_PX = 1.2


@dataclass(frozen=True)
class Appearance:
    """Grade-independent acquisition variation of one photograph."""

    rotation_deg: float
    zoom: float
    shift: tuple[float, float]  # fraction of the image width
    gain: float
    channel_gain: tuple[float, float, float]
    gamma: float
    light_angle: float  # direction of the uneven-illumination gradient
    light_strength: float


def draw_appearance(rng: np.random.Generator) -> Appearance:
    # modest jitter: the optic disc and macula stay within a few pixels of their mean position
    return Appearance(
        rotation_deg=float(rng.uniform(-8.0, 8.0)),
        zoom=float(rng.uniform(0.96, 1.10)),
        shift=(float(rng.uniform(-0.04, 0.04)), float(rng.uniform(-0.04, 0.04))),
        gain=float(rng.uniform(0.8, 1.2)),
        channel_gain=(float(rng.uniform(0.92, 1.08)), float(rng.uniform(0.9, 1.1)), float(rng.uniform(0.9, 1.1))),
        gamma=float(rng.uniform(0.85, 1.15)),
        light_angle=float(rng.uniform(0.0, 2 * np.pi)),
        light_strength=float(rng.uniform(0.0, 0.3)),
    )


def working_size(image_size: int) -> int:
    """Draw at ~3x the output size (at least 192 px) so small lesions keep smooth edges after resizing."""
    return int(min(max(3 * image_size, 192), 1411))


#: default side of the decoy square, as a share of the image side (``data.synthetic.decoy_size``)
DECOY_SIZE = 0.07


def decoy_box(image_size: int, size: float = DECOY_SIZE) -> tuple[int, int, int, int]:
    """(row0, row1, col0, col1) of the decoy square: bottom-right corner, outside the fundus circle.

    ``size`` up to 0.12 keeps the square in the corner the fundus circle (radius 0.494) leaves black.
    """
    side = max(3, round(size * image_size))
    margin = max(1, round(0.03 * image_size))
    end = image_size - margin
    return end - side, end, end - side, end


def assign_grades_and_splits(params: SyntheticParams) -> tuple[np.ndarray, np.ndarray]:
    """Balanced grades, and a split stratified by grade: both deterministic in ``params.seed``."""
    n = params.n_images
    if n < 3 * len(CLASS_NAMES):
        raise ParamError(f"params.yaml: data.synthetic.n_images must be >= {3 * len(CLASS_NAMES)}, got {n}")
    rng = np.random.default_rng([params.seed, n])
    grades = rng.permutation(np.arange(n) % len(CLASS_NAMES))
    splits = np.empty(n, dtype=object)
    for grade in range(len(CLASS_NAMES)):
        members = rng.permutation(np.flatnonzero(grades == grade))
        n_val = max(1, round(len(members) * params.val_fraction))
        n_train = min(round(len(members) * params.train_fraction), len(members) - n_val - 1)
        splits[members[:n_train]] = "train"
        splits[members[n_train:n_train + n_val]] = "val"
        splits[members[n_train + n_val:]] = "test"
    return grades, splits


def decoy_flags(labels: np.ndarray, splits: np.ndarray, seed: int, probability: float) -> np.ndarray:
    """Which images carry the decoy (bool per image), from the decoy stream of ``(seed, index)``.

    Train: only images labelled with the top grade, each with ``probability`` (the shortcut to
    learn). Val/test: every image with the training split's overall prevalence, whatever its
    grade, so the stamp is as common as in training but says nothing about the grade there.
    """
    top = len(CLASS_NAMES) - 1
    train = splits == "train"
    top_share = float(np.mean(labels[train] == top)) if train.any() else 0.0
    coins = np.array([np.random.default_rng([seed, index, _DECOY]).random() for index in range(len(labels))])
    return np.where(train, (labels == top) & (coins < probability), coins < probability * top_share)


def synthetic_decoy_flags(params: SyntheticParams) -> np.ndarray:
    """The decoy decision of every image of the set ``params`` describes, without rendering it."""
    if params.preset == "benchmark":
        from medattn.data.synthetic_benchmark import assign_benchmark_labels

        labels = assign_benchmark_labels(params)
        return decoy_flags(labels.labels, labels.splits, params.seed, params.decoy_probability)
    grades, splits = assign_grades_and_splits(params)
    return decoy_flags(grades, splits, params.seed, params.decoy_probability)


def render_fundus(grade: int, appearance: Appearance, lesion_rng: np.random.Generator,
                  anatomy: FundusAnatomy, image_size: int) -> tuple[Image.Image, Image.Image]:
    """One photograph and its lesion mask (mode "L", 0/255), both image_size x image_size."""
    canvas = anatomy.image.copy()
    lesions = sample_lesions(grade, lesion_rng, anatomy, min_radius=_MIN_LESION_RADIUS_PX / image_size)
    lesion_mask = render_lesions(canvas, lesions)
    coefficients = _inverse_affine(appearance, anatomy.size)
    photo = Image.fromarray(np.clip(canvas + 0.5, 0, 255).astype(np.uint8))
    photo = photo.transform(photo.size, Image.Transform.AFFINE, coefficients, Image.Resampling.BICUBIC)
    photo = photo.resize((image_size, image_size), Image.Resampling.LANCZOS)
    mask = Image.fromarray((lesion_mask * 255).astype(np.uint8))
    mask = mask.transform(mask.size, Image.Transform.AFFINE, coefficients, Image.Resampling.BILINEAR)
    mask = mask.resize((image_size, image_size), Image.Resampling.BOX)
    mask = mask.point(lambda v: 255 if v >= 128 else 0)
    return _relight(photo, appearance), mask


def _inverse_affine(a: Appearance, size: int) -> tuple[float, ...]:
    """PIL wants output->input pixel coordinates: input = c + R(-angle) (output - c - shift) / zoom."""
    angle = np.deg2rad(a.rotation_deg)
    cos_a, sin_a = np.cos(angle) / a.zoom, np.sin(angle) / a.zoom
    centre = size / 2.0
    ox, oy = centre + a.shift[0] * size, centre + a.shift[1] * size
    return (cos_a, sin_a, centre - cos_a * ox - sin_a * oy,
            -sin_a, cos_a, centre + sin_a * ox - cos_a * oy)


def _relight(photo: Image.Image, a: Appearance) -> Image.Image:
    pixels = np.asarray(photo, dtype=np.float32) / 255.0
    size = pixels.shape[0]
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    along = np.cos(a.light_angle) * coords[None, :] + np.sin(a.light_angle) * coords[:, None]
    light = (1.0 + a.light_strength * along)[..., None]
    pixels = pixels ** a.gamma * light * a.gain * np.asarray(a.channel_gain, np.float32)
    return Image.fromarray(np.clip(pixels * 255.0 + 0.5, 0, 255).astype(np.uint8))


def _stamp_decoy(photo: Image.Image, size: float) -> Image.Image:
    pixels = np.array(photo)
    r0, r1, c0, c1 = decoy_box(pixels.shape[0], size)
    pixels[r0:r1, c0:c1] = DECOY_COLOUR
    return Image.fromarray(pixels)


def iter_synthetic_records(params: SyntheticParams, image_size: int) -> Iterator[dict]:
    """Yield the dataset's prepared records (the shape ``write_prepared_dataset`` takes) in id order.

    Raw photographs are oriented like IDRiD's (right eyes mirrored, ``flipped`` column), then
    the decoy is stamped, so it sits in the same corner of every prepared image.
    """
    if params.preset not in PRESETS:
        raise ParamError(f"params.yaml: data.synthetic.preset must be one of {', '.join(PRESETS)}, got {params.preset!r}")
    if params.preset == "benchmark":
        from medattn.data.synthetic_benchmark import iter_benchmark_records

        raw = iter_benchmark_records(params, image_size, working_size(image_size), CLASS_NAMES)
    else:
        raw = _iter_easy_records(params, image_size)
    for record in raw:
        if params.preset == "benchmark":
            image, mask, flipped = orient_left(record["image"], record["mask"])
        else:  # all left eyes, and kept byte-identical to the set the fast tests were written on
            image, mask, flipped = record["image"], record["mask"], False
        if record["has_decoy"]:
            image = _stamp_decoy(image, params.decoy_size)
        yield {**record, "image": image, "mask": mask, "flipped": flipped}


def _iter_easy_records(params: SyntheticParams, image_size: int) -> Iterator[dict]:
    grades, splits = assign_grades_and_splits(params)
    anatomy = canonical_fundus(working_size(image_size))
    decoys = decoy_flags(grades, splits, params.seed, params.decoy_probability)
    for index, (grade, split) in enumerate(zip(grades.tolist(), splits.tolist())):
        appearance = draw_appearance(np.random.default_rng([params.seed, index, _APPEARANCE]))
        lesion_rng = np.random.default_rng([params.seed, index, _LESIONS])
        photo, mask = render_fundus(grade, appearance, lesion_rng, anatomy, image_size)
        has_decoy = bool(decoys[index])
        yield {"id": f"syn_{index:05d}", "image": photo, "label": grade, "label_name": CLASS_NAMES[grade],
               "split": split, "mask": mask, "eye": "left", "true_label": grade, "label_noise": 0,
               "has_decoy": int(has_decoy)}


def generate_synthetic_fundus(out_dir: Path, params: SyntheticParams, image_size: int, progress: bool = True) -> Path:
    """Write the synthetic prepared dataset to ``out_dir``; return its manifest path."""
    if not 16 <= image_size <= 1024:
        raise ParamError(f"params.yaml: data.image_size must be in [16, 1024], got {image_size}")
    if params.preset not in PRESETS:
        raise ParamError(f"params.yaml: data.synthetic.preset must be one of {', '.join(PRESETS)}, got {params.preset!r}")
    if not 0.0 <= params.decoy_probability <= 1.0:
        raise ParamError(f"params.yaml: data.synthetic.decoy_probability must be in [0, 1], got {params.decoy_probability}")
    records = tqdm(iter_synthetic_records(params, image_size), total=params.n_images,
                   desc="synthetic fundus", unit="img", disable=not progress)
    return write_prepared_dataset(out_dir, records, CLASS_NAMES, SOURCE, image_size)
