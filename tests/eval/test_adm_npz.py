"""ADM image batches: streaming write/read round trips, centre crops, and one-line errors for anything else."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from scale_rae_core.errors import DataError
from scale_rae_core.eval.adm_npz import (
    AdmNpzWriter,
    center_crop_arr,
    folder_to_npz,
    open_images,
    open_npz_images,
)


def _images(n=5, h=6, w=4, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def test_writer_streams_an_npz_numpy_reads(tmp_path):
    imgs = _images()
    writer = AdmNpzWriter(tmp_path / "a.npz", 5, 6, 4)
    writer.write(imgs[:2])
    writer.write(imgs[2:])
    path = writer.close()
    with np.load(path, allow_pickle=False) as npz:
        assert npz.files == ["arr_0"] and np.array_equal(npz["arr_0"], imgs)
    reader = open_npz_images(path)
    assert (reader.count, reader.height, reader.width) == (5, 6, 4)
    batches = list(reader.batches(2))
    assert [len(b) for b in batches] == [2, 2, 1] and np.array_equal(np.concatenate(batches), imgs)


def test_compressed_npz_with_extra_members_reads(tmp_path):
    imgs = _images(3)
    np.savez_compressed(tmp_path / "ref.npz", arr_0=imgs, mu=np.zeros(4), sigma=np.eye(4))
    assert np.array_equal(np.concatenate(list(open_npz_images(tmp_path / "ref.npz").batches(8))), imgs)


def test_unfinished_writer_leaves_nothing(tmp_path):
    writer = AdmNpzWriter(tmp_path / "a.npz", 5, 6, 4)
    writer.write(_images(2))
    with pytest.raises(DataError, match="2 of 5 images were written"):
        writer.close()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"images": _images(2)}, "has no arr_0 (members: images)"),
        ({"arr_0": _images(2).astype(np.float32)}, "arr_0 is float32 (2, 6, 4, 3)"),
        ({"arr_0": _images(2)[..., 0]}, "arr_0 is uint8 (2, 6, 4)"),
        ({"arr_0": np.array([{"a": 1}], dtype=object)}, "arr_0 is object"),
    ],
)
def test_non_adm_npz_is_a_one_line_error(tmp_path, arrays, message):
    np.savez(tmp_path / "x.npz", **arrays)
    with pytest.raises(DataError) as err:
        open_npz_images(tmp_path / "x.npz")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_not_an_archive(tmp_path):
    (tmp_path / "x.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not an .npz archive"):
        open_npz_images(tmp_path / "x.npz")


def test_center_crop_is_adms():
    arr = np.zeros((50, 200, 3), dtype=np.uint8)
    arr[:, 100:] = 255  # right half white
    out = center_crop_arr(Image.fromarray(arr), 16)
    # 200x50: box-halved once (min side 50 >= 32) to 100x25, bicubic to 64x16, centre 16x16 straddles the edge
    assert out.shape == (16, 16, 3)
    assert out[:, :6].max() < 30 and out[:, 10:].min() > 225


def test_folder_to_npz_crops_or_refuses_mixed_sizes(tmp_path):
    folder = tmp_path / "imgs"
    (folder / "b").mkdir(parents=True)
    Image.fromarray(_images(1, 20, 30)[0]).save(folder / "a.png")
    Image.fromarray(_images(1, 16, 16, seed=1)[0]).save(folder / "b" / "c.png")
    with pytest.raises(DataError) as err:
        folder_to_npz(folder, tmp_path / "x.npz")
    assert "pass --image-size" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "x.npz").exists()
    summary = folder_to_npz(folder, tmp_path / "ref.npz", image_size=16)
    assert summary["count"] == 2
    ref = np.concatenate(list(open_npz_images(tmp_path / "ref.npz").batches(4)))
    assert ref.shape == (2, 16, 16, 3)
    assert np.array_equal(ref[1], _images(1, 16, 16, seed=1)[0])  # already 16x16: kept as is


def test_folder_of_samples_reads_in_sorted_order(tmp_path):
    imgs = _images(3, 8, 8)
    for i, im in enumerate(imgs):
        Image.fromarray(im).save(tmp_path / f"{i:06d}.png")
    reader = open_images(tmp_path)
    assert np.array_equal(np.concatenate(list(reader.batches(2))), imgs)
