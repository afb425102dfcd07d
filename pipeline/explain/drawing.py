"""Drawing helpers the explain pictures share: matplotlib figures as RGB arrays, boxes on an image, grids
of crops."""
from __future__ import annotations

import cv2
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.patches import Rectangle

from pipeline.reports import new_figure

# RGB colours: what each kind of box is drawn in, on every picture
COLOURS = {"proposal": (0, 160, 255), "ground truth": (255, 255, 255), "detection": (255, 170, 0),
           "regressed": (0, 220, 0), "negative": (230, 40, 40), "anchor": (255, 60, 200)}


def figure(width: float, height: float):
    """A matplotlib figure to draw on (Agg backend, 100 dpi)."""
    return new_figure(width, height)


def figure_image(drawn) -> np.ndarray:
    """A matplotlib figure rendered to RGB uint8[H, W, 3]."""
    canvas = FigureCanvasAgg(drawn)  # a bare Figure's canvas cannot render
    drawn.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def draw_boxes(rgb: np.ndarray, boxes, colour, thickness: int = 2, labels=None) -> np.ndarray:
    """A copy of an RGB image with boxes[K, 4] (continuous pixel corners) drawn, each with its label if given."""
    canvas = np.ascontiguousarray(rgb).copy()
    for index, (x1, y1, x2, y2) in enumerate(np.asarray(boxes, dtype=float).reshape(-1, 4)):
        cv2.rectangle(canvas, (int(round(x1)), int(round(y1))), (int(round(x2)) - 1, int(round(y2)) - 1), colour,
                      thickness, cv2.LINE_AA)
        if labels is not None:
            cv2.putText(canvas, str(labels[index]), (int(x1) + 2, max(int(y1) - 3, 10)), cv2.FONT_HERSHEY_SIMPLEX,
                        0.4, colour, 1, cv2.LINE_AA)
    return canvas


def blend(rgb: np.ndarray, drawn: np.ndarray, alpha: float) -> np.ndarray:
    """drawn over rgb at opacity alpha (for boxes drawn faintly)."""
    return cv2.addWeighted(drawn, alpha, rgb, 1 - alpha, 0)


def tile(images: list[np.ndarray], columns: int, gap: int = 4) -> np.ndarray:
    """Equal-sized RGB images in a grid, `columns` wide, on a white background."""
    height, width = images[0].shape[:2]
    rows = -(-len(images) // columns)
    grid = np.full((rows * (height + gap) + gap, min(columns, len(images)) * (width + gap) + gap, 3), 255, np.uint8)
    for index, image in enumerate(images):
        top, left = gap + (index // columns) * (height + gap), gap + (index % columns) * (width + gap)
        grid[top:top + height, left:left + width] = image
    return grid


def labelled(crop: np.ndarray, lines: list[str]) -> np.ndarray:
    """A crop with a white strip below holding its lines of text."""
    strip = np.full((14 * len(lines) + 4, crop.shape[1], 3), 255, np.uint8)
    for index, line in enumerate(lines):
        cv2.putText(strip, line, (2, 13 + 14 * index), cv2.FONT_HERSHEY_SIMPLEX, 0.38, (0, 0, 0), 1, cv2.LINE_AA)
    return np.vstack([crop, strip])


def crop_window(rgb: np.ndarray, window: np.ndarray, side: int) -> np.ndarray:
    """The window (x1, y1, x2, y2; it may reach outside the image: padded grey) resized to side x side."""
    x1, y1, x2, y2 = (int(round(value)) for value in window)
    pad = max(0, -x1, -y1, x2 - rgb.shape[1], y2 - rgb.shape[0])
    padded = cv2.copyMakeBorder(rgb, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=(128, 128, 128))
    return cv2.resize(padded[y1 + pad:y2 + pad, x1 + pad:x2 + pad], (side, side), interpolation=cv2.INTER_LINEAR)


def pooling_picture(summary: np.ndarray, box_cells: np.ndarray, bins: list[tuple[np.ndarray, np.ndarray]],
                    pooled: list[np.ndarray], titles: list[str]) -> np.ndarray:
    """conv5's channel mean with the projected region and each pooling's bins (top row), and the pooled cells
    (bottom row), one column per pooling."""
    drawn = figure(3.2 * len(bins), 6)
    for column, ((xs, ys), cells, title) in enumerate(zip(bins, pooled, titles)):
        axes = drawn.add_subplot(2, len(bins), column + 1)
        axes.imshow(summary, cmap="viridis", extent=(0, summary.shape[1], summary.shape[0], 0))
        x1, y1, x2, y2 = box_cells
        axes.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="white", linewidth=2))
        for (left, right), (top, bottom) in ((x, y) for x in xs for y in ys):
            axes.add_patch(Rectangle((left, top), right - left, bottom - top, fill=False, edgecolor="red",
                                     linewidth=0.6))
        axes.set_title(f"conv map, {title}", fontsize=9)
        axes = drawn.add_subplot(2, len(bins), len(bins) + column + 1)
        axes.imshow(cells, cmap="viridis")
        axes.set_title(f"pooled: {cells.shape[0]} x {cells.shape[1]}", fontsize=9)
        axes.set_xticks([])
        axes.set_yticks([])
    return figure_image(drawn)
