"""The data pipeline end to end on the tiny target: public prompts → answers regenerated through a real
OpenAI-compatible server on loopback → target cache → DataModule batches, and a shard read by plain webdataset."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from specdec.data.cache.builder import TokenizeOptions, build_target_cache
from specdec.data.cache.reader import cache_shard_urls
from specdec.data.datamodules import TargetCacheDataModule
from specdec.data.prompts.importing import iter_conversations
from specdec.data.prompts.sources import iter_training_conversations
from specdec.data.regeneration.openai_client import OpenAIChatBackend
from specdec.data.regeneration.regenerate import SamplingParams, regenerate
from specdec.data.regeneration.serve import serve_in_background
from specdec.targets import TINY_TARGET, load_target

EVAL_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "eval_datasets"
pytestmark = pytest.mark.skipif(not EVAL_DATASETS.is_dir(), reason=f"{EVAL_DATASETS} is not present")
LAYER_IDS = [0, 2, 4]


def prompt_subset(tmp_path: Path) -> Path:
    """Multi-turn MT-Bench and single-turn GSM8K prompts, as a user would pass them."""
    path = tmp_path / "prompts.jsonl"
    with open(path, "w") as out:
        for name, count in (("mt-bench.jsonl", 4), ("gsm8k.jsonl", 6)):
            with open(EVAL_DATASETS / name) as source:
                for _, line in zip(range(count), source, strict=False):
                    out.write(line)
    return path


def test_prompts_to_batches_through_the_loopback_server(tmp_path):
    prompts = prompt_subset(tmp_path)
    inputs = list(iter_conversations(prompts))
    answers = tmp_path / "answers.jsonl"
    sampling = SamplingParams(temperature=0.7, top_p=0.95, top_k=50, max_tokens=40, seed=3)
    target = load_target(TINY_TARGET, device="cpu")
    with serve_in_background(target) as base_url:
        report = regenerate(inputs, answers, OpenAIChatBackend([base_url]), sampling, progress=False)
    assert (report.written, report.failed) == (10, 0)

    regenerated = list(iter_training_conversations(answers))
    assert sorted(c.key for c in regenerated) == sorted(c.key for c in inputs)  # the prompts' own keys
    by_key = {c.key: c for c in regenerated}
    for conversation in inputs:
        users = [m.content for m in conversation.messages if m.role == "user"]
        roles = [m.role for m in by_key[conversation.key].messages]
        assert roles == ["user", "assistant"] * len(users)  # every user turn answered, turn by turn

    cache = tmp_path / "cache"
    build = build_target_cache(
        target, regenerated, cache, LAYER_IDS, TokenizeOptions(max_length=256), samples_per_shard=3, progress=False
    )
    assert build.manifest["totals"]["samples"] + build.tokenize.num_skipped == 10
    assert build.manifest["totals"]["samples"] >= 8

    datamodule = TargetCacheDataModule(str(cache), batch_size=2, target=TINY_TARGET)
    datamodule.setup("fit")
    batches = list(datamodule.train_dataloader())
    assert len(batches) == build.manifest["totals"]["samples"] // 2
    for batch in batches:
        assert batch["target_hidden_states"].shape[-1] == len(LAYER_IDS) * target.geometry.hidden_size
        assert batch["loss_mask"].any(dim=1).all()
        assert not batch["target_last_hidden_states"][~batch["loss_mask"]].any()
        assert set(batch["keys"]) <= set(by_key)

    # a reader written with nothing but webdataset
    shard = cache_shard_urls(cache)[0]
    samples = list(wds.WebDataset(shard, shardshuffle=False))
    assert len(samples) == 3
    for sample in samples:
        meta = json.loads(sample["meta.json"])
        input_ids = np.load(io.BytesIO(sample["input_ids.npy"]))
        loss_mask = np.load(io.BytesIO(sample["loss_mask.npy"]))
        assert meta["key"] in by_key and input_ids.shape == loss_mask.shape == (meta["length"],)
        assert int(loss_mask.sum()) == meta["supervised"] > 0
        text = target.tokenizer.decode(torch.from_numpy(input_ids.astype(np.int64)))
        assert by_key[meta["key"]].messages[0].content[:20] in text
