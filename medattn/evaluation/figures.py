"""Evaluation figures (PNG) and the attention colouring the HTTP service reuses.

Figures are built on ``matplotlib.figure.Figure`` directly, never through ``pyplot``: no GUI
backend, no global figure registry to leak from, safe in worker threads. Sizes are fixed by
the constants below (no ``bbox_inches="tight"``), so a grid of N rows always has the same
pixel size. Each figure is saved atomically and its path returned.

Attention heat-maps share one colour scale per figure, spanning the attention values shown,
and the colourbar is labelled with those real values: a learned map whose values sit in a
narrow band still shows its structure, and the reader can still see where that band is.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from medattn.atomic_files import atomic_path
from medattn.errors import DataError

DPI = 100
PANEL_INCHES = 2.6  # one image panel of the overlay grid
ROW_TITLE_INCHES = 0.45  # room above each grid row for its (up to two-line) title
COLORBAR_INCHES = 1.0
OVERLAY_CMAP = "jet"  # the usual saliency colouring; readable over a fundus photograph
MAP_CMAP = "inferno"  # perceptually uniform, for a map shown on its own
OVERLAY_ALPHA = 0.45
MASK_OUTLINE_COLOR = "white"


# --- colour helpers (no figure; used by the service to return PNGs) ----------------------------


@lru_cache(maxsize=8)
def _lookup_table(cmap_name: str) -> np.ndarray:
    """256 x 3 uint8 RGB table of a matplotlib colormap."""
    rgba = matplotlib.colormaps[cmap_name](np.linspace(0.0, 1.0, 256))
    return np.round(rgba[:, :3] * 255).astype(np.uint8)


def colorize_attention(
    attention: np.ndarray,
    cmap: str = MAP_CMAP,
    value_range: tuple[float, float] | None = (0.0, 1.0),
) -> np.ndarray:
    """Colour an (H, W) attention map into an (H, W, 3) uint8 RGB image.

    ``value_range`` maps (low, high) onto the ends of the colormap (values outside are
    clipped); ``None`` stretches this map's own min..max, which shows structure in a map
    whose values all sit close together.
    """
    att = _single_map(attention, "attention")
    low, high = _value_range(att) if value_range is None else value_range
    scaled = (att - low) / (high - low) if high > low else np.zeros_like(att)
    index = np.clip(np.rint(scaled * 255), 0, 255).astype(np.intp)
    return _lookup_table(cmap)[index]


def blend_attention(
    image: np.ndarray,
    attention: np.ndarray,
    alpha: float = OVERLAY_ALPHA,
    cmap: str = OVERLAY_CMAP,
    value_range: tuple[float, float] | None = (0.0, 1.0),
) -> np.ndarray:
    """Alpha-blend the coloured (H, W) attention over an (H, W, 3) uint8 image; uint8 result."""
    rgb = _as_rgb(np.asarray(image), "image")
    heat = colorize_attention(attention, cmap=cmap, value_range=value_range)
    if heat.shape != rgb.shape:
        raise DataError(
            f"attention of shape {np.shape(attention)} does not match image {rgb.shape}"
        )
    mixed = (1.0 - alpha) * rgb.astype(np.float32) + alpha * heat.astype(np.float32)
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


# --- figures ------------------------------------------------------------------------------------


def confusion_matrix_figure(
    cm: np.ndarray | Sequence[Sequence[int]], class_names: Sequence[str], path: str | Path
) -> Path:
    """Confusion matrix (rows actual, columns predicted): cells coloured by the share of the
    actual class, annotated with count and that share (so imbalanced classes read fairly)."""
    counts = np.asarray(cm, dtype=np.int64)
    n = len(class_names)
    if counts.shape != (n, n):
        raise DataError(f"confusion matrix of shape {counts.shape} does not match {n} class names")
    row_totals = counts.sum(axis=1, keepdims=True)
    shares = counts / np.maximum(row_totals, 1)
    side = max(4.5, 1.0 * n + 2.5)
    fig = Figure(figsize=(side + 1.0, side), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(n):
        for j in range(n):
            ax.text(
                j,
                i,
                f"{counts[i, j]}\n{shares[i, j]:.0%}",
                ha="center",
                va="center",
                fontsize=9,
                color="white" if shares[i, j] > 0.55 else "black",
            )
    ax.set_xticks(range(n), [str(c) for c in class_names], rotation=30, ha="right")
    ax.set_yticks(
        range(n), [f"{c} (n={t})" for c, t in zip(class_names, row_totals[:, 0], strict=True)]
    )
    ax.set_xlabel("predicted class")
    ax.set_ylabel("actual class")
    ax.set_title(f"Confusion matrix ({int(counts.sum())} test images)")
    fig.colorbar(image, ax=ax, label="share of the actual class", fraction=0.046, pad=0.04)
    return _save(fig, path)


def attention_overlay_figure(
    images: np.ndarray,
    attention: np.ndarray,
    masks: np.ndarray | None,
    titles: Sequence[str],
    path: str | Path,
) -> Path:
    """Grid with one row per image: original | attention overlay | overlay + lesion-mask outline.

    ``attention`` is (N, H, W), (N, 1, H, W) or one global (H, W) map; without ``masks`` the
    third column is left out. ``titles`` (one per image, e.g. "true: x / predicted: y (0.93)")
    head each row's first panel.
    """
    rgb = _as_rgb(np.asarray(images), "images", batched=True)
    n_images, height, width = rgb.shape[:3]
    att = _maps_for(attention, n_images, (height, width), "attention")
    lesion = (
        None
        if masks is None
        else _maps_for(masks, n_images, (height, width), "masks", per_image=True) > 0
    )
    if len(titles) != n_images:
        raise DataError(f"got {len(titles)} titles for {n_images} images")
    if n_images == 0:
        raise DataError("attention_overlay_figure needs at least one image")

    n_cols = 2 if lesion is None else 3
    fig = Figure(
        figsize=overlay_figure_inches(n_images, with_masks=lesion is not None),
        dpi=DPI,
        layout="constrained",
    )
    axes = fig.subplots(n_images, n_cols, squeeze=False)
    value_range = _value_range(att)
    norm = Normalize(*value_range)
    for row in range(n_images):
        overlay = blend_attention(rgb[row], att[row], value_range=value_range)
        panels = [rgb[row], overlay] + ([] if lesion is None else [overlay])
        for col, panel in enumerate(panels):
            ax = axes[row, col]
            ax.imshow(panel, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[row, 0].set_title(
            textwrap.fill(str(titles[row]), 30, max_lines=2, placeholder="…"), fontsize=9
        )
        if lesion is not None:
            if lesion[row].any():
                axes[row, 2].contour(
                    lesion[row], levels=[0.5], colors=MASK_OUTLINE_COLOR, linewidths=1.3
                )
            else:
                axes[row, 2].text(
                    0.5,
                    0.5,
                    "no lesion mask",
                    transform=axes[row, 2].transAxes,
                    ha="center",
                    va="center",
                    color="white",
                    fontsize=9,
                    bbox={"facecolor": "black", "alpha": 0.5, "edgecolor": "none"},
                )
    axes[0, 1].set_title("attention overlay", fontsize=9)
    if lesion is not None:
        axes[0, 2].set_title(f"+ lesion outline ({MASK_OUTLINE_COLOR})", fontsize=9)
    fig.colorbar(
        ScalarMappable(norm=norm, cmap=OVERLAY_CMAP),
        ax=axes[:, -1].tolist(),
        label="attention",
        shrink=min(1.0, 0.6 + 0.1 * n_images),
        aspect=25,
    )
    return _save(fig, path)


def overlay_figure_inches(n_images: int, with_masks: bool) -> tuple[float, float]:
    """Figure size (inches) of an overlay grid; times ``DPI`` gives the PNG's pixel size."""
    n_cols = 3 if with_masks else 2
    return (n_cols * PANEL_INCHES + COLORBAR_INCHES, n_images * (PANEL_INCHES + ROW_TITLE_INCHES))


def global_attention_map_figure(global_map: np.ndarray, path: str | Path) -> Path:
    """The learned global spatial map M on its own, with a colourbar of its real values."""
    att = _single_map(global_map, "global attention map")
    fig = Figure(figsize=(5.6, 4.8), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(
        att,
        cmap=MAP_CMAP,
        vmin=_value_range(att)[0],
        vmax=_value_range(att)[1],
        interpolation="nearest",
    )
    ax.set_title(f"Learned global attention map M ({att.shape[1]}×{att.shape[0]})")
    ax.set_xlabel("x (pixel)")
    ax.set_ylabel("y (pixel)")
    fig.colorbar(image, ax=ax, label="attention weight")
    return _save(fig, path)


def training_curves_figure(
    history: Sequence[Mapping[str, Any]], cutoff_epoch: int | None, path: str | Path
) -> Path:
    """Loss, accuracy and validation macro-F1 per epoch; a dotted line marks the cut-off epoch
    (Algorithm 1: the global map M is frozen after it) and a dot the best validation macro-F1."""
    if not history:
        raise DataError("training history is empty: nothing to plot")
    epochs = np.array([row["epoch"] for row in history], dtype=float)
    fig = Figure(figsize=(13.5, 4.0), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, 3)
    panels = [
        ("loss", "loss", [("train_loss", "train"), ("val_loss", "validation")]),
        ("accuracy", "accuracy", [("train_acc", "train"), ("val_acc", "validation")]),
        ("validation macro-F1", "macro-F1", [("val_macro_f1", "validation")]),
    ]
    for ax, (title, ylabel, series) in zip(axes, panels, strict=True):
        for key, label in series:
            values = _column(history, key)
            if values is not None:
                color = "tab:blue" if label == "train" else "tab:orange"
                ax.plot(
                    epochs,
                    values,
                    marker="o",
                    markersize=2.5,
                    linewidth=1.6,
                    color=color,
                    label=label,
                )
        if cutoff_epoch is not None:
            ax.axvline(
                cutoff_epoch,
                color="0.35",
                linestyle=":",
                linewidth=1.5,
                label=f"cut-off E={cutoff_epoch}",
            )
        if not ax.lines or all(line.get_label().startswith("cut-off") for line in ax.lines):
            ax.text(
                0.5,
                0.5,
                "not recorded",
                transform=ax.transAxes,
                ha="center",
                va="center",
                color="0.5",
            )
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    f1 = _column(history, "val_macro_f1")
    if f1 is not None and np.isfinite(f1).any():
        # ties go to the later epoch, as in Algorithm 1's model selection (medattn.training.fit)
        best = len(f1) - 1 - int(np.nanargmax(f1[::-1]))
        axes[2].plot(
            epochs[best],
            f1[best],
            "o",
            color="tab:red",
            markersize=7,
            label=f"best {f1[best]:.3f} @ {epochs[best]:g}",
        )
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")
    for ax in axes[1:]:
        ax.set_ylim(-0.02, 1.02)
    return _save(fig, path)


# --- helpers ------------------------------------------------------------------------------------


def _save(fig: Figure, path: str | Path) -> Path:
    with atomic_path(path) as temp:
        fig.savefig(temp, format="png", dpi=DPI)
    return Path(path)


def _column(history: Sequence[Mapping[str, Any]], key: str) -> np.ndarray | None:
    """Per-epoch values of ``key`` (NaN where an epoch lacks it); None if no epoch has it."""
    if not any(key in row and row[key] is not None for row in history):
        return None
    return np.array([np.nan if row.get(key) is None else float(row[key]) for row in history])


def _value_range(att: np.ndarray) -> tuple[float, float]:
    """(min, max) of the attention values; (0, 1) for a constant map (nothing to stretch)."""
    low, high = float(np.min(att)), float(np.max(att))
    return (low, high) if high > low else (0.0, 1.0)


def _single_map(values: np.ndarray, name: str) -> np.ndarray:
    """A float (H, W) map from (H, W), (1, H, W) or (1, 1, H, W)."""
    array = np.asarray(values, dtype=np.float64)
    while array.ndim > 2 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2:
        raise DataError(f"{name} must be one (H, W) map, got shape {np.shape(values)}")
    if not np.isfinite(array).all():
        raise DataError(f"{name} holds NaN or infinite values")
    return array


def _maps_for(
    values: np.ndarray, n_images: int, size: tuple[int, int], name: str, per_image: bool = False
) -> np.ndarray:
    """(N, H, W) maps from (N, H, W) or (N, 1, H, W), or a global (H, W) map broadcast to N."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim == 4 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim == 2 and not per_image:
        array = array[None]
    allowed_leading = (n_images,) if per_image else (1, n_images)
    if array.ndim != 3 or array.shape[1:] != size or array.shape[0] not in allowed_leading:
        raise DataError(
            f"{name} of shape {np.shape(values)} does not match {n_images} images of size {size}"
        )
    if not np.isfinite(array).all():
        raise DataError(f"{name} holds NaN or infinite values")
    return np.broadcast_to(array, (n_images, *size))


def _as_rgb(array: np.ndarray, name: str, batched: bool = False) -> np.ndarray:
    """uint8 RGB with the channel last; a grey image (no channel axis) is repeated to 3 channels."""
    grey_ndim = 3 if batched else 2
    if array.ndim == grey_ndim:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != grey_ndim + 1 or array.shape[-1] != 3:
        expected = "(N, H, W, 3)" if batched else "(H, W, 3)"
        raise DataError(f"{name} must be uint8 RGB of shape {expected}, got {array.shape}")
    if array.dtype != np.uint8:
        raise DataError(f"{name} must be uint8 RGB (0..255), got dtype {array.dtype}")
    return array
