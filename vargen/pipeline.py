"""The diffusers-style pipeline: condition -> AR generator (a decoding method) -> tokenizer -> images."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Union

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

from .decoding import DecodeStats, SamplingConfig, get_method
from .loading import quiet_loading
from .models import LlamaGen, PrefixModel
from .errors import UsageError, reading_model
from .models.text import WordTextEncoder
from .tokenizers import Flex1DTokenizer, VQTokenizer

TINY_RANDOM = "tiny-random"
WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
EMBEDDED = ("scenes-t2i", "cifar10-c2i")  # trained by vargen's recipes, shipped in vargen/weights/


def embedded_models() -> list:
    """Names of the embedded models present in this installation."""
    return [n for n in EMBEDDED if os.path.isfile(os.path.join(WEIGHTS_DIR, n, "model_index.json"))]


def default_model() -> str:
    """The model ``vargen generate`` uses without ``--model``: the first embedded one, else tiny-random."""
    available = embedded_models()
    return available[0] if available else TINY_RANDOM


CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")


def _conversion_hint(path: str) -> str:
    """How to turn released checkpoint files (a file, or a folder of them) into a pipeline folder, or ''."""
    if os.path.isfile(os.path.join(path, "config.json")):
        return (f"it is a Hugging Face checkpoint folder: pass --model hf:{path}, or write a pipeline folder once with "
                f"`vargen convert hf {path} -o FOLDER` (docs/checkpoints.md); ")
    files = os.listdir(path) if os.path.isdir(path) else [path]
    if any(f.endswith(CHECKPOINT_SUFFIXES) for f in files):
        what = "holds checkpoint files" if os.path.isdir(path) else "is a checkpoint file"
        return (f"it {what}: convert them once with `vargen convert llamagen --gpt GPT.pt "
                "--vq VQ.pt -o FOLDER` (docs/checkpoints.md) and pass --model FOLDER; ")
    return ""


@dataclass
class VarGenPipelineOutput(ImagePipelineOutput):
    """Images plus the generated token grids and what decoding cost."""

    tokens: Optional[torch.Tensor] = None
    stats: Optional[DecodeStats] = None


class VarGenPipeline(DiffusionPipeline):
    """Generate images with an AR model and a VQ tokenizer.

    Components: ``gpt`` (:class:`vargen.models.LlamaGen`), ``vq``
    (:class:`vargen.tokenizers.VQTokenizer` for token grids, or
    :class:`vargen.tokenizers.Flex1DTokenizer` for a 1D-token GPT, ``grid_rows=1``, which can
    stop after any ``num_tokens``) and, for text-to-image models, ``text_encoder``
    (:class:`vargen.models.text.WordTextEncoder`); ``save_pretrained`` / ``from_pretrained``
    round-trip them.

    Example:
        >>> pipe = VarGenPipeline.load("tiny-random")
        >>> out = pipe([3, 5], seed=0, progress=False)
        >>> len(out.images), out.stats.forward_passes
        (2, 64)
    """

    _optional_components = ["text_encoder", "tokenizer"]

    def __init__(self, gpt: LlamaGen, vq: Union[VQTokenizer, Flex1DTokenizer], text_encoder=None, tokenizer=None):
        """``text_encoder``: a :class:`WordTextEncoder`, or a transformers T5 encoder with its ``tokenizer``."""
        super().__init__()
        if gpt.vocab_size != vq.vocab_size:
            raise ValueError(f"model vocabulary ({gpt.vocab_size} tokens) does not match the tokenizer codebook "
                             f"({vq.vocab_size} codes); pair the GPT with the tokenizer it was trained on")
        one_d = isinstance(vq, Flex1DTokenizer)
        if one_d != (gpt.grid[0] == 1) or (one_d and gpt.num_tokens > vq.num_latents):
            raise ValueError(f"a {'x'.join(map(str, gpt.grid))} token model does not fit a "
                             f"{type(vq).__name__}: pair 1D-token models (grid_rows=1, at most num_latents tokens) "
                             "with a Flex1DTokenizer and token grids with a VQTokenizer")
        if gpt.config.model_type == "t2i" and text_encoder is not None:
            dim = getattr(text_encoder.config, "caption_dim", None) or getattr(text_encoder.config, "d_model", None)
            if dim != gpt.config.caption_dim:
                raise ValueError(f"text encoder gives {dim}-d features but the model expects "
                                 f"{gpt.config.caption_dim}-d captions; pair them as trained")
        self.register_modules(gpt=gpt, vq=vq, text_encoder=text_encoder, tokenizer=tokenizer)

    # ----------------------------------------------------------------------------- loading
    @classmethod
    def load(cls, name_or_path: Optional[str] = None, device=None, torch_dtype=None) -> "VarGenPipeline":
        """Load an embedded model (``"scenes-t2i"``, ``"cifar10-c2i"``), a saved pipeline folder,
        ``"hf:DIR"`` (a Hugging Face Janus / Emu3 / Chameleon checkpoint folder, see
        :class:`vargen.hf_pipeline.HFImagePipeline`) or ``"tiny-random"`` (random weights, for smoke
        tests). ``None`` picks :func:`default_model`.

        ``torch_dtype`` (diffusers' name): the AR generator's weights and activations: fp32 by default (as
        diffusers), ``"auto"`` (bf16 where the hardware runs it natively, this project's AVX-512 BF16 CPU and
        CUDA GPUs; fp32 elsewhere: the CLI's default), ``"bf16"``, ``"fp16"``, ``"fp32"`` or a ``torch.dtype``. Logits become fp32 before probabilities, acceptance and
        sampling, whatever the dtype. The tokenizer and text encoder stay fp32 (one call per image or prompt).
        Hugging Face models keep their checkpoint's dtype under ``"auto"``.
        """
        from .precision import resolve_dtype

        from .hf_pipeline import HF_PREFIX, HFImagePipeline, read_reference

        name_or_path = name_or_path or default_model()
        if name_or_path == TINY_RANDOM:
            pipe = tiny_random_pipeline()
        elif name_or_path.startswith(HF_PREFIX):
            pipe = HFImagePipeline.from_hf(name_or_path[len(HF_PREFIX):])
        elif os.path.isdir(name_or_path) and read_reference(name_or_path) is not None:
            pipe = HFImagePipeline.from_pretrained(name_or_path)
        elif name_or_path in EMBEDDED or os.path.isdir(name_or_path):
            folder = os.path.join(WEIGHTS_DIR, name_or_path) if name_or_path in EMBEDDED else name_or_path
            if not os.path.isfile(os.path.join(folder, "model_index.json")):
                raise FileNotFoundError(f"no pipeline at {folder!r} (model_index.json missing); "
                                        f"{_conversion_hint(folder)}embedded models here: {embedded_models() or 'none'}")
            with reading_model(folder), quiet_loading():
                pipe = cls.from_pretrained(folder)
                _refuse_missing_weights(pipe, folder)
                pipe = pipe.to(torch.float32)
        else:
            raise FileNotFoundError(f"no model folder at {name_or_path!r}; {_conversion_hint(name_or_path)}pass a folder written by "
                                    f"VarGenPipeline.save_pretrained, hf:DIR, one of {list(EMBEDDED)}, or {TINY_RANDOM!r}")
        if device:
            with quiet_loading():
                pipe = pipe.to(device)
        if torch_dtype is not None and not (torch_dtype == "auto" and isinstance(pipe, HFImagePipeline)):
            dtype = resolve_dtype(torch_dtype, device or "cpu")
            torch.nn.Module.to(pipe.gpt, dtype=dtype)  # a plain cast: diffusers' would warn about fp32 modules
        return pipe

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' loader; a folder written by ``vargen convert hf`` loads its Hugging Face model."""
        from .hf_pipeline import HFImagePipeline, read_reference

        if cls is VarGenPipeline and read_reference(str(pretrained_model_name_or_path)) is not None:
            return HFImagePipeline.from_pretrained(pretrained_model_name_or_path, **kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @property
    def takes_text(self) -> bool:
        """Whether conditions are prompts (text-to-image) rather than classes."""
        return self.gpt.config.model_type == "t2i"

    @property
    def decodes_images(self) -> bool:
        """Whether :meth:`decode_tokens` makes pixels (vargen's tokenizers always do)."""
        return True

    def check_decodes_images(self) -> None:
        """Raise before any decoding when tokens could not become images (see :class:`HFImagePipeline`)."""

    @property
    def class_names(self) -> Optional[List[str]]:
        names = self.gpt.config.class_names
        return list(names) if names else None

    def parse_conditions(self, inputs: Sequence[Union[int, str]], unconditional: bool = False):
        """Inputs -> ``(cond, cond_mask)``: class ids/names for c2i, prompts through the text encoder for t2i.
        ``unconditional`` (t2i) takes empty prompts, which are refused otherwise."""
        if unconditional and self.gpt.config.model_type != "t2i":
            raise UsageError("unconditional generation is for text-to-image models; give a class")
        if self.gpt.config.model_type == "t2i":
            if self.text_encoder is None:
                raise ValueError("this is a text-to-image model without a text encoder; LlamaGen t2i models take "
                                 "FLAN-T5-XL caption features: convert with `vargen convert llamagen ... --t5 DIR` "
                                 "(docs/checkpoints.md) or pass text_encoder=T5EncoderModel and its tokenizer")
            prompts = [str(p) for p in inputs]
            if not isinstance(self.text_encoder, WordTextEncoder):
                if self.tokenizer is None:
                    raise ValueError("a transformers text encoder needs its tokenizer component")
                from .models.t5 import t5_caption_features

                return t5_caption_features(self.text_encoder, self.tokenizer, prompts, self.gpt.config.cls_token_num)
            import warnings

            for message in self.text_encoder.check_prompts(prompts, unconditional):
                warnings.warn(message)
            return self.text_encoder(prompts)
        names = self.class_names or []
        ids = []
        for item in inputs:
            if isinstance(item, (int, np.integer)) or (isinstance(item, str) and item.strip().lstrip("-").isdigit()):
                ids.append(int(item))
            elif item in names:
                ids.append(names.index(item))
            else:
                known = f"one of {names}" if names else f"an integer in [0, {self.gpt.config.num_classes})"
                raise ValueError(f"unknown class {item!r}: give {known}")
        bad = [i for i in ids if not 0 <= i < self.gpt.config.num_classes]
        if bad:
            raise ValueError(f"class ids {bad} are outside [0, {self.gpt.config.num_classes})")
        return torch.tensor(ids, dtype=torch.long, device=self.device), None

    # ----------------------------------------------------------------------------- generation
    @torch.no_grad()
    def __call__(self, inputs: Union[int, str, Sequence[Union[int, str]]], num_images_per_prompt: int = 1,
                 cfg_scale: float = 1.0, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 seed: Union[int, Sequence[int]] = 0, height: Optional[int] = None, width: Optional[int] = None,
                 output_type: str = "pil", progress: Optional[bool] = None,
                 callback_on_step_end: Optional[Callable] = None, return_dict: bool = True,
                 method: str = "ar", method_options: Optional[dict] = None, num_tokens: Optional[int] = None,
                 unconditional: bool = False, max_memory: Optional[int] = None):
        """Generate ``num_images_per_prompt`` images per class (c2i) or prompt (t2i); image ``i`` uses seed ``seed + i``
        (or ``seed[i]`` when a list with one seed per image is given).

        ``height`` / ``width`` (diffusers' names): the output size; a size other than the tokenizer's own
        (:attr:`image_size`) renders the same tokens through the model's LIIF decoder (:meth:`load_liif`).
        ``output_type``: ``"pil"``, ``"np"`` (``[B, H, W, 3]`` floats in [0, 1]) or ``"pt"``
        (``[B, 3, H, W]`` in [0, 1]) or ``"latent"`` (no image decoding; ``images`` holds the
        ``[B, N]`` tokens, as diffusers returns latents). ``callback_on_step_end(pipe, step, None, {"tokens", "committed"})``
        is called after every forward pass. ``method`` picks the decoding method
        (``vargen.decoding.METHODS``: ``"ar"``, ``"sjd"``, ``"sjd+coupling"``, ...) and
        ``method_options`` its settings (e.g. ``{"window": 16, "init": "left"}``); each method is built once per
        pipeline and reused. ``num_tokens`` (1D-token models only) stops every method after that many tokens; the
        1D tokenizer decodes the prefix. ``unconditional=True`` (t2i) takes empty prompts (the text encoder's
        all-padding caption); without it an empty prompt is an error. ``max_memory`` (bytes; default
        :func:`vargen.memory.default_budget`): decoding and rendering run in chunks of images and pixels that fit
        it, and a request whose finished images alone exceed it is refused up front. ``progress``: bars for
        decoding and rendering (default: the :meth:`set_progress_bar_config` setting, on unless disabled).
        """
        from .memory import budget_or_default, gpt_bytes_per_image, per_chunk

        if isinstance(inputs, (int, str)):
            inputs = [inputs]
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        if output_type != "latent":
            self.check_decodes_images()
        if progress is None:
            progress = not getattr(self, "_progress_bar_config", {}).get("disable", False)
        decode = self._method(method, method_options or {})
        size = self.output_size(height, width) if height is not None or width is not None else None
        budget = budget_or_default(max_memory if max_memory is not None else self.__dict__.get("_max_memory"))
        # repeated before parsing, so any condition type (features, class ids, prompt id rows) works alike
        inputs = [item for item in inputs for _ in range(num_images_per_prompt)]
        cond, cond_mask = self.parse_conditions(inputs, unconditional)
        if output_type != "latent" and isinstance(self.gpt, LlamaGen):
            self._refuse_unfitting(len(inputs), size or self.image_size, output_type, budget)
        sampling = SamplingConfig(cfg_scale, temperature, top_k, top_p)
        if isinstance(seed, int):
            seeds = [seed + i for i in range(len(inputs))]
        elif len(seed) == len(inputs):
            seeds = [int(s) for s in seed]
        else:
            raise ValueError(f"got {len(seed)} seeds for {len(inputs)} images; give one seed per image or one int")
        model = self.decode_model if num_tokens is None else PrefixModel(self.decode_model, num_tokens)
        per_call = (per_chunk(len(cond), gpt_bytes_per_image(self.gpt.config, sampling.uses_cfg), budget)
                    if isinstance(self.gpt, LlamaGen) else len(cond))  # adapters' caches live in transformers
        tokens, images, parts = [], [], []
        for a in range(0, len(cond), per_call):
            b = min(a + per_call, len(cond))
            callback = None if callback_on_step_end is None else self._step_callback(callback_on_step_end, a)
            t, stats = decode(model, cond[a:b], sampling, seeds[a:b],
                              cond_mask=None if cond_mask is None else cond_mask[a:b], progress=progress,
                              callback=callback)
            tokens.append(t)
            parts.append(stats)
            if output_type != "latent":
                pixels = (self.decode_tokens(t) if size is None and not isinstance(self.gpt, LlamaGen)
                          else self.render(t, *(size or (None, None)), max_memory=budget, progress=progress))
                images.extend(self._convert(pixels, output_type))
        tokens, stats = torch.cat(tokens), DecodeStats.combine(parts)
        if output_type == "latent":
            images = tokens
        elif output_type == "pt":
            images = torch.stack(images)
        elif output_type == "np":
            images = np.stack(images)
        if not return_dict:
            return images, tokens, stats
        return VarGenPipelineOutput(images=images, tokens=tokens, stats=stats)

    def set_memory_budget(self, max_memory: Optional[int]) -> "VarGenPipeline":
        """The working-memory budget (bytes) every later call decodes and renders within, unless a call passes its
        own ``max_memory``; ``None`` restores the default (:func:`vargen.memory.default_budget`)."""
        self.__dict__["_max_memory"] = max_memory
        return self

    def _step_callback(self, user_callback, first_image: int):
        """diffusers' ``callback_on_step_end(pipe, step, timestep, kwargs)`` for the chunk starting at ``first_image``."""
        def callback(step, tokens, committed):
            user_callback(self, step, None, {"tokens": tokens, "committed": committed, "first_image": first_image})
        return callback

    def _method(self, name: str, options: dict):
        """The decode function of ``name`` with ``options``, built once per pipeline (LANTERN's neighbour table
        over a 16,384-code codebook takes seconds) and reused by every later call with the same settings."""
        # plain values by value; objects (a drafter module, a folder's model) by identity: two modules with the
        # same architecture print the same, and the entry keeps them alive so an id is never reused
        key = (name, tuple(sorted((k, v if isinstance(v, (str, int, float, bool, type(None))) else id(v))
                                  for k, v in options.items())))
        built = self.__dict__.setdefault("_built_methods", {})
        if key not in built:
            built[key] = (get_method(name, codebook=self.vq.codebook_embeddings, **options), dict(options))
        return built[key][0]

    # ------------------------------------------------------------------------------- tokens to pixels
    def output_size(self, height: Optional[int] = None, width: Optional[int] = None) -> tuple:
        """``(height, width)`` of the images: the tokenizer's own size unless given (either one alone keeps the
        tokenizer's aspect ratio)."""
        own_h, own_w = self.image_size
        if height is None and width is None:
            return own_h, own_w
        for name, v in (("height", height), ("width", width)):
            if v is not None and (not isinstance(v, (int, np.integer)) or v < 1):
                raise UsageError(f"{name} must be a positive whole number of pixels, got {v!r}")
        height = height if height is not None else round(width * own_h / own_w)
        width = width if width is not None else round(height * own_w / own_h)
        return int(height), int(width)

    def load_liif(self, folder: Optional[str] = None):
        """The any-size decoder for this pipeline's tokens: ``folder``, else the model folder's own ``liif/``;
        checked against the tokenizer, loaded once and kept."""
        from .decoders import LIIFTokenDecoder

        if folder is None and self.__dict__.get("_liif") is not None:
            return self._liif
        if isinstance(self.vq, Flex1DTokenizer):
            raise UsageError("height / width other than the tokenizer's render 2D token grids through LIIF; "
                             "this model makes 1D tokens")
        own = os.path.join(getattr(self, "name_or_path", None) or "", "liif")
        folder = folder or (own if os.path.isdir(own) else None)
        if folder is None:
            raise UsageError(f"a size other than the tokenizer's {self.image_size[1]}x{self.image_size[0]} renders "
                             "through a LIIF decoder, and this model has none: pass one (CLI: --liif FOLDER; Python: "
                             "pipe.load_liif(FOLDER)); train one with `vargen train liif`")
        with reading_model(folder):
            liif = LIIFTokenDecoder.from_pretrained(folder).to(self.device)
        codes = liif.config["vq"]["codebook_size"]
        if codes != self.vq.vocab_size:
            raise UsageError(f"the LIIF decoder {folder} was trained on a tokenizer with {codes} codes, but this "
                             f"model's tokenizer has {self.vq.vocab_size}: use the LIIF decoder of this tokenizer")
        self.__dict__["_liif"] = liif
        return liif

    def _refuse_unfitting(self, n: int, size: tuple, output_type: str, budget: int) -> None:
        """Refuse up front what no chunking can serve: the finished images themselves, or one image's LIIF row."""
        from .memory import liif_query_bytes, refuse_unless_fits

        per_pixel = 3 if output_type == "pil" else 12  # uint8 or fp32 RGB
        fix = "draw fewer images, a smaller size, or many images one by one (`vargen sample`)"
        refuse_unless_fits(f"{n} image(s) of {size[1]}x{size[0]}", 2 * per_pixel * n * size[0] * size[1], budget, fix)
        if tuple(size) != tuple(self.image_size):
            refuse_unless_fits(f"rendering one {size[1]}x{size[0]} image",
                               size[1] * liif_query_bytes(self.load_liif().liif), budget, fix)

    @torch.no_grad()
    def render(self, tokens: torch.Tensor, height: Optional[int] = None, width: Optional[int] = None,
               max_memory: Optional[int] = None, progress: bool = False) -> torch.Tensor:
        """Tokens ``[B, N]`` -> images ``[B, 3, height, width]`` in [0, 1]: the tokenizer's decoder at its own size,
        the LIIF decoder (:meth:`load_liif`) at any other; in chunks that fit ``max_memory``."""
        size = self.output_size(height, width)
        if size == tuple(self.image_size):
            return self.decode_tokens(tokens, max_memory=max_memory)
        images = self.load_liif().decode(tokens.view(-1, *self.gpt.grid), size=size, max_memory=max_memory,
                                         progress=progress)
        return ((images + 1) / 2).clamp(0, 1)

    def enable_compile(self, mode: str = "reduce-overhead", backend: str = "inductor") -> "VarGenPipeline":
        """Decode through ``torch.compile`` from now on (fixed-shape steps over a static cache; CUDA graphs
        with ``mode="reduce-overhead"`` on a GPU). The first image of each batch shape pays the compilation."""
        from .models.compiled import compile_model

        self._compiled_gpt = compile_model(self.gpt, mode, backend)
        return self

    @property
    def decode_model(self):
        """The model the decoding methods run: the compiled wrapper after :meth:`enable_compile`, else ``gpt``."""
        compiled = self.__dict__.get("_compiled_gpt")
        return compiled if compiled is not None and compiled.model is self.gpt else self.gpt

    @torch.no_grad()
    def decode_tokens(self, tokens: torch.Tensor, max_memory: Optional[int] = None) -> torch.Tensor:
        """Raster token sequences ``[B, N]`` (1D tokens: any prefix ``[B, k]``) -> images ``[B, 3, H, W]`` in [0, 1],
        decoded a group of images at a time so the working memory stays within ``max_memory`` bytes
        (default: :func:`vargen.memory.default_budget`)."""
        from .memory import budget_or_default, per_chunk, vq_decode_bytes

        if not isinstance(self.vq, Flex1DTokenizer):
            tokens = tokens.view(-1, *self.gpt.grid)
        size = self.image_size
        channels = getattr(self.vq.config, "ch", None) or self.vq.config.width
        budget = budget_or_default(max_memory if max_memory is not None else self.__dict__.get("_max_memory"))
        group = per_chunk(len(tokens), vq_decode_bytes(channels, *size), budget)
        return torch.cat([((self.vq.decode(t).float() + 1) / 2).clamp(0, 1) for t in tokens.split(group)])

    @property
    def image_size(self) -> tuple:
        """``(height, width)`` of the tokenizer's own decode."""
        if isinstance(self.vq, Flex1DTokenizer):
            return (self.vq.config.image_size,) * 2
        h, w = self.gpt.grid
        f = 2 ** (len(self.vq.config.ch_mult) - 1)
        return h * f, w * f

    @staticmethod
    def _convert(images: torch.Tensor, output_type: str) -> list:
        """``[B, 3, H, W]`` in [0, 1] -> a list of images of ``output_type`` (PIL at once: 1/4 of the floats)."""
        if output_type == "pt":
            return list(images)
        arr = images.permute(0, 2, 3, 1).cpu().numpy()
        if output_type == "np":
            return list(arr)
        from PIL import Image

        return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in arr]


def _refuse_missing_weights(pipe: VarGenPipeline, folder: str) -> None:
    """diffusers loads a config.json that asks for more weights than the file holds with the extra ones left
    on the meta device (a warning, then "Cannot copy out of meta tensor" much later): refuse it here."""
    from .errors import ModelLoadError

    for name, component in pipe.components.items():
        state = component.state_dict() if isinstance(component, torch.nn.Module) else {}
        missing = [k for k, v in state.items() if v.is_meta]
        if missing:
            raise ModelLoadError(f"{os.path.join(folder, name)}: its config.json does not match its weights "
                                 f"({len(missing)} weights missing, e.g. {missing[0]}); export or copy the model again")


def tiny_random_pipeline(seed: int = 0) -> VarGenPipeline:
    """A class-conditional GPT-tiny (8 x 8 tokens) + tiny VQ-8 with seeded random weights.

    It produces noise, not pictures: it exists so the whole path (CLI, pipeline, decoding,
    tokenizer) runs anywhere in seconds.
    """
    torch.manual_seed(seed)
    gpt = LlamaGen.from_size("GPT-tiny", block_size=64, vocab_size=256, num_classes=10,
                             class_names=[f"class{i}" for i in range(10)])
    torch.nn.init.normal_(gpt.output.weight, 0.0, 0.02)  # LlamaGen zero-inits; give it some structure
    vq = VQTokenizer(codebook_size=256, ch=32, ch_mult=(1, 1, 2, 2), z_channels=32)
    return VarGenPipeline(gpt=gpt.eval(), vq=vq.eval())
