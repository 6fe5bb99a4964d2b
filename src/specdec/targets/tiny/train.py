"""Train the tiny embedded target from scratch on the standard library corpus.

Reproducible from a seed: the corpus, the tokenizer, the window order and the initialisation all derive
from it. ``python -m specdec.targets.tiny.train --output_dir DIR`` writes an HF model directory with a
model card; an interrupted run resumes from ``DIR/resume.pt``.
"""

from __future__ import annotations

import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from specdec.targets.tiny.corpus import Document, build_corpus
from specdec.targets.tiny.tokenizer import END_OF_TEXT, IM_END, train_tokenizer


@dataclass
class TinyTargetRecipe:
    """Every choice that determines the trained tiny target."""

    seed: int = 0
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 768
    num_hidden_layers: int = 6
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 64
    max_position_embeddings: int = 4096
    seq_len: int = 512
    batch_size: int = 8
    steps: int = 1800
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    bf16_autocast: bool = True  # fp32 master weights; bf16 matmuls where the CPU supports them
    save_every: int = 200


def render(document: Document, tokenizer: PreTrainedTokenizerFast) -> list[int]:
    """Token ids of one document as the model will see it, terminated by <|endoftext|>."""
    if document.is_conversation:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": document.prompt}],
            tokenize=False,
            add_generation_prompt=True,
            enable_thinking=False,
        )
        text = f"{prompt}{document.text}{IM_END}\n{END_OF_TEXT}"
    else:
        text = f"{document.text}{END_OF_TEXT}"
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenizer_training_text(document: Document) -> str:
    """Text the BPE learns from: conversations as rendered, so role names become single tokens."""
    if document.is_conversation:
        return f"user\n{document.prompt}\nassistant\n{document.text}\n"
    return document.text


def token_windows(documents: list[Document], tokenizer: PreTrainedTokenizerFast, seq_len: int) -> torch.Tensor:
    """Concatenate documents and cut the stream into [N, seq_len + 1] windows (last partial one dropped)."""
    stream = [token for document in documents for token in render(document, tokenizer)]
    count = (len(stream) - 1) // seq_len
    ids = torch.tensor(stream[: count * seq_len + 1], dtype=torch.long)
    return ids.unfold(0, seq_len + 1, seq_len)


def batch_indices(step: int, batch_size: int, num_windows: int, seed: int) -> torch.Tensor:
    """Window indices of ``step``: epochs of seeded permutations, so any step is recomputable on resume."""
    start = step * batch_size
    indices = []
    for position in range(start, start + batch_size):
        epoch, offset = divmod(position, num_windows)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        indices.append(int(torch.randperm(num_windows, generator=generator)[offset]))
    return torch.tensor(indices)


def learning_rate(step: int, recipe: TinyTargetRecipe) -> float:
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return recipe.lr * (recipe.min_lr_ratio + (1 - recipe.min_lr_ratio) * cosine)


def model_config(recipe: TinyTargetRecipe, tokenizer: PreTrainedTokenizerFast) -> Qwen3Config:
    return Qwen3Config(
        vocab_size=recipe.vocab_size,
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_hidden_layers,
        num_attention_heads=recipe.num_attention_heads,
        num_key_value_heads=recipe.num_key_value_heads,
        head_dim=recipe.head_dim,
        max_position_embeddings=recipe.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


@torch.no_grad()
def heldout_cross_entropy(model: Qwen3ForCausalLM, windows: torch.Tensor, batch_size: int = 16) -> float:
    """Mean next-token cross entropy (nats) over every predicted token of the held-out windows."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size]
        logits = model(input_ids=batch[:, :-1]).logits.float()
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
        total, count = total + loss.item(), count + batch[:, 1:].numel()
    return total / count


def unigram_cross_entropy(train: torch.Tensor, heldout: torch.Tensor, vocab_size: int) -> float:
    """Cross entropy of an add-one unigram model fitted on train tokens, on the held-out targets."""
    counts = torch.bincount(train.flatten(), minlength=vocab_size).double() + 1
    log_probs = (counts / counts.sum()).log()
    return float(-log_probs[heldout[:, 1:].flatten()].mean())


def sample_answers(model, tokenizer, prompts: list[str], seed: int, max_new_tokens: int = 160) -> list[str]:
    """Answers sampled at T = 1 (no top-k / top-p) for the model card."""
    model.eval()
    answers = []
    for index, prompt in enumerate(prompts):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            enable_thinking=False,
            return_tensors="pt",
            return_dict=False,
        )
        torch.manual_seed(seed + index)
        output = model.generate(ids, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens)
        answers.append(tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True))
    return answers


def train_tiny_target(output_dir: Path, recipe: TinyTargetRecipe | None = None) -> dict:
    """Build corpus and tokenizer, train, evaluate, and write the HF model directory with its card."""
    recipe = recipe or TinyTargetRecipe()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    torch.manual_seed(recipe.seed)

    train_docs, heldout_docs = build_corpus(seed=recipe.seed)
    tokenizer = train_tokenizer((tokenizer_training_text(d) for d in train_docs), recipe.vocab_size)
    train_windows = token_windows(train_docs, tokenizer, recipe.seq_len)
    heldout_windows = token_windows(heldout_docs, tokenizer, recipe.seq_len)
    print(
        f"corpus: {len(train_docs)} train / {len(heldout_docs)} held-out documents, "
        f"{train_windows.numel():,} / {heldout_windows.numel():,} tokens",
        file=sys.stderr,
    )

    torch.manual_seed(recipe.seed)
    model = Qwen3ForCausalLM(model_config(recipe, tokenizer))
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr,
        betas=(0.9, 0.95),
    )
    resume_path = output_dir / "resume.pt"
    first_step, losses = 0, []
    if resume_path.exists():
        state = torch.load(resume_path, weights_only=False)
        if state["recipe"] != asdict(recipe):
            raise ValueError(f"{resume_path} was written by a different recipe; delete it to start over")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        first_step, losses = state["step"], state["losses"]
        print(f"resuming from step {first_step}", file=sys.stderr)

    model.train()
    progress = tqdm(range(first_step, recipe.steps), initial=first_step, total=recipe.steps, desc="tiny target")
    for step in progress:
        batch = train_windows[batch_indices(step, recipe.batch_size, len(train_windows), recipe.seed)]
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, recipe)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.bf16_autocast):
            logits = model(input_ids=batch[:, :-1]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        progress.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
        if (step + 1) % recipe.save_every == 0 and step + 1 < recipe.steps:
            heldout_ppl = math.exp(heldout_cross_entropy(model, heldout_windows))
            model.train()
            progress.write(f"step {step + 1}: held-out perplexity {heldout_ppl:.2f}")
            state = {"recipe": asdict(recipe), "model": model.state_dict(), "optimizer": optimizer.state_dict()}
            torch.save({**state, "step": step + 1, "losses": losses}, resume_path.with_suffix(".tmp"))
            resume_path.with_suffix(".tmp").replace(resume_path)

    # The committed weights are bf16; every reported number is measured on exactly those weights.
    model = model.to(torch.bfloat16).float()
    heldout_ce = heldout_cross_entropy(model, heldout_windows)
    unigram_ce = unigram_cross_entropy(train_windows, heldout_windows, recipe.vocab_size)
    prompts = [d.prompt for d in heldout_docs if d.is_conversation and d.prompt.startswith("Write")][:3]
    samples = sample_answers(model, tokenizer, prompts, recipe.seed)

    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(END_OF_TEXT)],
        pad_token_id=tokenizer.pad_token_id,
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
    )
    model.to(torch.bfloat16).save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir, save_jinja_files=False)
    summary = {
        "recipe": asdict(recipe),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_documents": len(train_docs),
        "heldout_documents": len(heldout_docs),
        "train_tokens": train_windows.numel(),
        "heldout_tokens": heldout_windows.numel(),
        "tokens_seen": recipe.steps * recipe.batch_size * recipe.seq_len,
        "final_train_loss": sum(losses[-50:]) / len(losses[-50:]),
        "heldout_perplexity": math.exp(heldout_ce),
        "unigram_perplexity": math.exp(unigram_ce),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "minutes": (time.time() - started) / 60,
        "samples": [{"prompt": p, "answer": a} for p, a in zip(prompts, samples, strict=True)],
    }
    (output_dir / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (output_dir / "README.md").write_text(model_card(summary))
    resume_path.unlink(missing_ok=True)
    return summary


def model_card(summary: dict) -> str:
    recipe = summary["recipe"]
    samples = "\n\n".join(
        f"**Prompt:** {s['prompt'].splitlines()[0]}\n\n````text\n{s['answer']}\n````" for s in summary["samples"]
    )
    return f"""# specdec tiny target

A {summary["parameters"] / 1e6:.1f} M-parameter `Qwen3ForCausalLM` chat model ("a code assistant") that
specdec uses as its embedded default target: tests, the quickstart and the demo run against it with no
download. It is a real language model, trained from scratch, not a random network.

- Architecture: hidden {recipe["hidden_size"]}, {recipe["num_hidden_layers"]} layers,
  {recipe["num_attention_heads"]}/{recipe["num_key_value_heads"]} attention/KV heads (head_dim
  {recipe["head_dim"]}), SwiGLU {recipe["intermediate_size"]}, tied embeddings, vocabulary
  {recipe["vocab_size"]} (byte-level BPE trained on the same corpus). Weights stored in bf16.
- Chat template: Qwen style, `<|im_start|>role\\n…<|im_end|>\\n`; `enable_thinking=False` appends an empty
  `<think>\\n\\n</think>\\n\\n` to the generation prompt. Reserved mask token `<|mask|>` for DFlash/DSpark.
- Corpus: the CPython {summary["python"]} standard library (tests and site-packages excluded). Documented
  functions and methods become "write this function" conversations answered with their source; module and
  class docstrings answer "what does X do"; runs of comment prose are plain text.
- Split: by file, about 1 file in 20 held out (SHA-256 of the path). {summary["train_documents"]:,} train
  documents ({summary["train_tokens"]:,} tokens), {summary["heldout_documents"]:,} held-out documents
  ({summary["heldout_tokens"]:,} tokens).
- Training: seed {recipe["seed"]}, {recipe["steps"]} steps of {recipe["batch_size"]} x {recipe["seq_len"]}
  tokens ({summary["tokens_seen"]:,} tokens seen), AdamW lr {recipe["lr"]} with {recipe["warmup_steps"]}
  warmup steps and cosine decay to {recipe["min_lr_ratio"]} of it, bf16 autocast, torch {summary["torch"]},
  {summary["minutes"]:.1f} minutes on this machine's CPU. Final train loss {summary["final_train_loss"]:.3f}.

## Held-out perplexity

| model | perplexity |
|---|---|
| this model (bf16 weights) | {summary["heldout_perplexity"]:.2f} |
| add-one unigram baseline fitted on the train split | {summary["unigram_perplexity"]:.1f} |

## Samples at T = 1 (held-out prompts, no top-k / top-p)

{samples}

Reproduce with `python -m specdec.targets.tiny.train --output_dir <dir>` (same seed, same Python version).
"""


def main(argv: list[str] | None = None) -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(description="Train specdec's tiny embedded target.")
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_class_arguments(TinyTargetRecipe, "recipe")
    args = parser.parse_args(argv)
    summary = train_tiny_target(args.output_dir, TinyTargetRecipe(**vars(args.recipe)))
    print(json.dumps({k: v for k, v in summary.items() if k != "samples"}, indent=2))


if __name__ == "__main__":
    main()
