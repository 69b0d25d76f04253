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


def make_t2i_pipeline(captions):
    """A tiny random text-to-image pipeline (4 x 4 tokens, 8 x 8 px) whose vocabulary covers ``captions``."""
    from vargen.models.text import WordTextEncoder, build_vocabulary
    from vargen.pipeline import VarGenPipeline
    from vargen.tokenizers import VQTokenizer

    torch.manual_seed(0)
    enc = WordTextEncoder(vocabulary=build_vocabulary(captions), caption_dim=32, width=32, layers=1, heads=2,
                          max_length=6)
    gpt = LlamaGen.from_size("GPT-tiny", model_type="t2i", block_size=16, vocab_size=64, caption_dim=32,
                             cls_token_num=6)
    torch.nn.init.normal_(gpt.output.weight, 0.0, 0.5)
    vq = VQTokenizer(codebook_size=64, ch=32, ch_mult=(1, 2), z_channels=32)
    return VarGenPipeline(gpt=gpt.eval(), vq=vq.eval(), text_encoder=enc.eval())


@pytest.fixture
def one_thread():
    """Tiny models run faster on one thread, far faster on a busy shared CPU (measured: 23 ms vs 1.2 s a
    training step), and do not fight other processes for the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
