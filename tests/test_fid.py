"""vargen.eval.fid on CPU: a tiny random extractor, small PNG folders, clean-fid doing the reading."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg

import cleanfid.fid
from vargen.eval import fid as vfid

N, SIZE = 40, 32
INCEPTION = "inception-2015-12-05.pt"
# clean-fid's frechet_distance passes scipy's deprecated sqrtm(disp=...): its warning, not ours.
pytestmark = pytest.mark.filterwarnings("ignore:The `disp` argument:DeprecationWarning")


class TinyExtractor(torch.nn.Module):
    """Fixed-seed conv net: [B, 3, 32, 32] in [0, 255] -> [B, 16]; 5-class logits for IS."""

    def __init__(self, name="tiny-test"):
        super().__init__()
        with torch.random.fork_rng():  # fixed weights without touching the session's RNG
            torch.manual_seed(0)
            self.conv = torch.nn.Conv2d(3, 16, 3, stride=2)
            self.head = torch.nn.Linear(16, 5)
        self.name, self.image_size = name, SIZE

    @torch.no_grad()
    def forward(self, x):
        return torch.relu(self.conv(x / 127.5 - 1)).mean(dim=(2, 3))

    @torch.no_grad()
    def logits(self, feats):
        return self.head(feats)


def write_folder(folder, shift=0.0, seed=0, n=N):
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        base = rng.uniform(0, 200, size=(1, 1, 3))  # per-image colour, plus texture
        img = base + rng.normal(0, 25, size=(SIZE, SIZE, 3)) + shift
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(os.path.join(folder, f"{i:03d}.png"))
    return str(folder)


def load_pixels(folder):
    files = sorted(os.listdir(folder))
    arr = np.stack([np.asarray(Image.open(os.path.join(folder, f)).convert("RGB")) for f in files])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("fid")
    return {name: write_folder(root / name, shift=shift)
            for name, shift in (("real", 0.0), ("small", 15.0), ("big", 60.0))}


def fid(gen, ref, **kw):
    return vfid.compute_fid(gen, ref, extractor=TinyExtractor(), device="cpu", **kw)


def test_fid_self_zero_and_grows_with_shift(folders):
    same = fid(folders["real"], folders["real"])
    small, big = fid(folders["small"], folders["real"]).fid, fid(folders["big"], folders["real"]).fid
    assert abs(same.fid) < 1e-3
    assert same.precision == same.recall == 1.0
    assert 1e-3 < small < big
    assert same.n_gen == same.n_ref == N and same.extractor == "tiny-test" and same.mode == "clean"
    assert same.comparable_with_published is False
    assert same.is_mean is not None and same.is_mean >= 1.0


def test_frechet_matches_scipy(folders):
    net = TinyExtractor()
    # image_size == image size, so clean-fid's resize is a same-size PIL bicubic: the pixels as saved.
    f1, f2 = (net(load_pixels(folders[k])).double().numpy() for k in ("big", "real"))
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert fid(folders["big"], folders["real"]).fid == pytest.approx(expected, rel=1e-4)


def test_cleanfid_is_called_with_the_extractor(folders, monkeypatch):
    calls = []
    real = cleanfid.fid.get_folder_features

    def spy(fdir, model=None, **kw):
        calls.append((fdir, model, kw))
        return real(fdir, model=model, **kw)

    monkeypatch.setattr(cleanfid.fid, "get_folder_features", spy)
    net = TinyExtractor()
    vfid.compute_fid(folders["small"], folders["real"], extractor=net, device="cpu")
    assert [c[0] for c in calls] == [folders["small"], folders["real"]]
    assert all(c[1] is net and c[2]["mode"] == "clean" for c in calls)


def test_npz_roundtrip_and_refuses_other_extractor(folders, tmp_path):
    out = str(tmp_path / "stats" / "ref.npz")
    vfid.reference_stats(folders["real"], out, extractor=TinyExtractor(), device="cpu")
    assert sorted(os.listdir(tmp_path / "stats")) == ["ref.npz"]  # no temporary file left behind
    by_folder, by_npz = fid(folders["small"], folders["real"]), fid(folders["small"], out)
    assert by_npz.fid == pytest.approx(by_folder.fid, rel=1e-9)
    assert (by_npz.precision, by_npz.recall, by_npz.n_ref) == (by_folder.precision, by_folder.recall, N)
    with pytest.raises(ValueError, match="tiny-test.*other-net"):
        vfid.compute_fid(folders["small"], out, extractor=TinyExtractor("other-net"), device="cpu")
    with pytest.raises(ValueError, match="legacy_pytorch"):
        fid(folders["small"], out, mode="legacy_pytorch")
    with pytest.raises(FileNotFoundError):
        fid(folders["small"], str(tmp_path / "absent.npz"))


def test_dataset_reference_matches_folder(folders, tmp_path):
    images = load_pixels(folders["real"]) / 127.5 - 1
    dataset = [{"image": img, "caption": ""} for img in images]
    from_ds = vfid.reference_stats(dataset, None, extractor=TinyExtractor(), device="cpu")
    from_dir = vfid.reference_stats(folders["real"], None, extractor=TinyExtractor(), device="cpu")
    np.testing.assert_allclose(from_ds["mu"], from_dir["mu"], rtol=1e-6)
    np.testing.assert_allclose(from_ds["sigma"], from_dir["sigma"], rtol=1e-5, atol=1e-9)


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # an untrained ResNet has dead features
def test_fd_vargen_as_injected_extractor(folders):
    from vargen.eval.classifier import FDVargen, build_classifier

    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = FDVargen(build_classifier(layers=(1, 1, 1, 1), channels=(8, 8, 16, 16), num_classes=10))
    res = vfid.compute_fid(folders["big"], folders["real"], extractor=net, device="cpu")
    assert res.extractor == "fd-vargen-cifar10" and res.fid > 0 and res.is_mean is not None


def test_missing_inception_names_file_and_url(folders, tmp_path, monkeypatch):
    def no_network(*a, **kw):
        raise AssertionError("tried to download")

    monkeypatch.setattr("urllib.request.urlopen", no_network)
    monkeypatch.setattr(vfid, "CLEANFID_CACHE_DIR", str(tmp_path))  # clean-fid's cache: empty
    missing = str(tmp_path / "nowhere" / INCEPTION)
    for path in (missing, None):
        with pytest.raises(FileNotFoundError) as err:
            vfid.compute_fid(folders["small"], folders["real"], inception_path=path, device="cpu")
        msg = str(err.value)
        assert (path or str(tmp_path / INCEPTION)) in msg
        assert "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/" + INCEPTION in msg
        assert "--inception PATH" in msg


class FakeInception(torch.nn.Module):
    """Stands in for the TorchScript Inception file: its interface (``layers``, ``return_features``), 2048-d."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Conv2d(3, 2048, 1))

    def forward(self, x, return_features: bool = False):
        x = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear")
        return self.layers((x - 128) / 128)


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")  # clean-fid loads TorchScript
def test_default_path_loads_local_inception_file(tmp_path, monkeypatch):
    monkeypatch.setattr("urllib.request.urlopen", lambda *a, **kw: pytest.fail("tried to download"))
    path = str(tmp_path / "weights" / INCEPTION)
    os.makedirs(os.path.dirname(path))
    torch.jit.script(FakeInception()).save(path)
    for mode, inside in (("clean", False), ("legacy_tensorflow", True)):
        for given in (path, os.path.dirname(path)):  # the file or its folder
            net = vfid.load_inception(mode, given, device="cpu")
            assert net.resize_inside is inside and net.name == vfid.INCEPTION_NAME
    renamed = str(tmp_path / "inception.pt")
    os.replace(path, renamed)
    with pytest.raises(ValueError, match="rename"):
        vfid.load_inception("clean", renamed, device="cpu")
    os.replace(renamed, path)
    # A 2048 x 2048 matrix square root takes a minute on 2 cores: stub the distance, check the rest.
    monkeypatch.setattr(cleanfid.fid, "frechet_distance", lambda *a: 0.0)
    folder = write_folder(tmp_path / "imgs", n=8)
    res = vfid.compute_fid(folder, folder, inception_path=path, device="cpu")
    assert res.comparable_with_published and res.extractor == vfid.INCEPTION_NAME
    assert res.is_mean is None and res.precision == 1.0 and res.n_gen == 8


def test_precision_recall():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(50, 8))
    assert vfid.precision_recall(real, real.copy(), k=3) == (1.0, 1.0)
    assert vfid.precision_recall(real, real + 100.0, k=3) == (0.0, 0.0)


def test_inception_score():
    mean, std = vfid.inception_score(torch.zeros(100, 7))
    assert mean == pytest.approx(1.0) and std == pytest.approx(0.0, abs=1e-9)
    confident = torch.eye(7).repeat(10, 1) * 50.0  # 70 samples, every class 10 times, every split even
    mean, _ = vfid.inception_score(confident, splits=10)
    assert mean == pytest.approx(7.0, rel=1e-3)


def test_cli_fid_stats_and_fid_with_a_classifier_folder(folders, tmp_path, capsys):
    from vargen.cli import main
    from vargen.eval.classifier import build_classifier, save_classifier

    torch.manual_seed(0)
    clf = str(tmp_path / "clf")
    save_classifier(build_classifier(channels=(8, 8, 16, 16)), {"channels": [8, 8, 16, 16]}, clf)
    npz = str(tmp_path / "real.npz")
    assert main(["eval", "fid-stats", folders["real"], "--out", npz, "--extractor", clf, "--device", "cpu"]) == 0
    assert f"{N} images, 16-d features of fd-vargen-cifar10" in capsys.readouterr().out
    values = []
    for ref in (folders["real"], npz):
        assert main(["eval", "fid", folders["big"], ref, "--extractor", clf, "--device", "cpu",
                     "--json", str(tmp_path / "fid.json")]) == 0
        out = capsys.readouterr().out
        assert "not comparable with published FID" in out and "precision" in out and "IS" in out
        values.append(json.loads((tmp_path / "fid.json").read_text())["fid"])
    assert values[0] == pytest.approx(values[1], rel=1e-6) and values[0] > 0


def test_cli_fid_without_inception_says_how_to_get_it(folders, tmp_path, capsys, monkeypatch):
    from vargen.cli import main

    monkeypatch.setattr(vfid, "CLEANFID_CACHE_DIR", str(tmp_path))
    assert main(["eval", "fid", folders["big"], folders["real"], "--inception", str(tmp_path / "nope.pt"),
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert INCEPTION in err and "https://" in err and "--inception" in err
