"""Peak memory of loading the released 1.5B + 2.4B architecture and one generate step, per weights dtype.

The model is Scale-RAE-Qwen1.5B_DiT2.4B's architecture (Qwen2.5-1.5B with the 151,667-row vocabulary of the released
tokenizer, the 2.4B LightningDiT head over 256 × 1152 SigLIP-2 latents) with random weights, written once in the
released layout (cambrian_qwen config.json, ~0.5 GB safetensors shards + index, bf16, a tiny tokenizer with the
image tokens): built on the meta device, materialised on the CPU directly in bf16 and filled tensor by tensor, so
the writer never holds a float32 copy either.

Each dtype is then measured in a fresh process: ``load_model`` (the one materialise-and-load path: meta -> cast ->
allocate in the dtype -> strict load, shard by shard) + one generate step (greedy text to ``<im_start>``, forced
after 2 tokens, then one Euler step of the head over the 256 latent tokens). The figure is the process's peak
resident set (``ru_maxrss``), against the bytes of the loaded weights. bf16 runs first; float32 (15.6 GB of weights)
runs after it, alone, and only when the machine has the memory free (else the row says so).

    python benchmarks/bench_memory.py [--work /tmp/srae-bench-memory] [--threads 2] [--dtypes bf16,fp32]

Bar: bf16 peak RSS <= 1.2 × the bf16 weight bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

SHARD_BYTES = 512 * 2**20
VOCAB = 151_667  # len(tokenizer) of the released models: Qwen2.5's 151,665 + <im_start>, <im_end>
TOWER = "google/siglip2-so400m-patch14-224-interp256"


def released_architecture():  # -> ScaleRAEConfig
    from scale_rae_core.models.dit import DIT_PRESETS
    from scale_rae_core.models.llm import UnifiedLMConfig
    from scale_rae_core.models.presets import llm_config
    from scale_rae_core.models.scale_rae import ScaleRAEConfig

    dit = DIT_PRESETS["2.4B"]
    lm = UnifiedLMConfig(encoder_channels=dit.in_channels, num_image_tokens=dit.num_tokens, z_channels=dit.cond_dim)
    encoder = {"kind": "siglip2", "path": "google/siglip2-so400m-patch14-224", "input_size": None,
               "hidden_size": dit.in_channels, "num_tokens": dit.num_tokens}
    return ScaleRAEConfig(llm=llm_config("qwen2.5-1.5b", vocab_size=VOCAB).to_dict(), lm=lm, dit=dit, encoder=encoder)


def write_model(folder: Path) -> None:
    """The random model in the released layout, written in bf16 without a float32 copy."""
    import torch
    from safetensors.torch import save_file

    from scale_rae_core.models.adapters import srae_to_released_key, to_released_config
    from scale_rae_core.models.io import cast_weights
    from scale_rae_core.models.scale_rae import ScaleRAE
    from scale_rae_core.shapes.vocab import tiny_tokenizer

    cfg = released_architecture()
    with torch.device("meta"):
        model = ScaleRAE(cfg)
    cast_weights(model, torch.bfloat16)
    model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, t in model.state_dict().items():  # random, small; norms at 1; fixed tables recomputed
            if "norm" in name:
                t.fill_(1.0)
            else:
                t.normal_(0.0, 0.02, generator=gen)
    model.lm.llm.tie_weights()
    model.diff_head.reset_fixed_buffers()
    state = {srae_to_released_key(k): v for k, v in model.state_dict().items()}
    if cfg.llm.get("tie_word_embeddings"):
        state.pop("lm_head.weight")
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[list[str]] = [[]]
    size = 0
    for key in sorted(state):
        nbytes = state[key].numel() * state[key].element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    weight_map = {}
    for i, keys in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: state[k].contiguous() for k in keys}, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(to_released_config(cfg, TOWER)))
    tok = tiny_tokenizer(folder / "tok")
    tok.add_tokens(["<im_start>", "<im_end>"], special_tokens=True)
    tok.save_pretrained(str(folder))


def measure(folder: Path, dtype: str) -> dict:
    """Load + one generate step in this process; returns the figures (peak RSS read at the end)."""
    import torch

    from scale_rae_core.config import load_profile
    from scale_rae_core.infer.generate import decode_to_image_start
    from scale_rae_core.infer.pipeline import SamplerSettings, Session

    start = time.perf_counter()
    session = Session.open(str(folder), load_profile("tiny-cpu"), dtype=dtype)
    load_s = time.perf_counter() - start
    model = session.model
    weight_bytes = sum({t.data_ptr(): t.numel() * t.element_size()
                        for t in [*model.parameters(), *model.buffers()]}.values())  # a tied tensor once
    start = time.perf_counter()
    with torch.inference_mode():
        _, cond = decode_to_image_start(session, ["Can you generate a photo of a cat?"], max_new_tokens=2)
        text_s = time.perf_counter() - start
        latents = session.sample(cond, [0], SamplerSettings(steps=1))
    step_s = time.perf_counter() - start
    assert bool(torch.isfinite(latents).all())
    session.close()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {"dtype": dtype, "weight_bytes": weight_bytes, "peak_rss": peak, "load_s": load_s, "text_s": text_s,
            "step_s": step_s}


def available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def run_child(args: list[str], threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stdout[-2000:]}{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/srae-bench-memory"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtypes", default="bf16,fp32", help="measured in this order, each in its own process")
    ap.add_argument("--child", choices=["write", "measure"], help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="bf16", help=argparse.SUPPRESS)
    args = ap.parse_args()
    folder = args.work / "model"
    if args.child == "write":
        write_model(folder)
        print(json.dumps({"written": str(folder)}))
        return
    if args.child == "measure":
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(measure(folder, args.dtype)))
        return

    if not (folder / "config.json").is_file():
        t0 = time.perf_counter()
        run_child(["--child", "write", "--work", str(args.work)], args.threads)
        print(f"wrote the random model to {folder} in {time.perf_counter() - t0:.0f} s", flush=True)
    rows = []
    for dtype in args.dtypes.split(","):
        need = {"bf16": 2, "fp16": 2, "fp32": 4}[dtype] * 3.93e9 * 1.15
        if available_bytes() < need:
            rows.append({"dtype": dtype, "skipped": f"needs ~{need / 2**30:.1f} GiB free, "
                                                   f"{available_bytes() / 2**30:.1f} GiB available"})
            continue
        rows.append(run_child(["--child", "measure", "--work", str(args.work), "--dtype", dtype, "--threads",
                               str(args.threads)], args.threads))
        print(json.dumps(rows[-1]), flush=True)
    gib = 2**30
    print("\n| weights dtype | weight bytes (GiB) | peak RSS, load + 1 generate step (GiB) | peak / weights | load (s) | step (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        if "skipped" in r:
            print(f"| {r['dtype']} | – | skipped: {r['skipped']} | – | – | – |")
            continue
        print(f"| {r['dtype']} | {r['weight_bytes'] / gib:.2f} | {r['peak_rss'] / gib:.2f} | "
              f"{r['peak_rss'] / r['weight_bytes']:.3f} | {r['load_s']:.1f} | {r['step_s']:.1f} |")


if __name__ == "__main__":
    main()
