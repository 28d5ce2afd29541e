"""Start noise: per-image seeds (default), the released CLI's global generator (--noise reference), a file."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from scale_rae_core.config import load_profile
from scale_rae_core.errors import ConfigError, DataError
from scale_rae_core.flow.sampler import FlowSampler
from scale_rae_core.infer.generate import generate_images
from scale_rae_core.infer.noise import FileNoise, ReferenceNoise, SeedNoise, start_noise
from scale_rae_core.infer.outputs import load_latent
from scale_rae_core.infer.pipeline import SamplerSettings, Session
from tests.infer.helpers import GRID, C, build_tiny, write_export

PROMPTS = ["a red circle", "a blue square"]
SHAPE = (C, GRID, GRID)


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("noise")
    model, tok = build_tiny(tmp)
    return Session.open(str(write_export(model, tok, tmp / "export")), load_profile("tiny-cpu"))


@pytest.fixture
def start_noises(monkeypatch):
    """The start noise of every sampler call, in call order."""
    seen: list[torch.Tensor] = []
    original = FlowSampler.sample

    def spy(self, model, noise, cond, **kwargs):
        seen.append(noise.detach().clone())
        return original(self, model, noise, cond, **kwargs)

    monkeypatch.setattr(FlowSampler, "sample", spy)
    return seen


def _run(session, out, noise, *, batch_size, n=2, seed=7, steps=2, sampler="euler"):
    return generate_images(session, PROMPTS, out, SamplerSettings(steps=steps, method=sampler), seed=seed, n=n,
                           batch_size=batch_size, decode=False, save_latents=True, noise=noise)


def test_reference_noise_is_one_global_draw_per_image_in_order(session, tmp_path, start_noises):
    result = _run(session, tmp_path / "a", ReferenceNoise(7), batch_size=3)
    torch.manual_seed(7)  # the released CLI: seed once, then torch.randn((1, C, g, g)) on the device per image
    expected = torch.cat([torch.randn(1, *SHAPE) for _ in range(4)])
    assert torch.equal(torch.cat(start_noises), expected)
    assert [len(x) for x in start_noises] == [3, 1]  # batches of the head; the draws do not depend on them
    manifests = [json.loads(r.manifest.read_text()) for r in result.images]
    assert [(m["noise"], m["noise_index"], m["prompt"]) for m in manifests] == [
        ("reference", 0, PROMPTS[0]), ("reference", 1, PROMPTS[0]), ("reference", 2, PROMPTS[1]),
        ("reference", 3, PROMPTS[1])]
    # another batch size makes the same images, up to the float rounding of other batch shapes
    start_noises.clear()
    again = _run(session, tmp_path / "b", ReferenceNoise(7), batch_size=1)
    assert torch.equal(torch.cat(start_noises), expected)
    for a, b in zip(result.images, again.images, strict=True):
        torch.testing.assert_close(load_latent(a.latent, 64, C).tokens, load_latent(b.latent, 64, C).tokens,
                                   atol=1e-5, rtol=1e-5)


def test_reference_noise_feeds_the_sde_steps_from_the_same_generator(session, tmp_path, start_noises):
    _run(session, tmp_path, ReferenceNoise(3), batch_size=4, n=1, sampler="sde", steps=3)
    after = torch.randn(1, *SHAPE)  # the global generator where the run left it
    torch.manual_seed(3)
    draws = [torch.randn(1, *SHAPE) for _ in range(3)]
    assert torch.equal(start_noises[0], torch.cat(draws[:2]))
    assert not torch.equal(after, draws[2])  # the SDE's step noise came from it in between


def test_default_seed_noise_is_per_image_and_says_so(session, tmp_path, start_noises):
    result = _run(session, tmp_path, None, batch_size=4)
    rows = [torch.randn(SHAPE, generator=torch.Generator().manual_seed(s)) for s in (7, 8, 7, 8)]
    assert torch.equal(start_noises[0], torch.stack(rows))
    manifest = json.loads(result.images[0].manifest.read_text())
    assert manifest["noise"] == "seed" and "noise_index" not in manifest


def test_noise_file_rows_go_to_the_images_in_order(session, tmp_path, start_noises):
    noise = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(1))
    path = tmp_path / "noise.safetensors"
    save_file({"noise": noise}, str(path))
    result = _run(session, tmp_path / "out", start_noise("seed", 0, path), batch_size=3)
    assert torch.equal(torch.cat(start_noises), noise)
    assert [json.loads(r.manifest.read_text())["noise_index"] for r in result.images] == [0, 1, 2, 3]
    # the same rows reproduce the same images
    start_noises.clear()
    again = _run(session, tmp_path / "again", FileNoise(path), batch_size=3)
    for a, b in zip(result.images, again.images, strict=True):
        assert torch.equal(load_latent(a.latent, 64, C).tokens, load_latent(b.latent, 64, C).tokens)


def test_noise_file_and_mode_errors_are_one_line(session, tmp_path):
    wrong = tmp_path / "wrong.safetensors"
    save_file({"noise": torch.zeros(3, *SHAPE)}, str(wrong))
    with pytest.raises(DataError) as err:
        _run(session, tmp_path / "out", FileNoise(wrong), batch_size=2)
    assert str(err.value) == (
        f"--noise-file {wrong}: holds a (3, {C}, {GRID}, {GRID}) tensor but this run makes 4 image(s) of "
        f"({C}, {GRID}, {GRID}) noise; write one (4, {C}, {GRID}, {GRID}) float tensor (image k of the run takes row k)")
    assert not list((tmp_path / "out").glob("*.json"))
    two = tmp_path / "two.safetensors"
    save_file({"a": torch.zeros(1, *SHAPE), "b": torch.zeros(1, *SHAPE)}, str(two))
    with pytest.raises(DataError, match="holds 2 tensors and none is named 'noise'"):
        FileNoise(two)
    ints = tmp_path / "ints.safetensors"
    save_file({"noise": torch.zeros(1, *SHAPE, dtype=torch.int32)}, str(ints))
    with pytest.raises(DataError, match="must be floating point"):
        FileNoise(ints)
    nan = tmp_path / "nan.safetensors"
    save_file({"x": torch.full((1, *SHAPE), float("nan"))}, str(nan))
    with pytest.raises(DataError, match="holds NaN or inf"):
        FileNoise(nan)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(DataError, match="not a readable safetensors file"):
        FileNoise(junk)
    with pytest.raises(DataError, match="not found"):
        FileNoise(tmp_path / "missing.safetensors")
    with pytest.raises(ConfigError, match="--noise 'bogus' is unknown; choose one of seed, reference"):
        start_noise("bogus", 0)
    with pytest.raises(ConfigError, match="--noise reference and --noise-file both name the start noise"):
        start_noise("reference", 0, wrong)
    assert isinstance(start_noise("seed", 0), SeedNoise) and isinstance(start_noise("reference", 1), ReferenceNoise)


def test_cli_noise_options(session, tmp_path):
    import typer
    from typer.testing import CliRunner

    from scale_rae_cli import generate, understand
    from scale_rae_cli.main import _SraeGroup

    app = typer.Typer(cls=_SraeGroup)
    app.command("generate")(generate.generate)
    app.command("understand")(understand.understand)
    common = ["--model", str(session.loaded.source.path), "--steps", "2", "--profile", "tiny-cpu", "-q",
              "--skip-decoder", "--save-latent"]
    res = CliRunner().invoke(app, ["generate", "a red circle", "--noise", "reference", "--seed", "9",
                                   "--out", str(tmp_path / "r"), *common])
    assert res.exit_code == 0, res.output
    [manifest] = [json.loads(p.read_text()) for p in (tmp_path / "r").glob("*.json")]
    assert (manifest["noise"], manifest["noise_index"], manifest["seed"]) == ("reference", 0, 9)
    res = CliRunner().invoke(app, ["generate", "x", "--noise-file", str(tmp_path / "none.safetensors"),
                                   "--out", str(tmp_path / "f"), *common])
    assert res.exit_code == 1 and res.output.strip().splitlines() == [
        f"error: --noise-file {tmp_path / 'none.safetensors'}: not found; pass a .safetensors file holding one "
        "(K, C, g, g) tensor"]
