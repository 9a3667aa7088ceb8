"""WordNet 3.0 as offline real text (Debian ``wordnet-base``): the LLM demo's glosses and the gloss task.

One reader of ``data.noun`` (:func:`read_noun_synsets`) serves both:

- :func:`read_wordnet_glosses`: (word, definition) pairs of chosen lexicographer files, the LLM demo's
  "define the word" data (``robustft.demos.llm``).
- :func:`make_gloss_task`: a second classification task for the encoder (``robustft demo --task glosses``),
  a subpopulation shift in the manner of BREEDS (Santurkar et al. 2021): classify a dictionary definition
  as an animal, a plant, an artifact or a food. Each class is split by WordNet's hypernym tree into
  subgroups (mammals, birds, trees, shrubs, tools, vehicles, ...); fine-tuning and in-distribution
  evaluation see some subgroups of each class, the shifted split only the others. The text is real
  (WordNet's glosses), and the shift is one the training data does not show: no example of a bird, a
  shrub, a vehicle or a vegetable is ever trained on.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "GLOSS_CLASSES",
    "NOUN_LEXFILES",
    "NounSynset",
    "make_gloss_task",
    "read_noun_synsets",
    "read_wordnet_glosses",
    "wordnet_dir",
]

WORDNET_HINT = "apt-get install wordnet-base  (Debian/Ubuntu; or --wordnet-dir: a WordNet 3.0 dict folder)"
# WordNet 3.0 lexicographer file numbers of the noun files (lexnames(5WN))
NOUN_LEXFILES = {
    3: "noun.Tops", 4: "noun.act", 5: "noun.animal", 6: "noun.artifact", 7: "noun.attribute", 8: "noun.body",
    9: "noun.cognition", 10: "noun.communication", 11: "noun.event", 12: "noun.feeling", 13: "noun.food",
    14: "noun.group", 15: "noun.location", 16: "noun.motive", 17: "noun.object", 18: "noun.person",
    19: "noun.phenomenon", 20: "noun.plant", 21: "noun.possession", 22: "noun.process", 23: "noun.quantity",
    24: "noun.relation", 25: "noun.shape", 26: "noun.state", 27: "noun.substance", 28: "noun.time",
}

# The gloss task: label -> (lexicographer file, zero-shot description, in-distribution subgroups, shifted
# subgroups). A subgroup is named by the first lemma of a synset two levels below the top of its class's
# hypernym tree inside the lexicographer file (the synsets under it, first hypernyms followed).
GLOSS_CLASSES: dict[str, tuple[str, str, tuple[str, ...], tuple[str, ...]]] = {
    "animal": ("noun.animal", "This is a definition of an animal.",
               ("mammal", "insect", "reptile"), ("bird", "aquatic_vertebrate", "crustacean", "arachnid")),
    "plant": ("noun.plant", "This is a definition of a plant.",
              ("tree", "fern", "agaric"), ("shrub", "gramineous_plant", "liliaceous_plant", "cactus")),
    "artifact": ("noun.artifact", "This is a definition of a man-made object.",
                 ("instrument", "tool", "garment"), ("vehicle", "furniture", "musical_instrument", "room")),
    "food": ("noun.food", "This is a definition of a food or drink.",
             ("edible_fruit", "bread", "cake", "cut"), ("vegetable", "wine", "dessert", "mixed_drink")),
}


@dataclass(frozen=True)
class NounSynset:
    """One line of ``data.noun``: offset, lexicographer file, lemmas, first hypernym and definition."""

    offset: str
    lexfile: str
    lemmas: tuple[str, ...]
    hypernym: str | None
    definition: str


def wordnet_dir(path: str | os.PathLike | None = None) -> Path:
    """WordNet 3.0 dict folder: ``path``, ``$WNSEARCHDIR`` or Debian's ``/usr/share/wordnet``."""
    folder = Path(path or os.environ.get("WNSEARCHDIR") or "/usr/share/wordnet")
    if not (folder / "data.noun").is_file():
        raise FileNotFoundError(f"WordNet data not found ({folder / 'data.noun'}): {WORDNET_HINT}")
    return folder


def read_noun_synsets(folder: str | os.PathLike) -> dict[str, NounSynset]:
    """Every synset of ``data.noun`` by offset; the definition is the gloss without its quoted examples."""
    synsets = {}
    with open(Path(folder) / "data.noun", encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith(" ") or "|" not in line:  # the licence header
                continue
            head, gloss = line.split("|", 1)
            fields = head.split()
            n_words = int(fields[3], 16)
            lemmas = tuple(fields[4 + 2 * i] for i in range(n_words))
            at = 4 + 2 * n_words
            pointers = [fields[at + 1 + 4 * k: at + 5 + 4 * k] for k in range(int(fields[at]))]
            hypernym = next((p[1] for p in pointers if p[0] in ("@", "@i") and p[2] == "n"), None)
            definition = gloss.split('; "')[0].split(";")[0].strip().strip('"').strip()
            lexfile = NOUN_LEXFILES.get(int(fields[1]), fields[1])
            synsets[fields[0]] = NounSynset(fields[0], lexfile, lemmas, hypernym, definition)
    return synsets


def _check_lexfiles(lexfiles: Sequence[str]) -> None:
    unknown = set(lexfiles) - set(NOUN_LEXFILES.values())
    if unknown:
        raise ValueError(f"lexfiles: unknown noun lexicographer files {sorted(unknown)}")


def _plain_word(synset: NounSynset, max_words: int) -> bool:
    """A single lower-case first lemma (no proper nouns, no multi-word terms) and a short definition."""
    word = synset.lemmas[0]
    return word.isalpha() and word.islower() and bool(synset.definition) and (
        len(synset.definition.split()) <= max_words)


def read_wordnet_glosses(
    folder: str | os.PathLike, lexfiles: Sequence[str], max_gloss_words: int = 16
) -> list[tuple[str, str]]:
    """(word, definition) pairs for synsets in ``lexfiles``, sorted, one per word.

    One pair per synset: its first lemma if that is a single lower-case word, and the gloss's definition
    without its quoted examples, at most ``max_gloss_words`` words (short answers keep the sequences, and
    so the CPU cost, small).
    """
    _check_lexfiles(lexfiles)
    pairs, seen = [], set()
    for s in read_noun_synsets(folder).values():
        if s.lexfile in lexfiles and _plain_word(s, max_gloss_words) and s.lemmas[0] not in seen:
            seen.add(s.lemmas[0])
            pairs.append((s.lemmas[0], s.definition))
    return sorted(pairs)


def subgroup(synsets: dict[str, NounSynset], offset: str, depth: int = 2) -> str | None:
    """First lemma of the ancestor ``depth`` levels below the top of ``offset``'s hypernym chain inside its
    lexicographer file (first hypernyms followed); None when the chain is shorter."""
    lexfile, chain, seen = synsets[offset].lexfile, [], set()
    node: str | None = offset
    while node in synsets and node not in seen and synsets[node].lexfile == lexfile:
        seen.add(node)
        chain.append(node)
        node = synsets[node].hypernym
    return synsets[chain[-1 - depth]].lemmas[0] if len(chain) > depth else None


def gloss_pools(folder: str | os.PathLike, max_gloss_words: int = 24) -> dict[str, dict[str, list[str]]]:
    """label -> {"id": definitions, "shifted": definitions}: the subgroups of :data:`GLOSS_CLASSES`,
    sorted, each definition once."""
    synsets = read_noun_synsets(folder)
    pools: dict[str, dict[str, list[str]]] = {}
    seen: set[str] = set()
    for label, (lexfile, _, id_groups, shift_groups) in GLOSS_CLASSES.items():
        pools[label] = {"id": [], "shifted": []}
        for offset, s in sorted(synsets.items()):
            if s.lexfile != lexfile or not _plain_word(s, max_gloss_words) or s.definition in seen:
                continue
            group = subgroup(synsets, offset)
            split = "id" if group in id_groups else "shifted" if group in shift_groups else None
            if split:
                seen.add(s.definition)
                pools[label][split].append(s.definition)
    return pools


def make_gloss_task(
    folder: str | os.PathLike, n_train: int, n_eval: int, seed: int = 0
) -> dict[str, dict[str, list]]:
    """{"train", "id", "id_test", "shifted"} -> {"text", "label"}: balanced over the four labels; the
    in-distribution splits are disjoint, from the in-distribution subgroups, "shifted" from the others."""
    pools = gloss_pools(folder)
    labels = list(GLOSS_CLASSES)
    rng = random.Random(seed)
    per_train, per_eval = -(-n_train // len(labels)), -(-n_eval // len(labels))  # ceil: balanced, then cut
    for label in labels:
        have = pools[label]
        if len(have["id"]) < per_train + 2 * per_eval or len(have["shifted"]) < per_eval:
            raise ValueError(
                f"sizes: {n_train} train + 2 x {n_eval} eval need {per_train + 2 * per_eval} in-distribution "
                f"and {per_eval} shifted definitions per label; '{label}' has {len(have['id'])} and "
                f"{len(have['shifted'])}"
            )
    rows: dict[str, list[tuple[str, int]]] = {"train": [], "id": [], "id_test": [], "shifted": []}
    for y, label in enumerate(labels):
        drawn = rng.sample(pools[label]["id"], per_train + 2 * per_eval)
        rows["train"] += [(t, y) for t in drawn[:per_train]]
        rows["id"] += [(t, y) for t in drawn[per_train: per_train + per_eval]]
        rows["id_test"] += [(t, y) for t in drawn[per_train + per_eval:]]
        rows["shifted"] += [(t, y) for t in rng.sample(pools[label]["shifted"], per_eval)]
    sizes = {"train": n_train, "id": n_eval, "id_test": n_eval, "shifted": n_eval}
    task = {}
    for split, pairs in rows.items():
        rng.shuffle(pairs)
        pairs = pairs[: sizes[split]]
        task[split] = {"text": [t for t, _ in pairs], "label": [y for _, y in pairs]}
    return task
