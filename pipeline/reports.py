"""Small helpers for the files stages write for people: markdown tables and matplotlib figures."""
from __future__ import annotations

from pathlib import Path

import cv2
import matplotlib
import numpy as np
from matplotlib.figure import Figure

from pipeline.data.voc import voc_palette


def markdown_table(headers: list[str], rows: list[list]) -> str:
    """A GitHub-flavoured markdown table; floats are shown with 3 decimals."""
    def cell(value) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def interval_cell(summary: dict) -> str:
    """A paired-bootstrap difference (pipeline.evaluation.paired_bootstrap's "difference" and "ci95") as
    '+0.012 [-0.004, +0.030]'."""
    low, high = summary["ci95"]
    return f"{summary['difference']:+.3f} [{low:+.3f}, {high:+.3f}]"


def new_figure(width: float = 6.0, height: float = 4.0):
    """A matplotlib figure on the non-interactive Agg backend (no display needed)."""
    matplotlib.use("Agg")
    return Figure(figsize=(width, height), dpi=100)


def save_figure(figure, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path)


def plot_loss(losses: list[float], path: Path, title: str) -> None:
    """Loss per iteration and its running mean over 20 iterations."""
    figure = new_figure()
    axes = figure.add_subplot()
    axes.plot(losses, alpha=0.35, label="per iteration")
    window = min(20, len(losses))
    if window:
        axes.plot(np.arange(window - 1, len(losses)), np.convolve(losses, np.ones(window) / window, "valid"),
                  label=f"mean of {window}")
    axes.set(xlabel="iteration", ylabel="loss", title=title)
    axes.grid(True, alpha=0.3)
    axes.legend()
    save_figure(figure, path)


def plot_losses(losses: dict[str, list[float]], path: Path, title: str) -> None:
    """Several named losses per iteration (e.g. a multitask loss and its parts), each as a running mean of 20."""
    figure = new_figure()
    axes = figure.add_subplot()
    for name, values in losses.items():
        window = max(1, min(20, len(values)))
        axes.plot(np.arange(window - 1, len(values)), np.convolve(values, np.ones(window) / window, "valid"),
                  label=name)
    axes.set(xlabel="iteration", ylabel="loss (mean of 20 iterations)", title=title)
    axes.grid(True, alpha=0.3)
    axes.legend()
    save_figure(figure, path)


def draw_detections(rgb, rows, classes: list[str], min_score: float, ground_truth=None):
    """A BGR picture of an RGB image with its detections float32[D, 6] (x1, y1, x2, y2, score, class) scoring
    at least min_score drawn and labelled (orange), and ground-truth boxes[G, 4] if given (thin, white)."""
    canvas = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    for box in [] if ground_truth is None else ground_truth:
        cv2.rectangle(canvas, (int(box[0]), int(box[1])), (int(box[2]) - 1, int(box[3]) - 1), (255, 255, 255), 1)
    for x1, y1, x2, y2, score, class_index in rows:
        if score < min_score:
            continue
        cv2.rectangle(canvas, (int(x1), int(y1)), (int(x2) - 1, int(y2) - 1), (0, 200, 255), 2)
        cv2.putText(canvas, f"{classes[int(class_index)]} {score:.2f}", (int(x1), max(int(y1) - 3, 10)),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 200, 255), 1, cv2.LINE_AA)
    return canvas


def mask_palette() -> np.ndarray:
    """uint8[256, 3]: the RGB colour of each label of a mask (VOC's palette; 255, void, included)."""
    return np.array(voc_palette(), np.uint8).reshape(256, 3)


def overlay_mask(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A mask's colours blended over its RGB image."""
    return cv2.addWeighted(np.ascontiguousarray(rgb), 0.45, mask_palette()[mask], 0.55, 0)
