from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

from pipeline import proposals
from pipeline.data.voc import VOCDataset
from pipeline.engine.cache import StageCache
from pipeline.engine.config import load_config
from pipeline.engine.errors import ConfigError
from pipeline.proposals import SELECTIVE_SEARCH_MODES, defer_near_duplicates, proposal_params, propose, rank_rects
from stages.proposals import recall_curve


@pytest.fixture(scope="module")
def image(shapes_root):
    dataset = VOCDataset(shapes_root)
    return dataset.read_image(dataset.image_ids("test")[0])


def test_ranking_puts_more_votes_first_and_ignores_arrival_order():
    rects = [(0, 0, 30, 30), (5, 5, 40, 40), (1, 2, 3, 4), (9, 9, 21, 21)]
    votes = Counter({rects[0]: 1, rects[1]: 3, rects[2]: 1, rects[3]: 2})
    reversed_votes = Counter(dict(reversed(list(votes.items()))))
    assert rank_rects(votes)[:2] == [rects[1], rects[3]]
    assert rank_rects(votes) == rank_rects(reversed_votes)


def params_of(method: str, **settings) -> dict:
    """The demo preset's proposal params for `method` (what its key covers), with `settings` changed."""
    overrides = [f"proposals.method={method}", *(f"proposals.{name}={value}" for name, value in settings.items())]
    return proposal_params(load_config("demo", overrides))


def search(mode="rcnn-fast", search_side=0, min_size=20, max_proposals=2000, near_duplicate_iou=1.0) -> dict:
    return params_of("selective-search", mode=mode, search_side=search_side, min_size=min_size,
                     max_proposals=max_proposals, near_duplicate_iou=near_duplicate_iou)


# every registered proposal method, in each of its settings: a new method is tested by registering it
EVERY_METHOD = [("selective-search", {"mode": mode}) for mode in SELECTIVE_SEARCH_MODES] + [("edge-boxes", {})]


def test_every_registered_method_is_tested():
    assert {method for method, _ in EVERY_METHOD} == set(proposals.PROPOSAL_METHODS)


@pytest.mark.parametrize("method, settings", EVERY_METHOD)
def test_proposals_lie_in_the_image_are_large_enough_and_unique(image, method, settings):
    boxes = propose(image, params_of(method, **settings, search_side=0, max_proposals=100))
    height, width = image.shape[:2]
    assert boxes.dtype == np.float32 and boxes.shape[1] == 4 and 0 < len(boxes) <= 100
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= width).all()
    assert (boxes[:, 1] >= 0).all() and (boxes[:, 3] <= height).all()
    assert ((boxes[:, 2] - boxes[:, 0]) >= 20).all() and ((boxes[:, 3] - boxes[:, 1]) >= 20).all()
    assert len(np.unique(boxes, axis=0)) == len(boxes)


def test_near_duplicates_go_behind_the_distinct_boxes_in_their_order():
    ranked = np.array([[0, 0, 100, 100],     # kept first
                       [0, 0, 100, 95],      # IoU 0.95 with the first: moved back
                       [200, 0, 300, 100],   # distinct
                       [2, 0, 100, 100],     # IoU 0.98 with the first: moved back, after the second
                       [0, 0, 100, 75]],     # IoU 0.75 with the first: kept in place
                      np.float32)
    assert defer_near_duplicates(ranked, 0.8).tolist() == ranked[[0, 2, 4, 1, 3]].tolist()
    assert defer_near_duplicates(ranked, 1.0).tolist() == ranked.tolist()


def test_deferring_near_duplicates_keeps_the_set_and_spreads_the_first_boxes(image):
    plain, deferred = propose(image, search()), propose(image, search(near_duplicate_iou=0.7))
    assert sorted(map(tuple, deferred.tolist())) == sorted(map(tuple, plain.tolist()))
    first = torch.from_numpy(deferred[:20])
    overlaps = box_iou(first, first).fill_diagonal_(0)
    assert overlaps.max() <= 0.7 < box_iou(torch.from_numpy(plain), torch.from_numpy(plain)).fill_diagonal_(0).max()


@pytest.mark.parametrize("method, settings", EVERY_METHOD[:1] + EVERY_METHOD[-1:])
def test_same_image_gives_same_boxes_on_concurrent_threads(image, method, settings):
    with ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda _: propose(image, params_of(method, **settings)), range(4)))
    assert len(runs[0]) and all(np.array_equal(runs[0], other) for other in runs[1:])


def test_edge_boxes_find_the_shapes_that_have_edges(shapes_root):
    """On the shapes (flat colours on texture), gradient edges outline every object: recall at IoU 0.5."""
    dataset = VOCDataset(shapes_root)
    boxes = {image_id: propose(dataset.read_image(image_id), params_of("edge-boxes"))
             for image_id in dataset.image_ids("test")}
    assert recall_curve(dataset, boxes, [500])[-1]["recall@0.5"] >= 0.8


def test_the_key_of_one_method_leaves_the_other_methods_options_out():
    assert "edge_model" not in search() and "mode" not in params_of("edge-boxes")
    assert "edge_model" in params_of("edge-boxes") and "mode" in search()


def test_a_missing_structured_edge_model_stops_the_config_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match=f"proposals.edge_model {tmp_path}/model.yml.gz: no such structured-edge "
                                          f"model file"):
        load_config("demo", ["proposals.method=edge-boxes", f"proposals.edge_model={tmp_path}/model.yml.gz"])


def test_the_proposals_report_shows_every_method_computed_on_the_data_side_by_side(rcnn, tmp_path):
    assert rcnn("proposals") == 0 and rcnn("proposals", "--set", "proposals.method=edge-boxes") == 0
    table = (tmp_path / "reports" / "demo" / "proposals" / "recall-by-method.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "recall" not in line]
    assert [row.split(" | ")[0] for row in rows] == ["| EdgeBoxes (gradient edges, no model file)",
                                                    "| selective search (rcnn-fast)"]  # this run's first
    assert (tmp_path / "reports" / "demo" / "proposals" / "recall-by-method.png").stat().st_size > 0


def test_search_on_a_smaller_copy_returns_boxes_in_original_pixels(image):
    height, width = image.shape[:2]
    boxes = propose(image, search(search_side=max(height, width) // 2))
    assert boxes[:, 2].max() > 0.75 * width and boxes[:, 3].max() > 0.75 * height  # not left at half size
    assert (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
    assert np.array_equal(boxes, np.round(boxes))


def test_recall_curve_on_a_hand_worked_example():
    gt_boxes = np.array([[0, 0, 10, 10], [20, 20, 40, 40], [50, 50, 60, 60]], np.float32)
    difficult = np.array([False, False, True])
    dataset = SimpleNamespace(ground_truth=lambda image_id: (gt_boxes, np.zeros(3, np.int64), difficult))
    ranked = np.array([[20, 20, 40, 40],   # IoU 1.0 with the second box
                       [0, 0, 10, 16],     # IoU 100/160 = 0.625 with the first
                       [50, 50, 60, 60]],  # the difficult box: never counted
                      np.float32)
    curve = recall_curve(dataset, {"img": ranked}, [1, 2, 3, 3])  # max_proposals repeats a recall_at cap
    assert [row["cap"] for row in curve] == [1, 2, 3]
    assert [row["gt_boxes"] for row in curve] == [2, 2, 2]
    assert [row["mean_kept"] for row in curve] == [1, 2, 3]
    assert [row["recall@0.5"] for row in curve] == [0.5, 1.0, 1.0]
    assert [row["recall@0.7"] for row in curve] == [0.5, 0.5, 0.5]
    assert curve[1]["mean_best_iou"] == pytest.approx((1.0 + 0.625) / 2)


def test_a_large_photo_is_searched_at_search_side_and_its_boxes_come_back_in_its_pixels(monkeypatch):
    searched = []

    def whole_image(rgb, params):
        searched.append(rgb.shape)
        return [(0, 0, rgb.shape[1], rgb.shape[0])]

    monkeypatch.setitem(proposals.PROPOSAL_METHODS, "selective-search",
                        proposals.ProposalMethod("selective-search", whole_image, ("mode",)))
    photo = np.zeros((4000, 6000, 3), np.uint8)
    boxes = propose(photo, search(search_side=500))
    assert searched == [(333, 500, 3)] and boxes.tolist() == [[0.0, 0.0, 6000.0, 3996.0]]  # 333 px x 12
    assert propose(photo[:300, :400], search(search_side=500)).tolist() == [[0.0, 0.0, 400.0, 300.0]]
    assert searched[-1] == (300, 400, 3)  # never enlarged


def test_proposals_of_some_images_are_read_from_the_shards_that_hold_them(tmp_path, monkeypatch):
    cache = StageCache(tmp_path, "proposals", "key")
    cache.dir.mkdir(parents=True)
    boxes = {f"im{index}": np.full((index + 1, 4), index, np.float32) for index in range(6)}
    for shard in range(3):
        with h5py.File(cache.dir / f"{shard:05d}.h5", "w") as shard_file:
            for image_id in list(boxes)[2 * shard:2 * shard + 2]:
                shard_file[image_id] = boxes[image_id]
    opened = []
    real_file = h5py.File
    monkeypatch.setattr(proposals.h5py, "File", lambda path, mode: opened.append(path.name) or real_file(path, mode))
    assert proposals.read_proposals(cache).keys() == boxes.keys()
    assert proposals.read_proposals(cache, ["im0"]).keys() == {"im0"}  # lists which shard holds which image, once
    opened.clear()
    some = proposals.read_proposals(cache, ["im3", "im2", "missing"])
    assert some.keys() == {"im2", "im3"} and all((some[i] == boxes[i]).all() for i in some)
    assert opened == ["00001.h5"]
