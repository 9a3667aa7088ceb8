"""benchmarks/moe.py: its task, and a quick run that prints the table the docs record."""

import torch

from benchmarks import moe


def test_task_labels_are_the_majority_topic():
    ids, labels = moe.make_data(50, 3)
    for row, label in zip(ids, labels):
        topics = [int(t) // 12 for t in row if t < 48]
        assert max(range(moe.CLASSES), key=topics.count) == int(label)
        assert topics.count(int(label)) >= 4 and (row == moe.VOCAB - 1).sum() == 0  # no pad token inside


def test_quick_run_prints_the_table(capsys):
    torch.manual_seed(0)
    assert moe.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "| experts kept | rank | aligned | accuracy | loss | expert params stored |" in out
    assert "| 0 (experts zeroed) |" in out and "| 4 | 8 | yes |" in out and "| 0.188 |" in out
