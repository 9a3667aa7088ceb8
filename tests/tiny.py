"""Tiny models and generated data shared by the tests: everything local, random-init, CPU."""

from __future__ import annotations

import os

import torch
from datasets import Dataset
from transformers import BertConfig, BertForSequenceClassification, TrainerCallback, TrainingArguments

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tiny_bert(seed: int = 0, num_labels: int = 2, hidden: int = 16, vocab: int = 64, positions: int = 32,
              dropout: float | None = None) -> BertForSequenceClassification:
    """A random-init 2-layer BERT classifier (about 30k parameters at ``hidden=16``; ``dropout`` None keeps
    BERT's default, 0.0 makes training deterministic given the data)."""
    torch.manual_seed(seed)
    drop = {} if dropout is None else dict(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    config = BertConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=2 * hidden, max_position_embeddings=positions, num_labels=num_labels, **drop,
    )
    return BertForSequenceClassification(config)


def token_dataset(n: int = 64, seq_len: int = 8, seed: int = 0) -> Dataset:
    """Random token sequences; the label is whether token 5 appears (learnable in a few steps)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, 64, (n, seq_len), generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    ids[labels == 1, 0] = 5
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})


def training_args(output_dir, **overrides) -> TrainingArguments:
    """Fast, deterministic CPU arguments; overrides win."""
    kwargs = dict(
        output_dir=str(output_dir), use_cpu=True, report_to=[], disable_tqdm=True, seed=0,
        per_device_train_batch_size=8, per_device_eval_batch_size=16, learning_rate=5e-3,
        max_steps=8, logging_steps=1, save_strategy="no", dataloader_num_workers=0,
        lr_scheduler_type="constant",
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def tiny_llama(seed: int = 0, hidden: int = 16):
    """A random-init 2-layer Llama causal LM (about 20k parameters at ``hidden=16``), untied embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def lm_dataset(n: int = 64, seq_len: int = 8, seed: int = 0) -> Dataset:
    """Random token sequences for causal LM training (labels = inputs)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (n, seq_len), generator=g).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def stop_at(step: int) -> TrainerCallback:
    """A callback that stops training after optimizer step ``step`` (to cut a run for a resume test)."""

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                control.should_training_stop = True

    return Stop()


def tiny_gpt2(seed: int = 0):
    """A random-init 2-layer GPT-2 causal LM (about 20k parameters), tied embeddings, no dropout."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config)


def tiny_task():
    """benchmarks/robustness.py's ``Task`` on a tiny BERT: 32 training and eval examples, 4 steps."""
    import copy

    from transformers import default_data_collator

    from benchmarks.robustness import Task
    from robustft.demos.encoder import accuracy

    start = tiny_bert(num_labels=2)
    evals = {name: token_dataset(32, seed=s) for name, s in (("id", 1), ("id_test", 2), ("shifted", 3))}
    return Task(start=lambda: copy.deepcopy(start), train=token_dataset(32), evals=evals,
                collator=default_data_collator, metrics=accuracy, description="tiny BERT",
                args=lambda out, **kw: training_args(out, **{"max_steps": 4, "logging_steps": 10, **kw}),
                fisher_examples=4, learned_steps=2, batch_size=8)


def tiny_llama_folder(folder, words, chat_template: str | None = None, seed: int = 0, eos: str = "</s>",
                      hidden: int = 16):
    """A two-layer random Llama with a word-level tokenizer over ``words`` (which must hold ``eos``,
    ``[UNK]`` and ``[PAD]``), saved with it as a local folder (``chat_template`` set when given;
    ``hidden=64``: the least bitsandbytes' 4-bit blocks take)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=len(words), max_position_embeddings=64,
                         eos_token_id=words.index(eos), pad_token_id=words.index("[PAD]"), bos_token_id=None)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token=eos)
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(folder)
    return folder


def tiny_llm_task(folder, splits, shift: bool = False):
    """The LLM demo's task (``robustft.demos.llm.LLMTask``: its tokenizer and chat rows) on a tiny random
    Llama saved in ``folder``; eight WordNet-like glosses to train, four per eval set in ``splits`` (the
    i-th set starts at row i with ``shift``, else all are the first four). None: the demo's tokenizer is not
    in the cache."""
    from pathlib import Path

    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from robustft.demos import llm as demo_llm

    cache = demo_llm.default_cache_dir() / "smollm2-135m-instruct"
    if not (cache / "tokenizer.json").exists():
        return None
    tokenizer = AutoTokenizer.from_pretrained(cache)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(Path(folder))
    words = [("heron", "a wading bird"), ("oak", "a tree"), ("lamp", "a light"), ("cup", "a vessel")] * 2
    rows = [demo_llm.definition_example(w, d) for w, d in words]
    evals = {s: Dataset.from_list(rows[i * shift:i * shift + 4]) for i, s in enumerate(splits)}
    return demo_llm.LLMTask(Path(folder), tokenizer, Dataset.from_list(rows), evals)


def fed_average(averaged, points, make_live) -> dict[str, torch.Tensor]:
    """torch.optim.swa_utils as the reference of an average: ``averaged`` (an ``AveragedModel``) fed the
    recorded trajectory ``points`` (name -> tensor, one per update) through a separate live model from
    ``make_live()``; its averaged weights of the recorded names."""
    live = make_live()
    params = dict(live.named_parameters())
    for point in points:
        with torch.no_grad():
            for n, t in point.items():
                params[n].copy_(t)
        averaged.update_parameters(live)
    return {n: p.detach().clone() for n, p in averaged.module.named_parameters() if n in points[0]}


def tiny_mixtral(seed: int = 0, experts: int = 4, top_k: int = 2, hidden: int = 16):
    """A random-init 2-layer Mixtral causal LM (transformers 5 keeps its experts fused: 3-D ``gate_up_proj``
    (E, 2I, H) and ``down_proj`` (E, H, I), router ``mlp.gate.weight`` (E, H)), untied embeddings."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    config = MixtralConfig(
        vocab_size=64, hidden_size=hidden, intermediate_size=hidden // 2, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, num_local_experts=experts, num_experts_per_tok=top_k,
        max_position_embeddings=32, tie_word_embeddings=False,
    )
    return MixtralForCausalLM(config)


def tiny_mixtral_folder(folder, seed: int = 0, experts: int = 4):
    """:func:`tiny_mixtral` saved with ``save_pretrained`` (transformers writes Mixtral's per-expert layout,
    ``block_sparse_moe.experts.<e>.w1/w2/w3``, which mergekit reads)."""
    tiny_mixtral(seed, experts).save_pretrained(folder)
    return folder
