"""Shared data of the TRL tests (EMA reference, SALSA): a tiny word-level preference set, a tiny Llama saved
with its tokenizer, and completion log-probabilities computed by hand."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = "<pad> <unk> <s> </s> the cat dog sat ran on mat rug fast slow red blue is was a".split()
PAIRS = [
    ("the cat", "sat on the mat", "ran fast"),
    ("the dog", "ran fast", "sat on a rug"),
    ("a cat", "is red", "was blue"),
    ("a dog", "was slow", "is fast"),
    ("the mat", "is blue", "ran"),
    ("the rug", "was red", "sat slow"),
    ("a red cat", "sat", "ran on the rug"),
    ("a blue dog", "ran slow", "is a mat"),
]


def save_tiny_llama(path: Path, hidden_size: int = 16) -> str:
    """A random-init 2-layer Llama and a word-level tokenizer, saved (TRL builds its reference from it);
    ``hidden_size=64`` is the least bitsandbytes' 4-bit CPU kernels take (one 64-element block per row)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False,
        pad_token_id=vocab["<pad>"], bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"],
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def preference_data():
    from datasets import Dataset

    return Dataset.from_dict({
        "prompt": [p for p, _, _ in PAIRS], "chosen": [" " + c for _, c, _ in PAIRS],
        "rejected": [" " + r for _, _, r in PAIRS],
    })


def completion_logps(model, batch) -> torch.Tensor:
    """Σ log p(completion token) per sequence, by hand from the logits (no TRL code)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    target = batch["input_ids"][:, 1:]
    mask = batch["completion_mask"][:, 1:].bool()
    return (logp.gather(-1, target.unsqueeze(-1)).squeeze(-1) * mask).sum(dim=1)
