"""Output vocabularies of merges, as mergekit 0.1.5 builds them (``tokenizer_source`` and ``tokenizer:``).

mergekit (``mergekit/tokenizer/build.py``, ``embed.py``, ``merge.py``) picks an output tokenizer (the base
model's, a named model's, or the union of all the models' vocabularies plus the ``tokens:`` entries), maps
every input model's embedding-like tensors (those of the model's input and output embeddings, vocabulary
on axis 0) onto the output ids before merging, fills the rows a model lacks, and writes the tokenizer with
``save_pretrained`` and the config's ``vocab_size`` to match. This module does the same in three steps:

- :func:`build_vocabulary` (tokenizers only, before any tensor is read): the output tokenizer and, per
  input model, a row map output id -> input row (-1: the row comes from a fill rule);
- :meth:`VocabularyPlan.reads` / :func:`remap_rows`: one model's tensor in the output vocabulary's rows,
  the fill rows read row by row from the other models (the engine streams one tensor at a time);
- :meth:`VocabularyPlan.write`: the tokenizer files and the config's ``vocab_size``.

Where mergekit's result depends on hash order (the order of the new tokens of ``union``, the model it takes
as base when there is no ``base_model``), robustft takes the recipe's order; what mergekit stops on with an
exception, robustft refuses by name before anything is written. transformers is imported inside the
functions (``import robustft.merge`` stays cheap).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from robustft.checks import check_integer, check_path, short_repr

__all__ = [
    "TokenSource",
    "TokenizerSpec",
    "VocabularyPlan",
    "build_vocabulary",
    "parse_tokenizer",
    "remap_rows",
    "vocabulary_tensors",
]

LOG = logging.getLogger(__name__)

#: the recipe keys this module reads
TOKENIZER_KEYS = ("tokenizer_source", "tokenizer")


@dataclass(frozen=True)
class TokenSource:
    """Where one ``tokenizer.tokens`` entry's row comes from (mergekit's ``TokenEmbeddingConfig``).

    ``kind``: ``"model"`` (that model's row of the token), ``"zero"``, ``"model_token"`` (row ``token_id``
    or the row of ``token`` in ``model``), or ``"auto"`` (no source given: the default rule). ``force``:
    every model takes this row, also those that have the token.
    """

    kind: str = "auto"
    model: str | None = None
    token: str | None = None
    token_id: int | None = None
    force: bool = False


@dataclass(frozen=True)
class TokenizerSpec:
    """``source``: ``"base"``, ``"union"`` or a model path; ``tokens``: per-token sources (added to the
    vocabulary when missing); ``pad_to_multiple_of``: rows padded up to a multiple (with the mean row)."""

    source: str
    tokens: dict[str, TokenSource] = field(default_factory=dict)
    pad_to_multiple_of: int | None = None

    def paths(self) -> list[str]:
        """Model folders the spec names besides the recipe's models (inputs of the merge)."""
        out = [] if self.source in ("base", "union") else [self.source]
        return out + [t.model for t in self.tokens.values() if t.model is not None]


def _parse_token(where: str, raw: Any) -> TokenSource:
    """One ``tokens:`` entry: ``{source: PATH | {kind: zero} | {kind: model_token, model, token|token_id},
    force: bool}``."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping) or set(raw) - {"source", "force"}:
        raise ValueError(f"{where}: expected {{source: ..., force: bool}}, got {short_repr(raw)}")
    force = raw.get("force", False)
    if not isinstance(force, bool):
        raise ValueError(f"{where}.force must be true or false, got {short_repr(force)}")
    src = raw.get("source")
    if src is None:
        return TokenSource("auto", force=force)
    if isinstance(src, str):
        check_path(f"{where}.source", src)
        return TokenSource("model", model=src, force=force)
    kind = src.get("kind") if isinstance(src, Mapping) else None
    if kind == "zero" and set(src) == {"kind"}:
        return TokenSource("zero", force=force)
    if kind == "model_token" and set(src) <= {"kind", "model", "token", "token_id"} and "model" in src:
        check_path(f"{where}.source.model", src["model"])
        token, token_id = src.get("token"), src.get("token_id")
        if (token is None) == (token_id is None):
            raise ValueError(f"{where}.source: give exactly one of token and token_id")
        if token_id is not None:
            check_integer(f"{where}.source.token_id", token_id)
            if token_id < 0:
                raise ValueError(f"{where}.source.token_id must be >= 0, got {token_id}")
        elif not isinstance(token, str):
            raise ValueError(f"{where}.source.token must be a string, got {short_repr(token)}")
        return TokenSource("model_token", str(src["model"]), token, token_id, force)
    raise ValueError(
        f"{where}.source: expected a model path, {{kind: zero}} or {{kind: model_token, model: PATH, "
        f"token: STR | token_id: INT}}, got {short_repr(src)}"
    )


def parse_tokenizer(data: Mapping, source: str = "recipe") -> TokenizerSpec | None:
    """The recipe's ``tokenizer_source`` (base | union | a model path) or ``tokenizer:`` block
    (``{source, tokens, pad_to_multiple_of}``, source union by default) as mergekit reads them; None when
    neither is given (the reference model's tokenizer files are copied, mergekit's ``--copy-tokenizer``)."""
    ts, block = data.get("tokenizer_source"), data.get("tokenizer")
    if ts is not None and block is not None:
        raise ValueError(f"{source}: give tokenizer_source or tokenizer, not both (as mergekit)")
    if ts is not None:
        check_path(f"{source}: tokenizer_source", ts)
        return TokenizerSpec(str(ts))
    if block is None:
        return None
    where = f"{source}: tokenizer"
    if not isinstance(block, Mapping) or set(block) - {"source", "tokens", "pad_to_multiple_of"}:
        raise ValueError(f"{where}: expected {{source, tokens, pad_to_multiple_of}}, got {short_repr(block)}")
    src = block.get("source", "union")
    check_path(f"{where}.source", src)
    tokens_raw = block.get("tokens") or {}
    if not isinstance(tokens_raw, Mapping) or not all(isinstance(k, str) for k in tokens_raw):
        raise ValueError(f"{where}.tokens: expected a map token -> {{source, force}}")
    tokens = {k: _parse_token(f"{where}.tokens[{k!r}]", v) for k, v in tokens_raw.items()}
    pad = block.get("pad_to_multiple_of")
    if pad is not None:
        check_integer(f"{where}.pad_to_multiple_of", pad)
        if pad < 1:
            raise ValueError(f"{where}.pad_to_multiple_of must be >= 1, got {pad}")
    return TokenizerSpec(str(src), tokens, pad)


def _same(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    return os.path.normpath(a) == os.path.normpath(b)


def _config(path: str | os.PathLike) -> dict:
    p = Path(path) / "config.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def _vocab_key(config: dict) -> list[str] | None:
    """Where the config keeps the vocabulary size: ``vocab_size`` or ``text_config.vocab_size``."""
    if "vocab_size" in config:
        return ["vocab_size"]
    if isinstance(config.get("text_config"), dict) and "vocab_size" in config["text_config"]:
        return ["text_config", "vocab_size"]
    return None


def _vocab_size(path: str | os.PathLike) -> int | None:
    """The model's embedding size from its config (None when it has none, as mergekit's fallback)."""
    config = _config(path)
    key = _vocab_key(config)
    if key is None:
        return None
    for k in key:
        config = config[k]
    return config


def _load_tokenizer(path: str, what: str):
    """``AutoTokenizer.from_pretrained(path)``; the error names the recipe option it serves."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as err:  # noqa: BLE001 - any loader failure is the same user error
        raise ValueError(f"{what}: cannot load a tokenizer from {path} ({err})") from err


def _union(base_tok, tokenizers: list[tuple[str, Any]]):
    """mergekit's ``build_union_tokenizer``: the base tokenizer plus every other token (below each model's
    vocab_size) in model order, then every added token; new tokens in the order of their ids (mergekit's
    order is a hash map's)."""
    from transformers import AutoTokenizer

    out_vocab: dict[str, None] = {}
    out_added: dict[str, Any] = {}
    for path, tok in tokenizers:
        size = _vocab_size(path) or tok.vocab_size
        added = tok.added_tokens_decoder
        added_names = {info.content for info in added.values()}
        for word, idx in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if idx < size and word not in added_names:
                out_vocab.setdefault(word)
        for idx, info in sorted(added.items()):
            if idx < size and info.content not in out_added:
                out_added[info.content] = info
    with tempfile.TemporaryDirectory() as tmp:  # a copy, as mergekit (the base tokenizer stays as is)
        base_tok.save_pretrained(tmp)
        res = AutoTokenizer.from_pretrained(tmp)
    base_vocab = base_tok.get_vocab()
    for word in out_vocab:
        if word not in out_added and word not in base_vocab:
            res.add_tokens(word)
    for info in out_added.values():
        res.add_tokens(info)
    return res


def _meta_model(path: str | os.PathLike, what: str):
    """The config's architecture built on the meta device (no weights): where its embeddings are."""
    import transformers
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
        cls = getattr(transformers, (config.architectures or [""])[0], None)
        if cls is None:
            raise ValueError(f"unknown architecture {config.architectures}")
        with torch.device("meta"):
            return cls(config)
    except Exception as err:  # noqa: BLE001
        raise ValueError(
            f"{what}: cannot tell the embedding tensors of {path} from its config ({err})"
        ) from err


def vocabulary_tensors(path: str | os.PathLike, names: Sequence[str]) -> list[str]:
    """Names among ``names`` of the model's input/output embedding weights and biases (vocabulary on axis
    0): the modules ``get_input_embeddings``/``get_output_embeddings`` of the config's architecture, built on
    the meta device, as mergekit finds them for architectures it has no table for."""
    model = _meta_model(path, "tokenizer_source")
    ids = set()
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        for attr in ("weight", "bias"):
            param = getattr(module, attr, None) if module is not None else None
            if param is not None:
                ids.add(id(param))
    found = {n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in ids}
    return [n for n in names if n in found]


def embedding_names(path: str | os.PathLike) -> tuple[str, str] | None:
    """(input, output) embedding weight names of the model's architecture (``model.embed_tokens.weight``,
    ``lm_head.weight`` for Llama), tied or not; None when it has no output embedding. mergekit reads the
    input one in place of a missing output one (its architectures' ``tied_names``)."""
    model = _meta_model(path, "tied embeddings")
    where = {id(m): n for n, m in model.named_modules()}
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if inp is None or out is None or id(inp) not in where or id(out) not in where:
        return None
    return f"{where[id(inp)]}.weight", f"{where[id(out)]}.weight"


@dataclass
class VocabularyPlan:
    """The output vocabulary and how each input model's embedding-like tensors map onto it.

    ``rows[path]``: int64 (n_tokens,), output id -> the model's row, -1 where the row comes from the fill
    rules; ``fill``: output id -> rule, ``("mean", [(path, row), ...])``, ``("zero",)`` or
    ``("row", path, row)``; ``size``: output rows (n_tokens, padded up to ``pad_to_multiple_of`` with each
    model's mean row); ``tensors``: the names remapped.
    """

    tokenizer: Any
    n_tokens: int
    size: int
    rows: dict[str, torch.Tensor]
    fill: dict[int, tuple]
    tensors: frozenset[str]
    #: what the fill rules of another group of models are built from (:meth:`group`)
    spec: TokenizerSpec | None = field(default=None, repr=False)
    maps: dict[str, dict[int, int]] = field(default_factory=dict, repr=False)
    vocabs: dict[str, dict[str, int]] = field(default_factory=dict, repr=False)

    def key(self, path: str | os.PathLike) -> str:
        """The row map's key of a model path."""
        return os.path.normpath(path)

    def group(
        self, models: Sequence[str | os.PathLike], base: str | os.PathLike | None, readers: Mapping[str, Any]
    ) -> VocabularyPlan:
        """The plan for a tensor gathered from ``models`` only (mergekit's ``PermutedVocabulary`` fills a
        row from the models it gathered, e.g. one slice's sources), ``base`` the base model of the rule
        "the base's row"; every row it reads checked against ``readers`` (path -> reader)."""
        models = list(dict.fromkeys(self.key(m) for m in models))
        missing = [m for m in models if m not in self.maps]
        if missing or self.spec is None:
            raise ValueError(f"tokenizer: {missing or models} not among the models of the vocabulary plan")
        readers = {self.key(k): v for k, v in readers.items()}
        fill, _ = _fill_rules(self.spec, self.vocabs_out, models, base, self.maps, self.vocabs)
        plan = VocabularyPlan(
            self.tokenizer, self.n_tokens, self.size, {m: self.rows[m] for m in models}, fill, self.tensors,
            self.spec, self.maps, self.vocabs,
        )  # fmt: skip
        _check_rows(plan, models, readers)
        return plan

    @property
    def vocabs_out(self) -> dict[str, int]:
        """The output vocabulary: token -> id."""
        return self.tokenizer.get_vocab()

    def shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The output shape of tensor ``name``."""
        return (self.size, *shape[1:]) if name in self.tensors else tuple(shape)

    def fill_rows(self, name: str, readers: Mapping[str, Any], dtype: torch.dtype) -> torch.Tensor:
        """(len(fill), *rest) rows of the fill rules for tensor ``name`` (``dtype``), read row by row from
        ``readers`` (path -> CheckpointReader)."""
        ids = sorted(self.fill)
        wanted: dict[str, set[int]] = {}
        for i in ids:
            for path, row in _pairs(self.fill[i]):
                wanted.setdefault(path, set()).add(row)
        got = {}
        for path, rows in wanted.items():
            order = sorted(rows)
            data = readers[path].get_rows(name, order).to(dtype)
            got.update({(path, r): data[k] for k, r in enumerate(order)})
        rest = next(iter(readers.values())).infos[name].shape[1:]
        out = torch.zeros((len(ids), *rest), dtype=dtype)
        for k, i in enumerate(ids):
            rule = self.fill[i]
            if rule[0] == "mean":  # mergekit: zeros + each row in model order, then / count
                acc = torch.zeros(rest, dtype=dtype)
                for pair in rule[1]:
                    acc = acc + got[pair]
                out[k] = acc / len(rule[1])
            elif rule[0] == "row":
                out[k] = got[rule[1:]]
        return out

    def reads(
        self, name: str, readers: Mapping[str, Any], dtype: torch.dtype
    ) -> Callable[[Any], torch.Tensor]:
        """A function reader -> that model's tensor ``name`` in the output vocabulary's rows (``dtype``);
        a plain ``reader.get(name)`` for tensors without a vocabulary axis."""
        if name not in self.tensors:
            return lambda reader: reader.get(name)
        fill = self.fill_rows(name, {self.key(k): v for k, v in readers.items()}, dtype)
        ids = torch.tensor(sorted(self.fill), dtype=torch.long)

        def read(reader) -> torch.Tensor:
            rows = self.rows[self.key(reader.path)]
            return remap_rows(reader.get(name).to(dtype), rows, ids, fill, self.size)

        return read

    def write(self, out_dir: str | os.PathLike) -> None:
        """The tokenizer files (``save_pretrained``) and the config's vocab size, as mergekit writes them."""
        out_dir = Path(out_dir)
        self.tokenizer.save_pretrained(str(out_dir))
        path = out_dir / "config.json"
        if path.is_file():
            config = json.loads(path.read_text())
            node = config
            key = _vocab_key(config) or ["vocab_size"]
            for k in key[:-1]:
                node = node[k]
            node[key[-1]] = self.size
            path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def remap_rows(
    tensor: torch.Tensor, rows: torch.Tensor, fill_ids: torch.Tensor, fill: torch.Tensor, size: int
) -> torch.Tensor:
    """One model's embedding-like ``tensor`` (vocabulary on axis 0) in the output vocabulary: output row i
    is ``tensor[rows[i]]``, or, where ``rows[i] < 0``, the fill row of i (``fill[k]`` for
    ``fill_ids[k] == i``); rows beyond ``len(rows)`` up to ``size`` are the mean of the others (mergekit's
    ``pad_to_multiple_of``)."""
    n = rows.numel()
    out = torch.zeros((size, *tensor.shape[1:]), dtype=fill.dtype)
    own = (rows >= 0).nonzero().squeeze(1)
    out[own] = tensor[rows[own]].to(fill.dtype)
    if fill_ids.numel():
        lacking = rows[fill_ids] < 0
        out[fill_ids[lacking]] = fill[lacking]
    if size > n:
        out[n:] = out[:n].mean(dim=0)
    return out


def _row_maps(
    vocab_out: dict[str, int], models: list[str], vocabs: dict[str, dict[str, int]]
) -> dict[str, dict[int, int]]:
    """mergekit's permutations: output id -> the model's id of the token, -1 when it lacks it; a token at
    an id beyond the model's vocab_size stops the merge (mergekit then fails on a KeyError)."""
    maps = {}
    for path in models:
        vocab, size = vocabs[path], _vocab_size(path)
        size = len(vocab) if size is None else size
        p = {}
        for word, new in vocab_out.items():
            old = vocab.get(word, -1)
            if old >= size:
                raise ValueError(
                    f"tokenizer: token {word!r} has id {old} in {path}, beyond its vocab_size {size}; "
                    "mergekit 0.1.5 stops on a KeyError here (with source: base, a tokens: entry the base "
                    "tokenizer lacks does this)"
                )
            p[new] = old
        maps[path] = p
    return maps


def _fill_rules(
    spec: TokenizerSpec,
    vocab_out: dict[str, int],
    models: list[str],
    base: str | None,
    maps: dict[str, dict[int, int]],
    vocabs: dict[str, dict[str, int]],
) -> tuple[dict[int, tuple], set[int]]:
    """mergekit's ``assign_embedding_sources`` + default embeddings: the fill rule of every output id that
    some model lacks (or whose ``tokens:`` entry is forced), and the forced ids."""
    fill, forced = {}, set()
    base_key = next((m for m in models if base is not None and _same(m, base)), None)
    for word, i in vocab_out.items():
        cfg = spec.tokens.get(word)
        has = [m for m in models if maps[m][i] >= 0]
        if cfg is not None and cfg.force:
            forced.add(i)
        elif len(has) == len(models):
            continue
        where = f"tokenizer.tokens[{word!r}]"
        if cfg is None:
            if len(has) == 1:
                fill[i] = ("row", has[0], maps[has[0]][i])
            elif not has:
                LOG.warning("token %r is in no model: its rows are zero", word)
                fill[i] = ("zero",)
            elif base_key is not None and maps[base_key][i] >= 0:
                fill[i] = ("row", base_key, maps[base_key][i])
            else:
                fill[i] = ("mean", [(m, maps[m][i]) for m in has])
        elif cfg.kind == "zero":
            fill[i] = ("zero",)
        elif cfg.kind == "auto":
            raise ValueError(f"{where}: give a source (some model lacks this token; mergekit stops here)")
        else:
            model = next((m for m in models if _same(m, cfg.model)), None)
            if model is None:
                raise ValueError(f"{where}.source: {cfg.model} is not one of the merged models")
            if cfg.kind == "model":
                if maps[model][i] < 0:
                    raise ValueError(f"{where}.source: {cfg.model} has no token {word!r}")
                fill[i] = ("row", model, maps[model][i])
            else:
                row = cfg.token_id
                if row is None:
                    if cfg.token not in vocabs[model]:
                        raise ValueError(f"{where}.source: {cfg.model} has no token {cfg.token!r}")
                    row = vocabs[model][cfg.token]
                fill[i] = ("row", model, row)
    return fill, forced


def build_vocabulary(
    spec: TokenizerSpec,
    base: str | None,
    models: Sequence[str],
    readers: Mapping[str, Any],
    check: bool = True,
) -> VocabularyPlan:
    """The output tokenizer of ``spec`` and the row maps of the merge's models (``models``: the listed
    models, then the base when not among them, as mergekit gathers them; ``readers``: path -> open
    CheckpointReader of each, headers only), with the fill rules of all of them and every row they read
    checked; without ``check``, no fill rules (a slices merge builds them per group of models it gathers,
    :meth:`VocabularyPlan.group`). Reads no tensor."""
    models = list(dict.fromkeys(os.path.normpath(m) for m in models))
    readers = {os.path.normpath(k): v for k, v in readers.items()}
    tok_base = os.path.normpath(base) if base is not None else models[0]
    base_tok = _load_tokenizer(tok_base, "tokenizer_source (the base model's tokenizer)")
    size = _vocab_size(tok_base) or len(base_tok.get_vocab())
    unused = sorted(w for w, i in base_tok.get_vocab().items() if i >= size)
    if unused:
        raise ValueError(
            f"tokenizer_source: the tokenizer of {tok_base} has {len(unused)} token(s) with ids beyond its "
            f"vocab_size {size} (e.g. {unused[0]!r}); mergekit strips them from BPE tokenizers only, "
            "robustft refuses"
        )
    tokenizers = {tok_base: base_tok}
    for m in models:
        if m not in tokenizers:
            try:
                tokenizers[m] = _load_tokenizer(m, "tokenizer_source")
            except ValueError as err:
                LOG.warning("%s; taking it to have the vocabulary of %s (as mergekit)", err, tok_base)
    if spec.source == "base":
        out = base_tok
    elif spec.source == "union":
        out = _union(base_tok, list(tokenizers.items()))
    else:
        out = _load_tokenizer(spec.source, "tokenizer_source")
    existing = set(out.get_vocab())
    for word in spec.tokens:
        if word not in existing:
            out.add_tokens(word)
            existing.add(word)
    vocab_out = out.get_vocab()
    vocabs = {m: tokenizers.get(m, base_tok).get_vocab() for m in models}
    maps = _row_maps(vocab_out, models, vocabs)
    forced = {vocab_out[w] for w, cfg in spec.tokens.items() if cfg.force}
    fill = _fill_rules(spec, vocab_out, models, base, maps, vocabs)[0] if check else {}
    n = len(vocab_out)
    padded = n
    if spec.pad_to_multiple_of and n % spec.pad_to_multiple_of:
        padded = (n // spec.pad_to_multiple_of + 1) * spec.pad_to_multiple_of
    ref = readers[models[0]]
    tensors = frozenset(vocabulary_tensors(ref.folder, ref.names))
    if not tensors:
        raise ValueError(f"tokenizer_source: found no embedding tensor in {ref.path}")
    rows = {}
    for m in models:
        own = [-1] * n
        for i, old in maps[m].items():
            own[i] = -1 if i in forced else old
        rows[m] = torch.tensor(own, dtype=torch.long)
    plan = VocabularyPlan(out, n, padded, rows, fill, tensors, spec, maps, vocabs)
    if check:
        _check_rows(plan, models, readers)
    return plan


def _check_rows(plan: VocabularyPlan, models: list[str], readers: Mapping[str, Any]) -> None:
    """Every model has the plan's tensors with every row its row map and the fill rules read."""
    for m in models:
        needed = [old for rule in plan.fill.values() for old in _rule_rows(rule, m)] + plan.rows[m].tolist()
        for name in sorted(plan.tensors):
            info = readers[m].infos.get(name)
            if info is None:
                raise ValueError(f"tokenizer_source: {m} lacks tensor {name!r}")
            if max(needed, default=-1) >= info.shape[0]:
                raise ValueError(
                    f"tokenizer: row {max(needed)} of tensor {name!r} is needed but {m} has "
                    f"{info.shape[0]} rows"
                )


def _pairs(rule: tuple) -> list[tuple[str, int]]:
    """The (model path, row) pairs a fill rule reads."""
    return list(rule[1]) if rule[0] == "mean" else [rule[1:]] if rule[0] == "row" else []


def _rule_rows(rule: tuple, model: str) -> list[int]:
    """The rows of ``model`` a fill rule reads."""
    return [row for path, row in _pairs(rule) if path == model]
