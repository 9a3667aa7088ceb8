"""MC-SMoE (Li et al., ICLR 2024) against a reference written from the paper's equations in this file: the
router logits from transformers' own ``output_router_logits``, frequencies by counting, cosine similarities
pair by pair, neuron alignment by brute force over every permutation, frequency-weighted means, and the
low-rank step by numpy's SVD."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from robustft.merge.experts import merge_experts, routing_statistics
from robustft.ops.experts import dominant_experts, low_rank
from tests.tiny import tiny_mixtral

E, TOP_K, HIDDEN, INTER = 6, 2, 8, 4  # 4 hidden neurons per expert: 24 permutations to try


def small_moe(kind: str = "mixtral"):
    """A random 2-layer MoE of ``kind`` (Mixtral, Qwen3-MoE or OLMoE) with E experts of INTER neurons."""
    if kind == "mixtral":
        model = tiny_mixtral(seed=3, experts=E, top_k=TOP_K, hidden=HIDDEN)
    else:
        import transformers

        torch.manual_seed(3)
        common = dict(vocab_size=64, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=32, num_experts=E,
                      num_experts_per_tok=TOP_K, intermediate_size=INTER, pad_token_id=0, eos_token_id=1,
                      bos_token_id=2)
        if kind == "qwen3_moe":
            config = transformers.Qwen3MoeConfig(**common, moe_intermediate_size=INTER, head_dim=4,
                                                 norm_topk_prob=True)
            model = transformers.Qwen3MoeForCausalLM(config)
        else:
            model = transformers.OlmoeForCausalLM(transformers.OlmoeConfig(**common))
    assert model.model.layers[0].mlp.experts.down_proj.shape == (E, HIDDEN, INTER)
    return model


def sample():
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, 64, (4, 8), generator=g)} for _ in range(2)]


def reference(model, batches, keep, rank):
    """Per layer: the merged (gate_up, down) of each expert, from the paper's equations."""
    logits = [[] for _ in model.model.layers]
    with torch.no_grad():
        for b in batches:
            out = model(**b, output_router_logits=True)
            for i, h in enumerate(out.router_logits):
                logits[i].append(h.double())
    result = []
    for i, layer in enumerate(model.model.layers):
        H = torch.cat(logits[i])  # T x E
        counts = [0] * E
        for row in torch.softmax(H, -1):
            for e in row.argsort(descending=True)[:TOP_K].tolist():
                counts[e] += 1
        f = [c / sum(counts) for c in counts]
        dominant = sorted(range(E), key=lambda e: (-f[e], e))[:keep]
        cos = (H.T @ H) / torch.outer(H.norm(dim=0), H.norm(dim=0))  # cos[a, b] of logit columns a, b
        group = [e if e in dominant else max(dominant, key=lambda d, e=e: (float(cos[e, d]), -d))
                 for e in range(E)]
        up = layer.mlp.experts.gate_up_proj.detach().double()
        down = layer.mlp.experts.down_proj.detach().double()
        merged = {}
        for d in dominant:
            parts = []
            for e in (x for x in range(E) if group[x] == d):
                ud, ue, dd, de = up[d], up[e], down[d], down[e]
                scores = {p: float((ud[:INTER] * ue[:INTER][list(p)]).sum()
                                   + (ud[INTER:] * ue[INTER:][list(p)]).sum() + (dd * de[:, list(p)]).sum())
                          for p in itertools.permutations(range(INTER))}
                best = max(scores, key=scores.get)
                p = list(best)
                parts.append((f[e], torch.cat([up[e][:INTER][p], up[e][INTER:][p]]), down[e][:, p]))
            total = sum(w for w, _, _ in parts)
            u = sum(w * x for w, x, _ in parts) / total
            dn = sum(w * y for w, _, y in parts) / total
            if rank is not None:
                def svd_r(m):
                    a, s, b = np.linalg.svd(m.numpy())
                    return torch.from_numpy((a[:, :rank] * s[:rank]) @ b[:rank])
                u, dn = torch.cat([svd_r(u[:INTER]), svd_r(u[INTER:])]), svd_r(dn)
            merged[d] = (u, dn)
        result.append([merged[group[e]] for e in range(E)])
    return result


CASES = [("mixtral", 3, None), ("mixtral", 2, None), ("mixtral", 2, 2), ("mixtral", 1, 3),
         ("qwen3_moe", 2, 2), ("olmoe", 3, None)]


@pytest.mark.parametrize(("kind", "keep", "rank"), CASES)
def test_mc_smoe_equals_the_paper_reference(kind, keep, rank):
    model = small_moe(kind)
    want = reference(model, sample(), keep, rank)
    report = merge_experts(model, sample(), keep=keep, rank=rank)
    for i, layer in enumerate(model.model.layers):
        for e in range(E):
            torch.testing.assert_close(layer.mlp.experts.gate_up_proj[e].double(), want[i][e][0], rtol=1e-5,
                                       atol=1e-6)
            torch.testing.assert_close(layer.mlp.experts.down_proj[e].double(), want[i][e][1], rtol=1e-5,
                                       atol=1e-6)
        assert len(set(report.layers[f"model.layers.{i}.mlp"].group)) == keep
    assert report.ratio < 1


def test_keeping_every_expert_changes_nothing():
    model = small_moe()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = merge_experts(model, sample(), keep=E)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert report.ratio == 1


def test_routing_statistics_leave_padding_out_and_remove_hooks():
    model = small_moe()
    batch = {"input_ids": torch.randint(0, 64, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    batch["attention_mask"][1, 5:] = 0
    stats = routing_statistics(model, [batch])
    logits, indices = stats["model.layers.0.mlp"]
    assert logits.shape == (13, E) and indices.shape == (13, TOP_K)
    assert not any(m._forward_hooks for m in model.modules())


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="keep must be an integer in"):
        dominant_experts(torch.ones(4), 5)
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        low_rank(torch.ones(3, 3), 0)
    with pytest.raises(ValueError, match="rank must be a positive integer or None"):
        merge_experts(small_moe(), sample(), keep=2, rank=0)
