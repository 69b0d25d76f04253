"""Hugging Face AR image generators (Janus-Pro, Emu3, Chameleon / Lumina-mGPT / Anole) behind
vargen's model protocol, so every decoding method (AR, SJD, ZipAR, ...) runs on them.

The adapters drive the unmodified ``transformers`` decoder with ``inputs_embeds``,
``position_ids``, a 4D mask and a cache bridge (see :mod:`vargen.models.hf_base` for the
slot / position / separator mapping). Per family:

* **Janus-Pro** (``JanusForConditionalGeneration``): image codes live in a separate
  vocabulary; inputs go through ``generation_embeddings`` + ``generation_aligner``, logits
  come from ``generation_head``. Prompt: the chat template ending with the
  begin-of-image token; null prompt: every token but BOS/BOI replaced by the pad token
  (as ``JanusForConditionalGeneration.generate``). No row separators.
* **Emu3** (``Emu3ForConditionalGeneration``): codes map to LM vocabulary ids through
  ``vocabulary_mapping.img2bpe``; an end-of-line token (``<|extra_200|>``) follows every
  row. Prompt: ``BOS text BOI "H*W" <|image token|>``; null prompt: ``BOS [negative]`` + header.
* **Chameleon** (``ChameleonForConditionalGeneration``, Lumina-mGPT / Anole weights):
  codes map through the ``IMGIMG*`` names of ``vocabulary_map``; Lumina-mGPT's new-line
  token (``<reserved08799>``) after every row with ``row_separator="lumina"``. Null prompt:
  the image header alone (Lumina-mGPT's unconditional branch). transformers has no
  Chameleon VQ decoder, so :meth:`decode_tokens` raises.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional, Sequence, Union

import torch

from .hf_base import HFImageModel, prompt_rows

LUMINA_NEWLINE = "<reserved08799>"  # FlexARItemProcessor.new_line_token
LUMINA_TURN_END = "<reserved08706>"  # Lumina-mGPT's conversation separator
EMU3_DEFAULT_GRID = (90, 90)  # Emu3Processor defaults: ratio 1:1, image_area 518400 (720 px), 8x downsampling


def _first(*values):
    return next((v for v in values if v is not None), None)


def _to_unit(images: torch.Tensor) -> torch.Tensor:
    """VQ decoders output ``[-1, 1]`` (their processors unnormalise with mean = std = 0.5)."""
    return ((images.float() + 1) / 2).clamp(0, 1)


def _code_ids(img2bpe: dict, what: str) -> torch.Tensor:
    """``[V]`` vocabulary ids in code order from a ``code -> id`` mapping (codes must be ``0..V-1``)."""
    if not img2bpe:
        raise ValueError(f"{what}: the config's vocabulary_map has no image tokens")
    codes = sorted(img2bpe)
    if codes != list(range(len(codes))):
        raise ValueError(f"{what}: image codes in vocabulary_map are not 0..{len(codes) - 1}")
    return torch.tensor([img2bpe[c] for c in codes], dtype=torch.long)


def _texts(texts) -> List[str]:
    return [texts] if isinstance(texts, str) else list(texts)


class JanusImageModel(HFImageModel):
    """Janus / Janus-Pro text-to-image generation (``JanusForConditionalGeneration``).

    Special ids default to the model's ``generation_config`` (``bos_token_id``,
    ``pad_token_id``, ``generation_kwargs["boi_token_id"]``) and its text config.
    """

    family = "janus"
    has_image_decoder = True

    def __init__(self, hf_model, bos_token_id: Optional[int] = None, boi_token_id: Optional[int] = None,
                 pad_token_id: Optional[int] = None, max_prompt_len: int = 256):
        gen, text = hf_model.generation_config, hf_model.config.text_config
        extra = getattr(gen, "generation_kwargs", None) or {}
        super().__init__(hf_model, grid=hf_model.model.vqmodel.quantize.quant_state_dims,
                         bos_token_id=_first(bos_token_id, gen.bos_token_id, getattr(text, "bos_token_id", None)),
                         boi_token_id=_first(boi_token_id, extra.get("boi_token_id")),
                         pad_token_id=_first(pad_token_id, gen.pad_token_id, getattr(text, "pad_token_id", None)),
                         max_prompt_len=max_prompt_len)

    @property
    def text_config(self):
        return self.hf.config.text_config

    @property
    def decoder(self):
        return self.hf.model.language_model

    @property
    def vocab_size(self) -> int:
        return int(self.hf.config.vq_config.num_embeddings)

    @property
    def has_null_condition(self) -> bool:
        return self.boi_token_id is not None and self.pad_token_id is not None

    def embed_image(self, codes):
        return self.hf.prepare_embeddings_for_image_generation(codes)

    def image_logits(self, hidden):
        return self.hf.model.generation_head(hidden)

    def check_prompt(self, row):
        if self.boi_token_id is not None and row[-1] != self.boi_token_id:
            raise ValueError(f"Janus prompt ids must end with the begin-of-image token (id {self.boi_token_id}); "
                             "build them with JanusImageModel.prompt_ids(texts, processor)")

    def null_row(self, row, negative):
        keep = (self.bos_token_id, self.boi_token_id)
        return [t if t in keep else self.pad_token_id for t in row]

    def prompt_ids(self, texts: Union[str, Sequence[str]], processor):
        """Ids of the image-generation chat prompts (``JanusProcessor``, as in the HF docs)."""
        prompts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": t}]}],
                                                 add_generation_prompt=True) for t in _texts(texts)]
        return processor(text=prompts, generation_mode="image", padding=True, return_tensors="pt")

    @torch.no_grad()
    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Codes ``[B, H*W]`` -> images ``[B, 3, 16H, 16W]`` in ``[0, 1]`` through Janus's VQ decoder."""
        return _to_unit(self.hf.model.vqmodel.decode(tokens.long().to(self.device)))


class Emu3ImageModel(HFImageModel):
    """Emu3 text-to-image generation (``Emu3ForConditionalGeneration``, e.g. ``BAAI/Emu3-Gen-hf``).

    Args:
        grid: ``(H, W)`` tokens (not in the config; default 90 x 90 as ``Emu3Processor``).
        negative_prompt_ids: text ids of a negative prompt for the null branch (default none).
    """

    family = "emu3"
    has_image_decoder = True

    def __init__(self, hf_model, grid: Optional[Sequence[int]] = None, max_prompt_len: int = 256,
                 negative_prompt_ids: Optional[Sequence[int]] = None, bos_token_id: Optional[int] = None):
        mapping = hf_model.vocabulary_mapping
        vocab = mapping.vocab_map
        if mapping.eol_token_id is None:
            raise ValueError("Emu3 config's vocabulary_map has no end-of-line token <|extra_200|>")
        super().__init__(hf_model, grid=grid or EMU3_DEFAULT_GRID, image_ids=_code_ids(mapping.img2bpe, "Emu3"),
                         separator_id=mapping.eol_token_id,
                         bos_token_id=_first(bos_token_id, hf_model.config.text_config.bos_token_id),
                         boi_token_id=vocab.get("<|image start|>"), max_prompt_len=max_prompt_len,
                         negative_prompt_ids=negative_prompt_ids)
        self.image_wrapper_id = vocab.get("<|image token|>")

    @property
    def text_config(self):
        return self.hf.config.text_config

    @property
    def decoder(self):
        return self.hf.model.text_model

    def check_prompt(self, row):
        super().check_prompt(row)
        if self.image_wrapper_id is not None and row[-1] != self.image_wrapper_id:
            raise ValueError(f"Emu3 prompt ids must end with the header BOI 'H*W' <|image token|> "
                             f"(id {self.image_wrapper_id}); build them with Emu3ImageModel.prompt_ids")

    def prompt_ids(self, texts: Union[str, Sequence[str]], processor, negative_prompt: Optional[str] = None):
        """``Emu3Processor`` image-generation ids whose header matches :attr:`grid`; a
        ``negative_prompt`` is tokenized into ``negative_ids`` for the null branch."""
        H, W = self.grid
        enc = processor(text=_texts(texts), return_for_image_generation=True, padding=True, return_tensors="pt",
                        ratio=f"{W}:{H}", image_area=H * W * 64)
        sizes = enc.pop("image_sizes", None)
        if sizes is not None and tuple(int(s) for s in sizes[0]) != (H, W):
            raise ValueError(f"the processor builds a {tuple(sizes[0])} header but the adapter's grid is {(H, W)}")
        if negative_prompt is not None:
            enc["negative_ids"] = processor.tokenizer(negative_prompt, add_special_tokens=False)["input_ids"]
        return enc

    @torch.no_grad()
    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Codes ``[B, H*W]`` -> images ``[B, 3, 8H, 8W]`` in ``[0, 1]`` through Emu3's VQ decoder."""
        H, W = self.grid
        codes = tokens.long().to(self.device).reshape(-1, H, W)
        return _to_unit(self.hf.model.vqmodel.decode(codes))


class ChameleonImageModel(HFImageModel):
    """Chameleon-architecture image generators (Lumina-mGPT, Anole) on ``ChameleonForConditionalGeneration``.

    The logits are taken from ``lm_head`` directly: the HF forward suppresses image tokens
    (chat checkpoints), which image-generation checkpoints must not.

    Args:
        grid: ``(H, W)`` tokens; default from the VQ config (32 x 32 at 512 px); Lumina-mGPT
            768 px is ``(48, 48)``.
        row_separator: ``None`` (Anole: no separators), ``"lumina"`` (``<reserved08799>``),
            a token name in ``vocabulary_map`` or an id.
    """

    family = "chameleon"
    null_keeps_bos = False  # Lumina-mGPT's unconditional branch starts at the image header

    def __init__(self, hf_model, grid: Optional[Sequence[int]] = None, row_separator: Union[None, str, int] = None,
                 max_prompt_len: int = 256, negative_prompt_ids: Optional[Sequence[int]] = None):
        cfg = hf_model.config
        vocab = dict(cfg.vocabulary_map or {})
        if grid is None:
            vq = cfg.vq_config
            side = vq.resolution // 2 ** (len(vq.channel_multiplier) - 1)
            grid = (side, side)
        separator = LUMINA_NEWLINE if row_separator == "lumina" else row_separator
        if isinstance(separator, str):
            if separator not in vocab:
                raise ValueError(f"row separator {separator!r} is not in the config's vocabulary_map")
            separator = vocab[separator]
        image_ids = _code_ids(hf_model.model.vocabulary_mapping.img2bpe, "Chameleon")
        super().__init__(hf_model, grid=grid, image_ids=image_ids, separator_id=separator,
                         bos_token_id=cfg.bos_token_id, boi_token_id=vocab.get("<racm3:break>"),
                         max_prompt_len=max_prompt_len,
                         negative_prompt_ids=negative_prompt_ids)
        self.vocabulary_map = vocab

    @property
    def text_config(self):
        return self.hf.config

    @property
    def decoder(self):
        return self.hf.model

    def lumina_size_id(self, tokens: int) -> int:
        """Lumina-mGPT's size token for ``tokens`` latent tokens (it counts 32 px = 2 tokens)."""
        name = f"<reserved{8800 + tokens // 2:05d}>"
        if tokens % 2 or name not in self.vocabulary_map:
            raise ValueError(f"no Lumina-mGPT size token for {tokens} tokens ({name})")
        return self.vocabulary_map[name]

    def prompt_ids(self, texts: Union[str, Sequence[str]], tokenizer, template: Optional[str] = None):
        """Prompt ids ending with the image header.

        ``template="lumina"`` (default with separators) is Lumina-mGPT's
        ``"Generate an image of WxH according to the following prompt:\\n{text}<reserved08706>"``
        then ``BOI, size(H), size(W)``; ``"plain"`` (Anole) is the text then BOI.
        """
        tok = getattr(tokenizer, "tokenizer", tokenizer)
        template = template or ("lumina" if self.separators else "plain")
        if template not in ("lumina", "plain"):
            raise ValueError(f"template must be 'lumina' or 'plain', got {template!r}")
        H, W = self.grid
        rows = []
        for text in _texts(texts):
            header = [self.boi_token_id]
            if template == "lumina":
                text = (f"Generate an image of {W * 16}x{H * 16} according to the following prompt:\n"
                        f"{text}{LUMINA_TURN_END}")
                header += [self.lumina_size_id(H), self.lumina_size_id(W)]
            rows.append(list(tok(text)["input_ids"]) + header)
        return {"input_ids": rows}

    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("transformers' ChameleonVQVAE has only the encoder: decode Chameleon / "
                                  "Lumina-mGPT / Anole codes with Meta's VQGAN decoder (chameleon tokenizer "
                                  "vqgan.ckpt + vqgan.yaml), e.g. through a vargen VQ decoder loaded from it")


# model_type -> (transformers class name, adapter)
HF_FAMILIES = {
    "janus": ("JanusForConditionalGeneration", JanusImageModel),
    "emu3": ("Emu3ForConditionalGeneration", Emu3ImageModel),
    "chameleon": ("ChameleonForConditionalGeneration", ChameleonImageModel),
}
FAMILY_NAMES = {"janus": "Janus / Janus-Pro", "emu3": "Emu3-Gen",
                "chameleon": "Chameleon / Anole / Lumina-mGPT in transformers' Chameleon format"}


def hf_model_type(path) -> str:
    """The supported ``model_type`` in a checkpoint folder's ``config.json``; a clear error otherwise."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} has no config.json; is it a transformers checkpoint folder?")
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type not in HF_FAMILIES:
        families = "; ".join(FAMILY_NAMES[t] for t in sorted(HF_FAMILIES))
        raise ValueError(f"{path}: model_type {model_type!r} is not supported; supported model types: "
                         f"{', '.join(sorted(HF_FAMILIES))} ({families}). Use the transformers-format release of "
                         "the model; LlamaGen .pt files go through `vargen convert llamagen`")
    return model_type


def load_hf_image_model(path, local_files_only: bool = True, dtype=None, device=None,
                        attn_implementation: str = "sdpa", **adapter_kwargs) -> HFImageModel:
    """Load a ``transformers`` checkpoint folder (or hub id) as a vargen protocol model.

    ``config.json``'s ``model_type`` picks the adapter (janus, emu3, chameleon);
    ``adapter_kwargs`` go to it (e.g. ``grid=(48, 48), row_separator="lumina"``).
    """
    import transformers
    from transformers.utils import cached_file

    if Path(path).is_dir():
        model_type = hf_model_type(path)
    else:  # a hub id: its config.json from the local cache (or the hub, local_files_only=False)
        config_file = cached_file(str(path), "config.json", local_files_only=local_files_only)
        model_type = hf_model_type(Path(config_file).parent)
    class_name, adapter = HF_FAMILIES[model_type]
    kwargs = dict(local_files_only=local_files_only, attn_implementation=attn_implementation)
    if dtype is not None:
        kwargs["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
    hf_model = getattr(transformers, class_name).from_pretrained(str(path), **kwargs)
    if device is not None:
        hf_model.to(device)
    return adapter(hf_model, **adapter_kwargs)


__all__ = ["FAMILY_NAMES", "HF_FAMILIES", "ChameleonImageModel", "Emu3ImageModel", "HFImageModel", "JanusImageModel",
           "hf_model_type", "load_hf_image_model", "prompt_rows"]
