"""Peak memory of a streamed merge stays near (inputs + 1) x the largest tensor, far below the checkpoints'
size, with two tensors merged at once.

The merge runs in a fresh subprocess that first does a tiny warm-up merge (so imports, tqdm and the
allocator are settled), resets the kernel's peak-RSS mark (``/proc/self/clear_refs``), runs the real
merge and reports ``VmHWM``. (``ru_maxrss`` would not do: Linux carries it over from the forking parent.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from robustft.merge.io import CheckpointReader
from tests.merge.tiny_models import build_family, tiny_config

REPO = Path(__file__).resolve().parents[2]

CHILD = r"""
import json, sys
from robustft.merge import merge_checkpoints, load_recipe

def status(key):
    return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) * 1024

warm, recipe, out = sys.argv[1:4]
merge_checkpoints(load_recipe(warm), out + "_warm", progress=False)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
before = status("VmRSS")
merge_checkpoints(load_recipe(recipe), out, progress=True, workers=2)
print(json.dumps({"before": before, "peak": status("VmHWM")}))
"""


@pytest.mark.slow
def test_streamed_merge_peak_memory_is_bounded(tmp_path):
    # 24 layers of 256-wide Llama, 8192-token vocabulary: ~20M params = 79 MB per model, largest tensors the
    # 8 MB embedding and head (the layers' matrices are 0.25-0.5 MB)
    cfg = tiny_config(hidden=256, intermediate=512, layers=24, vocab=8192)
    base, dirs = build_family(tmp_path / "big", n=3, max_shard_size="8MB", config=cfg, tokenizer=False)
    small, small_dirs = build_family(tmp_path / "small", n=3, tokenizer=False)
    assert len(list(base.glob("*.safetensors"))) >= 4

    def recipe(b, ds, name):
        path = tmp_path / name
        data = {"merge_method": "ties", "base_model": str(b), "models": [str(d) for d in ds],
                "parameters": {"density": 0.3}}  # fmt: skip
        path.write_text(yaml.safe_dump(data))
        return path

    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(recipe(small, small_dirs, "w.yaml")),
         str(recipe(base, dirs, "r.yaml")), str(tmp_path / "out")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        # a fixed mmap threshold: glibc's moving one keeps freed 8 MB buffers in the heap, which is
        # allocator slack, not the engine's live memory
        env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    mem = json.loads(proc.stdout.strip().splitlines()[-1])

    infos = CheckpointReader(base).infos.values()
    largest = max(i.nbytes for i in infos)
    total_inputs = 4 * sum(i.nbytes for i in infos)
    # TIES holds the base and 3 task vectors, its result overwrites the first one, the trim/elect/mean
    # temporaries are chunks (1 MiB each): allow 6 float32 copies of the largest tensor plus 16 MB for the
    # chunks of two workers and allocator slack (measured here: 52 MB = the 4 inputs' 32 MB + 20 MB; the
    # engine before the streamed TIES: 82 MB)
    bound = 6 * largest + 16 * 2**20
    grew = mem["peak"] - mem["before"]
    assert grew < bound, f"peak grew by {grew / 2**20:.1f} MB, bound {bound / 2**20:.1f} MB"
    assert bound < total_inputs / 4, "the bound must be below the size of one input checkpoint"
    mb = 2**20
    print(f"peak growth {grew / mb:.1f} MB, bound {bound / mb:.1f} MB, inputs {total_inputs / mb:.0f} MB")
