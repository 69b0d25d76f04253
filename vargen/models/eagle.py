"""EAGLE drafter: one decoder layer on the target's features (EAGLE-1/2; the drafter LANTERN uses).

The drafter predicts the target GPT's next *feature* (its last hidden state, after the final
norm: what :meth:`LlamaGen.forward` returns with ``return_hidden=True``, as EAGLE uses
HF's ``last_hidden_state``) from the feature of the previous position and the embedding of
the token sampled from it:

    f_hat_t = Block( fc( [ tok_embeddings(x_t), f_{t-1} ] ) )        logits_{t+1} = output(f_hat_t)

- ``tok_embeddings`` and ``output`` are the target's own (frozen, shared, never saved here):
  the target's final norm is already inside the feature, so ``output`` is its whole LM head
  (the target's ``output(norm(h))`` is ``output(f)``);
- ``fc`` is ``Linear(2 * dim, dim)`` (with bias, as EAGLE), ``Block`` one LlamaGen
  :class:`~vargen.models.llamagen.TransformerBlock` with the 2D RoPE at the target's positions
  (rows, cols of each token's cell; condition tokens at ``-1``) and its own one-layer
  :class:`StaticKVCache`;
- condition tokens feed the target's condition embeddings in place of token embeddings, so a
  drafter prefill over the prefix mirrors the target's.

Only ``fc`` and the block are parameters of this module: ``save_pretrained`` writes a small
``config.json`` + ``model.safetensors``. A drafter fits one target: :meth:`check_matches`
raises a ``ValueError`` naming every difference (width, vocabulary, grid).
"""
from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Optional

import torch
import torch.nn as nn
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from .cache import StaticKVCache
from .checkpoint import check_saved_class
from .linear import Linear
from .llamagen import LlamaGen, TransformerBlock, _token_grid, attention_inputs
from .rope import rope_2d_table

TRAIN_HINT = ("train one with `vargen train eagle --config configs/eagle_scenes_cpu.json` (it writes OUT/eagle), "
              "then pass --eagle OUT/eagle")
# the target's settings the drafter is built on (width, heads for the RoPE table, vocabulary, grid)
MATCHING = ("dim", "vocab_size", "block_size", "grid_rows")


class EagleDrafter(ModelMixin, ConfigMixin):
    """EAGLE-style one-layer drafter for a LlamaGen target (see the module docstring).

    Example:
        >>> gpt = LlamaGen.from_size("GPT-tiny", block_size=16, vocab_size=32, num_classes=4)
        >>> drafter = EagleDrafter.from_target(gpt)
        >>> sum(p.numel() for p in drafter.parameters()) < sum(p.numel() for p in gpt.parameters())
        True
    """

    config_name = "config.json"

    @register_to_config
    def __init__(self, dim: int = 768, n_head: int = 12, n_kv_head: Optional[int] = None, multiple_of: int = 256,
                 ffn_dim_multiplier: Optional[float] = None, norm_eps: float = 1e-5, rope_base: float = 10000.0,
                 cond_rope: str = "zeros", vocab_size: int = 16384, block_size: int = 256,
                 grid_rows: Optional[int] = None, initializer_range: float = 0.02, fc_bias: bool = True,
                 target: Optional[str] = None):
        super().__init__()
        rows, cols = _token_grid(block_size, grid_rows)
        block_cfg = SimpleNamespace(dim=dim, n_head=n_head, n_kv_head=n_kv_head, multiple_of=multiple_of,
                                    ffn_dim_multiplier=ffn_dim_multiplier, norm_eps=norm_eps, attn_dropout_p=0.0,
                                    resid_dropout_p=0.0, ffn_dropout_p=0.0)
        self.fc = Linear(2 * dim, dim, bias=fc_bias)
        self.layer = TransformerBlock(block_cfg, 0.0)
        self.register_buffer("rope", rope_2d_table(rows, dim // n_head, rope_base, cond_rope, cols=cols),
                             persistent=False)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, initializer_range)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @classmethod
    def from_target(cls, gpt: LlamaGen, **kwargs) -> "EagleDrafter":
        """A fresh drafter shaped for ``gpt`` (its width, heads, FFN sizing, RoPE, vocabulary and grid)."""
        if not isinstance(gpt, LlamaGen):
            raise TypeError(f"an EAGLE drafter is built on a LlamaGen GPT, got {type(gpt).__name__}")
        c = gpt.config
        keys = ("dim", "n_head", "n_kv_head", "multiple_of", "ffn_dim_multiplier", "norm_eps", "rope_base",
                "cond_rope", "vocab_size", "block_size", "grid_rows", "initializer_range")
        cfg = {k: getattr(c, k) for k in keys}
        cfg["target"] = getattr(c, "_name_or_path", None)
        drafter = cls(**{**cfg, **kwargs})
        w = gpt.output.weight
        return nn.Module.to(drafter, device=w.device, dtype=w.dtype)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> "EagleDrafter":
        """Load a :meth:`save_pretrained` folder; a missing or foreign folder raises naming the train command."""
        path = str(pretrained_model_name_or_path)
        local = os.path.join(path, kwargs.get("subfolder") or "")
        if os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") != 1:  # not a hub id
            check_saved_class(local, cls.__name__, "an EAGLE drafter", TRAIN_HINT)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    # ----------------------------------------------------------------------------- checks, cache
    def check_matches(self, target, where: str = "this EAGLE drafter") -> None:
        """Raise ``ValueError`` unless ``target`` is a LlamaGen GPT with this drafter's width, vocabulary and grid."""
        if not isinstance(target, LlamaGen):
            raise ValueError(f"{where} drafts for a LlamaGen GPT (it uses its tok_embeddings, output and "
                             f"hidden states); got {type(target).__name__}")
        mine, theirs = self.config, target.config
        diff = [f"{k} {getattr(mine, k)} (drafter) vs {getattr(theirs, k)} (target)" for k in MATCHING
                if getattr(mine, k) != getattr(theirs, k)]
        if mine.dim // mine.n_head != theirs.dim // theirs.n_head and not diff:
            diff.append(f"head_dim {mine.dim // mine.n_head} vs {theirs.dim // theirs.n_head}")
        if diff:
            raise ValueError(f"{where} does not match the target model ({'; '.join(diff)}): a drafter only works "
                             f"with the GPT it was trained for (trained for {mine.target!r}); {TRAIN_HINT} "
                             "with this model as config['init']")

    def new_cache(self, batch: int, max_len: int, dtype=None, device=None) -> StaticKVCache:
        """The drafter's own one-layer cache (prefix + image slots + tree slots)."""
        c = self.config
        w = self.fc.weight
        return StaticKVCache.allocate(1, batch, c.n_kv_head or c.n_head, max_len, c.dim // c.n_head,
                                      dtype or w.dtype, device or w.device)

    # ----------------------------------------------------------------------------- forward
    def forward(self, target: LlamaGen, hidden: torch.Tensor, tokens: Optional[torch.Tensor] = None,
                positions: Optional[torch.Tensor] = None, slots: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None, cache: Optional[StaticKVCache] = None,
                embeds: Optional[torch.Tensor] = None) -> tuple:
        """``(logits [B, T, V] fp32, features [B, T, dim])`` for pairs ``(token x_t, target feature f_{t-1})``.

        ``hidden`` ``[B, T, dim]`` is the feature of each input's previous position (the target's, or the
        drafter's own prediction deeper in a draft tree); ``tokens`` ``[B, T]`` (embedded by the target) or
        ``embeds`` (condition embeddings). ``positions``, ``slots``, ``mask`` and ``cache`` as in
        :meth:`LlamaGen.forward` (no cache: a plain causal forward, or ``mask`` ``[B, T, T]``).
        """
        e = target.tok_embeddings(tokens) if embeds is None else embeds
        x = self.fc(torch.cat([e.to(self.fc.weight.dtype), hidden.to(self.fc.weight.dtype)], -1))
        rope, mask = attention_inputs(self.rope, x, positions, slots, mask, cache)
        feats = self.layer(x, rope, mask, cache, 0, slots)
        if cache is not None:
            cache.visible.scatter_(1, slots, True)
        return target.output(feats.to(target.output.weight.dtype)).float(), feats


def load_eagle(path: str) -> EagleDrafter:
    """Load a drafter folder (``EagleDrafter.save_pretrained``) in eval mode, failing clearly on a missing one."""
    return EagleDrafter.from_pretrained(os.path.abspath(path)).eval()
