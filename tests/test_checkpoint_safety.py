"""Loading never runs code from a checkpoint unless the user opts in."""
import pytest
import torch
from safetensors.torch import save_file

from official_files import Payload, llamagen_args, tiny_gpt, tiny_vq, write_gpt, write_vq
from vargen.decoders.liif import LIIF
from vargen.models import LlamaGen, read_state_dict
from vargen.models.checkpoint import UntrustedCheckpointError
from vargen.tokenizers import VQTokenizer

LOADERS = {
    "read_state_dict": read_state_dict,
    "LlamaGen.from_llamagen": LlamaGen.from_llamagen,
    "VQTokenizer.from_llamagen": VQTokenizer.from_llamagen,
    "LIIF.from_liif": LIIF.from_liif,
}


@pytest.fixture
def hostile_files(tmp_path):
    marker = tmp_path / "payload-ran"
    gpt = tiny_gpt(image_size=64)
    files = {
        "in args": write_gpt(tmp_path / "gpt.pt", gpt, llamagen_args(gpt_model="GPT-tiny", vocab_size=64,
                                                                     image_size=64, evil=Payload(marker))),
        "beside the weights": write_vq(tmp_path / "vq.pt", tiny_vq(), extra={"meta": Payload(marker)}),
        "legacy format": str(tmp_path / "legacy.pt"),
    }
    torch.save({"model": gpt.state_dict(), "x": Payload(marker)}, files["legacy format"],
               _use_new_zipfile_serialization=False)
    return files, marker


@pytest.mark.parametrize("loader", LOADERS)
def test_payload_is_refused_by_every_loader_and_never_runs(hostile_files, loader):
    files, marker = hostile_files
    for where, path in files.items():
        with pytest.raises(UntrustedCheckpointError) as err:
            LOADERS[loader](path)
        msg = str(err.value)
        assert "posix.system" in msg and "trust_checkpoint=True" in msg and "--trust-checkpoint" in msg, (where, msg)
        assert not marker.exists(), f"{loader} ran the payload of a checkpoint with it {where}"


def test_the_payload_is_live_when_the_user_trusts_the_file(hostile_files):
    files, marker = hostile_files  # proves the test above would see a payload that ran
    LlamaGen.from_llamagen(files["in args"], trust_checkpoint=True)
    assert marker.exists()


def test_released_formats_load_without_the_opt_in(tmp_path):
    gpt = tiny_gpt(image_size=64)
    ddp = write_gpt(tmp_path / "c2i.pt", gpt, llamagen_args(gpt_model="GPT-tiny", vocab_size=64, image_size=64))
    fsdp = write_gpt(tmp_path / "consolidated.pth", gpt)
    safe = tmp_path / "gpt.safetensors"
    save_file(gpt.state_dict(), str(safe))
    tokens = torch.randint(0, 64, (1, 16))
    want = gpt.forward_train(tokens, torch.tensor([3]), train=False)
    for path in (ddp, fsdp, safe):
        loaded = LlamaGen.from_llamagen(path, image_size=64)
        torch.testing.assert_close(loaded.forward_train(tokens, torch.tensor([3]), train=False), want)
    vq = tiny_vq()
    loaded = VQTokenizer.from_llamagen(write_vq(tmp_path / "vq_ds16_c2i.pt", vq))
    assert loaded.downsample == 16 and loaded.config.ch == 32
    torch.testing.assert_close(loaded.decode(torch.tensor([[[1, 2], [3, 4]]])),
                               vq.decode(torch.tensor([[[1, 2], [3, 4]]])))
