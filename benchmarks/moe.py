"""MC-SMoE's accuracy/size trade-off on a tiny Mixtral trained on a synthetic task (``merge_experts``).

    OMP_NUM_THREADS=1 python benchmarks/moe.py            # the table of docs/benchmarks.md
    OMP_NUM_THREADS=1 python benchmarks/moe.py --quick    # a few steps (tests the script)

Task: sequences of 12 tokens over 4 "topics" (a topic owns 12 of the 64 tokens, 48..62 are noise, 63 pads);
the label is the topic most of the sequence's topic tokens come from. A 2-layer Mixtral classifier (hidden 32,
8 experts of 64 hidden neurons, top-2) is trained with AdamW; then, on copies of it, MC-SMoE keeps k dominant
experts per layer (routing statistics of 256 training sequences) with and without neuron alignment (M-SMoE)
and with the low-rank step at rank r (MC-SMoE). Reported: held-out accuracy and loss, and the expert
parameters a deployment stores, relative to the 8 experts.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CLASSES, VOCAB, SEQ = 4, 64, 12


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids n x SEQ, labels n): topic t owns tokens 12·t .. 12·t + 11, tokens 48..62 are noise; a sequence has
    4 tokens of its own topic and 3 of random topics."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    ids = torch.randint(48, VOCAB - 1, (n, SEQ), generator=g)
    for i in range(n):
        slots = torch.randperm(SEQ, generator=g)[:7]
        ids[i, slots[:4]] = labels[i] * 12 + torch.randint(0, 12, (4,), generator=g)
        rival = torch.randint(0, CLASSES, (3,), generator=g)
        ids[i, slots[4:]] = rival * 12 + torch.randint(0, 12, (3,), generator=g)
    return ids, labels


def model_fn(seed: int = 0):
    from transformers import MixtralConfig, MixtralForSequenceClassification

    torch.manual_seed(seed)
    config = MixtralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
                           num_experts_per_tok=2, max_position_embeddings=SEQ, num_labels=CLASSES,
                           pad_token_id=VOCAB - 1)
    return MixtralForSequenceClassification(config)


def train(model, ids, labels, steps: int, batch: int = 32):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(ids), (batch,), generator=g)
        loss = model(input_ids=ids[idx], labels=labels[idx]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


@torch.no_grad()
def evaluate(model, ids, labels) -> tuple[float, float]:
    model.eval()
    out = model(input_ids=ids, labels=labels)
    return float((out.logits.argmax(-1) == labels).float().mean()), float(out.loss)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a few steps and cases (tests the script)")
    p.add_argument("--steps", type=int, default=300)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from robustft.merge import merge_experts

    steps = 5 if args.quick else args.steps
    train_ids, train_labels = make_data(64 if args.quick else 4096, 0)
    test_ids, test_labels = make_data(64 if args.quick else 1024, 1)
    t0 = time.perf_counter()
    trained = train(model_fn(), train_ids, train_labels, steps)
    seconds = time.perf_counter() - t0
    sample = [{"input_ids": train_ids[i:i + 64]} for i in range(0, min(256, len(train_ids)), 64)]
    cases = [(8, None, True), (6, None, True), (4, None, True), (4, None, False), (2, None, True),
             (2, None, False), (1, None, True), (4, 16, True), (4, 8, True), (2, 8, True), (2, 4, True)]
    if args.quick:
        cases = [(8, None, True), (4, 8, True)]
    acc, loss = evaluate(trained, test_ids, test_labels)
    print(f"trained {steps} steps in {seconds:.1f} s; held-out accuracy {acc:.3f}, loss {loss:.3f}")
    print("| experts kept | rank | aligned | accuracy | loss | expert params stored |")
    print("|---|---|---|---|---|---|")
    zeroed = copy.deepcopy(trained)
    with torch.no_grad():
        for name, p in zeroed.named_parameters():
            if ".experts." in name:
                p.zero_()
    acc0, loss0 = evaluate(zeroed, test_ids, test_labels)
    print(f"| 0 (experts zeroed) | - | - | {acc0:.3f} | {loss0:.3f} | 0 |")
    for keep, rank, align in cases:
        model = copy.deepcopy(trained)
        report = merge_experts(model, sample, keep=keep, rank=rank, align=align)
        acc, loss = evaluate(model, test_ids, test_labels)
        print(f"| {keep} | {rank or 'full'} | {'yes' if align else 'no'} | {acc:.3f} | {loss:.3f} "
              f"| {report.ratio:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
