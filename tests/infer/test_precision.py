"""Half-precision weights (--dtype bf16 | fp16): held in that dtype, float32 where precision needs it, and close to
the float32 model within a tolerance derived from the format's unit roundoff and the guidance weight.

The tolerance. A format with a p-bit significand rounds with relative error at most u = 2^-p (bf16: p = 8,
u = 3.9e-3; fp16: p = 11, u = 4.9e-4). The weights are rounded once (u each) and every layer's output once more,
so one velocity v̂ carries a relative error of a few u (the roundings of a layer are independent, they add up
like a random walk, not linearly; the float32 norms and timestep embedding add nothing). The sampler state stays
float32 and Euler sums the velocities with Σ Δt = 1, so the sample inherits that velocity error, not a multiple of
the step count. Guidance combines two velocities, v = (1 − w)·v_u + w·v_c, so their errors add with weight
|1 − w| + |w| = 2w − 1 (w ≥ 1). Hence ‖x_half − x_fp32‖ / ‖x_fp32‖ ≤ 2·u·(2w − 1); on the tiny model the measured
ratio is 0.36·u at w = 1 and 0.27·u·(2w − 1) at w = 5 for both formats, so the bound has a margin of ≥ 5× and a
wrong dtype path (a float32 island lost, the state rounded to half) breaks it.
"""

from __future__ import annotations

import json

import pytest
import torch

from scale_rae_core.config import load_profile
from scale_rae_core.infer.generate import generate_images
from scale_rae_core.infer.loading import load_model, load_pixel_decoder
from scale_rae_core.infer.pipeline import Runtime, SamplerSettings, Session, sample_latents
from scale_rae_core.models.io import DTYPES
from tests.infer.helpers import ENCODER, N, build_tiny, write_decoder, write_export, write_released

UNIT_ROUNDOFF = {"bf16": 2.0**-8, "fp16": 2.0**-11}


def tolerance(dtype: str, guidance: float) -> float:
    return 2 * UNIT_ROUNDOFF[dtype] * (abs(1 - guidance) + abs(guidance))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from scale_rae_core.models.build import tiny_random_encoder_dir

    tmp = tmp_path_factory.mktemp("precision")
    model, tok = build_tiny(tmp)
    return {
        "export": write_export(model, tok, tmp / "export"),
        "released": write_released(model, tok, tmp / "released", str(tiny_random_encoder_dir()) + "-interp64"),
        "decoder": write_decoder(tmp / "decoder"),
    }


@pytest.fixture(scope="module")
def fp32(files):
    return load_model(str(files["export"]))


def _conditions(z: int) -> torch.Tensor:
    return torch.randn(3, N, z, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("layout", ["export", "released"])
def test_weights_are_held_in_the_dtype_and_fp32_where_stated(files, dtype, layout):
    half = load_model(str(files[layout]), dtype=DTYPES[dtype]).model
    want = DTYPES[dtype]
    kept = ("diff_head.t_embedder.", "diff_head.pos_embed", "diff_head.feat_rope.")
    for name, tensor in [*half.named_parameters(), *half.named_buffers()]:
        if not tensor.is_floating_point():
            continue
        expected = torch.float32 if name.startswith(kept) or ".rotary_emb." in name else want
        assert tensor.dtype == expected, name
    dit = half.diff_head
    assert dit.t_embedder.W.dtype == torch.float32  # the non-persistent Fourier frequencies too
    assert dit.dit_blocks[0].norm1.weight.dtype == want and dit.x_embedder.proj.weight.dtype == want


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_half_samples_match_fp32_within_the_derived_tolerance(files, fp32, dtype, guidance):
    half = load_model(str(files["export"]), dtype=DTYPES[dtype]).model
    cond = _conditions(fp32.model.cfg.lm.z_channels)
    settings = SamplerSettings(steps=10, guidance=guidance)
    seen: list[torch.dtype] = []
    hook = half.diff_head.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    with torch.no_grad():
        try:
            x_half = sample_latents(half, cond.to(DTYPES[dtype]), [0, 1, 2], settings, Runtime(torch.device("cpu"), dtype))
        finally:
            hook.remove()
        x_ref = sample_latents(fp32.model, cond, [0, 1, 2], settings, Runtime(torch.device("cpu"), "fp32"))
    assert x_half.dtype == torch.float32 and seen and set(seen) == {torch.float32}  # the sampler state stays fp32
    rel = float((x_half - x_ref).norm() / x_ref.norm())
    assert 0 < rel <= tolerance(dtype, guidance), (rel, tolerance(dtype, guidance))


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_llm_conditions_and_decoder_match_fp32(files, fp32, dtype):
    """Teacher-forced (no greedy choice can flip): the LLM's conditions and the decoder's pixels stay within the
    same bound at w = 1."""
    half = load_model(str(files["export"]), dtype=DTYPES[dtype]).model
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        def conditions(model):
            lm = model.lm
            embeds = torch.cat([lm.embed_text(ids), lm.latent_queries[None].to(lm.embed_text(ids).dtype)], 1)
            return lm.conditions(lm.llm.model(inputs_embeds=embeds).last_hidden_state[:, -N:]).float()

        a, b = conditions(fp32.model), conditions(half)
        assert float((a - b).norm() / a.norm()) <= tolerance(dtype, 1.0)
        dec32, _ = load_pixel_decoder(str(files["decoder"]), ENCODER)
        dec16, _ = load_pixel_decoder(str(files["decoder"]), ENCODER, dtype=DTYPES[dtype])
        assert dec16.embed.weight.dtype == DTYPES[dtype] and dec16.pos_embed.dtype == torch.float32
        tokens = torch.randn(2, N, dec32.cfg.latent_dim, generator=torch.Generator().manual_seed(1))
        p32, p16 = dec32(tokens), dec16(tokens).float()
        assert float((p32 - p16).norm() / p32.norm()) <= tolerance(dtype, 1.0)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_generate_runs_in_half_on_cpu_and_says_so(files, tmp_path, dtype):
    with Session.open(str(files["released"]), load_profile("tiny-cpu"), dtype=dtype, decoder=str(files["decoder"])) as s:
        assert s.runtime.torch_dtype == DTYPES[dtype]
        result = generate_images(s, ["a red circle"], tmp_path, SamplerSettings(steps=3, guidance=2.0), seed=5)
        assert s.decoder()[0].norm.weight.dtype == DTYPES[dtype]
        assert s.encoder().backbone.embeddings.patch_embedding.weight.dtype == DTYPES[dtype]
        assert s.encoder().mean.dtype == torch.float32
        tokens = s.encode_image(torch.rand(1, 3, 64, 64))
        assert tokens.dtype == torch.float32 and torch.isfinite(tokens).all()
        from scale_rae_core.infer.understand import understand_image

        reply = understand_image(s, result.images[0].png, "What colour is it?", tmp_path / "u", SamplerSettings(steps=2),
                                 max_new_tokens=3)
        assert json.loads(reply.manifest.read_text())["dtype"] == dtype
    manifest = json.loads(result.images[0].manifest.read_text())
    assert manifest["dtype"] == dtype and result.images[0].png.is_file()


def test_the_profile_key_sets_the_default_dtype(files):
    profile = load_profile("tiny-cpu", ["backend.weights_dtype=fp16"])
    assert profile.inference_dtype == "fp16"
    assert load_profile("tiny-cpu", ["backend.precision=bf16"]).inference_dtype == "bf16"  # auto = precision
    with Session.open(str(files["export"]), profile) as s:
        assert s.runtime.dtype == "fp16" and s.model.diff_head.final_layer.linear.weight.dtype == torch.float16
