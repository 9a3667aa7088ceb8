"""WordNet reading (robustft.demos.wordnet): the LLM demo's glosses and the encoder's gloss task."""

import pytest

from robustft.demos import wordnet

# three synsets of noun.animal (05), one of noun.artifact (06), one of noun.person (18), WordNet 3.0 layout
DATA_NOUN = """\
  1 This software and database is being provided to you, the LICENSEE, by
  2 Princeton University under the following license. | not a synset
01313888 05 n 01 recombinant 0 002 @ 00006484 n 0000 @ 00004475 n 0000 | a cell or organism in which genetic \
recombination has occurred
01604330 05 n 02 heron 0 egret 0 000 | grey or white wading bird with long neck and long legs; "herons \
stand still"
01313093 05 n 03 Animalia 0 kingdom_Animalia 0 animal_kingdom 0 000 | taxonomic kingdom comprising all animals
01320000 05 n 01 sea_horse 0 000 | small fish with horselike head
01320001 05 n 01 longgloss 0 000 | one two three four five six seven eight nine ten eleven twelve thirteen \
fourteen fifteen sixteen seventeen
02700000 06 n 01 scuttle 0 000 | container for coal; "fill the scuttle"
10000000 18 n 01 farmer 0 000 | a person who operates a farm
"""


def test_wordnet_glosses_keep_single_lowercase_words_and_strip_examples(tmp_path):
    (tmp_path / "data.noun").write_text(DATA_NOUN)
    assert wordnet.read_wordnet_glosses(tmp_path, ["noun.animal"]) == [
        ("heron", "grey or white wading bird with long neck and long legs"),
        ("recombinant", "a cell or organism in which genetic recombination has occurred"),
    ]
    assert wordnet.read_wordnet_glosses(tmp_path, ["noun.artifact", "noun.person"]) == [
        ("farmer", "a person who operates a farm"),
        ("scuttle", "container for coal"),
    ]
    with pytest.raises(ValueError, match="noun.animals"):
        wordnet.read_wordnet_glosses(tmp_path, ["noun.animals"])




def synset_line(offset: str, lexfile: int, word: str, hypernym: str | None, gloss: str) -> str:
    pointer = f"001 @ {hypernym} n 0000" if hypernym else "000"
    return f"{offset} {lexfile:02d} n 01 {word} 0 {pointer} | {gloss}\n"


def tree(lexfile: int, base: int, groups: dict[str, int], noun: str) -> str:
    """root -> top -> one synset per group -> ``n`` leaves each: a class's hypernym tree in one file."""
    root, top = f"{base:08d}", f"{base + 1:08d}"
    lines = [synset_line(root, lexfile, f"{noun}root", None, f"{noun} root"),
             synset_line(top, lexfile, f"{noun}top", root, f"{noun} top")]
    at = base + 2
    for group, n in groups.items():
        g = f"{at:08d}"
        lines.append(synset_line(g, lexfile, group, top, f"a {group} kind"))
        at += 1
        for i in range(n):
            word = f"{group.replace('_', '')}{chr(97 + i % 26)}{chr(97 + i // 26)}"
            lines.append(synset_line(f"{at:08d}", lexfile, word, g, f"a {group} number {i}; \"an example\""))
            at += 1
    return "".join(lines)


@pytest.fixture
def gloss_wordnet(tmp_path):
    text = ""
    for k, (label, (lexfile, _, id_groups, shift_groups)) in enumerate(wordnet.GLOSS_CLASSES.items()):
        number = next(n for n, name in wordnet.NOUN_LEXFILES.items() if name == lexfile)
        groups = {g: 12 for g in id_groups[:2]} | {g: 6 for g in shift_groups[:1]} | {"elsewhere": 5}
        text += tree(number, 10_000_000 * (k + 1), groups, label)
    (tmp_path / "data.noun").write_text(text)
    return tmp_path


def test_subgroups_follow_the_hypernym_tree_inside_the_lexfile(gloss_wordnet):
    synsets = wordnet.read_noun_synsets(gloss_wordnet)
    by_word = {s.lemmas[0]: s for s in synsets.values()}
    assert wordnet.subgroup(synsets, by_word["mammalca"].offset) == "mammal"
    assert wordnet.subgroup(synsets, by_word["mammal"].offset) == "mammal"
    assert wordnet.subgroup(synsets, by_word["animaltop"].offset) is None  # above the subgroups
    assert by_word["mammalba"].definition == "a mammal number 1"  # examples stripped


def test_gloss_task_is_balanced_disjoint_and_shifted_to_unseen_subgroups(gloss_wordnet):
    task = wordnet.make_gloss_task(gloss_wordnet, n_train=40, n_eval=8, seed=1)
    assert {k: len(v["text"]) for k, v in task.items()} == {"train": 40, "id": 8, "id_test": 8, "shifted": 8}
    labels = list(wordnet.GLOSS_CLASSES)
    for split, data in task.items():
        for text, y in zip(data["text"], data["label"]):
            _, _, id_groups, shift_groups = wordnet.GLOSS_CLASSES[labels[y]]
            group = text.split()[1]
            assert group in (shift_groups if split == "shifted" else id_groups), (split, text)
        assert "elsewhere" not in " ".join(data["text"])
    assert sorted(task["train"]["label"]) == sorted([y for y in range(4) for _ in range(10)])
    seen = [set(task[k]["text"]) for k in ("train", "id", "id_test")]
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    assert wordnet.make_gloss_task(gloss_wordnet, 40, 8, seed=1) == task  # seeded
    with pytest.raises(ValueError, match="sizes: .*'animal'"):
        wordnet.make_gloss_task(gloss_wordnet, n_train=100, n_eval=8)


@pytest.mark.skipif(not (wordnet.Path("/usr/share/wordnet") / "data.noun").is_file(),
                    reason="needs Debian wordnet-base (installed by .ci/run)")
def test_real_wordnet_gives_the_default_demo_sizes():
    task = wordnet.make_gloss_task(wordnet.wordnet_dir(), n_train=400, n_eval=300, seed=0)
    assert [len(task[k]["text"]) for k in ("train", "id", "id_test", "shifted")] == [400, 300, 300, 300]
