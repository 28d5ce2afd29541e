"""The model I/O layer: the atomic folder writer, the strict loader and its one-line errors, old folders."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from scale_rae_core.errors import CheckpointError
from scale_rae_core.models import io
from scale_rae_core.models.scale_rae import (
    LM_HEAD,
    RECOMPUTED,
    ScaleRAE,
    load_export,
    load_scale_rae,
    read_export_config,
)

EXPORT_V1 = Path(__file__).parent / "assets" / "export-v1"


def _listing(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _hidden(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


# ----------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------


def test_a_folder_is_written_whole_and_replaced_whole(tmp_path):
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "vocab.txt").write_text("a\nb\n")
    dest = tmp_path / "out" / "model"
    io.write_model_folder(dest, {"w": torch.arange(4.0)}, {"n": 1, "betas": (0.9, 0.95)},
                          {"tokenizer": tok, "NOTE.txt": "hi", "blob.bin": b"\x00\x01"})
    assert sorted(_listing(dest)) == ["NOTE.txt", "blob.bin", "config.json", "model.safetensors", "tokenizer/vocab.txt"]
    assert json.loads((dest / "config.json").read_text()) == {"n": 1, "betas": [0.9, 0.95]}
    with safe_open(str(dest / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"} and torch.equal(f.get_tensor("w"), torch.arange(4.0))
    io.write_model_folder(dest, None, {"n": 2})  # a second write replaces every file of the first
    assert sorted(_listing(dest)) == ["config.json"]
    assert _hidden(dest.parent) == []


@pytest.mark.parametrize("where", ["weights", "extra file", "rename"])
def test_a_failure_mid_write_leaves_the_previous_folder_intact_and_no_temporary_folders(tmp_path, monkeypatch, where):
    dest = tmp_path / "model"
    io.write_model_folder(dest, {"w": torch.ones(3)}, {"v": 1}, {"tokenizer.json": "{}"})
    before = _listing(dest)
    extra: dict[str, object] = {"tokenizer.json": "{} "}
    if where == "weights":
        def broken_save(*args, **kwargs):
            raise OSError("disk full")

        monkeypatch.setattr("safetensors.torch.save_file", broken_save)
    elif where == "extra file":
        extra["missing"] = tmp_path / "no-such-file"
    else:
        real_rename = os.rename

        def rename(src, dst):
            if Path(src).name.startswith(".model.tmp"):
                raise OSError("rename failed")
            real_rename(src, dst)

        monkeypatch.setattr(os, "rename", rename)
    with pytest.raises((OSError, CheckpointError)):
        io.write_model_folder(dest, {"w": torch.zeros(3)}, {"v": 2}, extra)
    assert _listing(dest) == before
    assert _hidden(tmp_path) == []


def test_the_writer_refuses_to_replace_what_is_not_a_model_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError) as err:
        io.write_model_folder(tmp_path, {"w": torch.ones(1)}, {"v": 1})
    assert str(err.value) == f"{tmp_path} exists and is not a model folder (no config.json); choose a new or empty folder"
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    with pytest.raises(CheckpointError, match="is a file"):
        io.write_model_folder(tmp_path / "notes.txt", None, {"v": 1})
    with pytest.raises(CheckpointError, match=r"config\.json: the config is not JSON .*set"):
        io.write_model_folder(tmp_path / "m", None, {"v": {1, 2}})
    assert not (tmp_path / "m").exists() and _hidden(tmp_path) == []


def test_tied_storages_are_written_once_per_name_and_half_stores_fp16(tmp_path):
    emb = nn.Embedding(5, 4)
    head = nn.Linear(4, 5, bias=False)
    head.weight = emb.weight
    state = nn.ModuleDict({"emb": emb, "head": head}).state_dict() | {"steps": torch.tensor(7)}
    out = io.write_model_folder(tmp_path / "tied", state, {}, half=True)
    back = load_file(str(out / "model.safetensors"))
    assert back["emb.weight"].dtype == torch.float16 and back["steps"].dtype == torch.int64
    assert torch.equal(back["head.weight"], emb.weight.detach().half())
    with pytest.raises(CheckpointError, match=r"tensor big exceeds the fp16 range; write it without half=True"):
        io.write_model_folder(tmp_path / "big", {"big": torch.tensor([1e6])}, {}, half=True)


def test_export_model_refuses_an_empty_state_dict(tmp_path):
    with pytest.raises(CheckpointError, match="state dict is empty"):
        io.export_model(tmp_path / "x", {}, {})
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------


def test_the_strict_loader_names_unknown_missing_and_wrong_shape_keys_in_one_line():
    net = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    state = {"0.weight": torch.zeros(2, 3), "1.weight": torch.zeros(1, 3), "1.bias": torch.zeros(1), "2.weight": torch.ones(1)}
    with pytest.raises(CheckpointError) as err:
        io.load_state(net, state, source="w.safetensors", fix="re-export it")
    assert str(err.value) == (
        "w.safetensors: weights do not match the model (unknown keys: 2.weight; missing keys: 0.bias; "
        "wrong shapes: 0.weight (2, 3) vs (3, 2)); re-export it"
    )
    many = {f"extra.{i}": torch.zeros(1) for i in range(10)}
    with pytest.raises(CheckpointError, match=r"unknown keys: extra\.0, .*extra\.7, \.\.\. \(\+2 more\); missing keys"):
        io.load_state(net, many, source="w", fix="x")
    # renamed keys: unknown ones in the file's names, missing ones as the file would name them
    with pytest.raises(CheckpointError, match=r"unknown keys: zzz; missing keys: ext\.0\.bias, ext\.0\.weight"):
        io.load_state(net, {"ext.1.weight": torch.ones(1, 3), "ext.1.bias": torch.ones(1), "zzz": torch.ones(1)},
                      source="w", fix="x", rename=lambda k: k[4:] if k.startswith("ext.") else None,
                      file_key=lambda k: "ext." + k)
    filled = io.load_state(net, {k: torch.full_like(v, 0.5) for k, v in net.state_dict().items()}, source="w", fix="x")
    assert filled == set(net.state_dict()) and all(bool((v == 0.5).all()) for v in net.state_dict().values())


def test_an_export_written_before_the_io_layer_loads_bit_identically():
    loaded = load_export(EXPORT_V1)
    model, stored = loaded.model, load_file(str(EXPORT_V1 / "model.safetensors"))
    state = model.state_dict()
    assert set(stored) == set(state)
    for name, tensor in stored.items():
        assert torch.equal(state[name], tensor), name
    lm = model.lm.llm
    assert lm.lm_head.weight is lm.get_input_embeddings().weight  # tied again after to_empty
    # the tensors no file holds are what a freshly built model computes
    fresh = ScaleRAE(read_export_config(EXPORT_V1))
    assert torch.equal(lm.model.rotary_emb.inv_freq, fresh.lm.llm.model.rotary_emb.inv_freq)
    for name, buf in fresh.diff_head.named_buffers():
        assert torch.equal(dict(model.diff_head.named_buffers())[name], buf), name
    assert torch.equal(model.diff_head.t_embedder.W, fresh.diff_head.t_embedder.W)
    assert torch.equal(loaded.model.stats.mean, load_file(str(EXPORT_V1 / "latent_stats.safetensors"))["mean"])


def test_an_export_of_the_current_writer_round_trips(tmp_path):
    loaded = load_export(EXPORT_V1)
    out = io.export_model(tmp_path / "again", loaded.model.state_dict(), loaded.config.to_json(),
                          {p.name: p for p in EXPORT_V1.iterdir() if p.name not in ("model.safetensors", "config.json")})
    again = load_export(out)
    for (name, a), b in zip(loaded.model.state_dict().items(), again.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert again.config == loaded.config


def test_the_scale_rae_loader_reports_a_foreign_tensor_and_may_omit_recomputed_tables(tmp_path):
    cfg = read_export_config(EXPORT_V1)
    stored = load_file(str(EXPORT_V1 / "model.safetensors"))
    trimmed = {k: v for k, v in stored.items() if k not in RECOMPUTED and k != LM_HEAD}  # tied config
    model = load_scale_rae(cfg, trimmed.items(), source="s", fix="f")
    assert torch.equal(model.diff_head.pos_embed, ScaleRAE(cfg).diff_head.pos_embed)
    bad = dict(trimmed) | {"lm.latent_queries": torch.zeros(3, 3)}
    with pytest.raises(CheckpointError, match=r"^s: weights do not match its config\.json \(wrong shapes: "
                                              r"lm\.latent_queries \(3, 3\) vs \(4, 16\)\); f$"):
        load_scale_rae(cfg, bad.items(), source="s", fix="f")


def test_the_bundled_model_loads_bit_identically():
    from scale_rae_core.config import EncoderSettings
    from scale_rae_core.infer.loading import bundled_model, load_model, load_pixel_decoder

    bundle = bundled_model()
    if bundle is None:
        pytest.skip("this installation carries no bundled model")
    loaded = load_model(str(bundle))
    state = loaded.model.state_dict()
    fresh = ScaleRAE(loaded.config).state_dict()
    for name, tensor in load_file(str(bundle / "model.safetensors")).items():  # stored as fp16, loaded as fp32
        want = fresh[name] if name in RECOMPUTED else tensor.float()  # fixed tables: recomputed in fp32
        assert state[name].dtype == torch.float32 and torch.equal(state[name], want), name
    decoder, source = load_pixel_decoder(loaded.default_decoder, EncoderSettings(kind="siglip", path="tiny-random"))
    assert source.path == bundle / "decoder"
    dstate = decoder.state_dict()
    for name, tensor in load_file(str(bundle / "decoder" / "model.safetensors")).items():
        assert torch.equal(dstate[name], tensor.float()), name
