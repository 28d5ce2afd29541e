"""The export layout (version 2): the LLM is a standard Qwen2 folder in ``llm/`` that transformers loads with no
missing key, the export itself makes transformers raise instead of building a default model, srae loads both
versions, and no tensor is stored twice."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

from scale_rae_core.errors import CheckpointError
from scale_rae_core.models.scale_rae import (
    LLM_DIR,
    NOT_TRANSFORMERS,
    export_tokenizer_dir,
    load_export,
    read_export_config,
    save_export,
)

EXPORT_V1 = Path(__file__).parent / "assets" / "export-v1"


@pytest.fixture(scope="module")
def v1():
    return load_export(EXPORT_V1)


@pytest.fixture(scope="module")
def v2(v1, tmp_path_factory):
    out = tmp_path_factory.mktemp("layout") / "export"
    return save_export(v1.model, v1.tokenizer, out, EXPORT_V1 / "latent_stats.safetensors")


def _keys(file: Path) -> set[str]:
    with safe_open(str(file), framework="pt") as f:
        return set(f.keys())


def test_the_llm_is_a_qwen2_folder_that_transformers_loads_with_no_missing_key(v1, v2):
    llm_dir = v2 / LLM_DIR
    assert json.loads((llm_dir / "config.json").read_text())["model_type"] == "qwen2"
    model, info = transformers.AutoModelForCausalLM.from_pretrained(str(llm_dir), output_loading_info=True)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert (info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"]) == (set(), set(), set())
    tok = transformers.AutoTokenizer.from_pretrained(str(llm_dir))
    assert len(tok) == len(v1.tokenizer) and tok.convert_tokens_to_ids("<im_start>") == v1.tokenizer.convert_tokens_to_ids("<im_start>")
    ids = torch.tensor([tok("<|im_start|>user\ndraw a red circle<|im_end|>").input_ids])
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids).logits, v1.model.lm.llm(ids).logits, rtol=0, atol=0)


def test_no_tensor_is_stored_twice_and_srae_loads_both_versions(v1, v2):
    top, llm = _keys(v2 / "model.safetensors"), _keys(v2 / LLM_DIR / "model.safetensors")
    ours = set(v1.model.state_dict()) - {"lm.llm.lm_head.weight"}  # tied to the embeddings
    assert not any(k.startswith("lm.llm.") for k in top)
    assert top | {"lm.llm." + k for k in llm} == ours and not top & {"lm.llm." + k for k in llm}
    assert not list(v2.glob("tokenizer*")) and export_tokenizer_dir(v2) == v2 / LLM_DIR
    again = load_export(v2)
    assert again.config.to_json() | {"llm": None} == v1.config.to_json() | {"llm": None}
    assert again.config.llm["architectures"] == ["Qwen2ForCausalLM"]
    for name, value in v1.model.state_dict().items():
        assert torch.equal(value, again.model.state_dict()[name]), name
    assert torch.equal(again.model.stats.mean, v1.model.stats.mean)


@pytest.mark.parametrize("cls", ["AutoModelForCausalLM", "AutoModel", "Qwen2ForCausalLM"])
def test_transformers_refuses_the_export_itself_instead_of_building_a_default_model(v2, cls, monkeypatch):
    def no_model(self, *args, **kwargs):
        raise AssertionError("transformers started building a model from the export folder")

    monkeypatch.setattr(transformers.PreTrainedModel, "__init__", no_model)
    with pytest.raises(Exception) as info:  # noqa: B017 - transformers' own error types differ per path
        getattr(transformers, cls).from_pretrained(str(v2))
    if cls.startswith("Auto"):
        assert isinstance(info.value, ValueError) and "model type `srae-scale-rae`" in str(info.value)
    else:
        assert NOT_TRANSFORMERS in str(info.value) and "hidden_size" in str(info.value)


def test_a_version_2_export_without_its_llm_fails_in_one_line(v2, tmp_path):
    broken = shutil.copytree(v2, tmp_path / "broken")
    (broken / LLM_DIR / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"llm/model.safetensors: missing; .* re-export the model"):
        load_export(broken)
    shutil.rmtree(broken / LLM_DIR)
    with pytest.raises(CheckpointError, match=r"llm/config.json is missing; .* re-export the model"):
        read_export_config(broken)


def test_an_exports_llm_folder_starts_a_new_model_and_the_export_itself_is_refused(v1, v2, tmp_path):
    from scale_rae_core.config import LLMSettings
    from scale_rae_core.models.scale_rae import build_llm

    llm, tok = build_llm(LLMSettings(path=str(v2 / LLM_DIR)), tmp_path / "tok")
    for name, value in v1.model.lm.llm.state_dict().items():
        assert torch.equal(value, llm.state_dict()[name]), name
    assert len(tok) == len(v1.tokenizer)  # the image tokens are there already; none is added twice
    with pytest.raises(CheckpointError, match=r"is an srae export, not a Qwen2 folder; pass its LLM folder .*/llm"):
        build_llm(LLMSettings(path=str(v2)), tmp_path / "tok2")
