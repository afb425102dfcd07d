"""The sliding-window detection baseline: its grid of windows and its place before R-CNN."""
import numpy as np

from pipeline.sliding_window import grid_windows


def test_windows_cover_the_image_on_a_grid_of_each_size_and_aspect_ratio():
    windows = grid_windows(100, 60, sizes=[20, 40], aspect_ratios=[1.0, 4.0], step=0.5)
    widths, heights = windows[:, 2] - windows[:, 0], windows[:, 3] - windows[:, 1]
    assert (windows[:, :2] >= 0).all() and (windows[:, 2] <= 100).all() and (windows[:, 3] <= 60).all()
    assert np.isin(np.round(widths * heights), [400, 1600]).all()  # each window has area size^2
    square20 = windows[np.isclose(widths, 20) & np.isclose(heights, 20)]
    assert len(square20) == 9 * 5  # every 10 px: 9 positions across 100 px, 5 down 60 px
    assert sorted(set(square20[:, 0].tolist())) == [0, 10, 20, 30, 40, 50, 60, 70, 80]
    tall20 = windows[np.isclose(widths, 10) & np.isclose(heights, 40)]  # size 20, height / width 4
    assert len(tall20) == 19 * 2  # every 5 px across, every 20 px down
    assert not np.isclose(heights, 80).any()  # size 40 at ratio 4 is 20 x 80: taller than the image


def test_a_run_that_does_not_fill_the_image_is_centred():
    windows = grid_windows(25, 20, sizes=[20], aspect_ratios=[1.0], step=1.0)
    assert windows.tolist() == [[2.5, 0.0, 22.5, 20.0]]


def test_no_window_fits_an_image_smaller_than_every_size():
    assert grid_windows(10, 10, sizes=[20], aspect_ratios=[1.0], step=0.5).shape == (0, 4)
