"""Latent statistics: exact parallel merge, persistence, released stat.pt, (de)normalisation."""

from __future__ import annotations

import os
import socket

import pytest
import torch

from scale_rae_core.errors import CheckpointError
from scale_rae_core.models.stats import LatentStats, RunningStats, compute_latent_stats, load_stats


def _accumulate(data: torch.Tensor, sizes: list[int]) -> RunningStats:
    acc = RunningStats()
    for chunk in data.split(sizes):
        acc.update(chunk)
    return acc


def test_random_splits_and_worker_merge_equal_whole_dataset_variance():
    g = torch.Generator().manual_seed(0)
    data = torch.randn(103, 4, 6, dtype=torch.float64, generator=g) * 3 + 2
    # three "workers" with uneven batches, merged in an arbitrary order
    a = _accumulate(data[:40], [1, 7, 32])
    b = _accumulate(data[40:41], [1])
    c = _accumulate(data[41:], [20, 20, 22])
    stats = c.merge(a).merge(b).merge(RunningStats()).result()
    assert stats.count == 103
    torch.testing.assert_close(stats.mean, data.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stats.var, data.var(0, unbiased=False), rtol=1e-12, atol=1e-12)


def test_large_offset_stays_accurate():
    # mean 1e4, std 1e-2: E[x^2] - E[x]^2 would lose every digit of the variance; the M2 merge does not.
    g = torch.Generator().manual_seed(0)
    data = 1e4 + 1e-2 * torch.randn(1000, 8, dtype=torch.float64, generator=g)
    stats = _accumulate(data, [3] * 333 + [1]).result()
    torch.testing.assert_close(stats.var, data.var(0, unbiased=False), rtol=1e-8, atol=0)
    torch.testing.assert_close(stats.mean, data.mean(0), rtol=1e-14, atol=0)


def test_compute_latent_stats_runs_the_encoder_over_batches():
    def encoder(pixels: torch.Tensor) -> torch.Tensor:  # [B,3,H,W] -> tokens [B, H*W, 3]
        return pixels.flatten(2).transpose(1, 2)

    batches = [torch.rand(n, 3, 2, 2) for n in (5, 1, 9)]
    stats = compute_latent_stats(encoder, batches)
    tokens = torch.cat([encoder(b) for b in batches]).double()
    assert stats.shape == (4, 3) and stats.count == 15
    torch.testing.assert_close(stats.var, tokens.var(0, unbiased=False))


def test_normalize_round_trip_and_values():
    g = torch.Generator().manual_seed(0)
    stats = LatentStats(mean=torch.randn(4, 3, generator=g), var=torch.rand(4, 3, generator=g) + 0.1)
    z = torch.randn(2, 4, 3, generator=g)
    zn = stats.normalize(z)
    torch.testing.assert_close(zn, (z - stats.mean) / torch.sqrt(stats.var + 1e-5))
    torch.testing.assert_close(stats.denormalize(zn), z, rtol=1e-6, atol=1e-6)
    with pytest.raises(CheckpointError, match=r"\(4, 3\)"):
        stats.normalize(torch.randn(2, 5, 3))


def test_save_and_load_our_format(tmp_path):
    acc = _accumulate(torch.randn(10, 4, 3, dtype=torch.float64), [4, 6])
    stats = acc.result()
    path = stats.save(tmp_path / "stats" / "latent_stats.safetensors", metadata={"encoder": "org/enc"})
    assert sorted(p.name for p in path.parent.iterdir()) == ["latent_stats.safetensors"]
    back = load_stats(path)
    assert (back.count, back.eps, back.shape) == (10, 1e-5, (4, 3))
    torch.testing.assert_close(back.mean, stats.mean.float())
    torch.testing.assert_close(back.var, stats.var.float())
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["encoder"] == "org/enc"


def test_released_stat_pt_with_and_without_mean(tmp_path):
    Cc, H, W = 3, 2, 4
    mean = torch.arange(Cc * H * W, dtype=torch.float32).view(Cc, H, W)
    var = mean + 1
    torch.save({"mean": mean, "var": var}, tmp_path / "stat.pt")
    stats = load_stats(tmp_path / "stat.pt")
    assert stats.shape == (H * W, Cc)
    for i, j, c in [(0, 0, 0), (1, 3, 2), (0, 2, 1)]:
        assert stats.mean[i * W + j, c] == mean[c, i, j]  # token n = i*W + j, row-major
        assert stats.var[i * W + j, c] == var[c, i, j]
    assert torch.equal(load_stats(tmp_path / "stat.pt", layout="chw").var, var)

    torch.save({"var": var}, tmp_path / "var_only.pt")  # the released DINOv2-B file
    torch.save({"mean": None, "var": var}, tmp_path / "mean_none.pt")
    for name in ("var_only.pt", "mean_none.pt"):
        s = load_stats(tmp_path / name)
        assert torch.count_nonzero(s.mean) == 0
        torch.testing.assert_close(s.normalize(torch.ones(1, H * W, Cc)), 1 / torch.sqrt(s.var + 1e-5)[None])


def test_bad_stats_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_stats(tmp_path / "nope.pt")
    torch.save({"running_mean": torch.zeros(3)}, tmp_path / "bn.pt")
    with pytest.raises(CheckpointError, match="'mean' and/or 'var'"):
        load_stats(tmp_path / "bn.pt")
    torch.save({"var": torch.ones(3, 2, 2), "step": torch.tensor(1)}, tmp_path / "extra.pt")
    with pytest.raises(CheckpointError, match="'step'"):
        load_stats(tmp_path / "extra.pt")
    torch.save(
        {"var": torch.ones(3, 2, 2), "obj": socket.AF_INET}, tmp_path / "pickle.pt"
    )  # not weights-only
    with pytest.raises(CheckpointError, match="weights-only"):
        load_stats(tmp_path / "pickle.pt")


def test_all_reduce_single_rank_group_is_identity(tmp_path):
    import torch.distributed as dist

    acc = _accumulate(torch.randn(6, 2, 3, dtype=torch.float64), [2, 4])
    before = acc.result()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        after = acc.all_reduce().result()
    finally:
        dist.destroy_process_group()
    assert after.count == 6
    torch.testing.assert_close(after.var, before.var, rtol=0, atol=0)


def _rank_main(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    data = torch.load(os.path.join(out_dir, "data.pt"), weights_only=True)
    shard = data[:7] if rank == 0 else data[7:]  # uneven shards
    stats = _accumulate(shard, [len(shard)]).all_reduce().result()
    torch.save(
        {"mean": stats.mean, "var": stats.var, "count": torch.tensor(stats.count)}, f"{out_dir}/r{rank}.pt"
    )
    dist.destroy_process_group()


@pytest.mark.dist
def test_all_reduce_across_two_processes(tmp_path):
    import torch.multiprocessing as mp

    data = torch.randn(20, 3, 2, dtype=torch.float64) + 50
    torch.save(data, tmp_path / "data.pt")
    mp.spawn(_rank_main, args=(2, str(tmp_path / "pg"), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"r{rank}.pt", weights_only=True)
        assert int(got["count"]) == 20
        torch.testing.assert_close(got["var"], data.var(0, unbiased=False), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got["mean"], data.mean(0), rtol=1e-12, atol=1e-12)
