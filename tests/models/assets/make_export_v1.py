"""Writes ``export-v1/``: a tiny Scale-RAE export in the on-disk format of srae before the model I/O layer.

The folder in this directory was written by this script at commit 51d3b18 (``save_export`` of that commit:
``model.safetensors`` with metadata ``{"format": "pt"}``, ``config.json`` format ``srae-scale-rae`` version 1, the
tokenizer files, ``latent_stats.safetensors``). ``tests/models/test_io.py`` loads it and compares every tensor
with the file, so exports written by older code keep loading bit for bit. Re-running the script with newer code
writes the newer format; keep the committed folder as it is.

    python tests/models/assets/make_export_v1.py tests/models/assets/export-v1
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch


def main(out: Path) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from scale_rae_core.models.dit import DiTConfig
    from scale_rae_core.models.llm import UnifiedLMConfig, add_image_tokens
    from scale_rae_core.models.presets import LLM_PRESETS
    from scale_rae_core.models.scale_rae import ScaleRAE, ScaleRAEConfig, save_export
    from scale_rae_core.models.stats import LatentStats
    from scale_rae_core.shapes.vocab import tiny_tokenizer

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tok = tiny_tokenizer(Path(tmp) / "tok")
        sizes = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=1, tie_word_embeddings=True, vocab_size=len(tok))
        llm = Qwen2ForCausalLM(Qwen2Config(**{**LLM_PRESETS["tiny"], **sizes}))
        add_image_tokens(tok, llm)
        dit = DiTConfig(in_channels=8, grid=2, hidden=16, depth=1, heads=2, cond_dim=16)
        cfg = ScaleRAEConfig(llm=llm.config.to_dict(), lm=UnifiedLMConfig(8, 4, 16), dit=dit, shift_base_dim=4096,
                             encoder={"kind": "siglip", "path": "tiny-random", "input_size": 16, "hidden_size": 8,
                                      "num_tokens": 4})
        model = ScaleRAE(cfg, llm=llm)
        with torch.no_grad():
            for p in model.parameters():
                if p.abs().sum() == 0:
                    p.normal_(0, 0.05)
        stats = Path(tmp) / "stats.safetensors"
        LatentStats(mean=torch.randn(4, 8), var=torch.rand(4, 8) + 0.5, count=7).save(stats)
        save_export(model, tok, out, stats)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
