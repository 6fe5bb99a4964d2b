import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import specdec.targets.weights as weights
from specdec.targets import read_target_head
from tests.helpers import tiny_random_target


def _sharded_checkpoint(directory: Path, tie: bool) -> dict[str, str]:
    model = tiny_random_target("qwen3", tie_word_embeddings=tie)
    model.save_pretrained(directory, max_shard_size="20KB")
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    return index["weight_map"]


def test_sharded_extraction_equals_model_tensors_and_reads_only_them(tmp_path, monkeypatch):
    weight_map = _sharded_checkpoint(tmp_path, tie=False)
    needed = {weight_map["model.embed_tokens.weight"], weight_map["lm_head.weight"]}
    assert len(set(weight_map.values())) > len(needed) + 1, "test needs shards that hold neither tensor"
    # Shards without the two tensors are overwritten with garbage: reading any of them would fail.
    for shard in set(weight_map.values()) - needed:
        (tmp_path / shard).write_bytes(b"not a safetensors file")
    opened, read = [], []

    class RecordingSafeOpen:
        def __init__(self, path, framework):
            opened.append(Path(path).name)
            self.handle = safe_open(path, framework=framework)

        def __enter__(self):
            self.inner = self.handle.__enter__()
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

        def keys(self):
            return self.inner.keys()

        def get_tensor(self, key):
            read.append(key)
            return self.inner.get_tensor(key)

    monkeypatch.setattr(weights, "safe_open", RecordingSafeOpen)

    head = read_target_head(tmp_path)

    reference = tiny_random_target("qwen3")
    torch.testing.assert_close(head.embed_tokens, reference.model.embed_tokens.weight, rtol=0, atol=0)
    torch.testing.assert_close(head.lm_head, reference.lm_head.weight, rtol=0, atol=0)
    assert not head.tied
    assert set(opened) == needed
    assert sorted(read) == ["lm_head.weight", "model.embed_tokens.weight"]


def test_tied_checkpoint_falls_back_to_embedding(tmp_path):
    model = tiny_random_target("llama", tie_word_embeddings=True)
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", framework="pt") as handle:
        assert "lm_head.weight" not in handle.keys()

    head = read_target_head(tmp_path, dtype=torch.bfloat16)

    assert head.tied and head.lm_head is head.embed_tokens
    assert head.embed_tokens.dtype == torch.bfloat16
    torch.testing.assert_close(head.embed_tokens.float(), model.model.embed_tokens.weight.bfloat16().float())


def test_untied_checkpoint_without_lm_head_is_refused(tmp_path):
    model = tiny_random_target("qwen3", tie_word_embeddings=True)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["tie_word_embeddings"] = False
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(KeyError, match=r"no '\*lm_head\.weight' tensor"):
        read_target_head(tmp_path)


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_target_head(tmp_path / "nowhere")


def test_directory_without_weights_is_a_clear_error(tmp_path):
    tiny_random_target("qwen3").config.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no safetensors weights"):
        read_target_head(tmp_path)


def test_multimodal_checkpoints_pick_the_language_model_embedding():
    keys = [
        "model.vision_tower.patch_embedder.embed_tokens.weight",
        "model.embed_vision.embed_tokens.weight",
        "model.language_model.embed_tokens_per_layer.weight",
        "model.language_model.embed_tokens.weight",
    ]
    assert weights._pick_embedding_key(keys, "checkpoint") == "model.language_model.embed_tokens.weight"
    assert weights._pick_lm_head_key(keys) is None
