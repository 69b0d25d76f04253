"""Hugging Face checkpoint folders (Janus-Pro, Emu3, Chameleon / Lumina-mGPT) as vargen pipelines.

``HFImagePipeline.from_hf("Janus-Pro-1B")`` reads the folder's ``config.json``, builds the family's
adapter (:mod:`vargen.models.hf`) and its processor / tokenizer from the same folder, local files
only, never running code from it. Its pipeline folder (``save_pretrained``, ``vargen convert hf``)
*references* the Hugging Face folder instead of copying it: those weights are several GB and
already safetensors, so a copy would only double the disk use. Moving or deleting the Hugging
Face folder breaks the reference, and loading then says so.
"""
from __future__ import annotations

import json
import os
from typing import Optional, Sequence, Union

import torch

from .errors import UsageError
from .precision import DTYPE_CHOICES, DTYPES
from .models.hf import FAMILY_NAMES, hf_model_type, load_hf_image_model
from .models.hf_base import prompt_rows
from .pipeline import VarGenPipeline

HF_PREFIX = "hf:"
REFERENCE_CLASS = "HFImagePipeline"


def read_reference(folder: str) -> Optional[dict]:
    """The settings of a pipeline folder that references a Hugging Face folder, else ``None``."""
    index = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index):
        return None
    with open(index) as f:
        settings = json.load(f)
    return settings if settings.get("_class_name") == REFERENCE_CLASS else None


def _check_options(family: str, grid, row_separator) -> None:
    """Options a family does not take are errors, never ignored."""
    if row_separator is not None and family != "chameleon":
        raise ValueError(f"--row-separator is for Chameleon-format models (Lumina-mGPT); this is {family}: drop it")
    if grid is not None and family == "janus":
        raise ValueError("Janus takes its token grid from its config (vq_config); drop --grid")


class HFImagePipeline(VarGenPipeline):
    """A ``transformers`` AR image generator with its processor, behind :class:`VarGenPipeline`'s call.

    ``gpt`` is the family's adapter (:class:`vargen.models.hf.HFImageModel`); prompts go through
    ``processor`` (a ``JanusProcessor``, ``Emu3Processor`` or, for Chameleon, the tokenizer) and
    images come out of the model's own VQ decoder (Janus, Emu3; transformers has none for Chameleon).
    """

    def __init__(self, gpt, processor, hf_options: Optional[dict] = None):
        super(VarGenPipeline, self).__init__()  # VarGenPipeline's checks are for LlamaGen + VQ
        self.register_modules(gpt=gpt, processor=processor)
        self.hf_options = dict(hf_options or {})

    # ----------------------------------------------------------------------------- loading
    @classmethod
    def from_hf(cls, path: str, grid: Optional[Sequence[int]] = None, row_separator: Union[None, str, int] = None,
                max_prompt_len: int = 256, dtype: str = "auto") -> "HFImagePipeline":
        """Load a Hugging Face checkpoint folder (``config.json``, weights, processor files) from disk.

        ``grid`` (Emu3, Chameleon: ``(H, W)`` tokens) and ``row_separator`` (Chameleon:
        ``"lumina"`` for Lumina-mGPT) go to the adapter; ``dtype`` is ``"auto"`` (the checkpoint's
        own), ``"bf16"``, ``"fp16"`` or ``"fp32"``.
        """
        if not os.path.isdir(path):
            raise FileNotFoundError(f"no Hugging Face folder at {path!r}: download the checkpoint folder (config.json, "
                                    "weights, tokenizer / processor files) and pass its path; nothing is downloaded")
        if dtype not in DTYPE_CHOICES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {dtype!r}")
        family = hf_model_type(path)  # an unsupported model_type fails here, before any weights are read
        _check_options(family, grid, row_separator)
        adapter_kwargs = {"max_prompt_len": max_prompt_len}
        if grid is not None:
            adapter_kwargs["grid"] = tuple(int(g) for g in grid)
        if row_separator is not None:
            adapter_kwargs["row_separator"] = row_separator
        from .loading import quiet_loading

        with quiet_loading():
            model = load_hf_image_model(path, local_files_only=True, dtype=DTYPES.get(dtype, "auto"),
                                        **adapter_kwargs)
            processor = _load_processor(path, family)
        options = {"hf_folder": os.path.abspath(path), "model_type": family, "grid": list(model.grid),
                   "row_separator": row_separator, "max_prompt_len": max_prompt_len, "dtype": dtype}
        pipe = cls(gpt=model, processor=processor, hf_options=options)
        pipe.register_to_config(_name_or_path=os.path.abspath(path))
        return pipe

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> "HFImagePipeline":
        """A pipeline folder written by :meth:`save_pretrained` (or a Hugging Face folder itself)."""
        path = str(pretrained_model_name_or_path)
        if kwargs:
            raise ValueError(f"{cls.__name__}.from_pretrained takes no options ({', '.join(kwargs)}); they are "
                             "stored in the folder: pass them to from_hf / vargen convert hf")
        reference = read_reference(path)
        if reference is None:
            return cls.from_hf(path)
        source = reference["hf_folder"]
        if not os.path.isdir(source):
            raise FileNotFoundError(f"the pipeline folder {path!r} refers to the Hugging Face folder {source!r}, which "
                                    "is missing: restore it there, or rerun `vargen convert hf DIR -o "
                                    f"{path} --overwrite` with its new place")
        grid = None if reference["model_type"] == "janus" else reference["grid"]
        pipe = cls.from_hf(source, grid=grid, row_separator=reference.get("row_separator"),
                           max_prompt_len=reference.get("max_prompt_len", 256), dtype=reference.get("dtype", "auto"))
        pipe.register_to_config(_name_or_path=path)
        return pipe

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """Write a small pipeline folder that references the Hugging Face folder (see the module docs)."""
        if kwargs:
            raise ValueError(f"{type(self).__name__}.save_pretrained takes no options ({', '.join(kwargs)})")
        import diffusers

        os.makedirs(save_directory, exist_ok=True)
        index = {"_class_name": REFERENCE_CLASS, "_diffusers_version": diffusers.__version__, **self.hf_options}
        with open(os.path.join(save_directory, "model_index.json"), "w") as f:
            json.dump(index, f, indent=2)

    # ----------------------------------------------------------------------------- what the pipeline reads
    @property
    def takes_text(self) -> bool:
        return True

    @property
    def class_names(self):
        return None

    @property
    def vq(self):
        """The codebook side the decoding methods read (``vocab_size``, ``codebook_embeddings``): the adapter's."""
        return self.gpt

    @property
    def decodes_images(self) -> bool:
        return self.gpt.has_image_decoder

    def parse_conditions(self, inputs, unconditional: bool = False):
        """Prompts -> ``(prompt id rows, None)`` through the family's processor (chat template, image header)."""
        if unconditional:
            raise UsageError(f"{self.gpt.family} models are prompted through their chat template: give a prompt")
        prompts = [str(p) for p in inputs]
        return prompt_rows(self.gpt.prompt_ids(prompts, self.processor)), None

    @torch.no_grad()
    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        self.check_decodes_images()
        return self.gpt.decode_tokens(tokens)

    def check_decodes_images(self) -> None:
        if not self.decodes_images:
            raise ValueError(f"{self.gpt.family} models have no image decoder in transformers (Chameleon's VQ-GAN "
                             "decoder is not part of it), so vargen cannot write their images; generate tokens from "
                             "Python with pipe(prompts, output_type='latent'), or time decoding with `vargen bench "
                             "speed`, which needs no pixels (docs/checkpoints.md)")


def _load_processor(path: str, family: str):
    """The family's processor (Chameleon: its tokenizer) from ``path``; local files, no code from the folder."""
    import transformers

    name = {"janus": "JanusProcessor", "emu3": "Emu3Processor", "chameleon": "AutoTokenizer"}[family]
    try:
        return getattr(transformers, name).from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(f"{path}: could not build the {name} of this {FAMILY_NAMES[family]} checkpoint ({err}); "
                         "the folder needs the tokenizer / processor files of the release (tokenizer.json or "
                         "tokenizer.model, tokenizer_config.json, processor_config.json)") from None


__all__ = ["HFImagePipeline", "HF_PREFIX", "read_reference"]
