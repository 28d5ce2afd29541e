"""The GPU suite: one short run that measures training and generation speed against this GPU's own peaks.

On a CUDA machine (≤ 8 minutes on one H100/H200-class GPU), with random weights in the released shapes:

* the machine: the bf16 matmul rate (an 8192³ GEMM) and the memory bandwidth (a 4 GiB device copy), measured here —
  every MFU and floor below is against these, not a datasheet;
* stage 1: Qwen2.5-1.5B + the 2.4B DiT head, seq 512, micro-batch 16 (gpu-1's), one answer image per sample, bf16
  mixed precision with FSDP2 over a one-GPU mesh (as ``CpuCudaBackend.shard_model`` applies it), AdamW, gradient
  checkpointing off and on: step time, tokens/s, MFU (model FLOPs 6·N per token + attention, no recompute);
* the ViT-XL pixel decoder at 224 px (256 tokens × 1152 → 14-px patches), bf16 autocast, batch 64, L1 loss + AdamW:
  images/s and MFU;
* generation, 1.5B + 2.4B + decoder XL: time-to-image (greedy text to ``<im_start>`` after 32 tokens, 50 Euler steps
  with CFG w = 3, pixels) for 1 and 8 prompts, srae's path (bf16 weights, KV cache, batched, [cond; null] in one
  forward) against a reference-like loop (fp32 weights, no KV cache, one image at a time, the released grid with the
  doubled guidance batch; batch 8 = 8 × its batch-1 time) and against two floors: the weight-bandwidth floor (every
  forward reads all the weights it uses once: bytes / bandwidth) and the FLOP floor (2·N per token / peak).

Goals on a GPU: stage-1 MFU ≥ 40 %, time-to-image ≤ 2 × the weight-bandwidth floor.

``--tiny`` runs the same code with tiny presets on the CPU (seconds; the tests run it so the script cannot rot):
its numbers only show that every row is computed.

    python benchmarks/bench_gpu.py            # on a CUDA machine
    python benchmarks/bench_gpu.py --tiny     # anywhere
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class Sizes:
    device: str
    llm: str  # LLM preset
    dit: str  # DiT preset
    decoder: str  # decoder preset
    vocab: int
    seq: int  # stage-1 sequence length
    batch: int  # stage-1 micro-batch
    decoder_batch: int
    patch: int  # decoder patch (pixels per token side)
    gemm: int  # the peak-rate GEMM side
    copy_bytes: int  # the bandwidth copy
    tokens: int  # generated text tokens before <im_start>
    steps: int  # sampler steps
    guidance: float
    repeats: int  # timed repeats (after one warm-up)


REAL = Sizes("cuda", "qwen2.5-1.5b", "2.4B", "XL", 151_667, 512, 16, 64, 14, 8192, 4 * 2**30, 32, 50, 3.0, 3)
TINY = Sizes("cpu", "tiny", "tiny", "tiny", 1024, 96, 2, 2, 2, 256, 2**24, 3, 3, 3.0, 1)
PROMPTS = ["Can you generate a photo of a red fox in the snow?", "Can you generate a small blue square on the left?",
           "Can you generate a lighthouse at dusk?", "Can you generate two yellow stars?",
           "Can you generate a bowl of ramen?", "Can you generate a green triangle at the top?",
           "Can you generate a cat on a windowsill?", "Can you generate a city skyline at night?"]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str, repeats: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` calls, after one warm-up call."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


# ----------------------------------------------------------------------------------------------------------
# the machine


def peak_matmul(s: Sizes) -> float:
    """FLOP/s of a bf16 (CPU: fp32) square GEMM."""
    dtype = torch.bfloat16 if s.device == "cuda" else torch.float32
    a = torch.randn(s.gemm, s.gemm, device=s.device, dtype=dtype)
    b = torch.randn(s.gemm, s.gemm, device=s.device, dtype=dtype)
    seconds = timed(lambda: a @ b, s.device, max(3, s.repeats))
    return 2 * s.gemm**3 / seconds


def bandwidth(s: Sizes) -> float:
    """Bytes/s of a device-to-device copy (read + write counted)."""
    src = torch.empty(s.copy_bytes // 2, dtype=torch.bfloat16, device=s.device).fill_(1)
    dst = torch.empty_like(src)
    seconds = timed(lambda: dst.copy_(src), s.device, max(3, s.repeats))
    return 2 * s.copy_bytes / seconds


# ----------------------------------------------------------------------------------------------------------
# models with random weights


def scale_rae_config(s: Sizes):  # -> ScaleRAEConfig
    from dataclasses import replace

    from scale_rae_core.models.dit import DIT_PRESETS
    from scale_rae_core.models.llm import UnifiedLMConfig
    from scale_rae_core.models.presets import llm_config
    from scale_rae_core.models.scale_rae import ScaleRAEConfig

    dit = DIT_PRESETS[s.dit] if s.dit != "tiny" else replace(DIT_PRESETS["tiny"], grid=8)
    lm = UnifiedLMConfig(encoder_channels=dit.in_channels, num_image_tokens=dit.num_tokens, z_channels=dit.cond_dim)
    return ScaleRAEConfig(llm=llm_config(s.llm, vocab_size=s.vocab).to_dict(), lm=lm, dit=dit)


def random_model(module_fn: Callable[[], torch.nn.Module], device: str, dtype: torch.dtype) -> torch.nn.Module:
    """Built on meta, allocated once on ``device`` in ``dtype`` (float32 islands kept), filled N(0, 0.02)."""
    from scale_rae_core.models.io import cast_weights

    with torch.device("meta"):
        model = module_fn()
    cast_weights(model, dtype)
    model.to_empty(device=device)
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            if not t.is_floating_point():
                continue
            if "norm" in name:  # LayerNorm / RMSNorm: identity
                t.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                t.normal_(0.0, 0.02)
    if hasattr(model, "diff_head"):
        model.lm.llm.tie_weights()
        model.diff_head.reset_fixed_buffers()
        llm = model.lm.llm
        llm.model.rotary_emb = type(llm.model.rotary_emb)(llm.config).to(device)
    elif hasattr(model, "pos_embed"):
        from scale_rae_core.models.decoder import sincos_pos_embed_2d

        model.pos_embed.copy_(sincos_pos_embed_2d(model.cfg.hidden_size, model.cfg.grid)[None].to(device))
    return model


def decoder_config(s: Sizes, channels: int, grid: int):  # -> DecoderConfig
    from scale_rae_core.models.decoder import DecoderConfig

    return DecoderConfig.from_preset(s.decoder, latent_dim=channels, num_patches=grid * grid, patch_size=s.patch)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def weight_bytes(model: torch.nn.Module) -> int:
    return sum({t.data_ptr(): t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]}.values())


# ----------------------------------------------------------------------------------------------------------
# training


def one_process_group(device: str) -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=0, world_size=1)


def fsdp2(model: torch.nn.Module, blocks: tuple[type, ...], device: str, checkpointing: bool) -> torch.nn.Module:
    """CpuCudaBackend.shard_model's order on a one-device mesh: checkpointing → FSDP2 per block → root."""
    from torch.distributed._composable import checkpoint as checkpoint_activations
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    one_process_group(device)
    mesh = init_device_mesh(device, (1,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if device == "cuda" else MixedPrecisionPolicy()
    for block in [m for m in model.modules() if isinstance(m, blocks)]:
        if checkpointing:
            checkpoint_activations(block)
        fully_shard(block, mesh=mesh, mp_policy=mp)
    return fully_shard(model, mesh=mesh, mp_policy=mp)


def stage1_batch(s: Sizes, cfg, device: str) -> dict[str, torch.Tensor]:
    """micro-batch × seq tokens, one answer image (N latent positions) per sample, all positions supervised text."""
    g = torch.Generator().manual_seed(0)
    B, L, N, C = s.batch, s.seq, cfg.lm.num_image_tokens, cfg.lm.encoder_channels
    ids = torch.randint(0, s.vocab, (B, L), generator=g)
    start = min(16, L - N - 1)
    positions = torch.arange(start, start + N).expand(B, 1, N)
    labels = ids.clone()
    labels[:, start:start + N] = -100
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones(B, L, dtype=torch.long),
             "image_positions": positions.contiguous(), "image_valid": torch.ones(B, 1, dtype=torch.bool),
             "answer_image_mask": torch.ones(B, 1, dtype=torch.bool), "image_features": torch.randn(B, 1, N, C, generator=g)}
    return {k: v.to(device) for k, v in batch.items()}


def transformer_flops(params: int, tokens: int, layers: int, width: int, context: int) -> float:
    """Training FLOPs: 6·N per token plus attention 12·layers·width·context per token (no recompute)."""
    return tokens * (6 * params + 12 * layers * width * context)


def stage1(s: Sizes, peak: float, checkpointing: bool) -> dict[str, float]:
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

    from scale_rae_core.models.dit import DiTBlock
    from scale_rae_core.models.scale_rae import ScaleRAE

    cfg = scale_rae_config(s)
    model = random_model(lambda: ScaleRAE(cfg), s.device, torch.float32).train()
    llm_params, dit_params = n_params(model.lm), n_params(model.diff_head)
    model = fsdp2(model, (Qwen2DecoderLayer, DiTBlock), s.device, checkpointing)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=s.device == "cuda")
    batch = stage1_batch(s, cfg, s.device)

    def step() -> None:
        loss = model(batch).total
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    try:
        seconds = timed(step, s.device, s.repeats)
    except torch.OutOfMemoryError:
        return {"seconds": math.nan, "tokens_per_s": math.nan, "mfu": math.nan}
    llm = cfg.llm
    flops = transformer_flops(llm_params, s.batch * s.seq, llm["num_hidden_layers"], llm["hidden_size"], s.seq)
    flops += transformer_flops(dit_params, s.batch * cfg.dit.num_tokens, cfg.dit.depth, cfg.dit.hidden, cfg.dit.num_tokens)
    return {"seconds": seconds, "tokens_per_s": s.batch * s.seq / seconds, "mfu": flops / seconds / peak}


def decoder_training(s: Sizes, peak: float) -> dict[str, float]:
    from scale_rae_core.models.decoder import Decoder

    cfg = scale_rae_config(s)
    dcfg = decoder_config(s, cfg.lm.encoder_channels, cfg.dit.grid)
    decoder = random_model(lambda: Decoder(dcfg), s.device, torch.float32).train()
    opt = torch.optim.AdamW(decoder.parameters(), lr=1e-4, fused=s.device == "cuda")
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(s.decoder_batch, dcfg.num_patches, dcfg.latent_dim, generator=g).to(s.device)
    target = torch.rand(s.decoder_batch, 3, dcfg.image_size, dcfg.image_size, generator=g).to(s.device)
    autocast = torch.autocast(s.device, dtype=torch.bfloat16, enabled=s.device == "cuda")

    def step() -> None:
        with autocast:
            loss = (decoder(latents).float() - target).abs().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    seconds = timed(step, s.device, s.repeats)
    tokens = dcfg.num_patches + 1
    flops = transformer_flops(n_params(decoder), s.decoder_batch * tokens, dcfg.num_layers, dcfg.hidden_size, tokens)
    return {"seconds": seconds, "images_per_s": s.decoder_batch / seconds, "mfu": flops / seconds / peak}


# ----------------------------------------------------------------------------------------------------------
# generation


def generation_models(s: Sizes, dtype: torch.dtype, tokenizer_dir: Path):  # -> Session
    from scale_rae_core.config import EncoderSettings, load_profile
    from scale_rae_core.infer.loading import LoadedModel, Source
    from scale_rae_core.infer.pipeline import Runtime, Session
    from scale_rae_core.models.decoder import Decoder
    from scale_rae_core.models.scale_rae import ScaleRAE
    from scale_rae_core.shapes.vocab import tiny_tokenizer

    cfg = scale_rae_config(s)
    model = random_model(lambda: ScaleRAE(cfg), s.device, dtype).eval()
    decoder = random_model(lambda: Decoder(decoder_config(s, cfg.lm.encoder_channels, cfg.dit.grid)), s.device, dtype)
    name = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
    source = Source("random", tokenizer_dir, None, "random")
    loaded = LoadedModel(model, tiny_tokenizer(tokenizer_dir), cfg, EncoderSettings(), source, "random")
    return Session(loaded, Runtime(torch.device(s.device), name), load_profile("tiny-cpu"), _decoder=(decoder.eval(), source))


def srae_images(session: Any, s: Sizes, prompts: list[str]) -> torch.Tensor:
    from scale_rae_core.infer.generate import decode_to_image_start
    from scale_rae_core.infer.pipeline import SamplerSettings

    _, cond = decode_to_image_start(session, prompts, s.tokens)
    latents = session.sample(cond, list(range(len(prompts))), SamplerSettings(steps=s.steps, guidance=s.guidance))
    return session.decode_pixels(latents)


@torch.inference_mode()
def reference_like_image(session: Any, s: Sizes, prompt: str) -> torch.Tensor:
    """One image the released code's way: no KV cache, batch 1, the released grid, CFG doubling the batch."""
    from scale_rae_core.flow.grids import reference_schedule
    from scale_rae_core.infer.pipeline import decode_pixels
    from scale_rae_core.models.dit import grid_to_tokens
    from scale_rae_core.models.llm import build_sample

    model, tok, device = session.model, session.tokenizer, session.runtime.device
    lm, N = model.lm, model.cfg.lm.num_image_tokens
    ids = build_sample([{"from": "human", "value": prompt}], tok, N, 4096, add_generation_prompt=True).input_ids
    embeds = lm.embed_text(torch.tensor([ids], device=device))
    for _ in range(s.tokens):  # the whole sequence again for every token
        hidden = lm.llm.model(inputs_embeds=embeds, use_cache=False).last_hidden_state
        token = lm.llm.lm_head(hidden[:, -1]).argmax(-1)
        embeds = torch.cat([embeds, lm.embed_text(token[:, None])], 1)
    embeds = torch.cat([embeds, lm.latent_queries[None]], 1)
    cond = lm.conditions(lm.llm.model(inputs_embeds=embeds, use_cache=False).last_hidden_state[:, -N:])
    dit = model.diff_head
    x = torch.randn(1, dit.cfg.in_channels, dit.cfg.grid, dit.cfg.grid, device=device)
    null = dit.null_condition(1)
    for tc, tn in zip(*(t.tolist() for t in reference_schedule(s.steps, model.flow.shift)), strict=True):
        t = torch.full((2,), tc, device=device)
        v = dit(torch.cat([x, x]), t, torch.cat([cond, null])).chunk(2)[0]  # the guided half is never used
        x = x + (tn - tc) * v.float()
    return decode_pixels(session.decoder()[0], grid_to_tokens(x), session.runtime)


def generation_floors(session: Any, s: Sizes, prompts: list[str], bandwidth_bps: float, peak: float) -> tuple[float, float]:
    """(weight-bandwidth floor, FLOP floor) in seconds for srae's path on ``prompts``."""
    model, decoder = session.model, session.decoder()[0]
    b, N, rows = len(prompts), model.cfg.lm.num_image_tokens, 2 * len(prompts)  # CFG: [cond; null] rows
    prompt_tokens = max(len(session.tokenizer(p)["input_ids"]) for p in prompts) + 20  # + the chat template
    llm_bytes, dit_bytes, dec_bytes = weight_bytes(model.lm), weight_bytes(model.diff_head), weight_bytes(decoder)
    forwards = 1 + s.tokens + 1  # prefill, one per text token, the latent queries
    bytes_read = forwards * llm_bytes + s.steps * dit_bytes + dec_bytes
    flops = 2 * n_params(model.lm) * b * (prompt_tokens + s.tokens + N)
    flops += 2 * n_params(model.diff_head) * rows * N * s.steps + 2 * n_params(decoder) * b * (N + 1)
    return bytes_read / bandwidth_bps, flops / peak


def srae_generation(s: Sizes, bandwidth_bps: float, peak: float, work: Path) -> list[tuple[str, dict[str, float]]]:
    session = generation_models(s, torch.bfloat16, work / "tok")  # bf16 weights on the CPU too (--tiny)
    rows = []
    for b in (1, 8):
        prompts = PROMPTS[:b]
        seconds = timed(lambda prompts=prompts: srae_images(session, s, prompts), s.device, s.repeats)
        bw, fl = generation_floors(session, s, prompts, bandwidth_bps, peak)
        rows.append((f"generate, batch {b}: srae (bf16 weights, KV cache, batched CFG)",
                     {"seconds": seconds, "images_per_s": b / seconds, "bw_floor": bw, "flop_floor": fl}))
    return rows


def reference_like_generation(s: Sizes, work: Path) -> list[tuple[str, dict[str, float]]]:
    session = generation_models(s, torch.float32, work / "tok")
    one = timed(lambda: reference_like_image(session, s, PROMPTS[0]), s.device, max(1, s.repeats - 2))
    return [(f"generate, batch {b}: reference-like loop (fp32, no KV cache, {b} × batch 1)",
             {"seconds": b * one, "images_per_s": 1 / one, "bw_floor": math.nan, "flop_floor": math.nan}) for b in (1, 8)]


def free_device_memory(device: str) -> None:
    """Models of the previous measurement are gone (their function returned): give their memory back."""
    import gc

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------
# the table


def fmt(x: float, digits: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}g}"


def table(machine: dict[str, float], train: list[tuple[str, dict]], gen: list[tuple[str, dict]]) -> str:
    lines = ["| machine | value |", "|---|---:|",
             f"| bf16 matmul peak, measured (TFLOP/s) | {fmt(machine['peak'] / 1e12)} |",
             f"| memory bandwidth, measured (GB/s) | {fmt(machine['bandwidth'] / 1e9)} |", "",
             "| training | s/step | throughput | MFU |", "|---|---:|---:|---:|"]
    for name, r in train:
        rate = f"{fmt(r['tokens_per_s'])} tokens/s" if "tokens_per_s" in r else f"{fmt(r['images_per_s'])} img/s"
        lines.append(f"| {name} | {fmt(r['seconds'])} | {rate} | {fmt(r['mfu'])} |")
    lines += ["", "| generation | time-to-image (s) | img/s | weight-bandwidth floor (s) | FLOP floor (s) | × bandwidth floor |",
              "|---|---:|---:|---:|---:|---:|"]
    for name, r in gen:
        ratio = r["seconds"] / r["bw_floor"] if not math.isnan(r["bw_floor"]) else math.nan
        lines.append(f"| {name} | {fmt(r['seconds'])} | {fmt(r['images_per_s'])} | {fmt(r['bw_floor'])} | "
                     f"{fmt(r['flop_floor'])} | {fmt(ratio)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny presets on the CPU (seconds): checks every row runs")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (--tiny)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    s = TINY if args.tiny else REAL
    if s.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_gpu: no CUDA device here; run with --tiny to check the script on the CPU")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start = time.perf_counter()
    machine = {"peak": peak_matmul(s), "bandwidth": bandwidth(s)}
    train = []
    for checkpointing in (False, True):
        name = f"stage 1, {s.llm} + DiT {s.dit}, seq {s.seq}, batch {s.batch}, FSDP2, checkpointing {'on' if checkpointing else 'off'}"
        train.append((name, stage1(s, machine["peak"], checkpointing)))
        free_device_memory(s.device)
    train.append((f"decoder {s.decoder}, {s.patch * scale_rae_config(s).dit.grid} px, batch {s.decoder_batch}",
                  decoder_training(s, machine["peak"])))
    free_device_memory(s.device)
    with tempfile.TemporaryDirectory() as work:
        gen = srae_generation(s, machine["bandwidth"], machine["peak"], Path(work))
        free_device_memory(s.device)
        gen += reference_like_generation(s, Path(work))
    device = torch.cuda.get_device_name() if s.device == "cuda" else "CPU (--tiny)"
    print(f"bench_gpu on {device}, torch {torch.__version__}, {time.perf_counter() - start:.0f} s\n")
    print(table(machine, train, gen))


if __name__ == "__main__":
    main()
