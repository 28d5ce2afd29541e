"""Inference: batched KV-cache decoding, seeds, guidance, samplers, files, released layout, latents, CLI."""

from __future__ import annotations

import json

import pytest
import torch

from scale_rae_core.config import load_profile
from scale_rae_core.errors import CheckpointError, ConfigError, DataError
from scale_rae_core.flow.grids import reference_schedule
from scale_rae_core.infer.generate import decode_to_image_start, generate_images
from scale_rae_core.infer.loading import load_model
from scale_rae_core.infer.outputs import load_latent
from scale_rae_core.infer.pipeline import SamplerSettings, Session
from scale_rae_core.infer.understand import decode_latent_file, latent_answer, understand_image
from tests.infer.helpers import C, N, build_tiny, write_decoder, write_export, write_released

PROMPTS = ["draw a red circle", "a small blue square on the left of a big green triangle"]
FAST = SamplerSettings(steps=3)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from scale_rae_core.models.tiny_encoder import tiny_random_encoder_dir

    tmp = tmp_path_factory.mktemp("infer")
    model, tok = build_tiny(tmp)
    export = write_export(model, tok, tmp / "export")
    released = write_released(model, tok, tmp / "released", str(tiny_random_encoder_dir()) + "-interp64")
    decoder = write_decoder(tmp / "decoder")
    return {"model": model, "tok": tok, "export": export, "released": released, "decoder": decoder, "tmp": tmp}


@pytest.fixture(scope="module")
def session(files):
    return Session.open(str(files["export"]), load_profile("tiny-cpu"), decoder=str(files["decoder"]))


def _full_forward_conditions(session, prompt, generated):
    """No cache, no padding: the whole sequence [prompt, generated text, latent queries] in one forward."""
    from scale_rae_core.models.llm import build_sample

    lm, tok = session.model.lm, session.tokenizer
    ids = build_sample([{"from": "human", "value": prompt}], tok, N, 4096, add_generation_prompt=True).input_ids
    embeds = torch.cat([lm.embed_text(torch.tensor([ids + generated])), lm.latent_queries[None]], 1)
    hidden = lm.llm.model(inputs_embeds=embeds, use_cache=False).last_hidden_state
    return lm.conditions(hidden[:, -N:])[0]


def test_batched_left_padded_kv_decoding_matches_a_full_forward(session):
    texts, cond = decode_to_image_start(session, PROMPTS, max_new_tokens=5)
    assert cond.shape == (2, N, session.model.cfg.lm.z_channels)
    for r, t in enumerate(texts):
        assert t.generated_ids[-1] == session.tokenizer.convert_tokens_to_ids("<im_start>")
        assert len(t.generated_ids) <= 6 and "<|im_start|>user\n" + PROMPTS[r] in t.request
        with torch.no_grad():
            ref = _full_forward_conditions(session, PROMPTS[r], t.generated_ids)
        torch.testing.assert_close(cond[r], ref, atol=2e-5, rtol=1e-4)
    alone, cond1 = decode_to_image_start(session, PROMPTS[1:], max_new_tokens=5)
    assert alone[0].generated_ids == texts[1].generated_ids
    torch.testing.assert_close(cond1[0], cond[1], atol=2e-5, rtol=1e-4)
    forced, _ = decode_to_image_start(session, PROMPTS[:1], max_new_tokens=0)
    assert forced[0].forced and len(forced[0].generated_ids) == 1


def test_a_row_that_opens_its_image_early_waits_on_masked_positions(files, session):
    """Make row 1 choose <im_start> as its first token (its first logits get a large <im_start> bonus) while row 0
    keeps decoding: row 1 then stops at once (not forced), and both must match an unpadded, uncached forward."""
    other = Session(load_model(str(files["export"])), session.runtime, session.profile)
    im_start = other.tokenizer.convert_tokens_to_ids("<im_start>")
    head = other.model.lm.llm.lm_head
    calls = []

    def open_row_1_at_once(module, args, logits):
        calls.append(1)
        if len(calls) == 1:  # the logits after the prompt, one row per prompt
            logits = logits.clone()
            logits[1, im_start] += 1e4
            logits[0, im_start] -= 1e4
        else:  # row 0 keeps writing text until it is forced
            logits = logits.clone()
            logits[0, im_start] -= 1e4
        return logits

    handle = head.register_forward_hook(open_row_1_at_once)
    try:
        texts, cond = decode_to_image_start(other, PROMPTS, max_new_tokens=5)
    finally:
        handle.remove()
    assert texts[1].generated_ids == [im_start] and not texts[1].forced
    assert len(texts[0].generated_ids) == 6 and texts[0].forced
    for r in range(2):
        with torch.no_grad():
            ref = _full_forward_conditions(other, PROMPTS[r], texts[r].generated_ids)
        torch.testing.assert_close(cond[r], ref, atol=2e-5, rtol=1e-4)


def _pixels(png):
    import numpy as np
    from PIL import Image

    return torch.from_numpy(np.asarray(Image.open(png).convert("RGB")).astype("int16"))


def test_same_seed_same_image_and_names_never_collide(session, tmp_path):
    a = generate_images(session, PROMPTS, tmp_path / "a", FAST, seed=7, n=2, batch_size=3, save_latents=True)
    b = generate_images(session, PROMPTS[1:], tmp_path / "b", FAST, seed=8, n=1, batch_size=1)
    assert len(a.images) == 4 and [r.seed for r in a.images] == [7, 8, 7, 8]
    same = next(r for r in a.images if r.prompt == PROMPTS[1] and r.seed == 8)
    # batch- and neighbour-independent up to float rounding (other batch shapes take other CPU kernels)
    assert _pixels(same.png).sub(_pixels(b.images[0].png)).abs().max() <= 1
    assert a.images[0].png.read_bytes() != a.images[1].png.read_bytes()
    again = generate_images(session, PROMPTS[:1], tmp_path / "a", FAST, seed=7, n=1)
    assert again.images[0].png.read_bytes() == a.images[0].png.read_bytes()
    names = sorted(p.name for p in (tmp_path / "a").glob("*.png"))
    assert len(names) == 5 and names[0].startswith("00000-draw-a-red-circle-s7") and names[-1].startswith("00004-")
    m = json.loads(a.images[0].manifest.read_text())
    for key in ("prompt", "seed", "steps", "guidance", "sampler", "srae_version", "timings_s", "output_text"):
        assert key in m
    assert m["model"]["revision"].startswith("sha256:") and m["decoder"]["revision"].startswith("sha256:")
    assert m["image_size"] == [64, 64] and m["latent_shape"] == [N, C]
    lat = load_latent(a.images[0].latent, N, C)
    assert lat.tokens.shape == (1, N, C) and lat.metadata["encoder_kind"] == "siglip"


def test_guidance_is_one_batched_forward_and_changes_the_result(session, monkeypatch):
    dit = session.model.diff_head
    rows: list[int] = []
    original = type(dit).forward
    monkeypatch.setattr(type(dit), "forward", lambda self, x, t, y, *a, **k: (rows.append(x.shape[0]), original(self, x, t, y, *a, **k))[1])
    cond = torch.randn(3, N, session.model.cfg.lm.z_channels)
    plain = session.sample(cond, [1, 2, 3], SamplerSettings(steps=4))
    assert rows == [3] * 4
    rows.clear()
    guided = session.sample(cond, [1, 2, 3], SamplerSettings(steps=4, guidance=3.0))
    assert rows == [6] * 4 and (guided - plain).abs().max() > 1e-3
    rows.clear()
    outside = session.sample(cond, [1, 2, 3], SamplerSettings(steps=4, guidance=3.0, interval=(0.0, 0.0)))
    torch.testing.assert_close(outside, plain)  # the interval excludes every step: conditional velocity only


def test_reference_sampler_uses_the_released_grid(session, monkeypatch):
    dit = session.model.diff_head
    times: list[float] = []
    original = type(dit).forward
    monkeypatch.setattr(type(dit), "forward", lambda self, x, t, y, *a, **k: (times.append(float(t[0])), original(self, x, t, y, *a, **k))[1])
    session.sample(torch.randn(1, N, session.model.cfg.lm.z_channels), [0], SamplerSettings(steps=50, method="reference"))
    t_cur, _ = reference_schedule(50, session.model.flow.shift)
    assert len(times) == 49
    torch.testing.assert_close(torch.tensor(times, dtype=torch.float64), t_cur, atol=1e-6, rtol=0)
    with pytest.raises(ConfigError, match="--sampler"):
        SamplerSettings(method="ddim")


def test_released_layout_loads_every_key_and_generates_the_same_image(files, session, tmp_path):
    released = load_model(str(files["released"]))
    assert released.layout == "released" and released.encoder.kind == "siglip2"
    ours = files["model"].state_dict()
    for k, v in released.model.state_dict().items():
        torch.testing.assert_close(v, ours[k], msg=k)
    rsession = Session(released, session.runtime, session.profile, decoder_spec=str(files["decoder"]))
    a = generate_images(rsession, PROMPTS[:1], tmp_path / "r", FAST, seed=3)
    b = generate_images(session, PROMPTS[:1], tmp_path / "e", FAST, seed=3)
    assert a.images[0].png.read_bytes() == b.images[0].png.read_bytes()
    # released configs keep rope_theta at the top level (transformers 4.37): it must reach the LLM
    cfg_path = files["released"] / "config.json"
    hf = json.loads(cfg_path.read_text())
    assert "rope_theta" in hf and "rope_parameters" not in hf
    other = tmp_path / "theta"
    other.mkdir()
    for f in files["released"].iterdir():
        (other / f.name).symlink_to(f)
    (other / "config.json").unlink()
    (other / "config.json").write_text(json.dumps(hf | {"rope_theta": 123456.0}))
    assert load_model(str(other)).model.lm.llm.config.rope_parameters["rope_theta"] == 123456.0
    # strictness: an unknown key, a missing key
    extra = write_released(files["model"], files["tok"], tmp_path / "extra", "google/siglip2-so400m-patch14-224",
                           extra={"model.vision_sampler.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="unknown keys.*vision_sampler"):
        load_model(str(extra))
    missing = write_released(files["model"], files["tok"], tmp_path / "missing", "google/siglip2-so400m-patch14-224",
                             drop=("diff_head.model.final_layer.linear.weight",))
    with pytest.raises(CheckpointError, match="missing keys.*final_layer"):
        load_model(str(missing))


def test_offline_missing_repo_fails_in_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(CheckpointError) as err:
        load_model("nobody/no-such-model@v1")
    msg = str(err.value)
    assert "\n" not in msg and "`hf download nobody/no-such-model --revision v1`" in msg
    with pytest.raises(CheckpointError, match="not a Hugging Face repo id"):
        load_model(str(tmp_path / "nope" / "deeper"))


def test_understand_and_latent_actions(session, tmp_path):
    gen = generate_images(session, PROMPTS[:1], tmp_path, FAST, seed=5, save_latents=True)
    rec = gen.images[0]
    ans = understand_image(session, rec.png, "What colour is the shape?", tmp_path, FAST, max_new_tokens=4)
    m = json.loads(ans.manifest.read_text())
    assert m["mode"] == "understand" and m["output_text"] == ans.text and m["question"].startswith("What")
    # a reference-style bare tensor (256·n, C) and our file give the same answer
    ref_pt = tmp_path / "ref.pt"
    torch.save(load_latent(rec.latent, N, C).tokens.reshape(N, C).clone(), ref_pt)
    qa_ours = latent_answer(session, rec.latent, "Is it red?", "qa", tmp_path, FAST, max_new_tokens=4)
    qa_ref = latent_answer(session, ref_pt, "Is it red?", "qa", tmp_path, FAST, max_new_tokens=4)
    assert qa_ours.text == qa_ref.text
    cont = json.loads(latent_answer(session, rec.latent, "Now a blue one.", "continue", tmp_path, FAST, max_new_tokens=4).manifest.read_text())
    assert cont["history"][0]["value"] == PROMPTS[0] and cont["mode"] == "latent-continue"
    assert json.loads(latent_answer(session, ref_pt, "x", "continue", tmp_path, FAST, max_new_tokens=2).manifest.read_text())["history"] is None
    # decode: the same pixels as generate wrote, from either file
    for src in (rec.latent, ref_pt):
        (png,) = decode_latent_file(src, tmp_path / "dec", str(session.decoder_spec), session.profile)
        assert png.read_bytes() == rec.png.read_bytes()


def test_latent_and_option_errors_are_one_line(session, tmp_path):
    bad = tmp_path / "bad.pt"
    torch.save(torch.zeros(N, C + 1), bad)
    with pytest.raises(DataError, match="channels"):
        load_latent(bad, N, C)
    torch.save({"not": "a tensor"}, bad)
    with pytest.raises(DataError, match="not a tensor|weights-only"):
        load_latent(bad, N, C)
    torch.save(torch.zeros(N + 3, C), bad)
    with pytest.raises(DataError, match="is not"):
        load_latent(bad, N, C)
    with pytest.raises(ConfigError, match="--dtype 'int8' is unknown; use fp32, bf16, fp16"):
        Session.open(str(tmp_path), load_profile("tiny-cpu"), dtype="int8")
    with pytest.raises(ConfigError, match="--skip-decoder"):
        generate_images(session, PROMPTS, tmp_path, FAST, decode=False, save_latents=False)
    with pytest.raises(ConfigError, match="guidance-interval"):
        SamplerSettings(interval=(0.9, 0.1))


def test_cli_commands(files, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from scale_rae_cli.main import app

    run = CliRunner().invoke
    common = ["--decoder", str(files["decoder"]), "--steps", "2", "--out", str(tmp_path), "--profile", "tiny-cpu"]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "a red circle"}) + "\n")
    monkeypatch.setenv("SRAE_MODEL_PATH", str(files["export"]))
    res = run(app, ["generate", "a blue square", "--prompts-file", str(prompts), "--seed", "4", "--save-latent",
                    "--guidance", "2", "--guidance-interval", "0.2,0.8", "--sampler", "heun", "-q", *common])
    assert res.exit_code == 0, res.output
    pngs = sorted(tmp_path.glob("*.png"))
    assert [p.name for p in pngs] == ["00000-a-blue-square-s4.png", "00001-a-red-circle-s4.png"]
    latent_file = pngs[0].with_suffix(".safetensors")
    for args in (["understand", str(pngs[0]), "What is it?", "--max-new-tokens", "3"],
                 ["latent", "qa", str(latent_file), "What is it?", "--max-new-tokens", "3"],
                 ["latent", "continue", str(latent_file), "And now?", "--max-new-tokens", "3"],
                 ["latent", "decode", str(latent_file)]):
        res = run(app, [*args, *common] if args[1] != "decode" else [*args, "--decoder", str(files["decoder"]), "--out", str(tmp_path)])
        assert res.exit_code == 0, (args, res.output)
    monkeypatch.delenv("SRAE_MODEL_PATH")
    monkeypatch.setattr("scale_rae_core.infer.loading.BUNDLED_MODEL", tmp_path / "no-bundle")
    res = run(app, ["generate", "x", *common])
    assert res.exit_code == 1 and res.output.strip().splitlines() == [
        "error: --model is required: pass a model directory or hub repo id (e.g. nyu-visionx/Scale-RAE-Qwen1.5B_DiT2.4B), "
        "or set SRAE_MODEL_PATH"
    ]
    for cmd in (["generate"], ["understand"], ["latent", "decode"], ["latent", "qa"], ["latent", "continue"]):
        assert "Example" in run(app, [*cmd, "--help"]).output


def test_a_model_folder_carries_its_decoder_and_the_bundle_is_the_default_model(files, tmp_path, monkeypatch):
    from safetensors import safe_open
    from typer.testing import CliRunner

    from scale_rae_cli.main import app
    from scale_rae_core.infer.bundle import bundle_model

    about = {"command": "srae demo --retrain", "bench": {"gen_colour_shape_first": 0.5}}
    bundle = bundle_model(files["export"], files["decoder"], tmp_path / "bundle", half=True, about=about)
    assert json.loads((bundle / "ABOUT.json").read_text()) == about
    for weights in (bundle / "model.safetensors", bundle / "llm" / "model.safetensors"):
        with safe_open(str(weights), framework="pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}  # half the size on disk
    session = Session.open(str(bundle), load_profile("tiny-cpu"))  # no decoder given: the folder's decoder/
    decoder, source = session.decoder()
    assert source.path == bundle / "decoder"
    fp32 = files["model"].state_dict()
    for name, value in session.model.state_dict().items():  # loads back to fp32, within fp16 rounding
        assert value.dtype == fp32[name].dtype
        assert torch.allclose(value, fp32[name], rtol=1e-3, atol=1e-4), name

    monkeypatch.setattr("scale_rae_core.infer.loading.BUNDLED_MODEL", bundle)
    monkeypatch.delenv("SRAE_MODEL_PATH", raising=False)
    res = CliRunner().invoke(app, ["generate", "a red circle", "--steps", "2", "--out", str(tmp_path / "out"), "-q"])
    assert res.exit_code == 0, res.output
    assert f"no --model: using the bundled shapes demo model ({bundle})" in res.output
    assert [p.name for p in (tmp_path / "out").glob("*.png")] == ["00000-a-red-circle-s0.png"]

    with pytest.raises(CheckpointError, match="not an srae export"):
        bundle_model(files["decoder"], files["decoder"], tmp_path / "x")
    with pytest.raises(CheckpointError, match="not a decoder directory"):
        bundle_model(files["export"], tmp_path, tmp_path / "x")
    assert not (tmp_path / "x").exists() and (bundle / "decoder" / "config.json").is_file()


def _pixels_as_training_reads(path, tok, input_size):
    """The image through the training data path: a reference JSONL line -> reader -> ``prepare``."""
    from scale_rae_core.data.jsonl import JsonlDataset
    from scale_rae_core.train.unified_data import prepare

    line = {"image": path.name, "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                                  {"from": "gpt", "value": "a shape"}]}
    jsonl = path.with_suffix(".jsonl")
    jsonl.write_text(json.dumps(line) + "\n")
    return prepare(JsonlDataset(jsonl)[0], tok, N, 4096, input_size).pixels


def test_understand_reads_an_image_exactly_as_training_does(session, tmp_path):
    import numpy as np
    from PIL import Image

    from scale_rae_core.infer.understand import image_pixels

    rng = np.random.default_rng(0)
    rgba = Image.fromarray(rng.integers(0, 256, (90, 150, 4), dtype=np.uint8), mode="RGBA")  # non-square, alpha
    path = tmp_path / "photo.png"
    rgba.save(path)
    size = session.encoder().input_size
    ours = image_pixels(session, path)  # (1, 3, S, S)
    assert ours.shape == (1, 3, size, size)
    assert torch.equal(ours[0], _pixels_as_training_reads(path, session.tokenizer, size))
    # the encoder's own resize (bicubic without antialiasing, what `understand` fed it before) differs
    raw = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)[None].float() / 255
    unaliased = torch.nn.functional.interpolate(raw, size=(size, size), mode="bicubic", align_corners=False)
    assert (unaliased - ours).abs().max() > 0.05
    # 16-bit grey: a gradient, not the white Pillow's convert("RGB") makes of it
    deep = tmp_path / "deep.png"
    Image.fromarray(np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (64, 1))).save(deep)
    assert image_pixels(session, deep).mean().item() == pytest.approx(0.5, abs=0.02)


def test_understand_refuses_a_bomb_and_a_fifo_in_one_line(files, tmp_path, monkeypatch):
    import os
    import struct
    import zlib

    from typer.testing import CliRunner

    from scale_rae_cli.main import app

    data = bytearray(_png_bytes())
    data[16:24] = struct.pack(">II", 100_000, 100_000)  # the header claims 10^10 pixels
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(bytes(data))
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    monkeypatch.setenv("SRAE_MODEL_PATH", str(files["export"]))
    for path, reason in ((bomb, "decompression bomb: more than"), (fifo, "not a regular file")):
        res = CliRunner().invoke(app, ["understand", str(path), "What is it?", "--decoder", str(files["decoder"]),
                                       "--out", str(tmp_path / "out"), "--profile", "tiny-cpu"])
        lines = res.output.strip().splitlines()
        assert res.exit_code == 1 and len(lines) == 1 and lines[0].startswith(f"error: image {path}: {reason}"), res.output


def _png_bytes() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


def test_a_session_owns_its_backend_and_closes_it(files, tmp_path, monkeypatch):
    import scale_rae_core.backends as backends

    closed: list[str] = []
    real = backends.get_backend

    def spied(settings):
        backend = real(settings)
        monkeypatch.setattr(backend, "close", lambda: closed.append("closed"))
        return backend

    monkeypatch.setattr(backends, "get_backend", spied)
    with Session.open(str(files["export"]), load_profile("tiny-cpu"), decoder=str(files["decoder"])) as session:
        assert session.backend is not None and closed == []
    assert closed == ["closed"] and session.backend is None
    session.close()  # a second close is a no-op
    assert closed == ["closed"]
    with pytest.raises(CheckpointError):  # a model that fails to load does not leak the backend
        Session.open(str(tmp_path / "no-model" / "here"), load_profile("tiny-cpu"))
    assert closed == ["closed", "closed"]


def test_latent_decode_finds_the_decoder_of_the_model_that_made_the_latent(files, session, tmp_path):
    from scale_rae_core.infer.bundle import bundle_model

    profile = load_profile("tiny-cpu")
    bundle = bundle_model(files["export"], files["decoder"], tmp_path / "bundle")
    with Session.open(str(bundle), profile) as own:  # the folder's decoder/, no --decoder anywhere
        rec = generate_images(own, PROMPTS[:1], tmp_path / "gen", FAST, seed=3, save_latents=True).images[0]
    (png,) = decode_latent_file(rec.latent, tmp_path / "dec", None, profile)
    assert png.read_bytes() == rec.png.read_bytes()
    assert json.loads(png.with_suffix(".json").read_text())["decoder"]["path"] == str(bundle / "decoder")
    # a latent whose model carries no decoder/ (and no other decoder is known) fails in one line naming the model
    plain = generate_images(session, PROMPTS[:1], tmp_path / "plain", FAST, save_latents=True).images[0]
    with pytest.raises(ConfigError, match=rf"no decoder known \(its model {files['export']} carries no decoder/\); pass --decoder"):
        decode_latent_file(plain.latent, tmp_path / "dec", None, profile)


@pytest.mark.parametrize("kwargs, message", [
    ({"guidance": float("nan")}, "--guidance nan must be a number from 0 to 1000"),
    ({"guidance": float("inf")}, "--guidance inf must be a number"),
    ({"guidance": 1e30}, "--guidance 1e+30 must be a number"),
    ({"interval": (float("nan"), 0.5)}, "--guidance-interval"),
    ({"interval": (0.1, float("inf"))}, "--guidance-interval"),
    ({"steps": 0}, "--steps 0: the euler sampler takes 1 to 10000 steps"),
    ({"steps": 1, "method": "reference"}, "--steps 1: the reference sampler takes 2 to"),
    ({"steps": 2**40}, "--steps 1099511627776"),
])
def test_sampler_settings_refuse_non_finite_and_out_of_range_numbers(kwargs, message):
    with pytest.raises(ConfigError) as err:
        SamplerSettings(**kwargs)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    assert SamplerSettings(steps=1).steps == 1  # one euler step is fine


def test_non_finite_latents_and_manifests_are_refused_and_nothing_is_written(files, tmp_path):
    from scale_rae_core.infer.outputs import write_manifest

    broken = Session.open(str(files["export"]), load_profile("tiny-cpu"), decoder=str(files["decoder"]))
    with torch.no_grad():
        next(broken.model.diff_head.parameters()).fill_(float("nan"))  # a model whose head went NaN
    with pytest.raises(ConfigError, match="the flow head produced NaN or infinite latents"):
        generate_images(broken, PROMPTS[:1], tmp_path / "out", FAST)
    assert not list((tmp_path / "out").glob("*.png"))
    with pytest.raises(DataError, match=r"m\.json: guidance is not a finite number"):
        write_manifest(tmp_path / "m.json", {"guidance": float("nan")})
    assert not (tmp_path / "m.json").exists()
    with pytest.raises(ConfigError, match="64-bit range"):
        generate_images(broken, PROMPTS[:1], tmp_path / "out", FAST, seed=2**63 - 1, n=2)
