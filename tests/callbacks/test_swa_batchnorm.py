"""SWA with BatchNorm: statistics recomputed for the averaged weights, as swa_utils.update_bn does."""

import torch
from safetensors.torch import load_file
from torch import nn
from torch.optim.swa_utils import update_bn
from torch.utils.data import DataLoader, TensorDataset
from transformers import Trainer

from robustft import SWACallback
from robustft.callbacks.averaging import recompute_batchnorm
from tests.tiny import training_args


class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))

    def forward(self, x, labels=None):
        logits = self.body(x)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return {"loss": loss, "logits": logits}


def _data(n=64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=g) * 3 + 1
    return x, (x[:, 0] > 1).long()


def test_recompute_batchnorm_matches_update_bn_on_dict_batches():
    x, y = _data()
    a, b = BNNet(), BNNet()
    update_bn(DataLoader(TensorDataset(x), batch_size=16), a)
    dict_loader = [{"x": x[i:i + 16], "labels": y[i:i + 16]} for i in range(0, 64, 16)]
    recompute_batchnorm(b, dict_loader)
    torch.testing.assert_close(a.body[1].running_mean, b.body[1].running_mean)
    torch.testing.assert_close(a.body[1].running_var, b.body[1].running_var)


class DictData(torch.utils.data.Dataset):
    def __init__(self):
        self.x, self.y = _data()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def test_swa_saves_averaged_weights_with_recomputed_statistics(tmp_path):
    model = BNNet()
    swa = SWACallback(start=2, save_dir=str(tmp_path / "swa"), copy_to_model_at_end=True)
    # one batch per epoch, so the reference sees the same batch whatever the shuffling
    args = training_args(tmp_path, per_device_train_batch_size=64, learning_rate=5e-2)
    Trainer(model=model, args=args, train_dataset=DictData(), callbacks=[swa]).train()
    for name, t in zip(swa.average().names, swa.average().tensors):
        assert torch.equal(dict(model.named_parameters())[name].detach(), t)
    expected = BNNet()
    expected.load_state_dict(model.state_dict())
    update_bn(DataLoader(TensorDataset(DictData().x), batch_size=64), expected)
    torch.testing.assert_close(model.body[1].running_mean, expected.body[1].running_mean)
    torch.testing.assert_close(model.body[1].running_var, expected.body[1].running_var)
    saved = load_file(str(tmp_path / "swa" / "model.safetensors"))  # a plain nn.Module: its state dict
    for name, t in model.state_dict().items():
        assert torch.equal(saved[name], t), name
