"""B live sessions stacked on the batch dimension: one DiT call per pass, one KV cache of batch B.

`CausalGenerator` advances one session; `BatchedSessions` does the same steps for B sessions in lockstep
(same block index), each keeping its own cache row and noise stream, so row b equals session b run
alone (`stacked_vs_alone` measures it). The GPU smoke benchmark times it at B = 1/2/4/8.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from models.config import VIDEO_FRAMES_PER_LATENT
from models.sampling import sigma_to_timestep


@dataclass
class SessionInputs:
    """One session's random conditions: different per session, so every cache row holds its own K/V."""

    reference: torch.Tensor  # (1, 16, 1, h, w) normalised reference latent
    context: torch.Tensor  # (1, text_rows, text_dim)
    audio: torch.Tensor | None  # (1, block_frames, 4, audio_dim) features of one block, reused per block
    seed: int  # of the session's noise stream

    @property
    def first_audio(self) -> torch.Tensor | None:
        return None if self.audio is None else self.audio[:, :1]  # (1, 1, 4, D): the reference latent's


def random_sessions(cfg, count: int, latent_hw: tuple[int, int], block_frames: int, text_rows: int,
                    first_seed: int, device) -> list[SessionInputs]:
    """`count` sessions of random conditions for a DiT config; session i's noise seed is first_seed + i."""
    h, w = latent_hw
    g = torch.Generator().manual_seed(first_seed)
    out = []
    for i in range(count):
        ref = torch.randn(1, cfg.out_dim, 1, h, w, generator=g)
        ctx = torch.randn(1, min(text_rows, cfg.text_len), cfg.text_dim, generator=g)
        audio = (torch.randn(1, block_frames, VIDEO_FRAMES_PER_LATENT, cfg.audio_dim, generator=g)
                 if cfg.audio_dim else None)
        out.append(SessionInputs(ref.to(device), ctx.to(device), None if audio is None else audio.to(device),
                                 first_seed + i))
    return out


class BatchedSessions:
    """B sessions advanced in lockstep through one DiT call per pass: what `CausalGenerator` does for one
    session (`prefill_reference`, `generate_block`), with the sessions' inputs stacked on the batch
    dimension and one KV cache of batch B whose row b is session b's cache. Each session keeps its own
    noise stream, drawn exactly as the generator draws it, so row b equals session b run alone."""

    def __init__(self, gen, sessions: list[SessionInputs]) -> None:
        o = gen.options
        if o.guidance.passes != 1 or o.context_sigma or o.noise_correlation:
            raise ValueError("the stacked path mirrors one-pass guidance, context_sigma 0, independent noise only")
        self.gen, self.dit = gen, gen.dit
        self.reference = torch.cat([x.reference for x in sessions])  # (B, 16, 1, h, w)
        self.context = torch.cat([x.context for x in sessions])  # (B, L, text_dim)
        self.audio = None if sessions[0].audio is None else torch.cat([x.audio for x in sessions])  # (B, N, 4, D)
        h, w = self.reference.shape[-2:]
        self.cache = self.dit.init_cache(len(sessions), h, w, sink_frames=o.sink_frames, window_frames=o.window_frames,
                                         block_frames=o.block_frames, sink_follows=o.sink_follows)
        self.noise = [torch.Generator(device=self.dit.device).manual_seed(x.seed) for x in sessions]
        self.next_frame = 0

    @property
    def batch(self) -> int:
        return self.reference.shape[0]

    def _call(self, x: torch.Tensor, t: float | torch.Tensor, audio: torch.Tensor | None, known: int = 0):
        """One DiT pass for every session: x (B, 16, F, h, w) -> velocity (B, 16, F, h, w)."""
        dev, b, f = self.reference.device, self.batch, x.shape[2]
        ref = self.reference.expand(-1, -1, f, -1, -1)  # y as GuidedModel.reference_channels builds it
        mask = torch.ones_like(ref[:, :1])
        mask[:, :, :known] = 0
        y = torch.cat([ref, mask], dim=1) if self.dit.cfg.in_dim != self.dit.cfg.out_dim else None
        tt = torch.as_tensor(t, dtype=torch.float32, device=dev).reshape(1).expand(b)
        return self.dit(x.to(self.dit.dtype), tt, self.context, y=y, audio=audio, reference=self.reference,
                        cache=self.cache, start_frame=self.next_frame)

    @torch.no_grad()
    def prefill(self) -> None:
        audio = None if self.audio is None else self.audio[:, :1]
        self._call(self.reference, sigma_to_timestep(self.gen.options.context_sigma), audio, known=1)
        self.next_frame = 1

    @torch.no_grad()
    def block(self, sync) -> tuple[torch.Tensor, float, float]:
        """Generate every session's next block. Returns x0 (B, 16, N, h, w), denoise ms, clean-pass ms."""
        sampler, n = self.gen.sampler, self.gen.options.block_frames
        shape = (1, self.reference.shape[1], n, *self.reference.shape[-2:])
        dev = self.reference.device

        def noise() -> torch.Tensor:  # (B, 16, N, h, w): session b's draw from its own stream
            return torch.cat([torch.randn(shape, generator=g, device=dev, dtype=torch.float32) for g in self.noise])

        t0 = time.perf_counter()
        # 1. start from noise
        x = noise()
        # 2. few-step denoising against the cache, with the generator's sampler; the last step lands on x0
        for i in range(len(sampler)):
            v = self._call(x, sampler.timestep(i, dev), self.audio).float()
            x = sampler.step(x, v, i, noise=noise() if i + 1 < len(sampler) else None)
        x0 = x
        sync()
        t1 = time.perf_counter()
        # 3. clean pass: the cache keeps the clean block's K/V
        self._call(x0, sigma_to_timestep(self.gen.options.context_sigma), self.audio)
        sync()
        t2 = time.perf_counter()
        # 4. advance the cursor
        self.next_frame += n
        return x0, 1e3 * (t1 - t0), 1e3 * (t2 - t1)


@torch.no_grad()
def stacked_vs_alone(gen, sessions: list[SessionInputs], blocks: int, sync=lambda: None) -> dict:
    """Run the sessions stacked, then each alone through `gen` (same inputs, same noise): the largest
    difference, the largest value, and how far the sessions' own outputs lie apart (they must differ)."""
    from avatar.generator import Conditions

    batched = BatchedSessions(gen, sessions)
    batched.prefill()
    stacked = [batched.block(sync)[0] for _ in range(blocks)]  # each (B, 16, N, h, w)
    diff = scale = 0.0
    for i, x in enumerate(sessions):
        state = gen.init_state(Conditions(reference=x.reference, context=x.context), seed=x.seed)
        gen.prefill_reference(state, x.first_audio)
        for k in range(blocks):
            alone = gen.generate_block(state, x.audio)  # (1, 16, N, h, w)
            diff = max(diff, float((stacked[k][i:i + 1] - alone).abs().max()))
            scale = max(scale, float(alone.abs().max()))
    apart = float((stacked[-1][0] - stacked[-1][-1]).abs().max())
    return {"max_abs_diff": diff, "max_abs_value": scale, "sessions_max_abs_diff": apart}
