import math
import shutil

import pytest
import torch

from specdec.targets import TINY_TARGET_PATH, TargetGeometry, choose_runtime, load_target, resolve_target
from tests.helpers import HIDDEN, tiny_random_target


def test_missing_directory_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_target(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_target("./no/such/target")


def test_file_and_non_model_directory_are_refused(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(NotADirectoryError):
        resolve_target(tmp_path / "weights.bin")
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        resolve_target(tmp_path)


def test_hub_ids_resolve_without_network():
    location = resolve_target("Qwen/Qwen3-4B", revision="main")
    assert not location.is_local and location.path == "Qwen/Qwen3-4B" and location.revision == "main"


def test_runtime_on_cpu():
    runtime = choose_runtime(device="cpu")
    assert runtime.dtype == torch.float32 and runtime.attn_implementation == "sdpa"
    assert choose_runtime(device="cpu", dtype="bfloat16", attn_implementation="eager").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="not a torch dtype"):
        choose_runtime(device="cpu", dtype="Tensor")


def test_geometry_of_each_family():
    qwen = TargetGeometry.from_config(tiny_random_target("qwen3").config)
    assert (qwen.hidden_size, qwen.num_hidden_layers, qwen.num_attention_heads, qwen.num_key_value_heads) == (
        HIDDEN,
        4,
        4,
        2,
    )
    assert qwen.head_dim == 8 and qwen.embedding_multiplier == 1.0 and not qwen.tie_word_embeddings
    assert qwen.rope_parameters["rope_theta"] > 0
    llama = TargetGeometry.from_config(tiny_random_target("llama", tie_word_embeddings=True).config)
    assert llama.head_dim == HIDDEN // 4 and llama.tie_word_embeddings
    gemma = TargetGeometry.from_config(tiny_random_target("gemma4").config)
    assert gemma.embedding_multiplier == pytest.approx(math.sqrt(HIDDEN))


def test_load_local_target_is_frozen_and_in_eval_mode(tmp_path):
    tiny_random_target("qwen3").save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY_TARGET_PATH / name, tmp_path / name)

    target = load_target(tmp_path, device="cpu")

    assert not target.model.training
    assert not any(p.requires_grad for p in target.model.parameters())
    assert target.geometry.num_hidden_layers == 4 and target.runtime.dtype == torch.float32
    assert target.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
