import pytest
import torch

from vargen.models import LlamaGen


def make_gpt(model_type="c2i", vocab=48, block=16, seed=0, **kw):
    """A GPT-tiny with non-trivial random weights (LlamaGen zero-inits the head)."""
    torch.manual_seed(seed)
    extra = dict(num_classes=5) if model_type == "c2i" else dict(cls_token_num=6, caption_dim=24)
    model = LlamaGen.from_size("GPT-tiny", model_type=model_type, vocab_size=vocab, block_size=block,
                               **{**extra, **kw})
    for p in model.parameters():
        torch.nn.init.normal_(p, 0.0, 0.2)
    return model.eval()


@pytest.fixture
def c2i():
    return make_gpt("c2i")


@pytest.fixture
def t2i():
    return make_gpt("t2i")
