"""The shapes world as a 12-class task: class folders and packed shards read as (pixels, label), resumably."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from scale_rae_core.data.labelled import LabelledFolder, class_folders, labelled_batches, open_labelled
from scale_rae_core.data.pack import pack
from scale_rae_core.errors import ConfigError, DataError
from scale_rae_core.shapes.synth import SHAPE_CLASSES, synthesize


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    synthesize(root / "w", 26, image_size=16, seed=0, split_heldout=0.1)  # 23 training images
    pack(root / "w" / "classes", root / "packed", format="classes")
    return root


def test_shapes_classes_are_colour_x_shape_and_all_folders_exist(world):
    assert len(SHAPE_CLASSES) == 12 and SHAPE_CLASSES == tuple(sorted(SHAPE_CLASSES))
    assert SHAPE_CLASSES[0] == "blue_circle" and "yellow_triangle" in SHAPE_CLASSES
    for split in (world / "w" / "classes", world / "w" / "heldout" / "classes"):  # 3 held-out images, 12 folders
        assert sorted(d.name for d in split.iterdir()) == list(SHAPE_CLASSES)


def test_folder_labels_are_the_sorted_folder_index(world):
    stream = open_labelled(world / "w" / "classes", image_size=16, train=False)
    assert stream.classes == list(SHAPE_CLASSES) and stream.num_classes == 12
    items = list(stream)
    assert len(items) == 23
    _, files = class_folders(world / "w" / "classes")
    for (x, label, _), (path, expected) in zip(items, files, strict=True):
        assert label == expected == SHAPE_CLASSES.index(path.parent.name)
        assert x.shape == (3, 16, 16) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0


def test_packed_labels_agree_with_the_folders(world):
    folder = Counter(label for _, label, _ in open_labelled(world / "w" / "classes", image_size=16, train=False))
    by_name = open_labelled(world / "packed", image_size=16, train=False, classes=list(SHAPE_CLASSES))
    by_index = open_labelled(world / "packed" / "wds_manifest.json", image_size=16, train=False, num_classes=12)
    assert Counter(label for _, label, _ in by_name) == folder == Counter(label for _, label, _ in by_index)
    with pytest.raises(ConfigError, match="does not list its classes"):
        open_labelled(world / "packed", image_size=16, train=False)
    short = open_labelled(world / "packed", image_size=16, train=False, num_classes=3)
    with pytest.raises(DataError, match=r"not in 0\.\.2"):
        list(short)


def test_batches_and_resume_continue_the_same_order(world):
    root = world / "w" / "classes"
    full = LabelledFolder(root, image_size=16, train=True, seed=3)
    expected = [label for _, label, _ in full]
    a = LabelledFolder(root, image_size=16, train=True, seed=3)
    x, y, positions = next(labelled_batches(a, 5))
    assert x.shape == (5, 3, 16, 16) and y.dtype == torch.long and y.tolist() == expected[:5]
    a.mark_consumed(positions)
    b = LabelledFolder(root, image_size=16, train=True, seed=3)
    b.load_state_dict(a.state_dict())
    assert [label for _, label, _ in b] == expected[5:]
    with pytest.raises(DataError, match="saved for other data, process count or seed"):
        LabelledFolder(root, image_size=16, train=True, seed=4).load_state_dict(a.state_dict())


def test_ranks_split_the_folder_without_overlap(world):
    root = world / "w" / "classes"
    parts = [LabelledFolder(root, image_size=16, train=True, rank=r, world_size=2, seed=1) for r in range(2)]
    seen = [parts[r].items[i] for r in range(2) for i in parts[r].order.order(0)]
    assert len(seen) == 22 and len(set(seen)) == 22  # drop-last: 11 each


def test_bad_inputs_are_one_line_errors(world, tmp_path):
    with pytest.raises(DataError, match="no class folders"):
        open_labelled(tmp_path, image_size=16, train=False)
    with pytest.raises(DataError, match="has 12 class folders, the model 10 classes"):
        open_labelled(world / "w" / "classes", image_size=16, train=False, num_classes=10)
    with pytest.raises(DataError, match="are not the classes given"):
        open_labelled(world / "w" / "classes", image_size=16, train=False, classes=["a", "b"])
