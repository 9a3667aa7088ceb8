"""Model soups (Wortsman et al., 2022, "Model soups", arXiv:2203.05482): averages of fine-tuned models.

- :func:`write_uniform_soup`: the uniform soup of saved checkpoints, streamed to disk by the merge engine (a
  ``linear`` recipe of equal weights, ``normalize: true``); PEFT adapters are averaged as their deltas, the
  mean of s·B·A, exactly: a concatenated-rank adapter (:func:`robustft.lora.compose.compose_adapters`).
  ``robustft average`` and ``robustft soup`` write through it.
- :func:`soup_model`: uniform or greedy soup in memory. The candidates' tensors are loaded once
  (:class:`SoupIngredients`); each soup to score is written in place into one live model (no model copy, no
  disk round trip per candidate). Greedy is Algorithm 1 of the paper: candidates in decreasing order of
  in-distribution score, each added to the running uniform average of the kept ones only if the soup's ID
  score does not drop (>=). Scores come from a user callable or a Trainer's eval sets
  (:func:`trainer_scorer`); only the ID score chooses, the other sets are reported.
- :class:`SoupResult`: every candidate's and soup's scores as a table, JSON, CSV and plot (the conventions of
  :class:`robustft.interpolation.wise_ft.WiseFTCurve`: ``save(output_dir)`` writes ``soup.json``/``.csv``/
  ``.png`` through :func:`robustft.core.checkpoint.save_report`).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustft.core import distributed
from robustft.core.checkpoint import check_output_dir, pyplot, save_figure, save_report
from robustft.interpolation.wise_ft import metric_value
from robustft.ops.averaging import mean_of

__all__ = [
    "SOUP_METHODS",
    "Scorer",
    "SoupIngredients",
    "SoupResult",
    "WrittenSoup",
    "is_adapter_folder",
    "soup_model",
    "trainer_scorer",
    "write_uniform_soup",
]

SOUP_METHODS = ("uniform", "greedy")

#: a model -> its score: one number (the ID score) or eval-set name -> number (the ID set among them)
Scorer = Callable[[nn.Module], "float | Mapping[str, float]"]


def is_adapter_folder(path: str | os.PathLike) -> bool:
    """True for a PEFT adapter folder (``adapter_config.json``): its soup is an average of deltas."""
    return os.path.isfile(os.path.join(path, "adapter_config.json"))


# -- on disk: the uniform soup through the merge engine --------------------------------------------
@dataclass
class WrittenSoup:
    """What :func:`write_uniform_soup` wrote: the folder, its inputs and what they were."""

    out_dir: Path
    inputs: list[str]
    adapters: bool
    tensors: int
    files: int
    seconds: float


def write_uniform_soup(
    paths: Sequence[str | os.PathLike], out: str | os.PathLike, overwrite: bool = False, progress: bool = True
) -> WrittenSoup:
    """The uniform soup (1/N)·Σ θ_i of checkpoint folders, or of PEFT adapter folders as (1/N)·Σ ΔW_i (exact).

    Checkpoints go through the merge engine (a ``linear`` recipe of equal weights, normalized: streamed
    tensor by tensor, sharded output, config and tokenizer of the first copied). Averaging LoRA factors A
    and B one by one is not the mean of the deltas B·A; the exact mean is the concatenated-rank adapter
    [B_1/N, ..., B_N/N]·[A_1; ...; A_N] that ``compose_adapters`` writes (rank Σ r_i). Mixing adapters and
    model checkpoints, or a folder given twice, is refused before anything is written.
    """
    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise ValueError("soup: no checkpoints given")
    if len(set(map(os.path.realpath, paths))) != len(paths):
        raise ValueError(f"soup: a checkpoint is given twice: {paths}")
    check_output_dir(out, overwrite, paths)
    adapters = [is_adapter_folder(p) for p in paths]
    t0 = time.perf_counter()
    if any(adapters):
        if not all(adapters):
            raise ValueError(
                "give only PEFT adapter folders or only model checkpoints, not both: adapters "
                + ", ".join(p for p, a in zip(paths, adapters) if a)
            )
        from robustft.lora.compose import compose_adapters
        from robustft.lora.io import read_adapter, write_adapter

        composed = compose_adapters([read_adapter(p) for p in paths], [1.0 / len(paths)] * len(paths))
        written = write_adapter(composed, out, overwrite, None, paths)
        return WrittenSoup(Path(written), paths, True, len(composed.deltas), 1, time.perf_counter() - t0)
    from robustft.merge.engine import merge_checkpoints
    from robustft.merge.recipe import parse_recipe

    recipe = parse_recipe(
        {
            "merge_method": "linear",
            "models": [{"model": p, "parameters": {"weight": 1.0}} for p in paths],
            "parameters": {"normalize": True},
        },
        source="average",
    )
    result = merge_checkpoints(recipe, out, overwrite=overwrite, progress=progress)
    return WrittenSoup(result.out_dir, paths, False, result.tensors, len(result.files), result.seconds)


# -- in memory: the candidates' tensors, loaded once -----------------------------------------------
def _candidate_name(candidate: Any, i: int) -> str:
    if isinstance(candidate, (str, os.PathLike)):
        return os.path.basename(os.path.normpath(os.fspath(candidate))) or os.fspath(candidate)
    return getattr(candidate, "source", None) if hasattr(candidate, "deltas") else f"candidate-{i}"


def _read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    from robustft.merge.io import LoadedCheckpoint

    with LoadedCheckpoint(path) as loaded:
        return loaded.tensors


class SoupIngredients:
    """K candidates' tensors held once, and the uniform soup of any subset written into a live model in place.

    ``candidates``: checkpoint folders (safetensors, sharded accepted) or state dicts (name -> tensor) of
    ``model``'s architecture; or PEFT adapter folders / :class:`robustft.lora.io.LoRAAdapter` objects with
    ``model`` their *base* model (not a ``PeftModel``): the adapter soup (1/|S|)·Σ ΔW_k is then written as
    W_base + (1/|S|)·Σ ΔW_k into the base weights, which computes exactly what the concatenated-rank adapter
    of :func:`write_uniform_soup` computes. Floating tensors are averaged in the live tensor's dtype and on
    its device (the candidates are converted once, when read: K copies of the souped tensors are held);
    integer tensors (position ids) are left as the model has them. A tensor of the model that no candidate
    holds is refused unless it shares its storage with one that is (tied embeddings). Different names or
    shapes are a ValueError naming the tensor and the candidate.
    """

    def __init__(self, model: nn.Module, candidates: Sequence[Any], names: Sequence[str] | None = None):
        if not isinstance(model, nn.Module):
            raise ValueError(f"soup: model must be a torch.nn.Module, got {type(model).__name__}")
        candidates = list(candidates)
        if not candidates:
            raise ValueError("soup: no candidates given")
        self.names = (
            list(names) if names is not None else [_candidate_name(c, i) for i, c in enumerate(candidates)]
        )
        if len(self.names) != len(candidates) or len(set(self.names)) != len(self.names):
            raise ValueError(f"soup: names must be {len(candidates)} distinct strings, got {self.names}")
        kinds = [
            is_adapter_folder(c) if isinstance(c, (str, os.PathLike)) else hasattr(c, "deltas")
            for c in candidates
        ]
        if any(kinds) and not all(kinds):
            raise ValueError("soup: give only PEFT adapters or only model checkpoints, not both")
        self.adapters = all(kinds)
        self.base: list[torch.Tensor] | None = None
        if self.adapters:
            self._load_adapters(model, candidates)
        else:
            self._load_checkpoints(model, candidates)

    def _load_checkpoints(self, model: nn.Module, candidates: list[Any]) -> None:
        state = model.state_dict()
        dicts = [_read_checkpoint(c) if isinstance(c, (str, os.PathLike)) else dict(c) for c in candidates]
        keys = [k for k, t in dicts[0].items() if t.is_floating_point()]
        for name, d in zip(self.names, dicts):
            floating = [k for k, t in d.items() if t.is_floating_point()]
            if set(floating) != set(keys):
                diff = sorted(set(floating) ^ set(keys))
                raise ValueError(
                    f"soup: candidate {name!r} holds other tensors than {self.names[0]!r} "
                    f"(first difference {diff[0]!r})"
                )
        for k in keys:
            if k not in state:
                raise ValueError(f"soup: tensor {k!r} of the candidates is not in the model")
            for name, d in zip(self.names, dicts):
                if tuple(d[k].shape) != tuple(state[k].shape):
                    raise ValueError(
                        f"soup: tensor {k!r} has shape {tuple(d[k].shape)} in candidate {name!r} "
                        f"but {tuple(state[k].shape)} in the model"
                    )
        covered = {state[k].data_ptr() for k in keys}
        for k, t in state.items():
            if t.is_floating_point() and k not in keys and t.data_ptr() not in covered:
                raise ValueError(
                    f"soup: tensor {k!r} of the model is in none of the candidates "
                    f"({self.names[0]!r} lacks it); soup checkpoints of this model"
                )
        self.keys = keys
        self.live = [state[k] for k in keys]
        self.tensors = [
            [d[k].to(device=t.device, dtype=t.dtype) for k, t in zip(keys, self.live)] for d in dicts
        ]

    def _load_adapters(self, model: nn.Module, candidates: list[Any]) -> None:
        from robustft.lora.compose import check_compatible
        from robustft.lora.io import read_adapter

        if hasattr(model, "peft_config"):
            raise ValueError(
                "soup: adapters are souped into their base model; give the base model, not a "
                "PeftModel (its LoRA layers would add their own delta on top)"
            )
        adapters = [read_adapter(c) if isinstance(c, (str, os.PathLike)) else c for c in candidates]
        check_compatible(adapters)
        for name, a in zip(self.names, adapters):
            if a.extras:
                raise ValueError(
                    f"soup: adapter {name!r} saves non-LoRA tensors ({sorted(a.extras)[0]!r}, "
                    "modules_to_save); their in-memory soup is not supported: write the uniform "
                    "soup with write_uniform_soup"
                )
        modules = dict(model.named_modules())
        targets: list[tuple[str, str, bool]] = []  # (module, "weight"|"bias", transposed)
        for module in sorted({m for a in adapters for m in a.deltas}):
            layer = modules.get(module)
            if getattr(layer, "weight", None) is None:
                raise ValueError(
                    f"soup: module {module!r} of the adapters is not a weighted module of the model"
                )
            flip = any(a.kinds.get(module) == "embedding" for a in adapters) or bool(
                adapters[0].config.get("fan_in_fan_out")
            )
            targets.append((module, "weight", flip))
            if any(module in a.deltas and a.deltas[module].bias is not None for a in adapters):
                if getattr(layer, "bias", None) is None:
                    raise ValueError(
                        f"soup: module {module!r}: the adapters have a LoRA bias but the layer has none"
                    )
                targets.append((module, "bias", False))
        self.keys = [f"{m}.{part}" for m, part, _ in targets]
        self.live = [getattr(modules[m], part).data for m, part, _ in targets]
        self.base = [t.detach().clone() for t in self.live]
        self.tensors = []
        for name, a in zip(self.names, adapters):
            own = []
            for (module, part, flip), live in zip(targets, self.live):
                d = a.deltas.get(module)
                if d is None:
                    own.append(torch.zeros_like(live))
                    continue
                dense = d.dense() if part == "weight" else d.dense_bias()
                dense = dense.T if flip and part == "weight" else dense
                if tuple(dense.shape) != tuple(live.shape):
                    raise ValueError(
                        f"soup: module {module!r}: adapter {name!r} has ΔW of shape "
                        f"{tuple(dense.shape)} for a {tuple(live.shape)} {part}"
                    )
                own.append(dense.to(device=live.device, dtype=live.dtype))
            self.tensors.append(own)

    @torch.no_grad()
    def write_(self, subset: Sequence[int]) -> None:
        """Write the uniform soup of the candidates ``subset`` (indices) into the live model, in place."""
        if not subset:
            raise ValueError("soup: an empty set of candidates has no average")
        mean_of(self.live, [self.tensors[i] for i in subset])
        if self.base is not None:
            torch._foreach_add_(self.live, self.base)

    def snapshot(self) -> list[torch.Tensor]:
        """A copy of the live tensors the soups are written into (to restore them on error)."""
        return [t.detach().clone() for t in self.live]

    @torch.no_grad()
    def restore_(self, saved: Sequence[torch.Tensor]) -> None:
        torch._foreach_copy_(self.live, list(saved))


# -- scores ----------------------------------------------------------------------------------------
def trainer_scorer(
    trainer, eval_datasets: Mapping[str, Any], metric: str = "accuracy", key_prefix: str = "soup"
) -> Scorer:
    """A :data:`Scorer` through ``trainer.evaluate`` on every eval set (its ``compute_metrics``, collator and
    distributed evaluation as they are); the model scored must be ``trainer.model``."""
    if not eval_datasets:
        raise ValueError("soup: eval_datasets is empty")

    def score(model: nn.Module) -> dict[str, float]:
        if model is not trainer.model:
            raise ValueError("soup: the model souped is not the Trainer's model; give trainer.model")
        out = {}
        for name, ds in eval_datasets.items():
            prefix = f"{key_prefix}_{name}"
            out[name] = metric_value(
                trainer.evaluate(eval_dataset=ds, metric_key_prefix=prefix), prefix, metric, name
            )
        return out

    return score


def _scores(value: Any, id_dataset: str) -> dict[str, float]:
    """A scorer's answer as set -> float; one number is the ID score."""
    if isinstance(value, Mapping):
        if id_dataset not in value:
            raise ValueError(
                f"soup: the scores {sorted(value)} have no in-distribution score {id_dataset!r} (id_dataset)"
            )
        items = dict(value)
    else:
        items = {id_dataset: value}
    out = {}
    for k, v in items.items():
        if (
            isinstance(v, bool)
            or not isinstance(v, (int, float))
            and not (isinstance(v, torch.Tensor) and v.numel() == 1)
        ):
            raise ValueError(f"soup: score {k!r} must be a number, got {v!r}")
        out[str(k)] = float(v)
    return out


# -- the result ------------------------------------------------------------------------------------
@dataclass
class SoupResult:
    """Scores of every candidate and of the soups tried, and which candidates the soup kept."""

    method: str
    candidates: list[str]
    kept: list[str]
    id_dataset: str = "id"
    metric: str = "score"
    greater_is_better: bool = True
    individual: dict[str, dict[str, float]] = field(default_factory=dict)  # candidate -> set -> score
    steps: list[dict[str, Any]] = field(default_factory=list)  # greedy: tried, ingredients, scores, kept
    soup: dict[str, float] = field(default_factory=dict)  # the final soup's scores
    uniform: dict[str, float] = field(default_factory=dict)  # the uniform soup of all candidates
    evaluations: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def datasets(self) -> list[str]:
        found = [*self.soup, *self.uniform, *(k for s in self.individual.values() for k in s)]
        return list(dict.fromkeys([self.id_dataset, *found])) if found else []

    @property
    def order(self) -> list[str]:
        """The candidates by decreasing ID score (the greedy order; ties keep the given order)."""
        return rank_candidates(
            self.candidates,
            [self.individual.get(c, {}).get(self.id_dataset, math.nan) for c in self.candidates],
            self.greater_is_better,
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2)

    def _rows(self) -> list[tuple[str, str, dict[str, float], str]]:
        """(kind, name, scores, note) rows: each candidate, each greedy step, the uniform and final soups."""
        rows = [
            ("model", c, self.individual[c], "kept" if c in self.kept else "")
            for c in self.order
            if c in self.individual
        ]
        for s in self.steps[1:]:
            rows.append(("greedy", "+" + s["tried"], s["scores"], "kept" if s["kept"] else "dropped"))
        if self.uniform:
            rows.append(("uniform", f"all {len(self.candidates)}", self.uniform, ""))
        if self.soup:
            rows.append(
                (
                    self.method,
                    f"{len(self.kept)} kept",
                    self.soup,
                    f"<- chosen on {self.id_dataset}" if self.method == "greedy" else "",
                )
            )
        return rows

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf)
        sets = self.datasets
        w.writerow(["kind", "name", *[f"{d}_{self.metric}" for d in sets], "note"])
        for kind, name, scores, note in self._rows():
            w.writerow([kind, name, *[scores.get(d, math.nan) for d in sets], note])
        return buf.getvalue()

    def table(self) -> str:
        """Plain-text table: the candidates (best ID first), the greedy steps, the uniform and final soups."""
        sets = self.datasets
        head = f"{'':>8} {'name':<24} " + " ".join(f"{d[:12]:>12}" for d in sets) + "  note"
        rows = [head, "-" * len(head)]
        for kind, name, scores, note in self._rows():
            vals = " ".join(f"{scores.get(d, math.nan):>12.4f}" for d in sets)
            rows.append(f"{kind:>8} {name[:24]:<24} {vals}  {note}")
        rows.append(f"kept: {', '.join(self.kept)} ({self.evaluations} evaluations, {self.seconds:.1f} s)")
        return "\n".join(rows)

    def save(self, output_dir: str | os.PathLike, plot: bool = True, stem: str = "soup") -> list[Path]:
        """Write ``<stem>.json``, ``.csv`` and (with matplotlib) ``.png`` atomically; returns the paths."""
        return save_report(output_dir, stem, self.to_json(), self.to_csv(), self.plot if plot else None)

    def plot(self, path: str | os.PathLike) -> Path | None:
        """ID score on x, each other set's on y: every candidate, the uniform soup and the final soup."""
        plt = pyplot()
        if plt is None:
            return None
        shifted = [d for d in self.datasets if d != self.id_dataset] or [self.id_dataset]
        fig, ax = plt.subplots(figsize=(5.5, 4.5))
        for j, d in enumerate(shifted):
            color = f"C{j}"
            pts = [(s[self.id_dataset], s.get(d, math.nan)) for s in self.individual.values()]
            ax.plot(*zip(*pts), "o", ms=6, color=color, label=f"{d}: single models") if pts else None
            for scores, label, mk in (
                (self.uniform, "uniform soup", "s"),
                (self.soup, f"{self.method} soup", "*"),
            ):
                if scores:
                    ax.plot(
                        scores[self.id_dataset],
                        scores.get(d, math.nan),
                        mk,
                        ms=12 if mk == "*" else 9,
                        color="crimson" if mk == "*" else "black",
                    )
                    ax.annotate(
                        label,
                        (scores[self.id_dataset], scores.get(d, math.nan)),
                        textcoords="offset points",
                        xytext=(6, 6),
                    )
        ax.margins(x=0.15, y=0.1)
        ax.set_xlabel(f"{self.id_dataset} {self.metric} (in-distribution)")
        ax.set_ylabel(
            f"{self.metric} on the other eval sets"
            if shifted != [self.id_dataset]
            else f"{self.id_dataset} {self.metric}"
        )
        ax.set_title("Model soups: single models, uniform and greedy soup")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
        fig.tight_layout()
        return save_figure(fig, path)


def rank_candidates(
    names: Sequence[str], scores: Sequence[float], greater_is_better: bool = True
) -> list[str]:
    """``names`` by decreasing ID score (increasing if not ``greater_is_better``); non-finite last; stable."""
    sign = 1.0 if greater_is_better else -1.0
    key = {n: (0, -sign * s) if math.isfinite(s) else (1, 0.0) for n, s in zip(names, scores)}
    return sorted(names, key=lambda n: key[n])


# -- the soups -------------------------------------------------------------------------------------
def soup_model(
    model: nn.Module,
    candidates: Sequence[Any] | SoupIngredients,
    score: Scorer | None = None,
    method: str = "greedy",
    names: Sequence[str] | None = None,
    id_dataset: str = "id",
    greater_is_better: bool = True,
    metric: str = "score",
    evaluate_uniform: bool = True,
    progress: bool = True,
) -> SoupResult:
    """The uniform or greedy soup of ``candidates``, left in ``model``; its scores as a :class:`SoupResult`.

    Greedy (Wortsman et al. 2022, Alg. 1): every candidate is scored alone; in decreasing order of ID score
    each is added to the kept set when the uniform average of the kept set plus it scores at least the
    kept set's (``>=``, as the paper; the first is always kept). Only ``score(model)[id_dataset]`` decides;
    the other sets are reported. ``evaluate_uniform``: also score the uniform soup of all (reported). Uniform
    soups are scored only when ``score`` is given. Every soup is written in place into ``model``'s tensors
    (:class:`SoupIngredients`); if a score raises, the model gets its weights from before back.
    """
    if method not in SOUP_METHODS:
        raise ValueError(f"soup method: {method!r} is not one of {', '.join(SOUP_METHODS)}")
    if method == "greedy" and score is None:
        raise ValueError("soup method 'greedy' chooses by score: give score= (a callable or trainer_scorer)")
    if not isinstance(id_dataset, str) or not id_dataset:
        raise ValueError(f"id_dataset must name the in-distribution set, got {id_dataset!r}")
    ingredients = (
        candidates if isinstance(candidates, SoupIngredients) else SoupIngredients(model, candidates, names)
    )
    k = len(ingredients.names)
    result = SoupResult(method, list(ingredients.names), [], id_dataset, metric, greater_is_better)
    t0 = time.perf_counter()
    total = 0 if score is None else 1 if method == "uniform" else 2 * k - 1 + int(evaluate_uniform and k > 1)
    bar = None
    if progress and total and distributed.is_main_process():
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=f"{method} soup", unit="soup")

    def evaluate(subset: list[int]) -> dict[str, float]:
        ingredients.write_(subset)
        got = _scores(score(model), id_dataset)
        result.evaluations += 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix({id_dataset: round(got[id_dataset], 4), "size": len(subset)})
        return got

    saved = ingredients.snapshot()
    try:
        if method == "uniform":
            if score is not None:
                result.soup = result.uniform = evaluate(list(range(k)))
            kept = list(range(k))
        else:
            kept = _greedy(ingredients, evaluate, result, evaluate_uniform)
        result.kept = [ingredients.names[i] for i in kept]
        ingredients.write_(kept)
    except BaseException:
        ingredients.restore_(saved)
        raise
    finally:
        if bar is not None:
            bar.close()
    result.seconds = time.perf_counter() - t0
    return result


def _greedy(
    ingredients: SoupIngredients,
    evaluate: Callable[[list[int]], dict[str, float]],
    result: SoupResult,
    evaluate_uniform: bool = True,
) -> list[int]:
    """Alg. 1 of Wortsman et al.: the kept indices; fills the result's individual scores and steps."""
    names, idd = ingredients.names, result.id_dataset
    k = len(names)
    for i in range(k):
        result.individual[names[i]] = evaluate([i])
    ids = [result.individual[n][idd] for n in names]
    if not any(math.isfinite(s) for s in ids):
        raise ValueError(f"soup: no candidate has a finite {idd!r} score ({ids}); nothing to choose")
    if not all(math.isfinite(s) for s in ids):
        warnings.warn(f"soup: non-finite {idd!r} scores ({ids}) are tried last", RuntimeWarning, stacklevel=3)
    order = [names.index(n) for n in rank_candidates(names, ids, result.greater_is_better)]
    sign = 1.0 if result.greater_is_better else -1.0
    kept, best = [order[0]], result.individual[names[order[0]]]
    result.steps.append(
        {"tried": names[order[0]], "ingredients": [names[order[0]]], "scores": best, "kept": True}
    )
    for i in order[1:]:
        got = evaluate([*kept, i])
        keep = sign * got[idd] >= sign * best[idd]  # NaN never passes
        result.steps.append(
            {"tried": names[i], "ingredients": [names[j] for j in (*kept, i)], "scores": got, "kept": keep}
        )
        if keep:
            kept, best = [*kept, i], got
    result.soup = best
    if len(kept) == k:
        result.uniform = best  # the greedy soup kept all: it is the uniform soup
    elif evaluate_uniform:
        result.uniform = evaluate(list(range(k)))
    return kept
