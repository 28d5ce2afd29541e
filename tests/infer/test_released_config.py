"""A released model read as the reference reads it: stored DiT tables, tied heads, class dropout 0, select layer."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F

from scale_rae_core.config import load_profile
from scale_rae_core.errors import CheckpointError, ConfigError
from scale_rae_core.infer.generate import generate_images
from scale_rae_core.infer.loading import load_model
from scale_rae_core.infer.pipeline import SamplerSettings, Session
from scale_rae_core.models.dit import rope_tables_2d, sincos_pos_embed_2d
from scale_rae_core.models.scale_rae import ScaleRAE
from tests.infer.helpers import build_tiny, write_decoder, write_export, write_released

TABLES = ("pos_embed", "feat_rope.freqs_cos", "feat_rope.freqs_sin")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from scale_rae_core.models.build import tiny_random_encoder_dir

    tmp = tmp_path_factory.mktemp("released")
    model, tok = build_tiny(tmp)
    return {"model": model, "tok": tok, "tmp": tmp, "tower": str(tiny_random_encoder_dir()) + "-interp64",
            "decoder": write_decoder(tmp / "decoder")}


def _load(path, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_model(str(path), **kwargs)
    return loaded, [str(w.message) for w in caught]


def test_stored_tables_are_kept_and_the_difference_is_named(files, tmp_path):
    """A file that stores the DiT's tables in bf16: the reference uses those values (upcast), so srae does too."""
    path = write_released(files["model"], files["tok"], tmp_path / "bf16", files["tower"], dtype=torch.bfloat16)
    loaded, messages = _load(path)
    dit, cfg = loaded.model.diff_head, loaded.model.cfg.dit
    cos, sin = rope_tables_2d(cfg.head_dim, cfg.grid, cfg.rope_theta)
    computed = {"pos_embed": sincos_pos_embed_2d(cfg.hidden, cfg.grid)[None], "feat_rope.freqs_cos": cos,
                "feat_rope.freqs_sin": sin}
    own = dit.state_dict()
    for name in TABLES:
        assert own[name].dtype == torch.float32
        assert torch.equal(own[name], computed[name].bfloat16().float()), name  # the stored (bf16) values, upcast
        assert not torch.equal(own[name], computed[name])
        largest = float((computed[name].bfloat16().float() - computed[name]).abs().max())
        [line] = [m for m in messages if f"the stored DiT table {name} " in m]
        assert f"differs from the computed one by up to {largest:.3g}" in line and "\n" not in line
    # a file storing the exact tables (fp32) gives no warning; an srae export recomputes them (no warning either)
    exact, messages = _load(write_released(files["model"], files["tok"], tmp_path / "fp32", files["tower"]))
    assert not [m for m in messages if "DiT table" in m]
    assert torch.equal(exact.model.diff_head.pos_embed, computed["pos_embed"])
    _, messages = _load(write_export(files["model"], files["tok"], tmp_path / "export"))
    assert not messages
    # a file without the tables still loads: they are computed
    dropped, _ = _load(write_released(files["model"], files["tok"], tmp_path / "none", files["tower"],
                                      drop=tuple(f"diff_head.model.{n}" for n in TABLES)))
    assert torch.equal(dropped.model.diff_head.feat_rope.freqs_cos, cos)


def test_a_tied_config_ties_even_when_the_file_stores_another_head(files, tmp_path):
    torch.manual_seed(0)
    cfg = files["model"].cfg
    tied = ScaleRAE(type(cfg)(**{**cfg.__dict__, "llm": {**cfg.llm, "tie_word_embeddings": True}})).eval()
    other = torch.randn_like(tied.lm.llm.model.embed_tokens.weight)
    path = write_released(tied, files["tok"], tmp_path / "tied", files["tower"], extra={"lm_head.weight": other})
    loaded, messages = _load(path)
    llm = loaded.model.lm.llm
    assert llm.lm_head.weight is llm.model.embed_tokens.weight  # one tensor
    assert torch.equal(llm.lm_head.weight, tied.lm.llm.model.embed_tokens.weight)
    assert not torch.equal(llm.lm_head.weight, other)
    assert any("the stored lm_head.weight differs from the input embeddings" in m and "unused" in m for m in messages)
    # the same file with an untied config keeps the stored head
    untied = write_released(tied, files["tok"], tmp_path / "untied", files["tower"], extra={"lm_head.weight": other},
                            config={"tie_word_embeddings": False})
    head = load_model(str(untied)).model.lm.llm.lm_head.weight
    assert torch.equal(head, other)


def test_class_dropout_zero_loads_without_a_null_condition_and_refuses_guidance(files, tmp_path):
    path = write_released(files["model"], files["tok"], tmp_path / "p0", files["tower"],
                          drop=("diff_head.model.y_embedder.dropout_embedding",),
                          config={"diffusion_class_dropout_prob": 0.0})
    loaded = load_model(str(path))
    assert loaded.config.dit.null_condition is False and loaded.model.diff_head.null_condition(1) is None
    assert not any("dropout_embedding" in k for k in loaded.model.state_dict())
    with Session.open(str(path), load_profile("tiny-cpu"), decoder=str(files["decoder"])) as session:
        with pytest.raises(ConfigError) as err:
            generate_images(session, ["a red circle"], tmp_path / "out", SamplerSettings(steps=2, guidance=3.0))
        msg = str(err.value)
        assert "\n" not in msg and msg.startswith("--guidance 3.0: this model's head has no null condition")
        assert "use --guidance 1" in msg and not list((tmp_path / "out").glob("*.png"))
        result = generate_images(session, ["a red circle"], tmp_path / "out", SamplerSettings(steps=2, guidance=1.0))
        assert result.images[0].png.is_file()
    # strict both ways: dropout 0 with a stored null vector is an unknown key
    stray = write_released(files["model"], files["tok"], tmp_path / "stray", files["tower"],
                           config={"diffusion_class_dropout_prob": 0.0})
    with pytest.raises(CheckpointError, match="unknown keys: diff_head.model.y_embedder.dropout_embedding"):
        load_model(str(stray))


def test_mm_vision_select_layer_reaches_the_encoder(files, tmp_path):
    from scale_rae_core.models.build import tiny_random_encoder_dir

    path = write_released(files["model"], files["tok"], tmp_path / "sel", files["tower"],
                          config={"mm_vision_select_layer": -2})
    with Session.open(str(path), load_profile("tiny-cpu")) as session:
        assert session.loaded.encoder.select_layer == -2
        pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
        tokens = session.encode_image(pixels)
    from transformers import SiglipVisionModel

    full = SiglipVisionModel.from_pretrained(str(tiny_random_encoder_dir()), vision_use_head=False).eval()
    with torch.no_grad():
        states = full(pixel_values=(pixels - 0.5) / 0.5, output_hidden_states=True).hidden_states
    want = F.layer_norm(states[-2], (states[-2].shape[-1],), eps=1e-6)
    torch.testing.assert_close(tokens, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(tokens, F.layer_norm(states[-1], (states[-1].shape[-1],), eps=1e-6), atol=1e-3)
    assert json.loads((path / "config.json").read_text())["mm_vision_select_layer"] == -2
    assert load_model(str(path)).config.encoder["select_layer"] == -2  # recorded in the model config (manifests)
    # the reference's DINO tower reads its last layer whatever the config says: so does srae
    from scale_rae_core.models.adapters import released_config

    hf = json.loads((path / "config.json").read_text())
    _, dino = released_config(hf | {"mm_vision_tower_aux_list": ["facebook/webssl-dino300m-full2b-224-interp256"]})
    assert (dino.kind, dino.select_layer) == ("webssl-dino", -1)
    with pytest.raises(CheckpointError, match="mm_vision_select_layer = 'x' is not an integer"):
        load_model(str(write_released(files["model"], files["tok"], tmp_path / "bad", files["tower"],
                                      config={"mm_vision_select_layer": "x"})))
