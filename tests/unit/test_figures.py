"""Figures are real PNGs of the planned layout; the attention colouring is a proper colour map."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
from PIL import Image

from medattn.errors import DataError
from medattn.evaluation.figures import (
    DPI,
    attention_overlay_figure,
    blend_attention,
    colorize_attention,
    confusion_matrix_figure,
    global_attention_map_figure,
    overlay_figure_inches,
    training_curves_figure,
)

SIZE = 24


def _batch(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(n)
    images = rng.integers(0, 256, size=(n, SIZE, SIZE, 3), dtype=np.uint8)
    attention = rng.random((n, SIZE, SIZE))
    masks = np.zeros((n, SIZE, SIZE), dtype=bool)
    masks[:, 5:12, 8:15] = True
    return images, attention, masks


def _open_png(path) -> Image.Image:
    assert path.stat().st_size > 1000
    image = Image.open(path)
    assert image.format == "PNG"
    image.load()
    return image


def _expected_pixels(n_images: int, with_masks: bool) -> tuple[int, int]:
    width, height = overlay_figure_inches(n_images, with_masks)
    return round(width * DPI), round(height * DPI)


def test_overlay_grid_has_one_row_per_image_and_three_columns_with_masks(tmp_path) -> None:
    images, attention, masks = _batch(3)
    titles = [f"true: grade {i} / predicted: grade {i}" for i in range(3)]
    path = attention_overlay_figure(images, attention, masks, titles, tmp_path / "overlay.png")
    three_rows = _open_png(path)
    assert three_rows.size == _expected_pixels(3, with_masks=True)
    one_row = _open_png(
        attention_overlay_figure(
            images[:1], attention[:1], masks[:1], titles[:1], tmp_path / "one.png"
        )
    )
    no_masks = _open_png(
        attention_overlay_figure(images, attention, None, titles, tmp_path / "plain.png")
    )
    assert three_rows.height > 2.5 * one_row.height  # rows stack
    assert three_rows.width == one_row.width
    assert no_masks.width < three_rows.width  # the mask column is left out
    assert no_masks.size == _expected_pixels(3, with_masks=False)


def test_overlay_accepts_a_global_map_and_images_without_lesions(tmp_path) -> None:
    images, _, masks = _batch(2)
    masks[1] = False
    global_map = np.linspace(0, 1, SIZE * SIZE).reshape(SIZE, SIZE)
    path = attention_overlay_figure(images, global_map, masks, ["a", "b"], tmp_path / "global.png")
    assert _open_png(path).size == _expected_pixels(2, with_masks=True)


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ("titles", "2 titles for 3 images"),
        ("attention", "attention of shape"),
        ("images", "uint8"),
    ],
)
def test_overlay_rejects_mismatched_inputs_without_writing(
    tmp_path, change: str, needle: str
) -> None:
    images, attention, masks = _batch(3)
    titles = ["a", "b", "c"]
    if change == "titles":
        titles = titles[:2]
    elif change == "attention":
        attention = attention[:, :10]
    else:
        images = images.astype(np.float32)
    with pytest.raises(DataError, match=needle):
        attention_overlay_figure(images, attention, masks, titles, tmp_path / "bad.png")
    assert list(tmp_path.iterdir()) == []


def test_confusion_global_map_and_curves_figures_are_pngs(tmp_path) -> None:
    cm = _open_png(
        confusion_matrix_figure([[5, 1], [2, 7]], ["healthy", "severe"], tmp_path / "cm.png")
    )
    assert cm.width > 300 and cm.height > 300
    global_map = np.random.default_rng(1).random((1, 1, SIZE, SIZE))
    assert _open_png(global_attention_map_figure(global_map, tmp_path / "m.png")).size == (560, 480)
    history = [
        {
            "epoch": e,
            "train_loss": 1 / e,
            "val_loss": 1.2 / e,
            "train_acc": 0.5 + e / 20,
            "val_acc": 0.4 + e / 20,
            "val_macro_f1": 0.3 + e / 20,
        }
        for e in range(1, 9)
    ]
    curves = _open_png(training_curves_figure(history, 4, tmp_path / "curves.png"))
    assert curves.width > 2.5 * curves.height  # three panels side by side
    # A history without validation metrics (and no cut-off) still draws.
    partial = [{"epoch": e, "train_loss": 1 / e} for e in range(1, 4)]
    assert (
        _open_png(training_curves_figure(partial, None, tmp_path / "partial.png")).size
        == curves.size
    )


def test_figure_inputs_are_checked(tmp_path) -> None:
    with pytest.raises(DataError, match="does not match 3 class names"):
        confusion_matrix_figure([[1, 0], [0, 1]], ["a", "b", "c"], tmp_path / "cm.png")
    with pytest.raises(DataError, match="one \\(H, W\\) map"):
        global_attention_map_figure(np.ones((2, 4, 4)), tmp_path / "m.png")
    with pytest.raises(DataError, match="empty"):
        training_curves_figure([], 3, tmp_path / "c.png")
    assert list(tmp_path.iterdir()) == []


def test_colorize_attention_maps_values_onto_the_colormap() -> None:
    att = np.zeros((4, 6))
    att[:, 3:] = 1.0
    rgb = colorize_attention(att, cmap="inferno")
    assert rgb.shape == (4, 6, 3) and rgb.dtype == np.uint8
    low, high = rgb[0, 0], rgb[0, 5]
    assert not np.array_equal(low, high)
    assert int(high.sum()) > int(low.sum())  # inferno runs dark -> bright
    lut = matplotlib.colormaps["inferno"]
    np.testing.assert_array_equal(low, np.round(np.array(lut(0.0)[:3]) * 255).astype(np.uint8))
    np.testing.assert_array_equal(high, np.round(np.array(lut(1.0)[:3]) * 255).astype(np.uint8))
    # Stretching makes a narrow band [0.4, 0.6] span the whole colormap.
    narrow = 0.4 + 0.2 * att
    np.testing.assert_array_equal(colorize_attention(narrow, cmap="inferno", value_range=None), rgb)
    assert not np.array_equal(colorize_attention(narrow, cmap="inferno")[0, 5], high)
    # (1, 1, H, W) from the model contract is accepted.
    assert colorize_attention(att[None, None]).shape == (4, 6, 3)


def test_blend_attention_mixes_image_and_heat_map() -> None:
    image = np.full((4, 6, 3), 100, dtype=np.uint8)
    att = np.zeros((4, 6))
    att[:, 3:] = 1.0
    blended = blend_attention(image, att, alpha=0.5)
    heat = colorize_attention(att, cmap="jet")
    expected = np.rint(0.5 * 100 + 0.5 * heat.astype(float)).astype(np.uint8)
    np.testing.assert_array_equal(blended, expected)
    assert np.array_equal(blend_attention(image, att, alpha=0.0), image)
    with pytest.raises(DataError, match="does not match image"):
        blend_attention(image, np.zeros((3, 3)))
