import os

import pytest
import torch

from vargen.eval.classifier import FDVargen, build_classifier, load_classifier, load_fd_vargen
from vargen.train.classifier import augment, classifier_step, train_classifier

CIFAR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cifar10")
SMALL = {"layers": [1, 1, 1, 1], "channels": [8, 8, 16, 16], "num_classes": 10, "image_size": 32}


def test_augment_translates_and_flips_without_changing_content():
    torch.manual_seed(0)
    x = torch.rand(16, 3, 32, 32) * 2 - 1
    y = augment(x, pad=4)
    assert y.shape == x.shape
    # every output is a shifted (reflect-padded) copy, possibly mirrored: its centre appears in the padded source
    padded = torch.nn.functional.pad(x, (4,) * 4, mode="reflect")
    for i in range(16):
        centre = y[i, :, 8:24, 8:24]
        hits = [torch.equal(centre, src[:, dy + 8:dy + 24, dx + 8:dx + 24])
                for src in (padded[i], padded[i].flip(-1)) for dy in range(9) for dx in range(9)]
        assert any(hits)
    assert not torch.equal(y, x)


def test_classifier_steps_reduce_loss():
    torch.manual_seed(0)
    net = build_classifier(**SMALL).train()
    ext = FDVargen(net)
    batch = {"image": torch.rand(8, 3, 32, 32) * 2 - 1, "label": torch.arange(8) % 10}
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    torch.manual_seed(1)
    first = classifier_step({"classifier": net}, batch, ext)[0].item()
    for _ in range(15):
        loss, _ = classifier_step({"classifier": net}, batch, ext)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    logits = net(ext.normalise((batch["image"] + 1) * 127.5))
    assert torch.nn.functional.cross_entropy(logits, batch["label"]).item() < first - 0.5


@pytest.mark.skipif(not os.path.isdir(CIFAR), reason="../shared/data/cifar10 not present")
def test_recipe_saves_a_loadable_extractor(tmp_path):
    config = {"model": SMALL, "data": [{"name": "cifar10", "path": CIFAR, "split": "test", "limit": 64}],
              "eval_data": [{"name": "cifar10", "path": CIFAR, "split": "test", "limit": 40}],
              "steps": 2, "batch_size": 16, "lr": 1e-3, "log_every": 1, "save_every": 2}
    result = train_classifier(config, str(tmp_path))
    assert 0.0 <= result["test_accuracy"] <= 1.0
    net, cfg = load_classifier(str(tmp_path / "classifier"))
    assert cfg["channels"] == SMALL["channels"]
    ext = load_fd_vargen(str(tmp_path / "classifier"))
    images = torch.rand(3, 3, 64, 64) * 255
    feats = ext(images)
    assert feats.shape == (3, 16)
    # features at 64 px are those of the same images resized to the classifier's 32 px
    small = torch.nn.functional.interpolate(images, size=(32, 32), mode="bilinear", antialias=True)
    torch.testing.assert_close(ext(small), feats, atol=1e-4, rtol=1e-4)
    assert ext.logits(feats).shape == (3, 10)


def test_missing_classifier_names_the_recipe(tmp_path):
    with pytest.raises(FileNotFoundError, match="vargen train classifier"):
        load_fd_vargen(str(tmp_path))


@pytest.mark.skipif(not os.path.isdir(CIFAR), reason="../shared/data/cifar10 not present")
def test_shipped_extractor_classifies_cifar10():
    from vargen.data.images import Cifar10Dataset
    from vargen.train.classifier import accuracy

    ext = load_fd_vargen()
    assert ext.name == "fd-vargen-cifar10" and ext(torch.zeros(1, 3, 64, 64)).shape == (1, 256)
    # the model card states 0.66 on the full test split; 300 class-balanced images stay well above chance
    assert accuracy(ext, Cifar10Dataset(CIFAR, split="test", limit=300)) > 0.5
