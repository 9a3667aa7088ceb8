"""Retention sets: a base model's own greedy answers, and how far a fine-tuned model drifts from them.

A retention set is built once from the base model (before fine-tuning): general prompts (the user's, or
the list shipped with the package, :func:`general_prompts`) answered greedily, chat-template aware (plain
``question\\n`` prompts when the tokenizer has no template). Only answers that end (end-of-turn or EOS
within ``max_new_tokens``) are kept, so every scored token is exactly what the base model says. It is
saved as JSONL: a header line with the generation settings and the base model's identity (folder, SHA-256
of ``config.json`` and of the weight files), then one ``{"prompt", "completion"}`` row per answer.
:func:`build_retention_set` reuses a saved set only when identity, settings and prompts match, and
refuses loudly otherwise (``rebuild=True`` replaces it).

Scores (:func:`score_retention`, per item and overall; lower is better, the base model scores best):

- **retained loss**: the mean negative log-likelihood of the answer tokens (token-weighted over the
  set; per item, the mean over that item's answer tokens);
- **KL to base**: KL(p_base ‖ p_model) of the next-token distributions at the same answer positions,
  averaged the same way. For a PEFT model the base logits come from the same model with its adapter
  disabled (``with model.disable_adapter():``), no second model; for a full model, from ``reference``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

FORMAT = 1  # version of the JSONL header
# answer length limit of a new set: 80 of the 100 shipped prompts finish within it on SmolLM2-135M-Instruct
# (52 within 48, 73 within 96; docs/forgetting.md)
MAX_NEW_TOKENS = 128
PROMPTS_FILE = "general_prompts.txt"  # package data of robustft.analysis
WEIGHT_SUFFIXES = (".safetensors", ".bin")


# -- prompts and rows -----------------------------------------------------------------------------------
def general_prompts() -> list[str]:
    """The general prompt list shipped with robustft (100 varied questions and requests an instruct model
    answers briefly); the default prompts of a retention set."""
    text = resources.files("robustft.analysis").joinpath(PROMPTS_FILE).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts from a text file (one a line; blank and ``#`` lines skipped) or a JSONL file of ``prompt``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts: {path} not found")
    if path.suffix == ".jsonl":
        prompts = []
        for i, row in enumerate(read_jsonl(path), 1):
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise ValueError(f"{path}:{i}: expected an object with a string 'prompt'")
            prompts.append(row["prompt"])
    else:
        prompts = [s.strip() for s in path.read_text(encoding="utf-8").splitlines()
                   if s.strip() and not s.startswith("#")]
    if not prompts:
        raise ValueError(f"prompts: {path} holds no prompt")
    return prompts


def read_jsonl(path: str | os.PathLike) -> Iterator[Any]:
    """The JSON values of a JSONL file, one per non-blank line; a bad line is a ValueError (file:line)."""
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{i}: not valid JSON ({err.msg})") from None


def has_chat_template(tokenizer) -> bool:
    """Whether the tokenizer has a chat template (then prompts are chat messages, else plain text)."""
    return bool(getattr(tokenizer, "chat_template", None))


def plain_prompt(question: str) -> str:
    """The prompt text of a model without a chat template: the question and a newline."""
    return f"{question}\n"


def chat_row(question: str, answer: str) -> dict[str, list[dict[str, str]]]:
    """One conversational prompt-completion row (TRL's format; a loss reads the answer's tokens only)."""
    return {"prompt": [{"role": "user", "content": question}],
            "completion": [{"role": "assistant", "content": answer}]}


def as_plain(row: Mapping[str, Any]) -> dict[str, str]:
    """A conversational prompt-completion row as plain text, for a model without a chat template."""
    return {"prompt": plain_prompt(row["prompt"][0]["content"]),
            "completion": row["completion"][0]["content"]}


def model_row(tokenizer, question: str, answer: str) -> dict[str, Any]:
    """The row a model is scored on: chat messages with a chat template, plain text without."""
    row = chat_row(question, answer)
    return row if has_chat_template(tokenizer) else as_plain(row)


def prompt_text(tokenizer, question: str) -> str:
    """What the model is asked: the chat template with a generation prompt, or :func:`plain_prompt`."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                             add_generation_prompt=True, tokenize=False)
    return plain_prompt(question)


def end_of_answer_id(tokenizer, source: str | os.PathLike) -> int:
    """The token that ends an answer: ChatML's ``<|im_end|>`` where a chat template has it, else EOS."""
    if has_chat_template(tokenizer) and "<|im_end|>" in tokenizer.get_vocab():
        return tokenizer.convert_tokens_to_ids("<|im_end|>")
    if tokenizer.eos_token_id is None:
        raise ValueError(f"--model {source}: the tokenizer has no end-of-sequence token; a retention set "
                         "needs one to end the base model's answers")
    return tokenizer.eos_token_id


def check_model_dir(path: str | os.PathLike, option: str = "--model") -> Path:
    """``path`` checked as a local causal-LM folder (``config.json``, weights, a tokenizer), errors naming
    ``option``."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{option} {folder}: no config.json (a local transformers checkpoint folder)")
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise FileNotFoundError(f"{option} {folder}: no weights (*.safetensors or *.bin)")
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    if not any((folder / f).is_file() for f in tokenizer_files):
        raise FileNotFoundError(f"{option} {folder}: no tokenizer (save it with the model)")
    return folder


# -- the base model's identity --------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def model_identity(model_dir: str | os.PathLike) -> dict[str, str]:
    """Folder, SHA-256 of ``config.json`` and of the weight files (name and bytes, in name order): what a
    retention set was built from, so a set is never reused for other weights."""
    folder = Path(model_dir)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: no config.json (a local transformers checkpoint folder)")
    weights = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    if not weights:
        raise FileNotFoundError(f"{folder}: no weights (*.safetensors or *.bin)")
    h = hashlib.sha256()
    for p in weights:
        h.update(f"{p.name}\0{_sha256(p)}\0".encode())
    return {"path": str(folder.resolve()), "config_sha256": _sha256(folder / "config.json"),
            "weights_sha256": h.hexdigest()}


# -- generation -----------------------------------------------------------------------------------------
def generate_answers(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, end_id: int,
                     batch_size: int = 16, lengths: list | None = None) -> list[str | None]:
    """Greedy answers of ``model`` to ``prompts`` (None where no ``end_id`` came within ``max_new_tokens``).

    Left-padded batches of ``batch_size`` in prompt order, float32 logits, no sampling: deterministic.
    ``lengths``: a list that gets each answer's generated tokens, ``end_id`` included (None: unfinished), so
    one run at the largest limit tells how many answers finish within any smaller one.
    """
    import torch

    from robustft.core.params import train_mode

    side, pad = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    chat = has_chat_template(tokenizer)
    device = next(model.parameters()).device
    answers: list[str | None] = []
    try:
        with train_mode(model, False), torch.no_grad():
            for start in range(0, len(prompts), batch_size):
                texts = [prompt_text(tokenizer, p) for p in prompts[start:start + batch_size]]
                batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not chat)
                batch = {k: v.to(device) for k, v in batch.items()}
                out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                     eos_token_id=end_id, pad_token_id=tokenizer.pad_token_id)
                for row in out[:, batch["input_ids"].shape[1]:].tolist():
                    done = end_id in row
                    answers.append(tokenizer.decode(row[: row.index(end_id)]).strip() if done else None)
                    if lengths is not None:
                        lengths.append(row.index(end_id) + 1 if done else None)
    finally:
        tokenizer.padding_side, tokenizer.pad_token = side, pad
    return answers


# -- the set and its file -------------------------------------------------------------------------------
@dataclass
class RetentionSet:
    """The base model's finished greedy answers (``rows``: prompt, completion), how they were generated
    (``settings``), from which model (``model``, :func:`model_identity`) and the prompts left unfinished."""

    rows: list[dict[str, str]]
    settings: dict[str, Any]
    model: dict[str, str]
    unfinished: list[str] = field(default_factory=list)

    def header(self) -> dict[str, Any]:
        return {"robustft_retention_set": FORMAT, "model": self.model, "settings": self.settings,
                "unfinished": self.unfinished}

    def to_jsonl(self) -> str:
        lines = [self.header(), *self.rows]
        return "".join(json.dumps(x, ensure_ascii=False, sort_keys=True) + "\n" for x in lines)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the set as JSONL (header line, then rows), atomically."""
        from robustft.core.checkpoint import atomic_write_text

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, self.to_jsonl())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> RetentionSet:
        """Read a set written by :meth:`save`; anything else is a ValueError naming the file and line."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"retention set {path} not found")
        values = list(read_jsonl(path))
        if not values or not isinstance(values[0], dict) or values[0].get("robustft_retention_set") != FORMAT:
            raise ValueError(f"{path}:1: not a robustft retention set (its first line is the header with "
                             f"'robustft_retention_set': {FORMAT})")
        head = values[0]
        for i, row in enumerate(values[1:], 2):
            if not (isinstance(row, dict) and set(row) == {"prompt", "completion"}
                    and all(isinstance(v, str) for v in row.values())):
                raise ValueError(f"{path}:{i}: expected a row {{'prompt': str, 'completion': str}}")
        return cls(rows=values[1:], settings=head["settings"], model=head["model"],
                   unfinished=list(head.get("unfinished", [])))

    def model_rows(self, tokenizer) -> list[dict[str, Any]]:
        """The rows as the model is scored on them (chat messages with a chat template, else plain text)."""
        return [model_row(tokenizer, r["prompt"], r["completion"]) for r in self.rows]


def generation_settings(tokenizer, prompts: Sequence[str], max_new_tokens: int, end_id: int,
                        batch_size: int) -> dict[str, Any]:
    """Everything the answers depend on besides the weights: a reused set must match all of it."""
    template = getattr(tokenizer, "chat_template", None) or ""
    return {"decoding": "greedy", "max_new_tokens": int(max_new_tokens), "batch_size": int(batch_size),
            "dtype": "float32", "end_token_id": int(end_id), "chat_template": bool(template),
            "chat_template_sha256": hashlib.sha256(str(template).encode()).hexdigest(),
            "prompts": list(prompts)}


def check_matches(found: RetentionSet, model: Mapping[str, str], settings: Mapping[str, Any],
                  source: str | os.PathLike) -> None:
    """Refuse a saved set built from other weights or with other settings, naming what differs."""
    for key in ("config_sha256", "weights_sha256"):
        if found.model.get(key) != model[key]:
            raise ValueError(f"retention set {source} was built from another model "
                             f"({found.model.get('path')}, {key} differs from {model['path']}); "
                             "pass rebuild=True (--rebuild-retention) "
                             "to replace it, or another path")
    differ = sorted(k for k in settings if found.settings.get(k) != settings[k])
    if differ:
        raise ValueError(f"retention set {source} was built with other settings "
                         f"({', '.join(differ)} differ); pass rebuild=True (--rebuild-retention) "
                         "to replace it, or another path")


def build_retention_set(
    model_dir: str | os.PathLike,
    prompts: Sequence[str] | None = None,
    path: str | os.PathLike | None = None,
    max_new_tokens: int = MAX_NEW_TOKENS,
    batch_size: int = 16,
    rebuild: bool = False,
    model=None,
    tokenizer=None,
) -> RetentionSet:
    """The retention set of the base model in ``model_dir``: loaded from ``path`` when it was built from
    the same weights with the same settings and prompts, else generated (and saved to ``path``).

    ``prompts`` default to :func:`general_prompts`. A saved set that does not match is refused
    (ValueError naming what differs) unless ``rebuild``. ``model`` / ``tokenizer``: already loaded from
    ``model_dir`` (saves a load); the model is only read.
    """
    prompts = list(general_prompts() if prompts is None else prompts)
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError("prompts: expected a non-empty list of non-empty strings")
    if len(set(prompts)) != len(prompts):
        raise ValueError("prompts: the list repeats a prompt")
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens}, {batch_size}")
    identity = model_identity(model_dir)
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    end_id = end_of_answer_id(tokenizer, model_dir)
    settings = generation_settings(tokenizer, prompts, max_new_tokens, end_id, batch_size)
    if path is not None and Path(path).is_file() and not rebuild:
        found = RetentionSet.load(path)
        check_matches(found, identity, settings, path)
        return found
    if model is None:
        import torch
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    answers = generate_answers(model, tokenizer, prompts, max_new_tokens, end_id, batch_size)
    result = RetentionSet(
        rows=[{"prompt": p, "completion": a} for p, a in zip(prompts, answers) if a is not None],
        settings=settings, model=identity, unfinished=[p for p, a in zip(prompts, answers) if a is None],
    )
    if not result.rows:
        raise ValueError(f"retention set: the model in {model_dir} finished none of the {len(prompts)} "
                         f"prompts within max_new_tokens={max_new_tokens}; raise it")
    if path is not None:
        result.save(path)
    return result


def load_retention_set(path: str | os.PathLike, model_dir: str | os.PathLike, tokenizer=None,
                       prompts: Sequence[str] | None = None,
                       max_new_tokens: int | None = None) -> RetentionSet:
    """A saved retention set, checked to be the answers of the model in ``model_dir``: the same weights, chat
    template and end token, and the given ``prompts`` / ``max_new_tokens`` where given (else the file's).

    So a set built with any settings (``robustft demo --llm``'s, your own) is reused as it is; a set from
    other weights or with other given settings is a ValueError naming what differs.
    """
    found = RetentionSet.load(path)
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    saved = found.settings
    want = generation_settings(tokenizer, saved.get("prompts", []) if prompts is None else prompts,
                               saved.get("max_new_tokens", 0) if max_new_tokens is None else max_new_tokens,
                               end_of_answer_id(tokenizer, model_dir), saved.get("batch_size", 0))
    check_matches(found, model_identity(model_dir), want, path)
    return found


# -- tokenized examples ---------------------------------------------------------------------------------
def encode_example(tokenizer, prompt: str | Sequence[Mapping[str, str]],
                   completion: str | Sequence[Mapping[str, str]]) -> tuple[list[int], int]:
    """(token ids, number of prompt tokens) of one prompt-completion example; the rest are answer tokens.

    Conversational (lists of messages): the chat template with a generation prompt gives the prompt; the
    template of the whole conversation, past that prompt text, the answer (its end-of-turn included).
    Plain text: the prompt tokenized with special tokens, the completion without, then EOS.
    """
    if isinstance(prompt, str) != isinstance(completion, str):
        raise ValueError("example: prompt and completion must both be text or both be lists of messages")
    if isinstance(prompt, str):
        ids = tokenizer(prompt)["input_ids"]
        answer = tokenizer(completion, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            answer = [*answer, tokenizer.eos_token_id]
        return [*ids, *answer], len(ids)
    if not has_chat_template(tokenizer):
        raise ValueError("example: chat messages need a tokenizer with a chat template (this one has none)")
    head = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template([*prompt, *completion], tokenize=False)
    if not full.startswith(head):
        raise ValueError("example: the chat template does not render the conversation as the prompt text "
                         "followed by the answer; it cannot be scored on answer tokens")
    ids = tokenizer(head, add_special_tokens=False)["input_ids"]
    answer = tokenizer(full[len(head):], add_special_tokens=False)["input_ids"]
    return [*ids, *answer], len(ids)


def encode_rows(tokenizer, rows: Sequence[Mapping[str, Any]], max_length: int | None = None,
                source: str = "rows") -> list[tuple[list[int], int]]:
    """:func:`encode_example` of each ``{"prompt", "completion"}`` row, truncated to ``max_length`` tokens;
    a row with no answer token left is a ValueError naming it."""
    out = []
    for i, row in enumerate(rows):
        ids, n_prompt = encode_example(tokenizer, row["prompt"], row["completion"])
        if max_length is not None:
            ids = ids[:max_length]
        if n_prompt < 1:
            raise ValueError(f"{source}: row {i} has an empty prompt (the first answer token has no context)")
        if len(ids) <= n_prompt:
            raise ValueError(f"{source}: row {i} has no answer token (within max_length={max_length})")
        out.append((ids, n_prompt))
    return out


# -- scores ---------------------------------------------------------------------------------------------
@dataclass
class RetentionScores:
    """Answer-token loss (and KL to base) of a model on a set: overall (token-weighted) and per item."""

    loss: float
    item_loss: list[float]
    tokens: list[int]
    kl: float | None = None
    item_kl: list[float] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"loss": self.loss, "kl": self.kl, "n_items": len(self.tokens), "n_tokens": sum(self.tokens),
                "item_loss": self.item_loss, "item_kl": self.item_kl, "tokens": self.tokens}


def pad_id(tokenizer) -> int:
    """The id right-padded batches are filled with (masked out): PAD, else EOS, else 0."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return tid
    return 0


def _batches(examples: Sequence[tuple[list[int], int]], batch_size: int, pad_id: int, device) -> Iterator:
    """Right-padded (input_ids, attention_mask, answer-target mask) batches in order."""
    import torch

    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        attn = torch.zeros((len(chunk), width), dtype=torch.long)
        target = torch.zeros((len(chunk), width), dtype=torch.bool)  # token t is an answer token
        for r, (row, n_prompt) in enumerate(chunk):
            ids[r, : len(row)] = torch.tensor(row)
            attn[r, : len(row)] = 1
            target[r, n_prompt: len(row)] = True
        yield ids.to(device), attn.to(device), target.to(device)


@functools.cache
def _keeps_masked_logits(cls: type) -> bool:
    """Whether ``cls.forward`` projects only the positions of a boolean ``logits_to_keep`` mask onto the
    vocabulary (transformers' ``slice_logits_to_keep``, flattened to [n_kept, vocab]): every causal LM of
    transformers 5 whose version flattens such a mask."""
    import inspect

    import torch
    from transformers import modeling_utils

    slicer = getattr(modeling_utils, "slice_logits_to_keep", None)
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    if slicer is None or "slice_logits_to_keep(" not in source:
        return False
    probe = slicer(torch.zeros(2, 3, 1), torch.tensor([[True, False, True], [False, False, True]]))
    return tuple(probe.shape) == (3, 1)


def _answer_log_probs(model, ids, attn, target):
    """log p(· | prefix) (float32) at the positions that predict an answer token: [n_answer_tokens, vocab].

    Where the model supports it, the vocabulary projection runs at those positions only (prompt and
    padding positions, half the tokens of a short answer, skip the lm_head: ~1/5 of a 135M model's
    forward), the same rows in the same order as slicing the full logits."""
    import torch

    from robustft.lora.layers import is_peft_model

    keep = target[:, 1:]  # position t-1 predicts token t
    inner = model.get_base_model() if is_peft_model(model) else model
    if _keeps_masked_logits(type(inner)):
        mask = torch.zeros_like(target)
        mask[:, :-1] = keep
        logits = model(input_ids=ids, attention_mask=attn, logits_to_keep=mask).logits
        if logits.dim() != 2 or logits.shape[0] != int(keep.sum()):
            raise RuntimeError(f"{type(inner).__name__}: logits_to_keep=<boolean mask> gave logits of shape "
                               f"{tuple(logits.shape)}, not [{int(keep.sum())}, vocab]")
        return torch.log_softmax(logits.float(), dim=-1)
    logits = model(input_ids=ids, attention_mask=attn).logits
    return torch.log_softmax(logits[:, :-1][keep].float(), dim=-1)


def _base_log_probs(model, reference, ids, attn, target):
    """:func:`_answer_log_probs` of the base: ``reference``, else ``model`` (PEFT) with adapters disabled."""
    from robustft.core.params import train_mode

    if reference is not None:
        with train_mode(reference, False):
            return _answer_log_probs(reference, ids, attn, target)
    with model.disable_adapter():
        return _answer_log_probs(model, ids, attn, target)


def score_examples(model, examples: Sequence[tuple[list[int], int]], reference=None, kl: bool = True,
                   batch_size: int = 8, pad_id: int = 0) -> RetentionScores:
    """Answer-token loss and KL(p_base ‖ p_model) of ``model`` on encoded ``examples``.

    The base distribution comes from ``reference`` (a model in memory), or, when ``reference`` is None and
    ``model`` is a PEFT model, from ``model`` with its adapters disabled. ``kl=False`` skips it; KL on a
    full model without ``reference`` is a ValueError. Both models are run in eval mode, without gradients.
    """
    return score_sweep(model, examples, lambda run: [run(0)], reference, kl, batch_size, pad_id)[0]


def score_sweep(model, examples: Sequence[tuple[list[int], int]],
                sweep: Callable[[Callable[[int], Any]], list], reference=None, kl: bool = True,
                batch_size: int = 8, pad_id: int = 0, base_points: Sequence[int] = (),
                ) -> list[RetentionScores]:
    """:func:`score_examples` of ``model`` at every point of a sweep, batch by batch.

    ``sweep(run)`` sets the model to each of its points in turn, calls ``run(i)`` at point ``i``, returns
    the results in order and restores the model; it is called once per batch, so it must be cheap (an
    adapter's B ← α·B). Why: a batch's base log-probabilities (the KL's reference pass) are computed once
    for all points instead of once per point, and at ``base_points``, where the model *is* the base (α = 0
    of an adapter: B = 0 adds exact zeros), they are the model's own, so that point costs no forward pass.
    """
    import torch

    from robustft.core.params import train_mode
    from robustft.lora.layers import is_peft_model

    if not examples:
        raise ValueError("score: no example to score")
    needs_base = kl or bool(base_points)
    if needs_base and reference is None and not is_peft_model(model):
        raise ValueError("reference: KL to base needs the base model (reference=...) for a model that is not "
                         "a PEFT model; pass kl=False for the loss alone")
    device = next(model.parameters()).device
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))  # by length: little padding
    nll_sums: list[list[float]] = []  # per point, per example (in ``order``)
    kl_sums: list[list[float]] = []
    counts: list[int] = []
    with torch.no_grad(), train_mode(model, False):
        for ids, attn, target in _batches([examples[i] for i in order], batch_size, pad_id, device):
            answer = ids[:, 1:][target[:, 1:]].unsqueeze(1)
            per_row = target[:, 1:].sum(1).tolist()
            base = _base_log_probs(model, reference, ids, attn, target) if needs_base else None

            def run(i: int, ids=ids, attn=attn, target=target, base=base, answer=answer, per_row=per_row):
                logp = base if i in base_points else _answer_log_probs(model, ids, attn, target)
                nll = [float(x.double().sum()) for x in (-logp.gather(1, answer).squeeze(1)).split(per_row)]
                if not kl:
                    return nll, []
                tok_kl = (base.exp() * (base - logp)).sum(-1)
                return nll, [float(x.double().sum()) for x in tok_kl.split(per_row)]

            got = sweep(run)
            if not nll_sums:
                nll_sums, kl_sums = [[] for _ in got], [[] for _ in got]
            for point, (nll, k) in enumerate(got):
                nll_sums[point] += nll
                kl_sums[point] += k
            counts += per_row
    back = sorted(range(len(order)), key=order.__getitem__)  # results in the order of ``examples``
    counts = [counts[i] for i in back]
    total = sum(counts)
    scores = []
    for nll, k in zip(nll_sums, kl_sums):
        nll, k = [nll[i] for i in back], [k[i] for i in back] if kl else None
        scores.append(RetentionScores(
            loss=sum(nll) / total, item_loss=[s / n for s, n in zip(nll, counts)], tokens=counts,
            kl=sum(k) / total if kl else None, item_kl=[s / n for s, n in zip(k, counts)] if kl else None,
        ))
    return scores


def score_retention(model, tokenizer, retention: RetentionSet | Sequence[Mapping[str, Any]], reference=None,
                    kl: bool = True, batch_size: int = 8, max_length: int | None = None) -> RetentionScores:
    """Retained loss and KL to base of ``model`` on a retention set (or any prompt-completion rows).

    See :func:`score_examples` for where the base logits come from. ``tokenizer`` is the base model's.
    """
    rows = retention.model_rows(tokenizer) if isinstance(retention, RetentionSet) else list(retention)
    examples = encode_rows(tokenizer, rows, max_length, source="retention set")
    return score_examples(model, examples, reference, kl, batch_size, pad_id(tokenizer))
