"""Merge-coefficient search: a recipe's per-model weights (and any numeric parameter the merge-method registry
declares, e.g. density or λ, optionally one value per group of layers) chosen by an evaluation.

Every trial builds the recipe with the trial's values, merges it **in memory** from the inputs read once
(:func:`robustft.merge.io.load_checkpoints`; the same per-tensor code as ``robustft merge``,
:func:`robustft.merge.engine.merged_tensors`), copies the result into a live model's tensors in place and
scores it with ``objective(model) -> float`` (``trainer.evaluate`` on an in-distribution set through
:func:`trainer_objective`, any callable, or the CLI's JSONL scorer :func:`dataset_objective`).

Sampling is optuna's (TPE, CMA-ES, or a grid for at most two values), its study kept in SQLite
(``study.db``) in the output folder: a killed search resumes without evaluating its finished trials again
(a trial that was running is evaluated again). The output folder gets ``best.yaml`` (the best recipe, a
mergekit-compatible YAML), ``trials.csv``/``trials.json`` (the trial table) and ``trials.png`` (objective
per trial, best so far). Memory: the inputs as stored (base + models) plus the live model, plus one
tensor's merge at a time. See docs/merging.md, "Choosing coefficients: robustft search".
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from robustft.checks import as_real, short_repr
from robustft.core.checkpoint import atomic_write_text, pyplot, save_figure, save_report
from robustft.merge.engine import merged_tensors
from robustft.merge.io import LoadedCheckpoint, load_checkpoints, resolve_model
from robustft.merge.recipe import Recipe, load_recipe, parse_recipe
from robustft.merge.registry import METHODS

__all__ = [
    "SAMPLERS",
    "SearchParam",
    "SearchResult",
    "dataset_objective",
    "load_into_model",
    "read_eval_rows",
    "search_dimensions",
    "search_merge",
    "trainer_objective",
    "trial_recipe",
]

SAMPLERS = ("auto", "grid", "tpe", "cmaes")
STUDY_FILE = "study.db"
STUDY_NAME = "robustft-search"


@dataclass(frozen=True)
class SearchParam:
    """One searched recipe parameter ``key`` (a real-valued parameter of the method in the registry) in
    [``low``, ``high``] (``log``: sampled on a log scale). Per model when the registry declares it per model
    (``weight``, ``density`` of TIES: one value per model), else method-wide (``lambda``); ``groups`` > 1
    searches that many values spread over the layers, written as mergekit's gradient list."""

    key: str
    low: float
    high: float
    log: bool = False
    groups: int = 1


@dataclass(frozen=True)
class Dimension:
    """One searched number: its name in the trial table, where it goes in the recipe (``model`` index or
    None for ``parameters:``), the parameter, its layer group and range."""

    name: str
    key: str
    model: int | None
    group: int
    groups: int
    low: float
    high: float
    log: bool


@dataclass
class SearchResult:
    """The best trial (value, searched values, recipe mapping), every trial's row, and the files written."""

    best_value: float
    best_params: dict[str, float]
    best_recipe: dict[str, Any]
    trials: list[dict[str, Any]]
    evaluations: int
    out_dir: Path
    files: list[Path] = field(default_factory=list)


def _model_entries(raw: Mapping[str, Any], recipe: Recipe) -> list[int]:
    """Index in ``raw["models"]`` of each of ``recipe.models`` (the base, when listed there, left out)."""
    base = None if recipe.base_model is None else os.path.normpath(recipe.base_model)
    entries = []
    for i, item in enumerate(raw.get("models") or []):
        path = item if isinstance(item, str) else item.get("model")
        if base is None or os.path.normpath(str(path)) != base:
            entries.append(i)
    return entries


def search_dimensions(recipe: Recipe, params: Sequence[SearchParam]) -> list[Dimension]:
    """The searched numbers of ``params`` for ``recipe``, each checked against the registry: the method has
    that parameter, it is real-valued, and ``low`` and ``high`` pass its check (a density in [0, 1])."""
    if recipe.slices:
        raise ValueError("search: recipes with slices are not supported (search the models: form)")
    if recipe.tokenizer is not None:
        raise ValueError("search: tokenizer_source/tokenizer (a built vocabulary) is not supported")
    if not params:
        raise ValueError("search: give at least one parameter to search")
    spec = METHODS[recipe.merge_method]
    numeric = sorted(k for k, p in {**spec.global_params, **spec.model_params}.items() if _real_valued(p))
    dims: list[Dimension] = []
    seen = set()
    for p in params:
        where = f"search parameter {p.key!r}"
        if p.key in seen:
            raise ValueError(f"{where} is given twice")
        seen.add(p.key)
        if p.key not in numeric:
            raise ValueError(
                f"{where}: merge_method {recipe.merge_method!r} has no real-valued parameter {p.key!r} "
                f"(its searchable parameters: {', '.join(numeric) or 'none'})"
            )
        low, high = as_real(p.low), as_real(p.high)
        if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)) or low >= high:
            raise ValueError(f"{where}: the range needs finite low < high, got [{p.low!r}, {p.high!r}]")
        if p.log and low <= 0:
            raise ValueError(f"{where}: a log-scale range needs low > 0, got {low!r}")
        if isinstance(p.groups, bool) or not isinstance(p.groups, int) or p.groups < 1:
            raise ValueError(f"{where}: groups must be a positive integer, got {short_repr(p.groups)}")
        check = (spec.global_params.get(p.key) or spec.model_params[p.key]).check
        for end in (low, high):
            check(f"{where} range", end)
        per_model = p.key not in spec.global_params
        models: list[int | None] = list(range(len(recipe.models))) if per_model else [None]
        for m in models:
            for g in range(p.groups):
                name = f"models[{m}].{p.key}" if m is not None else p.key
                name += f"@{g}" if p.groups > 1 else ""
                dims.append(Dimension(name, p.key, m, g, p.groups, float(low), float(high), p.log))
    return dims


def _real_valued(param: Any) -> bool:
    """A registry parameter that takes real numbers: its check accepts 0.5 (paths, booleans and counts
    refuse it)."""
    try:
        param.check("probe", 0.5)
    except (ValueError, TypeError):
        return False
    return True


def trial_recipe(raw: Mapping[str, Any], recipe: Recipe, dims: Sequence[Dimension], values: Sequence[float]
                 ) -> dict[str, Any]:
    """The recipe mapping ``raw`` with the searched ``values`` written in: per-model values under
    ``models[i].parameters``, method-wide ones under ``parameters``, several layer groups as a gradient
    list (mergekit's meaning: spread over the layers, linear in between)."""
    out = copy.deepcopy(dict(raw))
    entries = _model_entries(out, recipe)
    grouped: dict[tuple[int | None, str], list[float]] = {}
    for d, v in zip(dims, values, strict=True):
        grouped.setdefault((d.model, d.key), [0.0] * d.groups)[d.group] = float(v)
    for (model, key), vals in grouped.items():
        value: Any = vals[0] if len(vals) == 1 else vals
        if model is None:
            out["parameters"] = {**(out.get("parameters") or {}), key: value}
            continue
        i = entries[model]
        item = out["models"][i]
        item = {"model": item} if isinstance(item, str) else dict(item)
        item["parameters"] = {**(item.get("parameters") or {}), key: value}
        out["models"][i] = item
    return out


def load_into_model(model: nn.Module, tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
    """Copy each (name, tensor) into the model's parameter or buffer of that name, in place (cast to its
    dtype); every floating tensor of the model must be given (tied ones count once). Returns the count."""
    live = model.state_dict(keep_vars=True)
    covered: set[int] = set()
    count = 0
    with torch.no_grad():
        for name, tensor in tensors:
            target = live.get(name)
            if target is None:
                near = ", ".join(sorted(live)[:3])
                raise ValueError(f"tensor {name!r} of the checkpoints is not a parameter or buffer of the "
                                 f"model (it has e.g. {near}): give the model the checkpoints come from")
            if tuple(target.shape) != tuple(tensor.shape):
                raise ValueError(f"tensor {name!r}: shape {tuple(tensor.shape)} in the checkpoints, "
                                 f"{tuple(target.shape)} in the model")
            target.copy_(tensor)
            covered.add(target.data_ptr())
            count += 1
    missing = [n for n, t in live.items()
               if isinstance(t, nn.Parameter) and t.dtype.is_floating_point and t.data_ptr() not in covered]
    if missing:
        raise ValueError(f"model parameter {missing[0]!r} (and {len(missing) - 1} more) is not in the "
                         "checkpoints: the search would evaluate it unmerged")
    return count


def trainer_objective(trainer: Any, eval_dataset: Any, metric: str = "loss") -> Callable[[nn.Module], float]:
    """``f(model)``: ``trainer.evaluate(eval_dataset)``'s ``metric`` (the Trainer's own collator,
    ``compute_metrics`` and batching) for the model the Trainer holds."""
    key = f"search_{metric.removeprefix('eval_')}"

    def objective(model: nn.Module) -> float:
        if getattr(trainer, "model", None) is not model:
            raise ValueError("trainer_objective: the searched model must be trainer.model")
        metrics = trainer.evaluate(eval_dataset=eval_dataset, metric_key_prefix="search")
        if key not in metrics:
            raise ValueError(f"metric: {metric!r} not in the evaluation results (keys: {sorted(metrics)})")
        return float(metrics[key])

    return objective


def read_eval_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of an evaluation set: a JSONL file (one JSON object a line) or a ``datasets`` folder
    (``save_to_disk``)."""
    path = Path(path)
    if path.is_dir():
        from datasets import load_from_disk

        rows = [dict(r) for r in load_from_disk(str(path))]
    elif not path.is_file():
        raise FileNotFoundError(f"--eval {path} does not exist")
    else:
        rows = []
        for i, line in enumerate(path.read_text().splitlines()):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as err:
                raise ValueError(f"--eval {path}: line {i + 1} is not JSON ({err})") from err
            if not isinstance(row, dict):
                raise ValueError(f"--eval {path}: line {i + 1} is not a JSON object")
            rows.append(row)
    if not rows:
        raise ValueError(f"--eval {path}: no rows")
    return rows


def dataset_objective(
    rows: Sequence[Mapping[str, Any]], tokenizer: Any, causal_lm: bool, batch_size: int = 16,
    max_length: int = 256,
) -> tuple[Callable[[nn.Module], float], str, bool]:
    """(``f(model)``, metric name, greater_is_better) on ``rows``, tokenized once: a causal LM's mean loss on
    the ``answer`` tokens of {"prompt", "answer"} rows (every token of {"text"} rows); a sequence
    classifier's accuracy on {"text", "label"} rows ("text_pair" optional)."""
    need = ({"prompt", "answer"} if "prompt" in rows[0] else {"text"}) if causal_lm else {"text", "label"}
    for i, row in enumerate(rows):
        if not need <= set(row):
            kind = "a causal LM" if causal_lm else "a sequence classifier"
            raise ValueError(f"--eval row {i}: {kind} is scored on rows with {sorted(need)}, got "
                             f"{sorted(row)}")
    batches = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        if causal_lm:
            batches.append(_lm_batch(chunk, tokenizer, max_length))
        else:
            pair = [r["text_pair"] for r in chunk] if "text_pair" in chunk[0] else None
            enc = tokenizer([r["text"] for r in chunk], pair, padding=True, truncation=True,
                            max_length=max_length, return_tensors="pt")
            batches.append((dict(enc), torch.tensor([int(r["label"]) for r in chunk])))

    def objective(model: nn.Module) -> float:
        from robustft.core.params import train_mode

        total, count = 0.0, 0
        with torch.no_grad(), train_mode(model, False):
            for inputs, target in batches:
                logits = model(**inputs).logits.float()
                if causal_lm:
                    shift, labels = logits[:, :-1], target[:, 1:]
                    total += float(nn.functional.cross_entropy(
                        shift.reshape(-1, shift.shape[-1]), labels.reshape(-1), ignore_index=-100,
                        reduction="sum"))
                    count += int((labels != -100).sum())
                else:
                    total += float((logits.argmax(-1) == target).sum())
                    count += len(target)
        return total / max(count, 1)

    return objective, ("answer_loss" if causal_lm else "accuracy"), not causal_lm


def _lm_batch(
    chunk: Sequence[Mapping[str, Any]], tokenizer: Any, max_length: int
) -> tuple[dict, torch.Tensor]:
    """Padded input ids and labels of causal-LM rows: -100 on the prompt and the padding."""
    seqs, labels = [], []
    for r in chunk:
        if "prompt" in r:
            prompt = tokenizer(r["prompt"], add_special_tokens=True)["input_ids"]
            answer = tokenizer(r["answer"], add_special_tokens=False)["input_ids"]
            ids = (prompt + answer)[:max_length]
            lab = ([-100] * len(prompt) + answer)[:max_length]
        else:
            ids = tokenizer(r["text"], add_special_tokens=True)["input_ids"][:max_length]
            lab = list(ids)
        seqs.append(ids)
        labels.append(lab)
    width = max(len(s) for s in seqs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    lab = torch.tensor([x + [-100] * (width - len(x)) for x in labels])
    return {"input_ids": ids, "attention_mask": mask}, lab


def _sampler(kind: str, dims: Sequence[Dimension], grid_points: int, seed: int):
    """optuna's sampler for ``kind`` (auto: a grid for at most two numbers, else TPE)."""
    import optuna

    if kind not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {short_repr(kind)}")
    if kind == "auto":
        kind = "grid" if len(dims) <= 2 else "tpe"
    if kind == "grid":
        if isinstance(grid_points, bool) or not isinstance(grid_points, int) or grid_points < 2:
            raise ValueError(f"grid_points must be an integer >= 2, got {short_repr(grid_points)}")
        space = {d.name: _grid(d, grid_points) for d in dims}
        return kind, optuna.samplers.GridSampler(space, seed=seed)
    if kind == "cmaes":
        try:
            import cmaes  # noqa: F401
        except ImportError as err:
            raise ValueError("sampler 'cmaes' needs the cmaes package: pip install 'robustft[search]'"
                             ) from err
        return kind, optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    return kind, optuna.samplers.TPESampler(seed=seed, multivariate=True)


def _grid(d: Dimension, points: int) -> list[float]:
    if d.log:
        return [float(math.exp(math.log(d.low) + (math.log(d.high) - math.log(d.low)) * i / (points - 1)))
                for i in range(points)]
    return [float(d.low + (d.high - d.low) * i / (points - 1)) for i in range(points)]


@contextmanager
def _locked(out: Path):
    """One search per output folder at a time (an advisory lock on ``out/.lock``)."""
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            raise ValueError(f"out_dir {out}: another search is running in this folder") from err
        yield


def _definition(recipe: Recipe, dims: Sequence[Dimension], sampler: str, greater_is_better: bool) -> str:
    """What makes two runs the same search (compared on resume): recipe, searched numbers, sampler, sense."""
    return json.dumps({"recipe": recipe.raw, "dims": [d.__dict__ for d in dims], "sampler": sampler,
                       "greater_is_better": bool(greater_is_better)}, sort_keys=True, default=str)


def _connect(db: Path):
    """A SQLite connection in WAL mode with ``synchronous=NORMAL``: a commit is a write, not an fsync (each
    trial commits a dozen times), and survives the process being killed; a power cut may lose the last
    trials, which the search then runs again."""
    import sqlite3

    conn = sqlite3.connect(str(db), check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


def _open_study(out: Path, definition: str, sampler, reseed: Callable[[int], Any], greater_is_better: bool,
                overwrite: bool):
    """The study in ``out/study.db``, created or resumed; a study of another search is refused; a resumed
    TPE/CMA-ES study gets ``reseed(n trials so far)`` as its sampler (a grid keeps its seed: it orders the
    grid); trials a killed run left running are marked
    failed and queued again with their values."""
    import optuna
    from optuna.trial import TrialState

    db = out / STUDY_FILE
    if overwrite:
        for path in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
            path.unlink(missing_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(f"sqlite:///{db}", engine_kwargs={"creator": lambda: _connect(db)})
    study = optuna.create_study(storage=storage, study_name=STUDY_NAME, sampler=sampler, load_if_exists=True,
                                direction="maximize" if greater_is_better else "minimize")
    stored = study.user_attrs.get("definition")
    if stored is None:
        study.set_user_attr("definition", definition)
    elif stored != definition:
        raise ValueError(f"out_dir {out} holds the study of another search (recipe, searched parameters, "
                         "sampler or direction differ): use another folder or overwrite=True (--overwrite)")
    if study.trials and not isinstance(sampler, optuna.samplers.GridSampler):
        study.sampler = reseed(len(study.trials))  # the same seed would replay the first run's draws
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        if t.params:
            study.enqueue_trial(t.params, skip_if_exists=False)
    return study


def _trial_rows(study, dims: Sequence[Dimension], greater_is_better: bool) -> list[dict[str, Any]]:
    """One row per finished trial: number, value, best so far, searched values, merge and eval seconds."""
    from optuna.trial import TrialState

    rows, best = [], None
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        v = float(t.value)
        better = best is None or (v > best if greater_is_better else v < best)
        best = v if better else best
        rows.append({"trial": t.number, "value": v, "best": best, **{d.name: t.params[d.name] for d in dims},
                     "merge_s": t.user_attrs.get("merge_s"), "eval_s": t.user_attrs.get("eval_s")})
    return rows


def _plot(rows: list[dict[str, Any]], label: str) -> Callable[[Path], Path | None]:
    """A plot function for ``save_report``: objective per trial and the best so far (None without
    matplotlib)."""

    def plot(path: Path) -> Path | None:
        plt = pyplot()
        if plt is None:
            return None
        fig, ax = plt.subplots(figsize=(5.5, 4))
        x = list(range(1, len(rows) + 1))
        ax.plot(x, [r["value"] for r in rows], "o", ms=4, alpha=0.6, label="trial")
        ax.plot(x, [r["best"] for r in rows], "-", color="crimson", label="best so far")
        ax.set_xlabel("trial (finished, in order)")
        ax.set_ylabel(label)
        ax.set_title("robustft search")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        return save_figure(fig, path)

    return plot


def _csv(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    keys = list(rows[0])
    lines = [",".join(keys)]
    lines += [",".join("" if r[k] is None else f"{r[k]:.6g}" if isinstance(r[k], float) else str(r[k])
                       for k in keys) for r in rows]
    return "\n".join(lines) + "\n"


def search_merge(
    recipe: Recipe | Mapping[str, Any] | str | os.PathLike,
    model: nn.Module,
    objective: Callable[[nn.Module], float],
    params: Sequence[SearchParam],
    out_dir: str | os.PathLike,
    greater_is_better: bool = True,
    n_trials: int | None = None,
    timeout: float | None = None,
    sampler: str = "auto",
    grid_points: int = 5,
    seed: int = 0,
    progress: bool = True,
    overwrite: bool = False,
    metric_name: str = "objective",
) -> SearchResult:
    """Search ``params`` of ``recipe`` for the best ``objective(model)``; the model ends with the best merge.

    ``n_trials``: finished trials wanted in total (a resumed search runs the rest; default: the grid's size,
    required for TPE/CMA-ES unless ``timeout``); ``timeout``: seconds for this run. The study lives in
    ``out_dir/study.db``: calling again with the same arguments resumes it (``overwrite`` starts afresh).
    If the objective raises, the error propagates (the trial is recorded as failed) and the model holds
    that trial's merge.
    """
    import optuna
    from tqdm.auto import tqdm

    if isinstance(recipe, (str, os.PathLike)):
        recipe = load_recipe(recipe)
    elif not isinstance(recipe, Recipe):
        recipe = parse_recipe(recipe, source="search recipe")
    dims = search_dimensions(recipe, params)
    kind, smp = _sampler(sampler, dims, grid_points, seed)
    if n_trials is not None and (isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1):
        raise ValueError(f"n_trials must be a positive integer, got {short_repr(n_trials)}")
    if timeout is not None and (as_real(timeout) is None or not timeout > 0):
        raise ValueError(f"timeout must be a positive number of seconds, got {short_repr(timeout)}")
    if n_trials is None:
        if kind != "grid" and timeout is None:
            raise ValueError(f"sampler {kind!r}: give a budget: n_trials or timeout (--trials, --timeout)")
        n_trials = grid_points ** len(dims) if kind == "grid" else None
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"out_dir {out} exists and is not a folder")

    paths = [recipe.base_model, *(m.path for m in recipe.models)]
    cache = load_checkpoints([resolve_model(p) for p in paths if p is not None])
    fishers = [p for m in recipe.models for k, p in m.parameters.items()
               if k == "fisher" and isinstance(p, str)]
    cache.update(load_checkpoints(fishers))

    def open_reader(path: Path) -> LoadedCheckpoint:
        return cache[Path(path)]

    def merge(raw: Mapping[str, Any], source: str) -> None:
        trial = parse_recipe(raw, source=source)
        load_into_model(model, merged_tensors(trial, open_reader))

    evaluations = 0

    def run(trial: optuna.Trial) -> float:
        nonlocal evaluations
        values = [_suggest(trial, d) for d in dims]
        t0 = time.perf_counter()
        merge(trial_recipe(recipe.raw, recipe, dims, values), f"search trial {trial.number}")
        t1 = time.perf_counter()
        value = float(objective(model))
        evaluations += 1
        trial.set_user_attr("merge_s", t1 - t0)
        trial.set_user_attr("eval_s", time.perf_counter() - t1)
        if not math.isfinite(value):
            shown = dict(zip([d.name for d in dims], values, strict=True))
            raise ValueError(f"objective returned {value} at trial {trial.number} ({shown})")
        return value

    # the recipe at the middle of every range, merged once: the recipe, the trial values and the model are
    # checked before anything is written (a gradient on a model without layers, a model that does not fit)
    middle = [math.sqrt(d.low * d.high) if d.log else (d.low + d.high) / 2 for d in dims]
    merge(trial_recipe(recipe.raw, recipe, dims, middle), "search check")
    with _locked(out):
        definition = _definition(recipe, dims, kind, greater_is_better)
        study = _open_study(out, definition, smp, lambda n: _sampler(sampler, dims, grid_points, seed + n)[1],
                            greater_is_better, overwrite)
        from optuna.trial import TrialState

        done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
        remaining = None if n_trials is None else max(0, n_trials - done)
        bar = tqdm(total=n_trials, initial=done, desc="search", unit="trial", disable=not progress)

        def tick(study: optuna.Study, trial: Any) -> None:
            bar.update(1)
            if study.best_trials:
                bar.set_postfix(best=f"{study.best_value:.4g}")

        try:
            if remaining != 0:
                study.optimize(run, n_trials=remaining, timeout=timeout, callbacks=[tick], catch=())
        finally:
            bar.close()
        rows = _trial_rows(study, dims, greater_is_better)
        if not rows:
            raise ValueError("search: no trial finished (raise timeout or n_trials)")
        best = study.best_trial
        best_values = [best.params[d.name] for d in dims]
        best_raw = trial_recipe(recipe.raw, recipe, dims, best_values)
        merge(best_raw, "search best")
        summary = {"metric": metric_name, "greater_is_better": greater_is_better, "sampler": kind,
                   "best_trial": best.number, "best_value": float(best.value),
                   "best_params": dict(best.params), "trials": rows}
        files = save_report(out, "trials", json.dumps(summary, indent=2) + "\n", _csv(rows),
                            _plot(rows, metric_name))
        atomic_write_text(out / "best.yaml", yaml.safe_dump(best_raw, sort_keys=False))
        files.append(out / "best.yaml")
    return SearchResult(float(best.value), dict(best.params), best_raw, rows, evaluations, out, files)


def _suggest(trial: Any, d: Dimension) -> float:
    return float(trial.suggest_float(d.name, d.low, d.high, log=d.log))
