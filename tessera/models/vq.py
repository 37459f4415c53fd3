"""The VQ-16 image tokenizer, parameter for parameter LlamaGen's `vq_ds16_t2i.pt`.

images [B,3,H,W] in [-1,1] -> Encoder -> quant_conv -> cosine nearest codebook entry -> codes [B,H/16,W/16]
codes -> codebook entry -> post_quant_conv -> Decoder -> images [B,3,16h,16w] in [-1,1]

Module and parameter names follow LlamaGen's checkpoint exactly, so its weights load strictly
with no converter. Model configs are data: `VQ_CONFIGS[name]`, the name of a config being the
name of the model.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class VQConfig:
    name: str
    codebook_size: int = 16384
    codebook_dim: int = 8
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    z_channels: int = 256
    encoder_res_blocks: int = 2
    decoder_res_blocks: int = 3
    norm_groups: int = 32
    # Cosine lookup: latents and codebook are L2-normalised before the nearest-neighbour search.
    l2_norm: bool = True
    # LlamaGen keeps a rolling record of recently used codes in the checkpoint; only its size matters here.
    codebook_used_size: int = 65536

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "VQConfig":
        return cls(**{**data, "ch_mult": tuple(data["ch_mult"])})


VQ_CONFIGS: dict[str, VQConfig] = {
    # LlamaGen's t2i tokenizer (vq_ds16_t2i.pt).
    "VQ-16": VQConfig(name="VQ-16"),
    # The demo's and the tests' tokenizer: the same architecture at 8 channels, fast on a CPU.
    "VQ-tiny": VQConfig(name="VQ-tiny", codebook_size=512, ch=8, ch_mult=(1, 1, 1, 1, 1), z_channels=8,
                        encoder_res_blocks=1, decoder_res_blocks=2, norm_groups=1),
}


# Building blocks -----------------------------------------------------------------------------
class ResnetBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=1e-6)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=1e-6)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        if in_ch != out_ch:
            self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the pixels of a feature map, with 1x1 conv projections."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.q = nn.Conv2d(ch, ch, 1)
        self.k = nn.Conv2d(ch, ch, 1)
        self.v = nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)
        q, k, v = (t(n).reshape(b, 1, c, h * w).transpose(2, 3) for t in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # scale c**-0.5, as LlamaGen
        return x + self.proj_out(out.transpose(2, 3).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric padding, as LlamaGen


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(res: list[nn.Module], attn: list[nn.Module], resample: nn.Module | None, name: str) -> nn.Module:
    level = nn.Module()
    level.res = nn.ModuleList(res)
    level.attn = nn.ModuleList(attn)
    if resample is not None:
        setattr(level, name, resample)
    return level


def _middle(ch: int, groups: int) -> nn.ModuleList:
    return nn.ModuleList([ResnetBlock(ch, ch, groups), AttnBlock(ch, groups), ResnetBlock(ch, ch, groups)])


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        g, chans = cfg.norm_groups, [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(3, cfg.ch, 3, padding=1)
        self.conv_blocks = nn.ModuleList()
        block_in = cfg.ch
        for i, block_out in enumerate(chans):
            last = i == len(chans) - 1
            res = [ResnetBlock(block_in if j == 0 else block_out, block_out, g) for j in range(cfg.encoder_res_blocks)]
            attn = [AttnBlock(block_out, g) for _ in range(cfg.encoder_res_blocks)] if last else []
            self.conv_blocks.append(_level(res, attn, None if last else Downsample(block_out), "downsample"))
            block_in = block_out
        self.mid = _middle(block_in, g)
        self.norm_out = nn.GroupNorm(g, block_in, eps=1e-6)
        self.conv_out = nn.Conv2d(block_in, cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.conv_blocks:
            for i, res in enumerate(level.res):
                h = res(h)
                if len(level.attn):
                    h = level.attn[i](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        g, chans = cfg.norm_groups, [cfg.ch * m for m in reversed(cfg.ch_mult)]
        block_in = chans[0]
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = _middle(block_in, g)
        self.conv_blocks = nn.ModuleList()
        for i, block_out in enumerate(chans):
            first, last = i == 0, i == len(chans) - 1
            res = [ResnetBlock(block_in if j == 0 else block_out, block_out, g) for j in range(cfg.decoder_res_blocks)]
            attn = [AttnBlock(block_out, g) for _ in range(cfg.decoder_res_blocks)] if first else []
            self.conv_blocks.append(_level(res, attn, None if last else Upsample(block_out), "upsample"))
            block_in = block_out
        self.norm_out = nn.GroupNorm(g, block_in, eps=1e-6)
        self.conv_out = nn.Conv2d(block_in, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            for i, res in enumerate(level.res):
                h = res(h)
                if len(level.attn):
                    h = level.attn[i](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.l2_norm = cfg.l2_norm
        self.embedding = nn.Embedding(cfg.codebook_size, cfg.codebook_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / cfg.codebook_size, 1.0 / cfg.codebook_size)
        self.register_buffer("codebook_used", torch.zeros(cfg.codebook_used_size))

    def codebook(self) -> torch.Tensor:
        w = self.embedding.weight
        return F.normalize(w, dim=-1) if self.l2_norm else w

    def lookup(self, z: torch.Tensor) -> torch.Tensor:
        """Latents [B,C,h,w] -> indices [B,h,w] of the nearest codebook entries."""
        b, c, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, c).float()
        book = self.codebook().float()
        if self.l2_norm:  # on the unit sphere the nearest entry is the one of largest dot product
            idx = (F.normalize(flat, dim=-1) @ book.T).argmax(dim=1)
        else:
            idx = torch.cdist(flat, book).argmin(dim=1)
        return idx.view(b, h, w)

    def entries(self, codes: torch.Tensor) -> torch.Tensor:
        """Indices [B,h,w] -> codebook vectors [B,C,h,w]."""
        return self.codebook()[codes].permute(0, 3, 1, 2).contiguous()


# The model ----------------------------------------------------------------------------------
class VQModel(nn.Module):
    def __init__(self, config: VQConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = VectorQuantizer(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.codebook_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.codebook_dim, config.z_channels, 1)

    @property
    def device(self) -> torch.device:
        return self.quant_conv.weight.device

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B,3,H,W] in [-1,1] (H, W multiples of 16) -> codes [B,H/16,W/16], raster order."""
        d = self.config.downsample
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] % d or images.shape[3] % d:
            raise ValueError(f"expected images [B,3,H,W] with H and W multiples of {d}, got {tuple(images.shape)}")
        return self.quantize.lookup(self.quant_conv(self.encoder(images)))

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B,h,w] -> images [B,3,16h,16w] in [-1,1]."""
        if codes.ndim != 3:
            raise ValueError(f"expected codes [B,h,w], got {tuple(codes.shape)}")
        z = self.quantize.entries(codes.long().to(self.device)).to(self.quant_conv.weight.dtype)
        return self.decoder(self.post_quant_conv(z)).clamp(-1, 1)


# Loading ------------------------------------------------------------------------------------
WEIGHTS_FILE = "vq.pt"
CONFIG_FILE = "vq_config.json"


def load_vq(path: str, config: str | None = None, device="cpu", ema: bool = False) -> VQModel:
    """A VQ model from a LlamaGen checkpoint file (weights under "model", or "ema" when asked)
    or from a folder holding `vq.pt` and `vq_config.json` (what `build_tiny` writes).

    `config` names a VQ_CONFIGS entry; for a bare file it defaults to "VQ-16". Loading is strict.
    """
    weights = path
    if os.path.isdir(path):
        weights = os.path.join(path, WEIGHTS_FILE)
        cfg_path = os.path.join(path, CONFIG_FILE)
        if config is None and os.path.exists(cfg_path):
            with open(cfg_path) as f:
                cfg = VQConfig.from_json(json.load(f))
        else:
            cfg = _named_config(config or "VQ-16")
    else:
        cfg = _named_config(config or "VQ-16")
    if not os.path.exists(weights):
        raise FileNotFoundError(f"VQ weights {weights} do not exist")
    state = torch.load(weights, map_location="cpu", weights_only=True)
    key = "ema" if ema else "model"
    if not isinstance(state, dict) or not isinstance(state.get(key), dict):
        found = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{weights}: no state dict under {key!r} (found {found})")
    with torch.device("meta"):  # no random init: every tensor comes from the checkpoint
        model = VQModel(cfg)
    ours, theirs = model.state_dict(), state[key]
    missing, unexpected = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
    wrong = [f"{k} {tuple(theirs[k].shape)} (expected {tuple(ours[k].shape)})"
             for k in ours if k in theirs and theirs[k].shape != ours[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(f"{weights} does not match {cfg.name}: missing {_few(missing)}, "
                         f"unexpected {_few(unexpected)}, wrong shapes {_few(wrong)}")
    model.load_state_dict(theirs, strict=True, assign=True)
    return model.eval().to(device)


def _named_config(name: str) -> VQConfig:
    if name not in VQ_CONFIGS:
        raise ValueError(f"unknown VQ config {name!r}; known: {', '.join(VQ_CONFIGS)}")
    return VQ_CONFIGS[name]


def _few(keys: list[str]) -> str:
    return "none" if not keys else ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")


# The tiny tokenizer --------------------------------------------------------------------------
def set_mosaic_weights(model: VQModel, seed: int = 0) -> None:
    """Hand-set weights that make a model of this architecture a colour-mosaic tokenizer.

    Each 16x16 patch becomes the code whose colour direction (RGB around mid-grey) is closest to
    the patch's mean colour; decoding paints the patch in that direction. Every residual and
    attention branch adds zero, down- and upsampling average and repeat, and the GroupNorm before
    each output sees channels (x, -x): its mean is zero, so it only rescales, and
    silu(u) - silu(-u) = u undoes the nonlinearity after it. decode then encode is the identity.
    Needs one GroupNorm group (norm_groups=1) and at least 6 channels everywhere.
    """
    cfg = model.config
    if cfg.norm_groups != 1 or min(cfg.ch * m for m in cfg.ch_mult) < 6 or cfg.z_channels < 3 or cfg.codebook_dim < 3:
        raise ValueError(f"{cfg.name}: mosaic weights need norm_groups=1 and at least 6 channels")
    rgb = torch.eye(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, ResnetBlock):
                m.conv2.weight.zero_(); m.conv2.bias.zero_()  # noqa: E702
                if hasattr(m, "nin_shortcut"):
                    _copy_channels(m.nin_shortcut, 6)
            elif isinstance(m, AttnBlock):
                m.proj_out.weight.zero_(); m.proj_out.bias.zero_()  # noqa: E702
            elif isinstance(m, Downsample):
                m.conv.weight.zero_(); m.conv.bias.zero_()  # noqa: E702
                for c in range(6):
                    m.conv.weight[c, c, :2, :2] = 0.25  # 2x2 mean: four of them make the 16x16 patch mean
            elif isinstance(m, Upsample):
                _copy_channels(m.conv, 6, centre=True)
        for norm in (model.encoder.norm_out, model.decoder.norm_out):
            norm.weight.fill_(1.0); norm.bias.zero_()  # noqa: E702
        enc, dec = model.encoder, model.decoder
        # Encoder: pixels -> (rgb, -rgb) -> ... -> silu(u) - silu(-u) = u -> codebook space.
        _zero(enc.conv_in)
        enc.conv_in.weight[:3, :, 1, 1] = rgb
        enc.conv_in.weight[3:6, :, 1, 1] = -rgb
        _zero(enc.conv_out)
        enc.conv_out.weight[:3, :3, 1, 1] = rgb
        enc.conv_out.weight[:3, 3:6, 1, 1] = -rgb
        _copy_channels(model.quant_conv, 3)
        # Decoder: code direction -> (d, -d) -> ... -> d, painted at unit radius (fits in [-1,1]).
        _copy_channels(model.post_quant_conv, 3)
        _zero(dec.conv_in)
        dec.conv_in.weight[:3, :3, 1, 1] = rgb
        dec.conv_in.weight[3:6, :3, 1, 1] = -rgb
        # Channels (d, -d, 0...) with |d| = 1: GroupNorm divides by sqrt(2/C) everywhere.
        scale = math.sqrt(2.0 / dec.norm_out.num_channels)
        _zero(dec.conv_out)
        dec.conv_out.weight[:, :3, 1, 1] = rgb * scale
        dec.conv_out.weight[:, 3:6, 1, 1] = -rgb * scale
        # Codebook: directions spread evenly over the sphere (a Fibonacci lattice).
        n = cfg.codebook_size
        i = torch.arange(n, dtype=torch.float64) + 0.5
        polar = torch.arccos(1 - 2 * i / n)
        azimuth = math.pi * (1 + 5 ** 0.5) * i
        points = torch.stack([polar.sin() * azimuth.cos(), polar.sin() * azimuth.sin(), polar.cos()], dim=1)
        model.quantize.embedding.weight.zero_()
        model.quantize.embedding.weight[:, :3] = points.float()


def _zero(conv: nn.Conv2d) -> None:
    conv.weight.zero_()
    conv.bias.zero_()


def _copy_channels(conv: nn.Conv2d, n: int, centre: bool = False) -> None:
    """Make a conv pass its first n input channels through unchanged (1x1, or 3x3 centre tap)."""
    _zero(conv)
    k = conv.weight.shape[-1] // 2 if centre else 0
    for c in range(n):
        conv.weight[c, c, k, k] = 1.0


def save_llamagen(model: VQModel, folder: str) -> None:
    """Save as LlamaGen does (weights under "model"), with our config beside it."""
    os.makedirs(folder, exist_ok=True)
    torch.save({"model": model.state_dict()}, os.path.join(folder, WEIGHTS_FILE))
    with open(os.path.join(folder, CONFIG_FILE), "w") as f:
        json.dump(model.config.to_json(), f, indent=2)


def build_tiny(path: str) -> None:
    """The demo's tokenizer: VQ-tiny with mosaic weights, in LlamaGen's checkpoint format."""
    torch.manual_seed(0)
    model = VQModel(VQ_CONFIGS["VQ-tiny"])
    set_mosaic_weights(model)
    save_llamagen(model, path)
