"""The one read order of indexed datasets (image folders, class folders, latent caches)."""

from __future__ import annotations

import itertools

import pytest

from scale_rae_core.data.order import EpochOrder
from scale_rae_core.errors import DataError


def _order(**kw) -> EpochOrder:
    return EpochOrder(10, kind="k", tag="t", where="here", shuffle=True, seed=1, **kw)


@pytest.mark.parametrize("drop_last, sizes", [(True, [3, 3, 3]), (False, [3, 3, 4])])
def test_ranks_cover_the_epoch_once(drop_last, sizes):
    parts = [_order(rank=r, world_size=3, drop_last=drop_last) for r in range(3)]
    assert [p.per_epoch for p in parts] == sizes
    seen = [i for p in parts for i in p.order(0)]
    assert len(seen) == len(set(seen)) == sum(sizes)
    assert sorted(_order().order(0)) == list(range(10)) and _order().order(0) != _order().order(1)


def test_a_saved_position_resumes_exactly_and_epochs_roll_over():
    a = _order()
    first = list(itertools.islice(a.items(), 4))
    b = _order()
    b.load_state_dict(a.state_dict())
    rest = [i for i, _ in b.items()]
    assert [i for i, _ in first] + rest == _order().order(0)
    assert [pos for _, pos in b.items()][0] == (1, 0)  # finished epoch 0: the next iteration is epoch 1


def test_mark_consumed_follows_what_reached_the_loop():
    o = _order()
    o.mark_consumed([(0, 0), (0, 1), (0, 2)])
    assert (o.epoch, o.consumed) == (0, 3)
    o.mark_consumed([(1, 0)])
    assert (o.epoch, o.consumed) == (1, 1)


def test_another_dataset_or_layout_is_refused_in_one_line():
    state = _order().state_dict()
    for other in (EpochOrder(11, kind="k", tag="t", where="here", shuffle=True, seed=1), _order(world_size=2),
                  EpochOrder(10, kind="k", tag="t", where="here", shuffle=True, seed=2),
                  EpochOrder(10, kind="k", tag="t", where="here", shuffle=True, seed=1, identity={"classes": ["a"]})):
        with pytest.raises(DataError, match="here: the checkpoint's data position was saved for other data"):
            other.load_state_dict(state)
    with pytest.raises(DataError, match="3 items cannot be split across 4 processes"):
        EpochOrder(3, kind="k", tag="t", where="here", shuffle=False, world_size=4)
