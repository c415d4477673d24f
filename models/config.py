"""Model configurations: frozen dataclasses with derived fields, and named presets.

A preset fixes the architecture (what shapes the weights have); where the weights come from is
`models/loading.py`'s business. TINY is for tests, DEMO is the embedded demo model, the WAN_* and
OMNIAVATAR_* presets reproduce the published checkpoints' shapes exactly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

# The Wan2.1 / OmniAvatar geometry that everything downstream relies on.
VIDEO_FRAMES_PER_LATENT = 4  # causal VAE: latent frame 0 -> 1 video frame, every later one -> 4
NUM_TRAIN_TIMESTEPS = 1000  # the DiT's timestep scale: noise level σ in [0, 1] is timestep 1000·σ
WAV2VEC2_BASE_FEATURES = 10752  # 14 x 768: last hidden state + all 13 hidden states (OmniAvatar)


class _DictConfig:
    """`replace`, `to_dict` and `from_dict` of the frozen configs; JSON gives lists where we keep tuples."""

    TUPLE_FIELDS: ClassVar[tuple[str, ...]] = ()

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        for key in cls.TUPLE_FIELDS:
            if key in kw:
                kw[key] = tuple(kw[key])
        return cls(**kw)


@dataclass(frozen=True)
class DiTConfig(_DictConfig):
    """Architecture of the Wan2.1-layout diffusion transformer and its avatar extensions.

    Field names follow Wan2.1's `WanModel` constructor where one exists, so a checkpoint's
    `config.json` maps onto this class with `from_wan_config`.
    """

    TUPLE_FIELDS: ClassVar[tuple[str, ...]] = ("patch_size", "faa_layers", "aem_layers", "lora_targets")

    name: str
    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    in_dim: int = 16  # 16 latent channels; 33 with OmniAvatar's reference latent (16) + mask (1)
    out_dim: int = 16
    text_dim: int = 4096  # umT5-XXL hidden size
    text_len: int = 512  # context is zero-padded to this many rows, as upstream does
    freq_dim: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)
    qk_norm: bool = True
    cross_attn_norm: bool = True
    eps: float = 1e-6

    # OmniAvatar audio path: Audio Pack (4 video frames -> one latent frame) + per-layer projections
    # added to every token of the matching latent frame in blocks 2..num_layers//2. 0 disables it.
    audio_dim: int = 0
    audio_hidden: int = 32
    audio_lead_frames: int = 0  # trained hearing its audio this many video frames early: frame f's
    # features come from frame f + lead's samples (the front end's lookahead grows by as much)

    # Learned null context (rows of text_dim) used when no text encoder is run. 0 disables it.
    null_context_len: int = 0

    # Face-aware audio adapters (HunyuanVideo-Avatar FAA): masked per-frame cross-attention from video
    # tokens to that frame's audio tokens, in these blocks (applied after the block).
    faa_layers: tuple[int, ...] = ()
    faa_heads: int = 4
    # Audio emotion module: cross-attention to emotion-reference latent tokens, gate initialised at 0.
    aem_layers: tuple[int, ...] = ()
    # Character image injection, mechanism (c): reference latent -> own patch embedding -> zero-init
    # projection -> added to every frame's video tokens.
    ref_injection: bool = False
    # Motion-intensity condition (HunyuanVideo-Avatar's motion buckets, continuous here): a value in
    # [0, 1] embedded like a timestep and added to the AdaLN time embedding, zero-initialised.
    motion_condition: bool = False

    # LoRA that ships with a checkpoint (OmniAvatar: r128 / alpha 64 on q,k,v,o,ffn.0,ffn.2). 0 = none.
    lora_rank: int = 0
    lora_alpha: float = 0.0
    lora_targets: tuple[str, ...] = ("q", "k", "v", "o", "ffn.0", "ffn.2")

    def __post_init__(self) -> None:
        if self.dim % self.num_heads:
            raise ValueError(f"{self.name}: dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2:
            raise ValueError(f"{self.name}: head_dim {self.head_dim} must be even for RoPE")
        for i in (*self.faa_layers, *self.aem_layers):
            if not 0 <= i < self.num_layers:
                raise ValueError(f"{self.name}: adapter layer {i} outside 0..{self.num_layers - 1}")
        if self.faa_layers and not self.audio_dim:
            raise ValueError(f"{self.name}: face-aware audio adapters need audio_dim > 0")

    # ---- derived fields -------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_split(self) -> tuple[int, int, int]:
        """Complex pairs of each head given to (time, height, width), as Wan2.1 splits them."""
        pairs = self.head_dim // 2
        hw = pairs // 3
        return pairs - 2 * hw, hw, hw

    @property
    def patch_tokens(self) -> int:
        return self.patch_size[0] * self.patch_size[1] * self.patch_size[2]

    @property
    def audio_layers(self) -> tuple[int, ...]:
        """Blocks that receive OmniAvatar's additive audio conditioning (before the block runs)."""
        if not self.audio_dim:
            return ()
        return tuple(range(2, self.num_layers // 2 + 1))

    @property
    def has_lora(self) -> bool:
        return self.lora_rank > 0

    def tokens_per_frame(self, latent_h: int, latent_w: int) -> int:
        return (latent_h // self.patch_size[1]) * (latent_w // self.patch_size[2])

    @classmethod
    def from_wan_config(cls, d: dict, name: str = "checkpoint") -> DiTConfig:
        """Build from a Wan2.1 / OmniAvatar / diffusers `config.json`."""
        if d.get("_class_name") == "WanTransformer3DModel":  # diffusers spelling
            heads, head_dim = d["num_attention_heads"], d["attention_head_dim"]
            return cls(
                name=name, dim=heads * head_dim, ffn_dim=d["ffn_dim"], num_heads=heads,
                num_layers=d["num_layers"], in_dim=d.get("in_channels", 16),
                out_dim=d.get("out_channels", 16), text_dim=d.get("text_dim", 4096),
                freq_dim=d.get("freq_dim", 256), patch_size=tuple(d.get("patch_size", (1, 2, 2))),
                eps=d.get("eps", 1e-6), cross_attn_norm=d.get("cross_attn_norm", True),
            )
        mc = d.get("model_config", {})  # OmniAvatar nests in_dim / audio_hidden_size here
        merged = {**d, **mc}
        audio = bool(merged.get("use_audio", "audio_hidden_size" in merged))
        return cls(
            name=name, dim=merged["dim"], ffn_dim=merged["ffn_dim"], num_heads=merged["num_heads"],
            num_layers=merged["num_layers"], in_dim=merged.get("in_dim", 16),
            out_dim=merged.get("out_dim", 16), text_dim=merged.get("text_dim", 4096),
            text_len=merged.get("text_len", 512), freq_dim=merged.get("freq_dim", 256),
            patch_size=tuple(merged.get("patch_size", (1, 2, 2))), eps=merged.get("eps", 1e-6),
            qk_norm=merged.get("qk_norm", True), cross_attn_norm=merged.get("cross_attn_norm", True),
            audio_dim=WAV2VEC2_BASE_FEATURES if audio else 0,
            audio_hidden=merged.get("audio_hidden_size", 32),
            lora_rank=int(merged.get("lora_rank", 0) or 0) if merged.get("train_architecture") == "lora" else 0,
            lora_alpha=float(merged.get("lora_alpha", 0) or 0),
        )


# ---- presets ------------------------------------------------------------------------------------

_OMNI_LORA = dict(lora_rank=128, lora_alpha=64.0)

WAN_1_3B = DiTConfig(name="wan2.1-t2v-1.3b", dim=1536, ffn_dim=8960, num_heads=12, num_layers=30)
WAN_14B = DiTConfig(name="wan2.1-t2v-14b", dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
OMNIAVATAR_1_3B = WAN_1_3B.replace(
    name="omniavatar-1.3b", in_dim=33, audio_dim=WAV2VEC2_BASE_FEATURES, audio_hidden=32, **_OMNI_LORA
)
OMNIAVATAR_14B = WAN_14B.replace(
    name="omniavatar-14b", in_dim=33, audio_dim=WAV2VEC2_BASE_FEATURES, audio_hidden=32, **_OMNI_LORA
)

# Tests: every module enabled, small enough for CPU in milliseconds. head_dim 16 -> RoPE pairs 4/2/2.
TINY = DiTConfig(
    name="tiny", dim=64, ffn_dim=128, num_heads=4, num_layers=4, in_dim=33, text_dim=32, text_len=16,
    audio_dim=48, audio_hidden=16, null_context_len=4, faa_layers=(1, 3), faa_heads=2,
    aem_layers=(1,), ref_injection=True, motion_condition=True,
)

# Placeholder for the embedded demo model; its final shape is set where the demo model is trained.
DEMO = DiTConfig(
    name="demo", dim=128, ffn_dim=384, num_heads=4, num_layers=6, in_dim=33, text_dim=32, text_len=8,
    audio_dim=80, audio_hidden=32, null_context_len=8, faa_layers=(1, 3), faa_heads=4,
    aem_layers=(1, 3), ref_injection=True, motion_condition=True, lora_rank=16, lora_alpha=16.0,
)

DIT_PRESETS: dict[str, DiTConfig] = {
    c.name: c for c in (TINY, DEMO, WAN_1_3B, WAN_14B, OMNIAVATAR_1_3B, OMNIAVATAR_14B)
}


def dit_preset(name: str) -> DiTConfig:
    try:
        return DIT_PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown DiT preset {name!r}; known: {', '.join(DIT_PRESETS)}") from None


# ---- VAE ----------------------------------------------------------------------------------------
# Wan2.1 causal 3D VAE. One latent frame covers VIDEO_FRAMES_PER_LATENT video frames (the first only
# one) and 8x8 pixels; 16 latent channels. Presets are named VAE_* because TINY / DEMO above are DiT's.

# Per-channel statistics of Wan2.1 latents (diffusers AutoencoderKLWan `latents_mean` / `latents_std`,
# the same 16 + 16 numbers as upstream's WanVAE wrapper). Decode uses z * std + mean, encode
# (mu - mean) / std.
WAN_VAE_LATENTS_MEAN: tuple[float, ...] = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
WAN_VAE_LATENTS_STD: tuple[float, ...] = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)


@dataclass(frozen=True)
class VAEConfig(_DictConfig):
    """Architecture of the Wan2.1 causal 3D VAE (upstream `WanVAE_` constructor arguments).

    `dim` is the base width; stage i of the encoder has dim * dim_mult[i] channels. `encoder_dim`, when
    set, is the encoder's own base width (the decoder keeps `dim`): an encoder runs once per avatar and
    per training clip, the decoder for every frame, so a wider encoder costs a stream nothing. Each of the
    len(dim_mult) - 1 resampling stages halves H and W; those with temporal_downsample[i] also halve
    time (causally: 1 + 4k frames -> 1 + k latents). Middle attention is always present; upstream's
    `attn_scales` is empty for every released checkpoint and is not supported.
    """

    TUPLE_FIELDS: ClassVar[tuple[str, ...]] = ("dim_mult", "temporal_downsample", "latents_mean", "latents_std")

    name: str
    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    in_channels: int = 3  # RGB in [-1, 1]
    encoder_dim: int | None = None  # None: dim
    latents_mean: tuple[float, ...] = WAN_VAE_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN_VAE_LATENTS_STD

    def __post_init__(self) -> None:
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"{self.name}: temporal_downsample has {len(self.temporal_downsample)} entries, "
                f"need len(dim_mult) - 1 = {len(self.dim_mult) - 1}"
            )
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ValueError(
                f"{self.name}: latents_mean / latents_std need z_dim = {self.z_dim} values, got "
                f"{len(self.latents_mean)} / {len(self.latents_std)}"
            )
        if any(s <= 0 for s in self.latents_std):
            raise ValueError(f"{self.name}: latents_std must be positive")
        if self.encoder_dim is not None and self.encoder_dim < 1:
            raise ValueError(f"{self.name}: encoder_dim must be positive (or None: dim), got {self.encoder_dim}")

    # ---- derived fields -------------------------------------------------------------------------
    @property
    def temporal_upsample(self) -> tuple[bool, ...]:
        """Which decoder up-stages double time: the encoder's choice mirrored."""
        return tuple(reversed(self.temporal_downsample))

    @property
    def encoder_base(self) -> int:
        """The encoder's base width."""
        return self.dim if self.encoder_dim is None else self.encoder_dim

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self.temporal_downsample)

    @classmethod
    def from_diffusers_config(cls, d: dict, name: str = "checkpoint") -> VAEConfig:
        """Build from a diffusers `AutoencoderKLWan` `config.json` (Wan2.1 layout only)."""
        if d.get("is_residual") or d.get("patch_size"):
            raise ValueError(f"{name}: residual / patchified VAEs (Wan2.2 layout) are not supported")
        if d.get("attn_scales"):
            raise ValueError(f"{name}: attn_scales {d['attn_scales']} is not supported (only [])")
        defaults = cls(name=name)
        return cls(
            name=name, dim=d.get("base_dim", 96), z_dim=d.get("z_dim", 16),
            dim_mult=tuple(d.get("dim_mult", defaults.dim_mult)),
            num_res_blocks=d.get("num_res_blocks", 2),
            temporal_downsample=tuple(d.get("temperal_downsample", defaults.temporal_downsample)),
            in_channels=d.get("in_channels", 3),
            latents_mean=tuple(d.get("latents_mean", defaults.latents_mean)),
            latents_std=tuple(d.get("latents_std", defaults.latents_std)),
        )


# The released Wan2.1_VAE.pth: 194 tensors, 126.9 M parameters.
VAE_WAN_2_1 = VAEConfig(name="wan2.1")
# Tests: the oracle's shape (same module tree and key set as the real one, widths / 12).
VAE_TINY = VAEConfig(name="tiny", dim=8)
# Placeholder for the embedded demo model's VAE; its final width is set where it is trained.
VAE_DEMO = VAEConfig(name="demo", dim=8, num_res_blocks=1)  # ~9 ms per 128x128 frame on ONNX CPU

# DEMO_SIZE: the demo streams 128x128 video -> 16x16 latents (8x8 DiT tokens per latent frame with
# patch (1, 2, 2)); one latent frame = 4 video frames = 160 ms at 25 fps.
VAE_DEMO_SIZE: tuple[int, int] = (128, 128)  # (height, width) in pixels

VAE_PRESETS: dict[str, VAEConfig] = {c.name: c for c in (VAE_TINY, VAE_DEMO, VAE_WAN_2_1)}


def vae_preset(name: str) -> VAEConfig:
    try:
        return VAE_PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown VAE preset {name!r}; known: {', '.join(VAE_PRESETS)}") from None
