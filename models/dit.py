"""Wan2.1-layout diffusion transformer with avatar conditioning.

Numerically Wan2.1's `WanModel` (t2v) with its parameter names, so Wan2.1, OmniAvatar and LiveTalk
weights load by name; extended with OmniAvatar's audio path (Audio Pack + per-layer projections),
HunyuanVideo-Avatar's face-aware audio adapters (FAA) and audio emotion module (AEM), and reference
injection (mechanism c). Every extension is exactly a no-op at initialisation.

Reads top to bottom: norms and positional math, attention layers, the transformer block, the avatar
modules, then the model. Token order is (frame, row, column) throughout; T = tokens per latent frame.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.attention import attention, expand_frame_mask, lengths_to_key_mask
from models.rope import apply_rope, rope_table
from models.config import NUM_TRAIN_TIMESTEPS, VIDEO_FRAMES_PER_LATENT, DiTConfig
from models.kv_cache import CacheGeometry, CacheGroup, KVCache


# ---- norms and positional math ------------------------------------------------------------------
class RMSNorm(nn.Module):
    """RMSNorm over the last dim, computed in float32 (Wan2.1 `WanRMSNorm`)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in float32 and cast back (Wan2.1 `WanLayerNorm`); the affine parameters are
    promoted too, so a model held in bfloat16 normalises in float32 as well."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).type_as(x)


def sinusoidal_embedding(dim: int, t: torch.Tensor) -> torch.Tensor:
    """Timestep sinusoid, cosine half first, computed in float64 and returned as float32. (...,) -> (..., dim)"""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = t.to(torch.float64)[..., None] * freqs
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1).float()


def row_rope_table(pairs: tuple[int, int, int], grid: tuple[int, int, int], starts: Sequence[int],
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """One RoPE table per batch row, for rows whose first frame sits at different absolute positions
    (sessions at different block indices in one call): (cos, sin), each (B, F*H*W, 1, head_dim/2)."""
    tables = [rope_table(pairs, grid, s, device) for s in starts]
    return torch.stack([t[0] for t in tables]), torch.stack([t[1] for t in tables])


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x: (B, L, dim); shift/scale: (B, Fe, dim) with Fe = 1 (per sample) or F (per frame, L = F*T)."""
    b, l, d = x.shape
    fe = shift.shape[1]
    xv = x.view(b, fe, l // fe, d)
    return (xv * (1 + scale[:, :, None]) + shift[:, :, None]).view(b, l, d)


def gated(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x + y * gate, with gate (B, Fe, dim) broadcast over each frame's tokens."""
    b, l, d = x.shape
    fe = gate.shape[1]
    return x + (y.float().view(b, fe, l // fe, d) * gate[:, :, None]).view(b, l, d)


# ---- attention layers ---------------------------------------------------------------------------
class _QKVO(nn.Module):
    """Wan2.1's attention parameters: q, k, v, o projections and RMS norms on queries and keys."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.q = nn.Linear(cfg.dim, cfg.dim)
        self.k = nn.Linear(cfg.dim, cfg.dim)
        self.v = nn.Linear(cfg.dim, cfg.dim)
        self.o = nn.Linear(cfg.dim, cfg.dim)
        self.norm_q = RMSNorm(cfg.dim, cfg.eps) if cfg.qk_norm else nn.Identity()
        self.norm_k = RMSNorm(cfg.dim, cfg.eps) if cfg.qk_norm else nn.Identity()


class SelfAttention(_QKVO):
    def forward(self, x, rope, key_mask=None, attn_mask=None, cache: KVCache | None = None,
                layer: int = 0) -> torch.Tensor:
        b, l, _ = x.shape
        q = self.norm_q(self.q(x)).view(b, l, self.heads, self.head_dim)  # (B, L, heads, head_dim)
        k = self.norm_k(self.k(x)).view(b, l, self.heads, self.head_dim)
        v = self.v(x).view(b, l, self.heads, self.head_dim)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, Lk, heads, head_dim): sink + window + this block
        return self.o(attention(q, k, v, key_mask, attn_mask).flatten(2))


class CrossAttention(_QKVO):
    """Text (or null-context) cross-attention; K/V of a fixed context can come from the cache."""

    def forward(self, x, context, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        b, l, _ = x.shape
        q = self.norm_q(self.q(x)).view(b, l, self.heads, self.head_dim)
        kv = cache.cross[layer] if cache is not None else None
        if kv is None:
            k = self.norm_k(self.k(context)).view(b, -1, self.heads, self.head_dim)
            v = self.v(context).view(b, -1, self.heads, self.head_dim)
            kv = (k, v)
            if cache is not None:
                cache.cross[layer] = kv
        return self.o(attention(q, *kv).flatten(2))


class TokenCrossAttention(nn.Module):
    """Pre-norm multi-head cross-attention used by the avatar adapters.

    Projections are named to_* so that LoRA targets ("q", "k", "v", "o") never match them.
    """

    def __init__(self, dim: int, heads: int, eps: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm_x = nn.LayerNorm(dim, eps=eps)
        self.norm_c = nn.LayerNorm(dim, eps=eps)
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope_x=None, rope_c=None) -> torch.Tensor:
        """x: (N, Lx, dim), c: (N, Lc, dim) -> (N, Lx, dim); optional RoPE tables rotate queries / keys."""
        n, lx, d = x.shape
        hd = d // self.heads
        q = self.to_q(self.norm_x(x)).view(n, lx, self.heads, hd)
        cn = self.norm_c(c)
        k = self.to_k(cn).view(n, -1, self.heads, hd)
        v = self.to_v(cn).view(n, -1, self.heads, hd)
        if rope_x is not None:
            q, k = apply_rope(q, rope_x), apply_rope(k, rope_c)
        return self.to_out(attention(q, k, v).flatten(2))


# ---- transformer block --------------------------------------------------------------------------
class WanBlock(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        # 1. self-attention
        self.norm1 = LayerNorm32(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(cfg)
        # 2. text cross-attention
        self.norm3 = LayerNorm32(cfg.dim, eps=cfg.eps) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = CrossAttention(cfg)
        # 3. feed-forward
        self.norm2 = LayerNorm32(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(cfg.dim, cfg.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.ffn_dim, cfg.dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, cfg.dim) / cfg.dim**0.5)

    def forward(self, x, e, context, rope, key_mask=None, attn_mask=None, cache=None, layer=0):
        """x: (B, L, dim) float32 residual stream; e: (B, Fe, 6, dim) float32 time modulation."""
        dt = self.modulation.dtype
        mod = (self.modulation.float()[:, None] + e).unbind(2)  # 6 x (B, Fe, dim)
        # 1. self-attention
        y = self.self_attn(modulate(self.norm1(x), mod[0], mod[1]).to(dt), rope, key_mask, attn_mask,
                           cache, layer)
        x = gated(x, y, mod[2])
        # 2. text cross-attention
        x = x + self.cross_attn(self.norm3(x).to(dt), context, cache, layer).float()
        # 3. feed-forward
        y = self.ffn(modulate(self.norm2(x), mod[3], mod[4]).to(dt))
        return gated(x, y, mod[5])


class Head(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.norm = LayerNorm32(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, cfg.patch_tokens * cfg.out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """x: (B, L, dim), e: (B, Fe, dim) -> (B, L, patch_tokens * out_dim)"""
        shift, scale = (self.modulation.float()[:, None] + e[:, :, None]).unbind(2)
        return self.head(modulate(self.norm(x), shift, scale).to(self.head.weight.dtype)).float()


# ---- avatar modules -----------------------------------------------------------------------------
class AudioPack(nn.Module):
    """OmniAvatar Audio Pack: the 4 video frames of a latent frame, flattened -> Linear -> LayerNorm."""

    def __init__(self, audio_dim: int, hidden: int) -> None:
        super().__init__()
        self.proj = nn.Linear(VIDEO_FRAMES_PER_LATENT * audio_dim, hidden)
        self.norm_out = nn.LayerNorm(hidden)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """(B, F, 4, audio_dim) -> (B, F, hidden); video-frame index slowest, features fastest."""
        return self.norm_out(self.proj(audio.flatten(2)))


class FaceAudioAdapter(nn.Module):
    """FAA: per latent frame, cross-attention from video tokens to that frame's audio tokens, masked
    to a character's face; x += sum_c mask_c * attn(x_t, a_{c,t}). Zero output projection at init."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.attn = TokenCrossAttention(cfg.dim, cfg.faa_heads, cfg.eps)
        nn.init.zeros_(self.attn.to_out.weight)
        nn.init.zeros_(self.attn.to_out.bias)

    def forward(self, x: torch.Tensor, audio_tokens: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """x: (B, F*T, dim); audio_tokens: (B, C, F, A, dim); masks: (B, C, F|1, T) in [0, 1]."""
        b, c, f, a, d = audio_tokens.shape
        xf = x.view(b * f, -1, d)  # (B*F, T, dim): each frame attends only its own audio
        out = x
        for ci in range(c):
            delta = self.attn(xf.to(audio_tokens.dtype), audio_tokens[:, ci].reshape(b * f, a, d))
            m = masks[:, ci].expand(b, f, -1).reshape(b, -1, 1)  # (B, F*T, 1)
            out = out + m * delta.float().view(b, -1, d)
        return out


class EmotionAdapter(nn.Module):
    """AEM: cross-attention to the emotion reference's latent tokens, scaled by a gate that starts at 0.

    Queries and keys carry the spatial part of the 3D RoPE (every frame placed at the emotion image's
    frame), so a token finds the emotion image's tokens at its own place first: a mouth corner reads the
    reference's mouth corner, not whichever patch looks alike. Without positions the demo model's
    AEM learned no measurable effect."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.attn = TokenCrossAttention(cfg.dim, cfg.num_heads, cfg.eps)
        self.gate = nn.Parameter(torch.zeros(cfg.dim))

    def forward(self, x: torch.Tensor, emotion_tokens: torch.Tensor, rope=None) -> torch.Tensor:
        """x: (B, F*T, dim); emotion_tokens: (B, T, dim); rope: the (cos, sin) table of one frame of T tokens."""
        rope_x = None
        if rope is not None:
            frames = x.shape[1] // rope[0].shape[0]
            rope_x = tuple(r.repeat(frames, 1, 1) for r in rope)  # (F*T, 1, head_dim/2): same place, same angle
        out = self.attn(x.to(emotion_tokens.dtype), emotion_tokens, rope_x, rope)
        return x + self.gate.float() * out.float()


def group_video_frames(audio: torch.Tensor) -> torch.Tensor:
    """OmniAvatar layout: (B, 1+4k, D) per-video-frame features -> (B, 1+k, 4, D) per latent frame.

    Latent frame 0 covers only video frame 0, so that frame is repeated 3 extra times in front.
    """
    b, n, d = audio.shape
    if (n - 1) % VIDEO_FRAMES_PER_LATENT:
        raise ValueError(f"{n} video frames of audio; expected 1 + 4k to match latent frames")
    padded = torch.cat([audio[:, :1].expand(b, VIDEO_FRAMES_PER_LATENT - 1, d), audio], dim=1)
    return padded.view(b, -1, VIDEO_FRAMES_PER_LATENT, d)


# ---- the model ----------------------------------------------------------------------------------
class WanDiT(nn.Module):
    """The diffusion transformer. `forward` predicts flow-matching velocity for video latents.

    Weights are shared between sessions; per-session state (the KV cache) is created by
    `init_cache` and passed in explicitly.
    """

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        # Wan2.1 core
        self.patch_embedding = nn.Conv3d(cfg.in_dim, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"),
                                            nn.Linear(d, d))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, d * 6))
        self.blocks = nn.ModuleList(WanBlock(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        # OmniAvatar audio path (names as in its checkpoints)
        if cfg.audio_dim:
            self.audio_proj = AudioPack(cfg.audio_dim, cfg.audio_hidden)
            self.audio_cond_projs = nn.ModuleList(nn.Linear(cfg.audio_hidden, d) for _ in cfg.audio_layers)
        # avatar extensions, each a no-op at init
        if cfg.null_context_len:
            self.null_context = nn.Parameter(torch.randn(1, cfg.null_context_len, cfg.text_dim) * 0.02)
        if cfg.faa_layers:
            self.face_audio_embedding = nn.Sequential(nn.Linear(cfg.audio_dim, d), nn.GELU(approximate="tanh"),
                                                      nn.Linear(d, d))
            self.face_adapters = nn.ModuleDict({str(i): FaceAudioAdapter(cfg) for i in cfg.faa_layers})
        if cfg.aem_layers:
            self.emotion_embedding = nn.Conv3d(cfg.out_dim, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
            self.emotion_adapters = nn.ModuleDict({str(i): EmotionAdapter(cfg) for i in cfg.aem_layers})
        if cfg.ref_injection:
            self.ref_embedding = nn.Conv3d(cfg.out_dim, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
            self.ref_proj = nn.Linear(d, d)
        if cfg.motion_condition:
            self.motion_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.init_weights()

    # Which top-level parameter prefixes belong to which optional module (the loader reports these).
    EXTENSIONS = {
        "audio": ("audio_proj.", "audio_cond_projs."),
        "null_context": ("null_context",),
        "face_audio_adapter": ("face_audio_embedding.", "face_adapters."),
        "emotion_module": ("emotion_embedding.", "emotion_adapters."),
        "reference_injection": ("ref_embedding.", "ref_proj."),
        "motion_condition": ("motion_embedding.",),
    }

    def init_weights(self) -> None:
        """Wan2.1's initialisation, then the zero-inits that make every extension a no-op."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        for seq in (self.text_embedding, self.time_embedding):
            for m in seq.modules():
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.head.head.weight)
        for adapter in getattr(self, "face_adapters", {}).values():
            nn.init.zeros_(adapter.attn.to_out.weight)
        if self.cfg.ref_injection:
            nn.init.zeros_(self.ref_proj.weight)
        if self.cfg.motion_condition:
            nn.init.zeros_(self.motion_embedding[2].weight)
        for adapter in getattr(self, "emotion_adapters", {}).values():
            nn.init.zeros_(adapter.gate)

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_embedding.weight.device

    # ---- per-session state --------------------------------------------------------------------
    def init_cache(self, batch: int, latent_h: int, latent_w: int, *, sink_frames: int, window_frames: int,
                   block_frames: int, sink_follows: bool = False, device=None, dtype=None) -> KVCache:
        c = self.cfg
        grid = (latent_h // c.patch_size[1], latent_w // c.patch_size[2])
        geometry = CacheGeometry(
            num_layers=c.num_layers, batch=batch, heads=c.num_heads, head_dim=c.head_dim,
            tokens_per_frame=grid[0] * grid[1], sink_frames=sink_frames, window_frames=window_frames,
            block_frames=block_frames, sink_follows=sink_follows, rope_pairs=c.rope_split, grid_hw=grid,
        )
        return KVCache(geometry, device=device or self.device, dtype=dtype or self.dtype)

    # ---- condition embeddings (cacheable per session) ----------------------------------------
    def embed_context(self, context: torch.Tensor | None, batch: int) -> torch.Tensor:
        """(B, L<=text_len, text_dim) or None (learned null context) -> (B, text_len, dim).

        Rows past L are zero-padded before the MLP, as upstream does, and are attended.
        """
        c = self.cfg
        if context is None:
            if not c.null_context_len:
                raise ValueError("no context given and this model has no learned null context")
            context = self.null_context.expand(batch, -1, -1)
        if context.dim() != 3 or context.shape[-1] != c.text_dim or context.shape[1] > c.text_len:
            raise ValueError(f"context must be (B, L<={c.text_len}, {c.text_dim}); got {tuple(context.shape)}")
        if context.shape[0] != batch:
            raise ValueError(f"context batch {context.shape[0]} != latent batch {batch}")
        pad = c.text_len - context.shape[1]
        if pad:
            context = torch.cat([context, context.new_zeros(batch, pad, c.text_dim)], dim=1)
        return self.text_embedding(context.to(self.dtype))

    def _embed_latent_image(self, conv: nn.Conv3d, latent: torch.Tensor) -> torch.Tensor:
        """(B, 16, H, W) or (B, 16, 1, H, W) image latent -> (B, T, dim) tokens."""
        if latent.dim() == 4:
            latent = latent[:, :, None]
        if latent.dim() != 5 or latent.shape[1] != self.cfg.out_dim or latent.shape[2] != 1:
            raise ValueError(f"image latent must be (B, {self.cfg.out_dim}, [1,] H, W); got {tuple(latent.shape)}")
        return conv(latent.to(self.dtype)).flatten(2).transpose(1, 2)

    def embed_reference(self, latent: torch.Tensor) -> torch.Tensor:
        return self.ref_proj(self._embed_latent_image(self.ref_embedding, latent))

    def embed_emotion(self, latent: torch.Tensor) -> torch.Tensor:
        return self._embed_latent_image(self.emotion_embedding, latent)

    # ---- forward ------------------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor | None = None,
        *,
        y: torch.Tensor | None = None,
        audio: torch.Tensor | None = None,
        face_audio: torch.Tensor | None = None,
        face_mask: torch.Tensor | None = None,
        emotion: torch.Tensor | None = None,
        reference: torch.Tensor | None = None,
        motion: torch.Tensor | None = None,
        frame_lens: torch.Tensor | None = None,
        frame_mask: torch.Tensor | None = None,
        cache: KVCache | CacheGroup | None = None,
        start_frame: int | Sequence[int] = 0,
    ) -> torch.Tensor:
        """Predict velocity.

        x: (B, C, F, H, W) noisy latents (padded to the longest sample when `frame_lens` is given);
        t: (B,) or (B, F) timesteps in [0, 1000]; context: (B, L, text_dim) or None for the null context;
        y: (B, in_dim - C, F, H, W) channels concatenated to x (OmniAvatar: reference latent + mask);
        audio: (B, F, 4, audio_dim) per latent frame (`group_video_frames`), zeros for unconditional;
        face_audio: (B, chars, F, 4, audio_dim); face_mask: (B, chars, [F,] h, w) on the token grid;
        emotion: (B, 16, [1,] H, W) emotion-image latent; reference: (B, 16, [1,] H, W) reference latent;
        motion: (B,) head-motion intensity in [0, 1] (0 = still);
        frame_lens: (B,) valid latent frames per sample; frame_mask: (F, F) bool frame-level mask;
        cache/start_frame: run as the block of frames [start_frame, start_frame + F) of a stream;
        with a CacheGroup (several sessions in one call) start_frame has one entry per row.
        Returns (B, out_dim, F, H, W) float32.
        """
        c = self.cfg
        if y is not None:
            x = torch.cat([x, y.to(x.dtype)], dim=1)
        self._check(x, t, audio, frame_lens, frame_mask, cache)
        b = x.shape[0]
        starts = (start_frame,) * b if isinstance(start_frame, int) else tuple(int(s) for s in start_frame)
        if len(starts) != b:
            raise ValueError(f"{len(starts)} start frames for a batch of {b}")
        if not isinstance(cache, CacheGroup) and len(set(starts)) > 1:
            raise ValueError("rows at different start frames need a CacheGroup (one cache per session)")

        # 1. patchify: (B, C, F, H, W) -> (B, L, dim), L = F*h*w
        x = self.patch_embedding(x.to(self.dtype))
        grid = tuple(x.shape[2:])
        f, tpf = grid[0], grid[1] * grid[2]
        x = x.flatten(2).transpose(1, 2).float().contiguous()

        # 2. time embedding -> per-sample (Fe = 1) or per-frame (Fe = F) modulation
        e = self.time_embedding(sinusoidal_embedding(c.freq_dim, t).to(self.dtype)).float()
        e = e[:, None] if t.dim() == 1 else e  # (B, Fe, dim)
        if motion is not None and c.motion_condition:
            # intensity 0..1 is embedded on the timestep scale
            m = sinusoidal_embedding(c.freq_dim, motion * NUM_TRAIN_TIMESTEPS)
            m = self.motion_embedding(m.to(self.dtype)).float()
            e = e + m[:, None]  # the motion condition steers every AdaLN modulation, like the timestep
        e0 = self.time_projection(e.to(self.dtype)).float().unflatten(-1, (6, c.dim))  # (B, Fe, 6, dim)

        # 3. context, positions and masks
        cached_ctx = cache is not None and cache.cross[0] is not None
        ctx = None if cached_ctx else self.embed_context(context, b)
        if len(set(starts)) == 1:
            rope = rope_table(c.rope_split, grid, starts[0], x.device)  # (L, 1, head_dim/2)
        else:
            rope = row_rope_table(c.rope_split, grid, starts, x.device)  # (B, L, 1, head_dim/2)
        key_mask = lengths_to_key_mask(frame_lens.to(x.device) * tpf, x.shape[1]) if frame_lens is not None else None
        attn_mask = expand_frame_mask(frame_mask.to(x.device), tpf) if frame_mask is not None else None
        if cache is not None:
            cache.begin_block(starts if isinstance(cache, CacheGroup) else starts[0], f)
            key_mask = cache.key_mask(x.device)  # (B, Lk): a group's shorter histories are padding

        # 4. conditions: reference injection, audio, face audio tokens, emotion tokens
        if reference is not None and c.ref_injection:
            x = (x.view(b, f, tpf, -1) + self.embed_reference(reference).float()[:, None]).view(b, -1, c.dim)
        audio_h = self.audio_proj(audio.to(self.dtype)) if audio is not None else None  # (B, F, hidden)
        faa = None
        if c.faa_layers and face_mask is not None and (audio is not None or face_audio is not None):
            fa = audio[:, None] if face_audio is None else face_audio  # one character = the main audio
            faa = (self.face_audio_embedding(fa.to(self.dtype)), self._token_masks(face_mask, b, f, tpf))
        emo = self.embed_emotion(emotion) if emotion is not None and c.aem_layers else None
        if emo is not None and emo.shape[1] != tpf:
            raise ValueError(f"the emotion image gives {emo.shape[1]} tokens, a video frame {tpf}: "
                             "it must have the video's size")
        emo_rope = rope_table(c.rope_split, (1, *grid[1:]), 0, x.device) if emo is not None else None

        # 5. transformer blocks, audio added before the shallow/middle blocks, adapters after
        for i, block in enumerate(self.blocks):
            if audio_h is not None and i in c.audio_layers:
                a = self.audio_cond_projs[i - 2](audio_h).float()  # (B, F, dim)
                x = (x.view(b, f, tpf, -1) + a[:, :, None]).view(b, -1, c.dim)
            x = block(x, e0, ctx, rope, key_mask, attn_mask, cache, i)
            if faa is not None and str(i) in self.face_adapters:
                x = self.face_adapters[str(i)](x, *faa)
            if emo is not None and str(i) in self.emotion_adapters:
                x = self.emotion_adapters[str(i)](x, emo, emo_rope)

        # 6. head and unpatchify: (B, L, pt*ph*pw*C) -> (B, C, F, H, W)
        return self.unpatchify(self.head(x, e), grid)

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        b = x.shape[0]
        (pt, ph, pw), co = self.cfg.patch_size, self.cfg.out_dim
        f, h, w = grid
        x = x.view(b, f, h, w, pt, ph, pw, co).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(b, co, f * pt, h * ph, w * pw)

    def _token_masks(self, face_mask: torch.Tensor, b: int, f: int, tpf: int) -> torch.Tensor:
        """(B, chars, [F,] h, w) -> (B, chars, F|1, T) float."""
        m = face_mask if face_mask.dim() == 5 else face_mask[:, :, None]
        if m.shape[0] != b or m.shape[2] not in (1, f) or m.shape[3] * m.shape[4] != tpf:
            raise ValueError(f"face_mask must be (B={b}, chars, [F={f},] h, w) with h*w = {tpf} tokens; "
                             f"got {tuple(face_mask.shape)}")
        return m.flatten(3).float()

    def _check(self, x, t, audio, frame_lens, frame_mask, cache) -> None:
        c = self.cfg
        if x.dim() != 5 or x.shape[1] != c.in_dim:
            raise ValueError(f"latents (with y) must be (B, {c.in_dim}, F, H, W); got {tuple(x.shape)}")
        b, _, f, h, w = x.shape
        pt, ph, pw = c.patch_size
        if f % pt or h % ph or w % pw:
            raise ValueError(f"latent grid {(f, h, w)} is not divisible by the patch size {c.patch_size}")
        if t.dim() not in (1, 2) or t.shape[0] != b or (t.dim() == 2 and t.shape[1] != f // pt):
            raise ValueError(f"t must be (B,) or (B, F) = ({b}, {f // pt}); got {tuple(t.shape)}")
        if audio is not None:
            if not c.audio_dim:
                raise ValueError(f"{c.name} has no audio path, but audio was given")
            if audio.shape != (b, f // pt, VIDEO_FRAMES_PER_LATENT, c.audio_dim):
                raise ValueError(f"audio must be (B, F, {VIDEO_FRAMES_PER_LATENT}, {c.audio_dim}) = "
                                 f"{(b, f // pt, VIDEO_FRAMES_PER_LATENT, c.audio_dim)}; got {tuple(audio.shape)}")
        if cache is not None and (frame_lens is not None or frame_mask is not None):
            raise ValueError("a cached block forward takes no frame_lens/frame_mask: the cache defines visibility")
        if cache is not None and cache.rows != b:
            raise ValueError(f"cache was made for batch {cache.rows}, latents have batch {b}")
