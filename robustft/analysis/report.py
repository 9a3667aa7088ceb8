"""``robustft report``'s engine: the WiSE-FT curve of a user's fine-tuned model, with what it retained.

Given the base model and the fine-tuned one (a PEFT LoRA adapter, or a full model folder), in-distribution
data and optionally shifted data, it evaluates θ(α) for each α on a grid: the mean answer-token loss on
each data set, and on a retention set of the base model's own greedy answers (:mod:`.retention`) the
retained loss and KL(p_base ‖ p_α). α* is chosen on the in-distribution loss only
(:func:`robustft.interpolation.wise_ft.choose_alpha`). Output: a table, the curve's JSON/CSV/plot
(:class:`~robustft.interpolation.wise_ft.WiseFTCurve`: in-distribution loss on x; shifted and retained
loss on y) and ``report.json`` with per-item retained values for intervals.

Cost: for an adapter, θ(α) is B ← α·B_end (:class:`~robustft.interpolation.wise_ft.WiseFTWeights`, only
the LoRA factors are copied) and the base logits come from the same model with the adapter disabled; each
batch is scored at every α in turn, so its base pass (the KL's reference, and α = 0 itself, where B = 0)
runs once: one forward pass per eval token and α > 0, plus one. For a full model, the base model (start
and KL reference) and the fine-tuned model are in memory; θ(α) is written into the fine-tuned model's
tensors from the base's and the fine-tuned file's (read tensor by tensor), never a third copy, once per α,
so the retained set's base pass is repeated per α.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from robustft.analysis.retention import (
    MAX_NEW_TOKENS,
    RetentionScores,
    RetentionSet,
    build_retention_set,
    check_model_dir,
    encode_rows,
    load_retention_set,
    pad_id,
    read_prompts,
    score_examples,
    score_sweep,
)

DEFAULT_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
ROW_SHAPES = ("{'messages': [..., {'role': 'assistant', ...}]}", "{'prompt': str, 'completion': str}",
              "{'prompt': [messages], 'completion': [messages]}")


# -- data -----------------------------------------------------------------------------------------------
def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in value)


def example_of(row: Any) -> dict[str, Any] | None:
    """A JSONL row as ``{"prompt", "completion"}`` (text or messages), or None for any other shape.

    Chat ``messages`` ending with an assistant message: everything before it is the prompt, it is the
    completion."""
    if not isinstance(row, dict):
        return None
    if set(row) >= {"messages"} and not set(row) & {"prompt", "completion"}:
        msgs = row["messages"]
        if _is_messages(msgs) and len(msgs) >= 2 and msgs[-1]["role"] == "assistant":
            return {"prompt": msgs[:-1], "completion": msgs[-1:]}
        return None
    prompt, completion = row.get("prompt"), row.get("completion")
    if isinstance(prompt, str) and isinstance(completion, str) and completion:
        return {"prompt": prompt, "completion": completion}
    if _is_messages(prompt) and _is_messages(completion):
        return {"prompt": prompt, "completion": completion}
    return None


def read_examples(path: str | os.PathLike, option: str = "--id") -> list[dict[str, Any]]:
    """Prompt-completion examples of a JSONL file; another row shape is a ValueError naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{option} {path}: file not found")
    examples = []
    with open(path, encoding="utf-8") as f:
        lines = [(i, line) for i, line in enumerate(f, 1) if line.strip()]
    for i, line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{option} {path}:{i}: not valid JSON ({err.msg})") from None
        example = example_of(row)
        if example is None:
            raise ValueError(f"{option} {path}:{i}: expected one of {', '.join(ROW_SHAPES)}")
        examples.append(example)
    if not examples:
        raise ValueError(f"{option} {path}: no rows")
    return examples


# -- models ---------------------------------------------------------------------------------------------
def check_adapter(adapter: str | os.PathLike) -> None:
    """Refuse an adapter whose θ(α) is not B ← α·B: LoRA variants (read_adapter refuses them) and
    ``modules_to_save`` (dense trained copies with no start value in the adapter)."""
    from robustft.lora.io import read_adapter

    if not (Path(adapter) / "adapter_config.json").is_file():
        raise FileNotFoundError(f"--adapter {adapter}: no adapter_config.json (a PEFT adapter folder)")
    try:
        found = read_adapter(adapter)
    except (ValueError, FileNotFoundError) as err:
        raise type(err)(f"--adapter {adapter}: {err}") from None
    if found.extras:
        raise ValueError(f"--adapter {adapter}: holds non-LoRA tensors ({sorted(found.extras)[:3]}, "
                         "modules_to_save): their base values are not in the adapter; merge it "
                         "(robustft lora ... --merge-into) and pass --model")


@dataclass
class Interpolation:
    """A model that ``sweep(alphas, run)`` sets to each θ(α) in place (then back to the fine-tuned end),
    and the base model's KL reference (None: the PEFT model itself with its adapter disabled).
    ``per_batch``: a sweep is cheap (an adapter's B ← α·B), so the report sweeps every batch, scoring the
    base once per batch for all α (:func:`~robustft.analysis.retention.score_sweep`); else once per α."""

    model: Any
    reference: Any
    sweep: Callable[[Sequence[float], Callable[[int], Any]], list]
    per_batch: bool = False


def adapter_interpolation(base: str | os.PathLike, adapter: str | os.PathLike) -> Interpolation:
    """The base model with the adapter loaded; θ(α) scales the adapter's B factors
    (:func:`~robustft.interpolation.wise_ft.evaluate_at_alphas`: only the factors are copied, once)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from robustft.core.params import select_parameters
    from robustft.interpolation.wise_ft import WiseFTWeights, evaluate_at_alphas

    check_adapter(adapter)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(adapter)).eval()
    params = select_parameters(model, include=r"\.lora_(A|B|embedding_A|embedding_B)\.", trainable_only=False)
    weights = WiseFTWeights(params, check_start=False)  # the trained B is the end; its start is B = 0
    if weights.dense:
        raise ValueError(f"--adapter {adapter}: tensors {weights.dense[:3]} are not LoRA factor pairs")
    return Interpolation(model, None, lambda grid, run: evaluate_at_alphas(weights, grid, run),
                         per_batch=True)


def full_interpolation(base: str | os.PathLike, model_dir: str | os.PathLike) -> Interpolation:
    """Base (start, KL reference) and fine-tuned model in memory; θ(α) written into the fine-tuned one from
    the base's tensors and the fine-tuned file's (read one tensor at a time), so no third copy; the end
    comes back bit-exactly at α = 1 (``interpolate_into_``)."""
    from transformers import AutoModelForCausalLM

    from robustft.merge.io import CheckpointReader
    from robustft.ops.interpolate import interpolate_into_

    start = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    live, ref = model.state_dict(), start.state_dict()
    reader = CheckpointReader(model_dir)
    names = [n for n in reader.names if n in live]
    stored = {live[n].data_ptr() for n in names}
    for n in live:
        if n not in ref:
            raise ValueError(f"--base {base} has no tensor {n!r} of --model {model_dir}")
        if ref[n].shape != live[n].shape:
            raise ValueError(f"tensor {n!r}: --base has shape {tuple(ref[n].shape)}, --model "
                             f"{tuple(live[n].shape)}")
        if live[n].data_ptr() not in stored:  # neither in the files nor tied to a tensor that is
            raise ValueError(f"tensor {n!r} of --model {model_dir} is not in its weight files")

    @torch.no_grad()
    def sweep(grid: Sequence[float], run: Callable[[int], Any]) -> list:
        results = []
        try:
            for i, alpha in enumerate(grid):
                for n in names:
                    interpolate_into_([live[n]], [ref[n]], [reader.get(n)], alpha)
                results.append(run(i))
        finally:
            for n in names:
                interpolate_into_([live[n]], [ref[n]], [reader.get(n)], 1.0)
        return results

    return Interpolation(model, start, sweep)


# -- the report -----------------------------------------------------------------------------------------
@dataclass
class Report:
    """Per α: the loss on each data set and the retained loss and KL; α* (in-distribution only)."""

    alphas: list[float]
    losses: dict[str, list[float]]  # "id", "shift" (optional), "retained"
    retained_kl: list[float]
    chosen_alpha: float
    retained_items: dict[str, dict[str, Any]]  # "alpha=...": per-item values at α* and at α = 1
    n_items: dict[str, int]
    n_tokens: dict[str, int]
    seconds: float = 0.0
    inputs: dict[str, Any] = field(default_factory=dict)
    # α* minus the fine-tuned model (α = 1), paired over the same items: "<set> loss" and "retained KL" ->
    # BootstrapInterval fields (the mean over items of each item's mean answer-token loss / KL)
    differences: dict[str, dict[str, float]] = field(default_factory=dict)

    def curve(self):
        """The WiSE-FT curve (in-distribution loss on x; shifted and retained loss on y)."""
        from robustft.interpolation.wise_ft import WiseFTCurve

        return WiseFTCurve(alphas=self.alphas, results=dict(self.losses), metric="loss", id_dataset="id",
                           chosen_alpha=self.chosen_alpha, greater_is_better=False,
                           extra={"retained_kl": self.retained_kl})

    def table(self) -> str:
        """A Markdown table: one row per α (losses, retained KL), the endpoints and α* labelled."""
        sets = list(self.losses)
        head = ["alpha", *(f"{s} loss" for s in sets), "retained KL", "note"]
        rows = []
        for i, a in enumerate(self.alphas):
            note = [x for x, ok in (("base", a == 0.0), ("fine-tuned", a == 1.0),
                                    ("α* (chosen on id only)", a == self.chosen_alpha)) if ok]
            rows.append([f"{a:g}", *(f"{self.losses[s][i]:.4f}" for s in sets), f"{self.retained_kl[i]:.4f}",
                         ", ".join(note)])
        widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
        line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
        lines = [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)]
        if self.differences:
            first = next(iter(self.differences.values()))
            lines.append(
                f"\nα*={self.chosen_alpha:g} minus the fine-tuned model (α=1), mean over items of each "
                f"answer's mean token loss, paired bootstrap {100 * first['confidence']:g}% interval "
                f"({first['resamples']} resamples, seeded; robustft.ops.bootstrap.paired_bootstrap):")
            for name, d in self.differences.items():
                outside = "; outside the noise" if d["low"] > 0 or d["high"] < 0 else ""
                lines.append(f"- {name}: {d['difference']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}] "
                             f"(n = {d['n']} items{outside})")
        return "\n".join(lines)

    def summary(self) -> str:
        a, i = self.chosen_alpha, self.alphas.index(self.chosen_alpha)
        end = self.alphas.index(1.0) if 1.0 in self.alphas else len(self.alphas) - 1
        r = self.losses["retained"]
        return (f"α*={a:g} (chosen on id loss only): id loss {self.losses['id'][i]:.4f} vs "
                f"{self.losses['id'][end]:.4f} fine-tuned; retained loss {r[i]:.4f} vs {r[end]:.4f} "
                f"fine-tuned and {r[0]:.4f} at α={self.alphas[0]:g}; retained KL "
                f"{self.retained_kl[i]:.4f} vs {self.retained_kl[end]:.4f} "
                f"({self.n_items['retained']} retained answers).")

    def as_dict(self) -> dict[str, Any]:
        return {"alphas": self.alphas, "chosen_alpha": self.chosen_alpha, "losses": self.losses,
                "retained_kl": self.retained_kl, "retained_items": self.retained_items,
                "n_items": self.n_items, "n_tokens": self.n_tokens, "seconds": self.seconds,
                "inputs": self.inputs, "differences": self.differences}


def wise_ft_report(interp: Interpolation, examples: Mapping[str, Sequence[tuple[list[int], int]]],
                   alphas: Sequence[float] = DEFAULT_ALPHAS, batch_size: int = 8, pad_id: int = 0) -> Report:
    """Evaluate θ(α) for each α on encoded ``examples`` ("id", optional "shift", "retained": KL too)."""
    from robustft.interpolation.wise_ft import check_alphas, choose_alpha

    grid = check_alphas(alphas)
    t0 = time.perf_counter()
    scores: dict[str, list[RetentionScores]] = {name: [] for name in examples}

    def run(i: int) -> None:
        for name, ex in examples.items():
            kl = name == "retained"
            scores[name].append(score_examples(interp.model, ex, interp.reference, kl, batch_size, pad_id))

    if interp.per_batch:  # α outermost per batch: one base pass per batch; α = 0 (B = 0) is that pass
        at_base = [i for i, a in enumerate(grid) if a == 0.0]
        for name, ex in examples.items():
            scores[name] = score_sweep(interp.model, ex, lambda r: interp.sweep(grid, r), interp.reference,
                                       name == "retained", batch_size, pad_id, at_base)
    else:
        interp.sweep(grid, run)
    losses = {name: [s.loss for s in v] for name, v in scores.items()}
    chosen = choose_alpha(grid, losses["id"], greater_is_better=False)
    items = {}
    for a in dict.fromkeys([chosen, grid[-1]]):
        s = scores["retained"][grid.index(a)]
        items[f"alpha={a:g}"] = {"loss": s.item_loss, "kl": s.item_kl, "tokens": s.tokens}
    differences = {}
    if chosen != grid[-1]:
        from dataclasses import asdict

        from robustft.ops.bootstrap import paired_bootstrap

        at, end = grid.index(chosen), grid.index(1.0) if 1.0 in grid else len(grid) - 1
        pairs = {f"{name} loss": (v[at].item_loss, v[end].item_loss) for name, v in scores.items()}
        pairs["retained KL"] = (scores["retained"][at].item_kl, scores["retained"][end].item_kl)
        differences = {k: asdict(paired_bootstrap(a, b, seed=0)) for k, (a, b) in pairs.items() if len(a) > 1}
    return Report(
        alphas=grid, losses=losses, retained_kl=[s.kl for s in scores["retained"]], chosen_alpha=chosen,
        retained_items=items, differences=differences, n_items={k: len(v) for k, v in examples.items()},
        n_tokens={k: sum(len(ids) - n for ids, n in v) for k, v in examples.items()},
        seconds=time.perf_counter() - t0,
    )


def check_report_inputs(base, model, adapter, id_path, shift_path, prompts_path, retention_path) -> None:
    """Every input checked before anything is loaded or written, each error naming its option."""
    if (model is None) == (adapter is None):
        raise ValueError("give exactly one of --model (a fine-tuned model folder) or --adapter "
                         "(a PEFT adapter folder)")
    check_model_dir(base, "--base")
    if model is not None:
        check_model_dir(model, "--model")
    if adapter is not None:
        check_adapter(adapter)
    read_examples(id_path, "--id")
    if shift_path is not None:
        read_examples(shift_path, "--shift")
    if prompts_path is not None:
        read_prompts(prompts_path)
    if retention_path is not None and Path(retention_path).exists():
        RetentionSet.load(retention_path)


def run_report(
    base: str | os.PathLike,
    id_path: str | os.PathLike,
    out: str | os.PathLike,
    model: str | os.PathLike | None = None,
    adapter: str | os.PathLike | None = None,
    shift_path: str | os.PathLike | None = None,
    prompts_path: str | os.PathLike | None = None,
    retention_path: str | os.PathLike | None = None,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    max_new_tokens: int | None = None,
    max_length: int | None = 512,
    batch_size: int = 8,
    overwrite: bool = False,
    rebuild_retention: bool = False,
    say=print,
) -> Report:
    """``robustft report``: check inputs, build or reuse the retention set, evaluate the curve, write ``out``.

    ``out`` gets ``report.json``, ``report.md`` (the table), ``wise_ft.{json,csv,png}`` and, when
    ``retention_path`` is not given, the retention set (``retention.jsonl``, reused by a later run into
    the same ``out`` with ``overwrite``). Nothing is written when an input is refused. A saved set is reused
    as it was built (e.g. ``robustft demo --llm``'s), checked against ``base``'s weights; ``prompts_path``
    and ``max_new_tokens``, when given, must match it. A new set is answered within ``max_new_tokens``
    (default :data:`~robustft.analysis.retention.MAX_NEW_TOKENS`).
    """
    from transformers import AutoTokenizer

    from robustft.core.checkpoint import atomic_output_dir, check_output_dir
    from robustft.interpolation.wise_ft import check_alphas

    grid = check_alphas(alphas)
    out = Path(out)
    check_output_dir(out, overwrite, inputs=[base, model, adapter])
    check_report_inputs(base, model, adapter, id_path, shift_path, prompts_path, retention_path)
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(base)
    prompts = read_prompts(prompts_path) if prompts_path is not None else None
    reuse = Path(retention_path) if retention_path is not None else out / "retention.jsonl"
    reused = reuse.is_file() and not rebuild_retention
    say(f"retention set: {'reusing' if reused else 'building'} {reuse} (answers of --base)")
    if reused:
        retained = load_retention_set(reuse, base, tokenizer, prompts, max_new_tokens)
    else:
        retained = build_retention_set(base, prompts, reuse if (retention_path or reuse.exists()) else None,
                                       MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens,
                                       rebuild=rebuild_retention, tokenizer=tokenizer)
    data = {"id": read_examples(id_path, "--id"), **({"shift": read_examples(shift_path, "--shift")}
                                                   if shift_path is not None else {})}
    encoded = {name: encode_rows(tokenizer, rows, max_length, source=name) for name, rows in data.items()}
    encoded["retained"] = encode_rows(tokenizer, retained.model_rows(tokenizer), max_length, "retention set")
    say(f"models: base {base}, " + (f"adapter {adapter}" if adapter else f"model {model}")
        + f" | id {len(encoded['id'])}" + (f", shift {len(encoded['shift'])}" if "shift" in encoded else "")
        + f", retained {len(encoded['retained'])} ({len(retained.unfinished)} unfinished prompts left out)")
    interp = adapter_interpolation(base, adapter) if adapter is not None else full_interpolation(base, model)
    report = wise_ft_report(interp, encoded, grid, batch_size, pad_id(tokenizer))
    report.inputs = {"base": str(base), "model": None if model is None else str(model),
                     "adapter": None if adapter is None else str(adapter), "id": str(id_path),
                     "shift": None if shift_path is None else str(shift_path),
                     "prompts": str(prompts_path) if prompts_path is not None else
                     "the retention set's" if reused else "shipped general prompts",
                     "max_new_tokens": retained.settings["max_new_tokens"],
                     "retention_set": str(reuse), "max_length": max_length, "batch_size": batch_size,
                     "eval_seconds": report.seconds}
    report.seconds = time.perf_counter() - t0
    if not all(math.isfinite(x) for x in report.losses["id"]):
        say("warning: the id loss is not finite at some α")
    with atomic_output_dir(out, overwrite=overwrite, inputs=[base, model, adapter]) as tmp:
        (tmp / "report.json").write_text(json.dumps(report.as_dict(), indent=2))
        (tmp / "report.md").write_text(report.table() + "\n\n" + report.summary() + "\n")
        report.curve().save(tmp)
        if retention_path is None:
            retained.save(tmp / "retention.jsonl")
    return report
