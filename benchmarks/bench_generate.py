"""Text-to-image speed: srae's pipeline against a reference-like baseline, on the same model in the same run.

Both paths produce the same text tokens (greedy; ``<im_start>`` forced after ``--tokens`` tokens or at a turn end)
and run the same head and decoder. They differ where the reference's inference does (notes §2.5, §8.1, §8.10):

* srae: KV cache; prompts batched (left padding); the head samples the whole batch at once; CFG rows
  [cond; null] in the same forward and really applied; corrected Euler grid (``--steps`` calls);
* baseline: one image at a time; every text token re-runs the whole sequence (no cache); the released grid
  (``--steps`` − 1 calls); with guidance > 1 the batch is doubled but only the conditional half is used.

Rows: time-to-image (one prompt, batch 1: text + sampler + decoder) and images/s at batch 4 (4 prompts), with
and without guidance, fp32 on CPU with a tiny random model. On a CUDA machine the released sizes (Qwen2.5-1.5B
shapes + the 2.4B DiT, random weights, 256 × 1152 latents, bf16 autocast) are timed too.

    python benchmarks/bench_generate.py [--threads 2] [--steps 50] [--tokens 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

PROMPTS = [
    "Can you generate a red circle on a plain background?",
    "Can you generate a small blue square on the left?",
    "Can you generate a big green triangle at the top?",
    "Can you generate two yellow stars in the center?",
]


def build_session(tmp: Path, size: str, device: str) -> Any:
    """A random ScaleRAE + decoder (built in memory, tokenizer files in `tmp`) as an inference Session."""
    import torch

    from scale_rae_core.config import DiTSettings, EncoderSettings, LLMSettings, load_profile
    from scale_rae_core.infer.loading import LoadedModel, Source
    from scale_rae_core.infer.pipeline import Runtime, Session
    from scale_rae_core.models.decoder import Decoder, DecoderConfig
    from scale_rae_core.models.io import cast_weights
    from scale_rae_core.models.scale_rae import ScaleRAE, build_llm, scale_rae_config

    torch.manual_seed(0)
    if size == "tiny":
        llm, tok = build_llm(LLMSettings(path="", preset="tiny"), tmp / "tok")
        enc, C, grid, dit = EncoderSettings(kind="siglip", path="tiny-random", input_size=64), 192, 8, "tiny"
        dec = DecoderConfig.from_preset("tiny", latent_dim=C, num_patches=grid * grid, patch_size=8)
    else:  # the released shapes, random weights, tiny tokenizer (timing only)
        from transformers import Qwen2ForCausalLM

        from scale_rae_core.models.presets import llm_config
        from scale_rae_core.shapes.vocab import tiny_tokenizer

        tok = tiny_tokenizer(tmp / "tok")
        llm = Qwen2ForCausalLM(llm_config("qwen2.5-1.5b", vocab_size=len(tok)))
        enc, C, grid, dit = EncoderSettings(kind="siglip2"), 1152, 16, "2.4B"
        dec = DecoderConfig.from_preset("XL", latent_dim=C, num_patches=grid * grid, patch_size=14)
    cfg = scale_rae_config(llm, DiTSettings(preset=dit), enc, C, grid)
    model = ScaleRAE(cfg, llm=llm)
    with torch.no_grad():
        for p in model.diff_head.parameters():  # non-zero head outputs and null condition
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    runtime = Runtime(torch.device(device), "bf16" if device == "cuda" else "fp32")
    source = Source("random", tmp, None, "random")
    # the weights are held in the runtime's dtype (inference runs no autocast)
    loaded = LoadedModel(cast_weights(model.to(runtime.device), runtime.torch_dtype).eval(), tok, cfg, enc, source, "srae-export")
    decoder = cast_weights(Decoder(dec).to(runtime.device), runtime.torch_dtype).eval()
    return Session(loaded, runtime, load_profile("tiny-cpu"), _decoder=(decoder, source))


# ------------------------------------------------------------------------------------------------------
# the two pipelines (no file writing: PNG encoding is the same for both)


def srae_images(session: Any, prompts: list[str], tokens: int, steps: int, guidance: float) -> tuple[Any, list[list[int]]]:
    from scale_rae_core.infer.generate import decode_to_image_start
    from scale_rae_core.infer.pipeline import SamplerSettings

    texts, cond = decode_to_image_start(session, prompts, tokens)
    latents = session.sample(cond, list(range(len(prompts))), SamplerSettings(steps=steps, guidance=guidance))
    return session.decode_pixels(latents), [t.generated_ids for t in texts]


def baseline_image(session: Any, prompt: str, tokens: int, steps: int, guidance: float) -> tuple[Any, list[int]]:
    """One image the reference's way: no KV cache, batch 1, fp32, guidance doubling the batch without effect."""
    import torch

    from scale_rae_core.flow.grids import reference_schedule
    from scale_rae_core.models.dit import grid_to_tokens
    from scale_rae_core.models.llm import build_sample, image_token_ids, stop_token_ids

    model, tok, device = session.model, session.tokenizer, session.runtime.device
    lm, N = model.lm, model.cfg.lm.num_image_tokens
    im_start, stops = image_token_ids(tok).im_start, stop_token_ids(tok)
    with torch.inference_mode():
        ids = build_sample([{"from": "human", "value": prompt}], tok, N, 4096, add_generation_prompt=True).input_ids
        embeds = lm.embed_text(torch.tensor([ids], device=device))
        generated: list[int] = []
        for step in range(tokens + 1):  # full re-forward of the whole sequence for every token
            hidden = lm.llm.model(inputs_embeds=embeds, use_cache=False).last_hidden_state
            token = int(lm.llm.lm_head(hidden[:, -1]).argmax(-1))
            if token != im_start and (token in stops or step == tokens):
                token = im_start
            generated.append(token)
            embeds = torch.cat([embeds, lm.embed_text(torch.tensor([[token]], device=device))], 1)
            if token == im_start:
                break
        embeds = torch.cat([embeds, lm.latent_queries[None]], 1)
        hidden = lm.llm.model(inputs_embeds=embeds, use_cache=False).last_hidden_state
        cond = lm.conditions(hidden[:, -N:])  # (1, N, Z)
        dit = model.diff_head
        x = torch.randn(1, dit.cfg.in_channels, dit.cfg.grid, dit.cfg.grid, generator=torch.Generator().manual_seed(0)).to(device)
        t_cur, t_next = reference_schedule(steps, model.flow.shift)
        for tc, tn in zip(t_cur.tolist(), t_next.tolist(), strict=True):
            t = torch.full((1,), tc, device=device)
            if guidance > 1:  # the doubled batch of the released code; its guided combination is never used
                v = dit(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, dit.null_condition(1)])).chunk(2)[0]
            else:
                v = dit(x, t, cond)
            x = x + (tn - tc) * v
        latents = model.denormalize_latents(grid_to_tokens(x))
    return session.decode_pixels(latents), generated


def timed(fn: Any, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_size(size: str, device: str, args: argparse.Namespace) -> list[tuple[str, ...]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        session = build_session(Path(tmp), size, device)
        # sanity: both paths decode the same tokens
        _, ours = srae_images(session, PROMPTS[:1], args.tokens, 2, 1.0)
        _, theirs = baseline_image(session, PROMPTS[0], args.tokens, 2, 1.0)
        assert ours[0] == theirs, (ours[0], theirs)
        for guidance in (1.0, 3.0):
            for batch in (1, 4):
                prompts = PROMPTS[:batch]
                t_ours = timed(lambda: srae_images(session, prompts, args.tokens, args.steps, guidance), args.repeats)  # noqa: B023
                t_base = timed(lambda: [baseline_image(session, p, args.tokens, args.steps, guidance) for p in prompts], args.repeats)  # noqa: B023
                label = "time-to-image (s)" if batch == 1 else "images/s"
                ours_v = t_ours if batch == 1 else batch / t_ours
                base_v = t_base if batch == 1 else batch / t_base
                speedup = t_base / t_ours
                rows.append((size, device, f"{guidance:g}", str(batch), label, f"{base_v:.3f}", f"{ours_v:.3f}", f"{speedup:.2f}x"))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--tokens", type=int, default=32, help="text tokens before <im_start> is forced")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    header = ("model", "device", "guidance", "batch", "metric", "reference-like", "srae", "speed-up")
    rows = run_size("tiny", "cpu", args)
    note = ""
    if torch.cuda.is_available():
        rows += run_size("1.5B+2.4B", "cuda", args)
    else:
        note = "1.5B+2.4B on GPU: skipped: no CUDA"
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print(f"steps={args.steps}, text tokens={args.tokens}, threads={args.threads}, median of {args.repeats}")
    for r in [header, tuple("-" * w for w in widths), *rows]:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")
    if note:
        print(note)


if __name__ == "__main__":
    main()
