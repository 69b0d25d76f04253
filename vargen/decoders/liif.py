"""LIIF: Local Implicit Image Function (Chen, Liu & Wang, CVPR'21, yinboc/liif) and a token decoder built on it.

An encoder turns an image (or a token grid) into a feature map ``[B, C, h, w]``; a small
MLP maps (feature, relative coordinate, cell size) to RGB at any continuous query point,
so one feature map renders at any output size and any non-integer scale.

Module and parameter names follow the official ``models/edsr.py``, ``models/mlp.py`` and
``models/liif.py``, so official checkpoints (``{'model': {'name': 'liif', 'args', 'sd'}}``)
load with :meth:`LIIF.from_liif`. Pixels are in ``[-1, 1]`` (LIIF's ``(x - 0.5) / 0.5``
data norm, which is also vargen's image range); rendered images are not clamped.

Output sizes from a scale use Python's ``round`` (halves to even), exactly as the
official ``test.py``: ``scale=2.5`` on a 7 x 9 input gives ``round(17.5) x round(22.5)`` = 18 x 22.
"""
from __future__ import annotations

import json
import os
from typing import Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..models.checkpoint import (CheckpointError, check_trunk_unchanged, load_checked, load_head, read_checkpoint,
                                 read_state_dict, trunk_folder)
from ..ops.reference import make_coord  # defined with the gather reference that uses it

Size = Union[int, Sequence[int]]
# Optional skip: the input interpolated at the query point is added to the MLP's output (LTE's
# bilinear LR residual). None is the official LIIF.
RESIDUALS = (None, "bilinear", "bicubic")


def output_size(hw: Sequence[int], size: Optional[Size] = None, scale=None) -> Tuple[int, int]:
    """``(H, W)`` from an explicit ``size`` (int or ``(H, W)``) or a ``scale`` (float or ``(sh, sw)``) of ``hw``."""
    if (size is None) == (scale is None):
        raise ValueError("pass exactly one of size=(H, W) or scale=s")
    if size is not None:
        H, W = (size, size) if isinstance(size, int) else tuple(int(v) for v in size)
    else:
        sh, sw = (scale, scale) if isinstance(scale, (int, float)) else tuple(scale)
        if sh <= 0 or sw <= 0:
            raise ValueError(f"scale must be positive, got {scale}")
        H, W = round(hw[0] * sh), round(hw[1] * sw)  # Python round, as LIIF's test.py
    if H < 1 or W < 1:
        raise ValueError(f"output size must be at least 1 x 1, got {H} x {W}")
    return H, W


# --------------------------------------------------------------------------------------------- encoder
class MeanShift(nn.Conv2d):
    """EDSR's fixed RGB mean shift. Unused in LIIF's forward, but its weights are in every official checkpoint."""

    def __init__(self, rgb_range: float = 1, rgb_mean=(0.4488, 0.4371, 0.4040), rgb_std=(1.0, 1.0, 1.0),
                 sign: int = -1):
        super().__init__(3, 3, kernel_size=1)
        std = torch.tensor(rgb_std)
        self.weight.data = torch.eye(3).view(3, 3, 1, 1) / std.view(3, 1, 1, 1)
        self.bias.data = sign * rgb_range * torch.tensor(rgb_mean) / std
        self.requires_grad_(False)


class ResBlock(nn.Module):
    """conv-ReLU-conv with a scaled residual (``body.0`` / ``body.2`` as in EDSR)."""

    def __init__(self, n_feats: int, res_scale: float = 1.0):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(n_feats, n_feats, 3, padding=1), nn.ReLU(True),
                                  nn.Conv2d(n_feats, n_feats, 3, padding=1))
        self.res_scale = res_scale

    def forward(self, x):
        return self.body(x) * self.res_scale + x


class EDSRBaseline(nn.Module):
    """EDSR without its upsampler (LIIF's encoder): ``[B, 3, h, w]`` -> ``[B, n_feats, h, w]``.

    Defaults are ``edsr-baseline`` (16 blocks, 64 features, 1.2M parameters); ``n_resblocks=32,
    n_feats=256, res_scale=0.1`` is the full ``edsr``.
    """

    def __init__(self, n_resblocks: int = 16, n_feats: int = 64, res_scale: float = 1.0, rgb_range: float = 1,
                 n_colors: int = 3):
        super().__init__()
        self.n_resblocks, self.n_feats, self.res_scale, self.rgb_range = n_resblocks, n_feats, res_scale, rgb_range
        self.sub_mean, self.add_mean = MeanShift(rgb_range), MeanShift(rgb_range, sign=1)
        self.head = nn.Sequential(nn.Conv2d(n_colors, n_feats, 3, padding=1))
        self.body = nn.Sequential(*[ResBlock(n_feats, res_scale) for _ in range(n_resblocks)],
                                  nn.Conv2d(n_feats, n_feats, 3, padding=1))
        self.out_dim = n_feats

    def forward(self, x):
        x = self.head(x)  # no mean shift: LIIF normalises inputs itself (the official code comments it out)
        return self.body(x) + x

    def spec(self) -> dict:
        """The official ``encoder_spec`` that rebuilds this module."""
        return {"name": "edsr-baseline", "args": {"n_resblocks": self.n_resblocks, "n_feats": self.n_feats,
                                                  "res_scale": self.res_scale, "rgb_range": self.rgb_range,
                                                  "no_upsampling": True}}


# Official encoder names -> their default arguments (the official make_* functions' defaults).
ENCODERS = {"edsr-baseline": {}, "edsr": {"n_resblocks": 32, "n_feats": 256, "res_scale": 0.1}}


class MLP(nn.Module):
    """Linear-ReLU stack; ``layers.{0,2,4,...}`` as in the official ``models/mlp.py``."""

    def __init__(self, in_dim: int, out_dim: int, hidden_list: Sequence[int]):
        super().__init__()
        layers, last = [], in_dim
        for hidden in hidden_list:
            layers += [nn.Linear(last, hidden), nn.ReLU()]
            last = hidden
        layers.append(nn.Linear(last, out_dim))
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], -1)


# --------------------------------------------------------------------------------------------- LIIF
class LIIF(nn.Module):
    """Encoder + implicit MLP head. ``encoder`` may be ``None`` when features come from elsewhere
    (then pass ``feat_dim`` and render with ``is_feat=True``).

    ``residual="bilinear"`` or ``"bicubic"`` adds the input image interpolated at each query
    point to the MLP's output (LTE's LR skip; the last MLP layer starts at zero, so an untrained
    model is that interpolation). It is saved as an extra ``residual`` arg in the official spec.

    Example:
        >>> m = LIIF(EDSRBaseline(n_resblocks=1, n_feats=8), hidden_list=[16])
        >>> m.render(torch.zeros(1, 3, 7, 9), scale=2.5).shape
        torch.Size([1, 3, 18, 22])
    """

    def __init__(self, encoder: Optional[nn.Module], hidden_list: Sequence[int] = (256, 256, 256, 256),
                 out_dim: int = 3, local_ensemble: bool = True, feat_unfold: bool = True, cell_decode: bool = True,
                 feat_dim: Optional[int] = None, residual: Optional[str] = None):
        super().__init__()
        if residual not in RESIDUALS:
            raise ValueError(f"residual must be one of {RESIDUALS}, got {residual!r}")
        self.local_ensemble, self.feat_unfold, self.cell_decode = local_ensemble, feat_unfold, cell_decode
        self.residual = residual
        self.encoder = encoder
        feat_dim = feat_dim or encoder.out_dim
        in_dim = feat_dim * (9 if feat_unfold else 1) + 2 + (2 if cell_decode else 0)
        self.imnet = MLP(in_dim, out_dim, list(hidden_list))
        if residual:  # start as the interpolated input: the MLP learns only the correction
            nn.init.zeros_(self.imnet.layers[-1].weight)
            nn.init.zeros_(self.imnet.layers[-1].bias)
        self.feat: Optional[torch.Tensor] = None
        self.inp: Optional[torch.Tensor] = None

    # ----------------------------------------------------------------------- official interface
    def gen_feat(self, inp: torch.Tensor) -> torch.Tensor:
        """Encode ``inp`` and keep the features for :meth:`query_rgb` (the official stateful API)."""
        if self.encoder is None:
            raise ValueError("this LIIF has no encoder: pass features and is_feat=True / feat=")
        self.inp, self.feat = inp, self.encoder(inp)
        return self.feat

    def query_rgb(self, coord: torch.Tensor, cell: Optional[torch.Tensor] = None,
                  feat: Optional[torch.Tensor] = None, inp: Optional[torch.Tensor] = None) -> torch.Tensor:
        """RGB at query points: ``coord``, ``cell`` ``[B, Q, 2]`` (row, col in [-1, 1]) -> ``[B, Q, out_dim]``.

        ``feat`` and ``inp`` (the input image, used by a ``residual`` model) default to those
        stored by :meth:`gen_feat`.
        """
        feat = self.feat if feat is None else feat
        skip = self._skip(coord, self.inp if inp is None else inp) if self.residual else 0
        B, _, h, w = feat.shape
        if self.feat_unfold:  # each feature carries its 3 x 3 neighbourhood (zero-padded at the border)
            feat = F.unfold(feat, 3, padding=1).view(B, feat.shape[1] * 9, h, w)
        # per corner: nearest feature + offset from its centre (+ cell), all in feature cells
        inp, areas = ops.liif_corners(feat, coord, cell, self.local_ensemble, self.cell_decode)
        preds = [self.imnet(x) for x in inp]
        tot_area = areas.sum(dim=0)
        areas = list(areas)
        if self.local_ensemble:
            # Each corner is weighted by the area of the rectangle to the diagonally opposite corner
            # (bilinear-style weights): swap 0<->3 and 1<->2.
            areas = areas[::-1]
        return skip + sum(pred * (area / tot_area).unsqueeze(-1) for pred, area in zip(preds, areas))

    def _skip(self, coord: torch.Tensor, inp: Optional[torch.Tensor]) -> torch.Tensor:
        """The input image interpolated at ``coord`` (LTE's LR skip): ``[B, Q, 3]``."""
        if inp is None:
            raise ValueError(f"this LIIF adds the {self.residual}-interpolated input image: render from the "
                             "image (not is_feat=True), or pass inp=")
        grid = coord.flip(-1).unsqueeze(1).to(inp.dtype)  # grid_sample wants (x, y) = (col, row)
        return F.grid_sample(inp, grid, mode=self.residual, padding_mode="border",
                             align_corners=False)[:, :, 0, :].permute(0, 2, 1)

    def forward(self, inp: torch.Tensor, coord: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
        return self.query_rgb(coord, cell, feat=self.gen_feat(inp), inp=inp)

    # ----------------------------------------------------------------------- rendering
    @torch.no_grad()
    def render(self, inp: torch.Tensor, size: Optional[Size] = None, scale=None, chunk: int = 30000,
               is_feat: bool = False) -> torch.Tensor:
        """Render ``[B, 3, H, W]`` from an input image (or, with ``is_feat``, a feature map).

        ``scale`` is relative to ``inp``'s spatial size (see :func:`output_size` for rounding).
        Queries run ``chunk`` pixels at a time (LIIF's ``batched_predict``), so the MLP's
        activations stay bounded however large the output is.
        """
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        H, W = output_size(inp.shape[-2:], size, scale)
        if is_feat and self.residual:
            raise ValueError(f"this LIIF adds the {self.residual}-interpolated input image: render from the image, "
                             "not from features (is_feat=True)")
        feat = inp if is_feat else self.gen_feat(inp)
        return render_feat(self, feat, H, W, chunk, inp=None if is_feat else inp)

    # ----------------------------------------------------------------------- official checkpoints
    def spec(self) -> dict:
        """The official ``{'name': 'liif', 'args': ..., 'sd': ...}`` model spec (needs an EDSR encoder)."""
        if not hasattr(self.encoder, "spec"):
            raise ValueError("only LIIF models with an EDSR encoder have an official spec")
        hidden = [m.out_features for m in self.imnet.layers if isinstance(m, nn.Linear)]
        return {"name": "liif", "args": {
            "encoder_spec": self.encoder.spec(),
            "imnet_spec": {"name": "mlp", "args": {"out_dim": hidden[-1], "hidden_list": hidden[:-1]}},
            "local_ensemble": self.local_ensemble, "feat_unfold": self.feat_unfold, "cell_decode": self.cell_decode,
            **({"residual": self.residual} if self.residual else {}),  # vargen's key; absent = official LIIF
        }, "sd": self.state_dict()}

    @classmethod
    def from_spec(cls, args: Mapping) -> "LIIF":
        """Build (random weights) from the official ``model['args']``."""
        enc_spec = args.get("encoder_spec") or {}
        name = enc_spec.get("name")
        if name not in ENCODERS:
            raise CheckpointError(f"unknown LIIF encoder {name!r}; vargen implements {sorted(ENCODERS)}")
        enc_args = {**ENCODERS[name], **enc_spec.get("args", {})}
        enc_args.pop("scale", None)  # only sizes EDSR's upsampler, which LIIF removes
        if not enc_args.pop("no_upsampling", False):
            raise CheckpointError(f"LIIF encoder {name!r} must have no_upsampling=True (LIIF replaces the upsampler)")
        imnet_spec = args.get("imnet_spec")
        if not imnet_spec or imnet_spec.get("name") != "mlp":
            raise CheckpointError(f"LIIF imnet must be 'mlp', got {imnet_spec and imnet_spec.get('name')!r}")
        imnet_args = imnet_spec.get("args", {})
        return cls(EDSRBaseline(**enc_args), hidden_list=imnet_args.get("hidden_list", [256] * 4),
                   out_dim=imnet_args.get("out_dim", 3), local_ensemble=args.get("local_ensemble", True),
                   feat_unfold=args.get("feat_unfold", True), cell_decode=args.get("cell_decode", True),
                   residual=args.get("residual"))

    CHECKPOINT = "liif.pth"

    def save_pretrained(self, folder: str) -> None:
        """Write ``folder/liif.pth`` in the official format (``{'model': spec}``), atomically;
        :meth:`from_liif` loads the folder or the file, and so does the official ``test.py``."""
        import io

        from ..atomic import write_atomic

        os.makedirs(folder, exist_ok=True)
        buf = io.BytesIO()
        torch.save({"model": self.spec()}, buf)
        write_atomic(os.path.join(folder, self.CHECKPOINT), buf.getvalue())

    @classmethod
    def from_liif(cls, path_or_dict) -> "LIIF":
        """Load an official LIIF checkpoint (``.pth`` path, a folder holding ``liif.pth``, or a
        loaded dict), or a raw state dict (``encoder.*`` + ``imnet.*`` keys).

        A raw state dict carries no arguments, so the sizes are read off its tensors
        (EDSR blocks and width, MLP widths, unfold/cell from the MLP's input width) and the
        local ensemble is assumed on, as in every published LIIF model.
        Raises :class:`CheckpointError` naming missing / unexpected / mis-shaped keys.
        """
        obj = path_or_dict
        if isinstance(obj, (str, os.PathLike)):
            if os.path.isdir(obj):
                obj = os.path.join(obj, cls.CHECKPOINT)
            if not os.path.exists(obj):
                raise FileNotFoundError(f"checkpoint not found: {obj}")
            obj = read_checkpoint(obj)  # official files are plain dicts
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"expected a LIIF checkpoint dict, got {type(obj).__name__}")
        spec = obj.get("model", obj)
        if isinstance(spec, Mapping) and "sd" in spec:
            if spec.get("name") != "liif":
                raise CheckpointError(f"checkpoint holds model {spec.get('name')!r}, not 'liif'")
            model, state = cls.from_spec(spec.get("args", {})), spec["sd"]
        else:
            state = read_state_dict(obj)
            model = cls._from_raw_state(state)
        load_checked(model, state, what="LIIF (official encoder.* + imnet.* layout)")
        return model.eval()

    @classmethod
    def _from_raw_state(cls, state: Mapping[str, torch.Tensor]) -> "LIIF":
        head = state.get("encoder.head.0.weight")
        n_feats = head.shape[0] if head is not None else 64
        blocks = {k.split(".")[2] for k in state if k.startswith("encoder.body.") and k.endswith(".body.0.weight")}
        linear = sorted(int(k.split(".")[2]) for k in state if k.startswith("imnet.layers.") and k.endswith(".weight"))
        if not linear:
            raise CheckpointError("no imnet.layers.*.weight in the state dict: not a LIIF model")
        widths = [state[f"imnet.layers.{i}.weight"].shape[0] for i in linear]
        in_dim = state[f"imnet.layers.{linear[0]}.weight"].shape[1]
        for unfold, cell in ((True, True), (True, False), (False, True), (False, False)):
            if in_dim == n_feats * (9 if unfold else 1) + 2 + (2 if cell else 0):  # feature + coord + cell
                break
        else:
            raise CheckpointError(f"imnet input width {in_dim} does not fit {n_feats}-channel features")
        return cls(EDSRBaseline(n_resblocks=len(blocks) or 16, n_feats=n_feats), hidden_list=widths[:-1],
                   out_dim=widths[-1], feat_unfold=unfold, cell_decode=cell)


def render_feat(liif: LIIF, feat: torch.Tensor, H: int, W: int, chunk: int = 30000,
                inp: Optional[torch.Tensor] = None, bar=None) -> torch.Tensor:
    """Query ``liif``'s head on ``feat`` (and, for a residual LIIF, the input image ``inp``) at every
    pixel centre of an ``H x W`` image, ``chunk`` queries at a time in all (so a batch of ``B`` images runs
    ``chunk // B`` pixels per step, or one image at a time when ``B`` exceeds ``chunk``: memory follows
    ``chunk``, not the batch). ``bar`` (tqdm) advances by the pixels rendered."""
    B = feat.shape[0]
    out = feat.new_empty(B, H * W, liif.imnet.layers[-1].out_features)
    group = max(1, min(B, chunk))
    pixels = max(1, chunk // group)
    coord = make_coord((H, W), device=feat.device).to(feat.dtype)
    cell = coord.new_tensor([2.0 / H, 2.0 / W]).expand_as(coord)
    for b in range(0, B, group):
        f, x = feat[b:b + group], None if inp is None else inp[b:b + group]
        n = f.shape[0]
        for i in range(0, H * W, pixels):
            out[b:b + n, i:i + pixels] = liif.query_rgb(coord[None, i:i + pixels].expand(n, -1, -1),
                                                        cell[None, i:i + pixels].expand(n, -1, -1), feat=f, inp=x)
            if bar is not None:
                bar.update(n * min(pixels, H * W - i))
    return out.view(B, H, W, -1).permute(0, 3, 1, 2).contiguous()


# --------------------------------------------------------------------------------------------- tokens
_VQ_KEYS = ("codebook_size", "codebook_embed_dim", "ch", "ch_mult", "decoder_ch_mult", "num_res_blocks",
            "z_channels", "dropout_p", "norm_groups")


class VQFeatures(nn.Module):
    """Token grid -> features: a copy of a VQ tokenizer's codebook and decoder trunk.

    The trunk is the decoder minus ``norm_out``/``conv_out`` and minus its last upsampling
    stages (Kim & Kim's latent decoder + LIIF): all res blocks stay, only ``keep_upsample``
    of the upsamplers run, so features sit at stride ``f / 2**keep_upsample``.
    The codebook is a buffer (copied from the VQ, never trained), so token ids keep their meaning.
    """

    def __init__(self, vq_config: Mapping, keep_upsample: int):
        super().__init__()
        from ..tokenizers.vq import Decoder

        c = dict(vq_config)
        mult = tuple(c.get("decoder_ch_mult") or c["ch_mult"])
        if not 0 <= keep_upsample <= len(mult) - 1:
            raise ValueError(f"keep_upsample must be in [0, {len(mult) - 1}] for this VQ, got {keep_upsample}")
        self.keep_upsample, self.vq_downsample = keep_upsample, 2 ** (len(mult) - 1)
        self.register_buffer("codebook", torch.zeros(c["codebook_size"], c["codebook_embed_dim"]))
        self.post_quant_conv = nn.Conv2d(c["codebook_embed_dim"], c["z_channels"], 1)
        self.decoder = Decoder(c["ch"], mult, c["num_res_blocks"], c["z_channels"], c.get("dropout_p", 0.0),
                               c.get("norm_groups", 32))
        del self.decoder.norm_out, self.decoder.conv_out  # LIIF's MLP replaces the RGB head
        for i, block in enumerate(self.decoder.conv_blocks):
            if i >= keep_upsample and hasattr(block, "upsample"):
                del block.upsample
        self.out_dim = c["ch"] * mult[0]

    @property
    def stride(self) -> int:
        """Pixels of the VQ's native output per feature cell."""
        return self.vq_downsample // 2 ** self.keep_upsample

    def copy_from(self, vq) -> "VQFeatures":
        """Take the codebook, ``post_quant_conv`` and decoder trunk weights of ``vq``."""
        self.codebook.copy_(vq.decode_table.detach())
        self.post_quant_conv.load_state_dict(vq.post_quant_conv.state_dict())
        self.decoder.load_state_dict(vq.decoder.state_dict(), strict=False)  # drops norm_out/conv_out/upsamplers
        return self

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() == 2:
            side = int(round(tokens.shape[1] ** 0.5))
            if side * side != tokens.shape[1]:
                raise ValueError(f"flat token sequence of length {tokens.shape[1]} is not square; pass [B, h, w]")
            tokens = tokens.view(-1, side, side)
        n = self.codebook.shape[0]
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= n):
            raise ValueError(f"token ids must lie in [0, {n}); got [{int(tokens.min())}, {int(tokens.max())}]")
        return self.decoder.trunk(self.post_quant_conv(self.codebook[tokens].permute(0, 3, 1, 2)))


TRUNK_PREFIX = "liif.encoder."  # the VQFeatures trunk's keys inside LIIFTokenDecoder


class LIIFTokenDecoder(nn.Module):
    """Any-resolution decoder for a :class:`~vargen.tokenizers.VQTokenizer`'s tokens.

    ``vq`` is a VQ tokenizer (its codebook and decoder trunk are copied; the VQ itself is
    never modified) or, when loading, the dict of its config. ``keep_upsample`` defaults to
    the number of upsamplers that brings features to stride 4 (f4; the latent grid itself
    when the VQ downsamples by 4 or less). ``feat_unfold`` defaults to on for features of at
    most 64 channels (LIIF's EDSR width) and off for wider ones (the 128-channel template).
    ``train_trunk`` lets the trunk copy fine-tune with the head (only the VQ encoder and
    codebook must stay fixed for token ids to keep their meaning).

    Example:
        >>> from vargen.tokenizers import VQTokenizer
        >>> dec = LIIFTokenDecoder(VQTokenizer(codebook_size=64, ch=32, ch_mult=(1, 2), z_channels=32), hidden=[32])
        >>> dec.decode(torch.zeros(1, 4, 4, dtype=torch.long), scale=2.5).shape  # native 8 x 8 -> 20 x 20
        torch.Size([1, 3, 20, 20])
    """

    def __init__(self, vq, keep_upsample: Optional[int] = None, hidden: Sequence[int] = (256, 256, 256, 256),
                 feat_unfold: Optional[bool] = None, local_ensemble: bool = True, cell_decode: bool = True,
                 train_trunk: bool = True):
        super().__init__()
        vq_config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(getattr(vq, "config", vq)).items()
                     if k in _VQ_KEYS}
        levels = len(vq_config.get("decoder_ch_mult") or vq_config["ch_mult"]) - 1
        if keep_upsample is None:
            keep_upsample = max(0, levels - 2)  # stride 2**levels / 2**keep = 4
        trunk = VQFeatures(vq_config, keep_upsample)
        if hasattr(vq, "config"):
            trunk.copy_from(vq)
        if feat_unfold is None:
            feat_unfold = trunk.out_dim <= 64
        self.liif = LIIF(trunk, hidden_list=hidden, local_ensemble=local_ensemble, feat_unfold=feat_unfold,
                         cell_decode=cell_decode)
        trunk.requires_grad_(train_trunk)
        self.config = {"vq": vq_config, "keep_upsample": keep_upsample, "hidden": list(hidden),
                       "feat_unfold": feat_unfold, "local_ensemble": local_ensemble, "cell_decode": cell_decode,
                       "train_trunk": train_trunk}

    @property
    def trunk(self) -> VQFeatures:
        return self.liif.encoder

    def native_size(self, tokens: torch.Tensor) -> Tuple[int, int]:
        """The VQ decoder's own output size for this token grid."""
        f = self.trunk.vq_downsample
        if tokens.dim() == 2:
            side = int(round(tokens.shape[1] ** 0.5))
            return side * f, side * f
        return tokens.shape[-2] * f, tokens.shape[-1] * f

    def forward(self, tokens: torch.Tensor, coord: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
        """RGB ``[B, Q, 3]`` at query points (for training on sampled pixels)."""
        return self.liif.query_rgb(coord, cell, feat=self.trunk(tokens))

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, size: Optional[Size] = None, scale=None,
               chunk: Optional[int] = None, max_memory: Optional[int] = None, progress: bool = False) -> torch.Tensor:
        """Tokens ``[B, h, w]`` -> images ``[B, 3, H, W]`` in [-1, 1] (unclamped).

        ``scale`` is relative to the VQ's native output ``(h * f, w * f)``; ``scale=1`` is the
        tokenizer's own size. Any ``size`` works (odd, non-square, non-integer ratios).
        ``chunk`` (queries per step) defaults to what ``max_memory`` bytes hold (default: see
        :mod:`vargen.memory`); the trunk runs one image group at a time. ``progress`` shows a bar of pixels.
        """
        from tqdm.auto import tqdm

        from ..memory import budget_or_default, liif_query_bytes, per_chunk, vq_decode_bytes

        if chunk is not None and chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        H, W = output_size(self.native_size(tokens), size, scale)
        # a group's trunk features and a chunk of queries are alive together: half the budget each
        half = budget_or_default(max_memory) // 2
        chunk = chunk or per_chunk(len(tokens) * H * W, liif_query_bytes(self.liif), half)
        group = per_chunk(len(tokens), vq_decode_bytes(self.trunk.out_dim, *self.native_size(tokens)), half)
        with tqdm(total=len(tokens) * H * W, desc=f"rendering {W}x{H} (LIIF)", unit="px", unit_scale=True,
                  disable=not progress) as bar:
            return torch.cat([render_feat(self.liif, self.trunk(t), H, W, chunk, bar=bar)
                              for t in tokens.split(group)])

    # ----------------------------------------------------------------------- save / load
    def save_pretrained(self, folder: str, trunk: Optional[str] = None) -> None:
        """``config.json`` + ``model.safetensors`` (trunk copy, codebook and head: no VQ needed to load).

        With ``trunk`` (the VQ folder this decoder was copied from, relative to ``folder``) only the head
        is written and the config names the VQ: a decoder trained with ``train_trunk=False`` then ships
        without a second copy of the VQ decoder (the shipped ``scenes-t2i/liif`` reads ``../vq``). Refused
        if the trunk differs from that VQ's (it was fine-tuned)."""
        from safetensors.torch import save_file

        from ..tokenizers import VQTokenizer

        state, config = self.state_dict(), dict(self.config)
        if trunk is not None:
            reference = VQFeatures(self.config["vq"], self.config["keep_upsample"])
            reference.copy_from(VQTokenizer.from_pretrained(trunk_folder(folder, trunk, "LIIF head")))
            check_trunk_unchanged(self.trunk.state_dict(), reference.state_dict(), what="LIIF decoder", trunk=trunk)
            state = {k: v for k, v in state.items() if not k.startswith(TRUNK_PREFIX)}
            config["trunk"] = trunk
        os.makedirs(folder, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(folder, "model.safetensors"))
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump({"_class_name": type(self).__name__, **config}, f, indent=2)

    @classmethod
    def from_pretrained(cls, folder: str) -> "LIIFTokenDecoder":
        """Load a folder written by :meth:`save_pretrained`."""
        from safetensors.torch import load_file

        paths = [os.path.join(folder, n) for n in ("config.json", "model.safetensors")]
        missing = [p for p in paths if not os.path.exists(p)]
        if missing:
            raise FileNotFoundError(f"not a LIIF token decoder folder (missing {', '.join(missing)}); "
                                    "train one with vargen.train.liif.train_liif")
        from ..errors import reading_model

        with reading_model(folder):
            with open(paths[0]) as f:
                config = json.load(f)
            config.pop("_class_name", None)
            trunk = config.pop("trunk", None)
            if trunk is None:
                model = cls(config.pop("vq"), **config)
                load_checked(model, load_file(paths[1]), what=f"LIIF token decoder in {folder}")
                return model.eval()
            from ..tokenizers import VQTokenizer

            config.pop("vq")
            model = cls(VQTokenizer.from_pretrained(trunk_folder(folder, trunk, "LIIF head")), **config)
            load_head(model, load_file(paths[1]), trunk_prefix=TRUNK_PREFIX, what="the LIIF head")  # reading_model names the folder
        return model.eval()
