"""Wan2.1 causal 3D VAE with explicit, per-stream caches.

Numerically this is Wan2.1's `WanVAE_` (parameter names and shapes of `Wan2.1_VAE.pth`): RGB video
(B, 3, 1 + 4k, H, W) in [-1, 1] <-> latents (B, 16, 1 + k, H/8, W/8). Every convolution is causal in
time, so video can be decoded one latent frame at a time: latent 0 gives 1 video frame, every later
latent gives 4.

State is never kept on a module. Each causal conv takes the tail of its previous input as `cache` and
returns the new tail; the per-stream collection of those tensors lives in a `VaeDecodeState` (or
`VaeEncodeState`) made by `WanVAE.init_state` (`init_encode_state`). One set of weights can therefore
serve any number of streams, and the same functions export to ONNX with the caches as graph inputs and
outputs (`models/onnx_vae.py`).

The upstream first-call rules, reproduced with a `first` flag instead of sentinels in the cache list:
  * a 3-tap causal conv starts from a zero cache (the same as upstream's zero padding);
  * the decoder's temporal upsamplers skip their time conv on the stream's first latent (one frame stays
    one frame) and keep a zero cache, so the second latent sees zero padding;
  * the encoder's temporal downsamplers skip their strided time conv on the first chunk and only
    remember its last frame.

Layout (leaf modules first): RMSNorm, PointwiseConv3d, CausalConv3d, Upsample2x, Resample,
ResidualBlock, AttentionBlock, Encoder3d, Decoder3d, the state dataclasses, WanVAE, input checks.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.config import VAEConfig

CacheShape = tuple[int, int, int, int, int]  # (B, C, frames, H, W)


# ---- leaf layers --------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """Upstream `RMS_norm`: L2-normalise over channels (eps 1e-12 on the norm), times sqrt(C) * gamma.

    Not an RMSNorm with eps inside the square root. `gamma` is (C, 1, 1, 1) for video tensors and
    (C, 1, 1) for per-frame image tensors, as in the checkpoint.
    """

    def __init__(self, dim: int, images: bool = False) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1) if images else torch.ones(dim, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # = F.normalize(x, dim=1, eps=1e-12), written out: several times faster on CPU for small C
        norm = x.square().sum(dim=1, keepdim=True).sqrt().clamp_min(1e-12)  # (B, 1, ...)
        return x / norm * (self.scale * self.gamma)


class PointwiseConv3d(nn.Conv3d):
    """1x1x1 conv: it looks at one frame, so it needs no cache (upstream: a kernel-1 CausalConv3d)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, kernel_size=1)


class CausalConv3d(nn.Conv3d):
    """3D conv, causal in time, whose past input frames arrive as `cache` and leave as the new cache.

    kernel (kt, k, k) with temporal stride st needs kt - st frames of context: 2 for the 3x3x3 convs and
    the upsamplers' (3, 1, 1) time conv, 1 for the downsamplers' stride-2 time conv. Spatial padding is
    symmetric zero padding of k // 2 (upstream pads explicitly; same values).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int, int],
                 stride: int | tuple[int, int, int] = 1) -> None:
        kt, kh, kw = (kernel_size,) * 3 if isinstance(kernel_size, int) else kernel_size
        st = stride if isinstance(stride, int) else stride[0]
        super().__init__(in_channels, out_channels, (kt, kh, kw), stride=stride, padding=(0, kh // 2, kw // 2))
        self.context = kt - st  # past input frames each call needs
        if self.context < 1:
            raise ValueError(f"a kernel of {kt} frames with stride {st} needs no cache; use PointwiseConv3d")

    def cache_shape(self, batch: int, h: int, w: int) -> CacheShape:
        return (batch, self.in_channels, self.context, h, w)

    def forward(self, x: torch.Tensor, cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, C, T, H, W), cache (B, C, context, H, W) -> y (B, C', T', H', W'), new cache."""
        x = torch.cat([cache, x], dim=2)  # (B, C, context + T, H, W)
        return super().forward(x), x[:, :, -self.context:].contiguous()


def _per_frame(fn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a 2D module to every frame: (B, C, T, H, W) -> (B, C', T, H', W')."""
    b, c, t, h, w = x.shape
    y = fn(x.transpose(1, 2).reshape(b * t, c, h, w))  # (B*T, C', H', W')
    return y.reshape(b, t, *y.shape[1:]).transpose(1, 2)


class Upsample2x(nn.Module):
    """Upstream's nearest-exact x2 on H and W. At a factor of exactly 2 every output pixel copies
    source pixel floor(i / 2) under both "nearest" and "nearest-exact", so plain "nearest" is used: it
    exports to a single ONNX Resize that ONNX Runtime runs fast."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2.0, mode="nearest")  # (N, C, 2H, 2W)


class Resample(nn.Module):
    """Spatial x2 up/down per frame, plus a causal time conv for the "3d" modes.

    upsample: nearest x2 then a 3x3 conv that halves the channels. upsample3d first doubles time: its
    time conv outputs 2C channels = two frames per input frame, interleaved.
    downsample: pad right/bottom by one, stride-2 3x3 conv. downsample3d then halves time with a
    stride-2 (3, 1, 1) conv over [last frame of the previous chunk, this chunk].
    """

    MODES = ("upsample2d", "upsample3d", "downsample2d", "downsample3d")

    def __init__(self, dim: int, mode: str) -> None:
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"unknown resample mode {mode!r}; known: {self.MODES}")
        self.mode = mode
        self.upsample = mode.startswith("up")
        self.temporal = mode.endswith("3d")
        if self.upsample:
            self.resample = nn.Sequential(Upsample2x(), nn.Conv2d(dim, dim // 2, 3, padding=1))
            if self.temporal:
                self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
            if self.temporal:
                self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))
        self.n_caches = 1 if self.temporal else 0

    def cache_shapes(self, batch: int, h: int, w: int) -> list[CacheShape]:
        if not self.temporal:
            return []
        if self.upsample:  # the time conv runs before the spatial resample
            return [self.time_conv.cache_shape(batch, h, w)]
        return [self.time_conv.cache_shape(batch, (h + 1) // 2, (w + 1) // 2)]

    def out_size(self, h: int, w: int) -> tuple[int, int]:
        return (2 * h, 2 * w) if self.upsample else ((h + 1) // 2, (w + 1) // 2)

    def forward(self, x: torch.Tensor, caches: Sequence[torch.Tensor], first: bool
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        if not self.temporal:
            return _per_frame(self.resample, x), ()
        (cache,) = caches
        if self.upsample:
            if not first:  # the first latent frame stays one frame; its cache stays zero
                b, c, t, h, w = x.shape
                x, cache = self.time_conv(x, cache)  # (B, 2C, T, H, W)
                x = x.reshape(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5)  # (B, C, T, 2, H, W)
                x = x.reshape(b, c, 2 * t, h, w)
            return _per_frame(self.resample, x), (cache,)
        x = _per_frame(self.resample, x)  # (B, C, T, H/2, W/2)
        if first:  # the first chunk (one frame) passes through; remember it for the next chunk
            return x, (x[:, :, -self.time_conv.context:].contiguous(),)
        x, cache = self.time_conv(x, cache)  # (B, C, T/2, H/2, W/2)
        return x, (cache,)


class ResidualBlock(nn.Module):
    """norm -> SiLU -> causal conv -> norm -> SiLU -> causal conv, plus a (1x1x1) shortcut.

    `residual` is indexed like upstream's Sequential (index 5 was a dropout layer, rate 0 in every
    release) so the parameter names match: residual.{0,3}.gamma, residual.{2,6}.weight.
    """

    n_caches = 2

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.residual = nn.ModuleList([
            RMSNorm(in_dim), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3),
            RMSNorm(out_dim), nn.SiLU(), nn.Identity(), CausalConv3d(out_dim, out_dim, 3),
        ])
        self.shortcut = PointwiseConv3d(in_dim, out_dim) if in_dim != out_dim else nn.Identity()

    def cache_shapes(self, batch: int, h: int, w: int) -> list[CacheShape]:
        return [self.residual[2].cache_shape(batch, h, w), self.residual[6].cache_shape(batch, h, w)]

    def out_size(self, h: int, w: int) -> tuple[int, int]:
        return h, w

    def forward(self, x: torch.Tensor, caches: Sequence[torch.Tensor], first: bool = False
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        norm1, act1, conv1, norm2, act2, _, conv2 = self.residual
        shortcut = self.shortcut(x)
        h, cache1 = conv1(act1(norm1(x)), caches[0])
        h, cache2 = conv2(act2(norm2(h)), caches[1])
        return h + shortcut, (cache1, cache2)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W positions of each frame (no state, no time mixing)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)
        nn.init.zeros_(self.proj.weight)  # upstream init: the block starts as the identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)  # (B*T, C, H, W)
        qkv = self.to_qkv(self.norm(frames)).reshape(b * t, 3 * c, h * w).transpose(1, 2)  # (B*T, HW, 3C)
        q, k, v = qkv.unsqueeze(1).chunk(3, dim=-1)  # each (B*T, 1, HW, C)
        y = F.scaled_dot_product_attention(q, k, v)  # (B*T, 1, HW, C)
        y = self.proj(y.squeeze(1).transpose(1, 2).reshape(b * t, c, h, w))  # (B*T, C, H, W)
        return x + y.reshape(b, t, c, h, w).transpose(1, 2)


def _run_stateful(layers: Sequence[nn.Module], x: torch.Tensor, caches: Sequence[torch.Tensor],
                  first: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run layers in order, handing each its slice of the flat cache list; attention has none."""
    new: list[torch.Tensor] = []
    i = 0
    for layer in layers:
        if isinstance(layer, AttentionBlock):
            x = layer(x)
            continue
        x, out = layer(x, caches[i:i + layer.n_caches], first)
        new.extend(out)
        i += layer.n_caches
    return x, new


def _stateful_cache_shapes(layers: Sequence[nn.Module], batch: int, h: int, w: int
                           ) -> tuple[list[CacheShape], tuple[int, int]]:
    shapes: list[CacheShape] = []
    for layer in layers:
        if isinstance(layer, AttentionBlock):
            continue
        shapes += layer.cache_shapes(batch, h, w)
        h, w = layer.out_size(h, w)
    return shapes, (h, w)


# ---- encoder and decoder ------------------------------------------------------------------------


class _CausalStack(nn.Module):
    """`conv1`, a body of stateful blocks, then `head` (norm, SiLU, conv): the encoder's and decoder's shape.
    Subclasses build the modules (their names are the checkpoint's) and say which ones form the body."""

    conv1: CausalConv3d
    head: nn.ModuleList

    def body(self) -> list[nn.Module]:
        raise NotImplementedError

    def cache_shapes(self, batch: int, h: int, w: int) -> list[CacheShape]:
        shapes = [self.conv1.cache_shape(batch, h, w)]
        more, (h, w) = _stateful_cache_shapes(self.body(), batch, h, w)
        return shapes + more + [self.head[2].cache_shape(batch, h, w)]

    def forward(self, x: torch.Tensor, caches: Sequence[torch.Tensor], first: bool
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """x, one cache per causal conv in call order -> output, the new caches (same order)."""
        x, c0 = self.conv1(x, caches[0])
        x, body = _run_stateful(self.body(), x, caches[1:-1], first)
        norm, act, conv = self.head
        x, c_head = conv(act(norm(x)), caches[-1])
        return x, (c0, *body, c_head)


class Encoder3d(_CausalStack):
    """Video (B, 3, T, H, W) -> (B, 2 * z_dim, T', H/8, W/8): mean and log-variance, pre `conv1`."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        dims = [cfg.encoder_base * m for m in (1, *cfg.dim_mult)]
        self.conv1 = CausalConv3d(cfg.in_channels, dims[0], 3)
        layers: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i < len(cfg.dim_mult) - 1:
                layers.append(Resample(out_dim, "downsample3d" if cfg.temporal_downsample[i] else "downsample2d"))
        self.downsamples = nn.ModuleList(layers)
        c = dims[-1]
        self.middle = nn.ModuleList([ResidualBlock(c, c), AttentionBlock(c), ResidualBlock(c, c)])
        self.head = nn.ModuleList([RMSNorm(c), nn.SiLU(), CausalConv3d(c, 2 * cfg.z_dim, 3)])

    def body(self) -> list[nn.Module]:
        # forward: x (B, 3, T, H, W) with T = 1 on the first chunk, 4 after -> (B, 2z, 1, H/8, W/8)
        return [*self.downsamples, *self.middle]


class Decoder3d(_CausalStack):
    """(B, z_dim, 1, h, w) latent frame (after `conv2`) -> (B, 3, 1 or 4, 8h, 8w) video frames."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        mult = cfg.dim_mult
        dims = [cfg.dim * m for m in (mult[-1], *reversed(mult))]
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3)
        self.middle = nn.ModuleList([ResidualBlock(dims[0], dims[0]), AttentionBlock(dims[0]),
                                     ResidualBlock(dims[0], dims[0])])
        layers: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:  # the previous stage's upsampler halved the channels
                in_dim //= 2
            for _ in range(cfg.num_res_blocks + 1):
                layers.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i < len(mult) - 1:
                layers.append(Resample(out_dim, "upsample3d" if cfg.temporal_upsample[i] else "upsample2d"))
        self.upsamples = nn.ModuleList(layers)
        c = dims[-1]
        self.head = nn.ModuleList([RMSNorm(c), nn.SiLU(), CausalConv3d(c, cfg.in_channels, 3)])

    def body(self) -> list[nn.Module]:
        # forward: x (B, z, 1, h, w) -> (B, 3, 1 if first else 4, 8h, 8w)
        return [*self.middle, *self.upsamples]


# ---- per-stream state ---------------------------------------------------------------------------


@dataclass(frozen=True)
class VaeDecodeState:
    """One stream's decoder memory: the input tail of every causal conv, in call order.

    `first` is True until the stream's first latent frame has been decoded (that frame gives one video
    frame; every later one gives four). Immutable: `decode_step` returns the next state.
    """

    caches: tuple[torch.Tensor, ...]
    first: bool
    batch: int
    latent_h: int
    latent_w: int

    def reset(self) -> VaeDecodeState:
        return dataclasses.replace(self, caches=tuple(torch.zeros_like(c) for c in self.caches), first=True)


@dataclass(frozen=True)
class VaeEncodeState:
    """One stream's encoder memory; `first` is True until the first (one-frame) chunk was encoded."""

    caches: tuple[torch.Tensor, ...]
    first: bool
    batch: int
    height: int
    width: int


def _check_finite(x: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{what} contain NaN or Inf values")


# ---- the VAE ------------------------------------------------------------------------------------


class WanVAE(nn.Module):
    """Wan2.1 VAE: `encoder`, `conv1` (-> mean, log-var), `conv2` (latent -> decoder), `decoder`.

    Latents outside this class are normalised per channel, (mu - mean) / std, as the DiT sees them;
    `decode_step` undoes that before `conv2`. Video values are in [-1, 1] (decoded frames are not
    clamped; clamp before converting to pixels).
    """

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder3d(cfg)
        self.conv1 = PointwiseConv3d(2 * cfg.z_dim, 2 * cfg.z_dim)
        self.conv2 = PointwiseConv3d(cfg.z_dim, cfg.z_dim)
        self.decoder = Decoder3d(cfg)
        stats = (1, cfg.z_dim, 1, 1, 1)
        self.register_buffer("latents_mean", torch.tensor(cfg.latents_mean).view(stats), persistent=False)
        self.register_buffer("latents_std", torch.tensor(cfg.latents_std).view(stats), persistent=False)

    @property
    def _param(self) -> torch.Tensor:
        """Any parameter: states are made with its dtype and device."""
        return self.conv2.weight

    # ---- streaming decode -----------------------------------------------------------------------
    def init_state(self, batch: int, latent_h: int, latent_w: int) -> VaeDecodeState:
        """A fresh decode stream for latents of (batch, z_dim, 1, latent_h, latent_w) per step."""
        for name, v in (("batch", batch), ("latent_h", latent_h), ("latent_w", latent_w)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        p = self._param
        caches = tuple(torch.zeros(s, dtype=p.dtype, device=p.device)
                       for s in self.decoder.cache_shapes(batch, latent_h, latent_w))
        return VaeDecodeState(caches=caches, first=True, batch=batch, latent_h=latent_h, latent_w=latent_w)

    def unnormalise(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latents (as the DiT sees them) -> the VAE's own units, what `conv2` takes."""
        return z * self.latents_std + self.latents_mean

    def decode_latent(self, z: torch.Tensor, caches: Sequence[torch.Tensor], first: bool
                      ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Pure step (no checks), the function ONNX export traces: z (B, z, 1, h, w) normalised."""
        x = self.conv2(self.unnormalise(z))  # (B, z, 1, h, w)
        return self.decoder(x, caches, first)

    @torch.no_grad()
    def decode_step(self, state: VaeDecodeState, z: torch.Tensor) -> tuple[torch.Tensor, VaeDecodeState]:
        """Decode one latent frame: z (B, z_dim, 1, h, w) -> frames (B, 3, 1 or 4, 8h, 8w), next state."""
        check_latent_step(self.cfg, state.batch, state.latent_h, state.latent_w, z)
        _check_finite(z, "latents")
        p = self._param
        frames, caches = self.decode_latent(z.to(p.device, p.dtype), state.caches, state.first)
        return frames, dataclasses.replace(state, caches=caches, first=False)

    @torch.no_grad()
    def decode(self, z: torch.Tensor, clamp: bool = False) -> torch.Tensor:
        """Offline decode, built on the streaming step: (B, z, T, h, w) -> (B, 3, 1 + 4(T-1), 8h, 8w)."""
        return decode_all(self, z, clamp)

    # ---- streaming encode -----------------------------------------------------------------------
    def init_encode_state(self, batch: int, height: int, width: int) -> VaeEncodeState:
        """A fresh encode stream for video chunks of (batch, 3, 1 then 4, height, width)."""
        f = self.cfg.spatial_factor
        if height < 1 or width < 1 or height % f or width % f:
            raise ValueError(f"video height and width must be positive multiples of {f}, got {height}x{width}")
        p = self._param
        caches = tuple(torch.zeros(s, dtype=p.dtype, device=p.device)
                       for s in self.encoder.cache_shapes(batch, height, width))
        return VaeEncodeState(caches=caches, first=True, batch=batch, height=height, width=width)

    @torch.no_grad()
    def encode_step(self, state: VaeEncodeState, frames: torch.Tensor) -> tuple[torch.Tensor, VaeEncodeState]:
        """Encode one chunk (1 frame first, then 4) -> one normalised latent frame (B, z, 1, h, w)."""
        check_video_chunk(self.cfg, state, frames)
        _check_finite(frames, "video frames")
        p = self._param
        h, caches = self.encoder(frames.to(p.device, p.dtype), state.caches, state.first)
        mu = self.conv1(h)[:, : self.cfg.z_dim]  # (B, z, 1, h, w); the log-variance half is unused
        latent = (mu - self.latents_mean) / self.latents_std
        return latent, dataclasses.replace(state, caches=caches, first=False)

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Offline encode in [1, 4, 4, ...] chunks: (B, 3, 1 + 4k, H, W) -> (B, z, 1 + k, H/8, W/8)."""
        if video.ndim != 5:
            raise ValueError(f"video must be (B, C, T, H, W), got shape {tuple(video.shape)}")
        step = self.cfg.temporal_factor
        t = video.shape[2]
        if t < 1 or (t - 1) % step:
            raise ValueError(f"video must have 1 + {step}k frames, got {t}")
        state = self.init_encode_state(video.shape[0], video.shape[3], video.shape[4])
        latents = []
        for start, stop in [(0, 1)] + [(s, s + step) for s in range(1, t, step)]:
            latent, state = self.encode_step(state, video[:, :, start:stop])
            latents.append(latent)
        return torch.cat(latents, dim=2)


# ---- shared with the ONNX runner -----------------------------------------------------------------


def decode_all(decoder, z: torch.Tensor, clamp: bool = False) -> torch.Tensor:
    """Offline decode through any streaming decoder's `init_state` / `decode_step`, one latent at a time."""
    if z.ndim != 5:
        raise ValueError(f"latents must be (B, C, T, H, W), got shape {tuple(z.shape)}")
    state = decoder.init_state(z.shape[0], z.shape[3], z.shape[4])
    out = []
    for t in range(z.shape[2]):
        frames, state = decoder.decode_step(state, z[:, :, t:t + 1])
        out.append(frames)
    video = torch.cat(out, dim=2)
    return video.clamp(-1.0, 1.0) if clamp else video


def frames_per_latent(cfg: VAEConfig, first: bool) -> int:
    return 1 if first else cfg.temporal_factor


def video_frames(cfg: VAEConfig, latent_frames: int) -> int:
    """1 + 4 (T - 1) video frames for T latent frames."""
    return 0 if latent_frames == 0 else 1 + cfg.temporal_factor * (latent_frames - 1)


def _five_dims(x, channels: int, name: str, layout: str) -> tuple[int, ...]:
    """`x`'s shape, checked to be 5-d with `channels` channels (messages name the tensor and its layout)."""
    shape = tuple(x.shape)
    if len(shape) != 5:
        raise ValueError(f"{name} must be {layout}, got shape {shape}")
    if shape[1] != channels:
        raise ValueError(f"{name.split()[0]} has {shape[1]} channels, the VAE expects {channels} (shape {shape})")
    return shape


def check_latent_step(cfg: VAEConfig, batch: int, latent_h: int, latent_w: int, z) -> None:
    """Shape checks for one decode step; `z` may be a torch tensor or a numpy array."""
    shape = _five_dims(z, cfg.z_dim, "latent frame", "(B, C, 1, h, w)")
    b, c, t, h, w = shape
    if t != 1:
        raise ValueError(f"decode_step takes one latent frame at a time, got {t} (shape {shape})")
    if (b, h, w) != (batch, latent_h, latent_w):
        raise ValueError(f"latent batch/size {b}x{h}x{w} does not match the stream's "
                         f"{batch}x{latent_h}x{latent_w} (shape {shape})")


def check_video_chunk(cfg: VAEConfig, state: VaeEncodeState, x: torch.Tensor) -> None:
    shape = _five_dims(x, cfg.in_channels, "video chunk", "(B, C, T, H, W)")
    b, c, t, h, w = shape
    f = cfg.spatial_factor
    if h % f or w % f:
        raise ValueError(f"video height and width must be multiples of {f}, got {h}x{w}")
    if (b, h, w) != (state.batch, state.height, state.width):
        raise ValueError(f"video batch/size {b}x{h}x{w} does not match the stream's "
                         f"{state.batch}x{state.height}x{state.width}")
    want = frames_per_latent(cfg, state.first)
    if t != want:
        which = "the first chunk" if state.first else "every chunk after the first"
        raise ValueError(f"{which} must have {want} frame(s), got {t}")


def param_count(module: nn.Module) -> int:
    return sum(math.prod(p.shape) for p in module.parameters())
