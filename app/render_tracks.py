"""The audio of one render: a track per speaker, decoded as generation needs it.

    open_tracks(audio, speaker_audio, speakers, rate, max_s)   -> SpeakerFeeds
        speakers == 1: the file, down-mixed to mono (any channel count)
        one file per speaker (a manifest row's audio_1, audio_2, ...): each down-mixed, resampled to `rate`
        one multi-channel file: channel i drives face i (its channel count must equal `speakers`)
    feeds.take(n)    -> (speakers, m) float32: the tracks in step; one that ends first goes on as silence
    feeds.tracks()   -> per speaker: where it came from, its length and the silence that pads it

Every track is resampled to the output rate by the project's resampler (`audio.resample`), so speaker
files of different sample rates line up sample for sample.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from audio.io import AudioReadError, audio_duration, stream_audio
from audio.resample import PcmFormat, StreamResampler


class AudioFeed:
    """One track as it decodes: blocks pulled as generation needs them, handed on in order."""

    def __init__(self, blocks) -> None:
        self.blocks = blocks
        self.pending: list[np.ndarray] = []  # decoded, not yet taken
        self.decoded = self.taken = 0  # samples
        self.ended = False

    def pull_until(self, samples: int | None) -> None:
        """Decode until `samples` have decoded in all (None: to the end) or the audio ends."""
        while not self.ended and (samples is None or self.decoded < samples):
            block = next(self.blocks, None)
            if block is None:
                self.ended = True
            elif block.size:
                self.pending.append(block)
                self.decoded += block.size

    def take(self, samples: int) -> np.ndarray:
        """Up to `samples` of what has decoded and was not taken yet."""
        out: list[np.ndarray] = []
        want = max(0, samples)
        while want and self.pending:
            block = self.pending[0]
            out.append(block[:want])
            if block.size <= want:
                self.pending.pop(0)
            else:
                self.pending[0] = block[want:]
            want -= out[-1].size
        chunk = np.concatenate(out) if out else np.zeros(0, np.float32)
        self.taken += chunk.size
        return chunk


class SpeakerFeeds:
    """Every speaker's AudioFeed, taken in step (the session needs all tracks at the same place)."""

    def __init__(self, feeds: list[AudioFeed], sources: list[str], rate: int) -> None:
        self.feeds, self.sources, self.rate = feeds, sources, rate
        self.taken = 0

    @property
    def speakers(self) -> int:
        return len(self.feeds)

    @property
    def decoded(self) -> int:
        """The longest track so far: the clip's length once every track has ended."""
        return max(f.decoded for f in self.feeds)

    @property
    def ended(self) -> bool:
        return all(f.ended for f in self.feeds)

    def pull_until(self, samples: int | None) -> None:
        for f in self.feeds:
            f.pull_until(samples)

    def take(self, samples: int) -> np.ndarray:
        """(speakers, m): up to `samples` of each track; a track that has ended is padded with silence to
        the longest one's length, so the tracks never drift apart."""
        target = self.taken + max(0, samples)
        self.pull_until(target)
        chunks = [f.take(samples) for f in self.feeds]
        # an unfinished track has decoded past `target`, so only ended ones can come up short
        m = min(max(c.size for c in chunks), max(0, min(target, self.decoded) - self.taken))
        out = np.zeros((len(chunks), m), np.float32)
        for row, chunk in zip(out, chunks, strict=True):
            row[:min(m, chunk.size)] = chunk[:m]
        self.taken += m
        return out

    def tracks(self) -> list[dict]:
        """Per speaker: its source, its own length and the silence added to match the longest (seconds)."""
        longest = self.decoded
        return [{"speaker": i + 1, "input": src, "duration_s": round(f.decoded / self.rate, 3),
                 "padded_s": round((longest - f.decoded) / self.rate, 3)}
                for i, (f, src) in enumerate(zip(self.feeds, self.sources, strict=True))]


def open_tracks(audio: str, speaker_audio: tuple[str, ...], speakers: int, rate: int,
                max_duration_s: float) -> SpeakerFeeds:
    """The speakers' tracks of one input (see the module doc). ValueError / AudioReadError name the file
    and the problem: a channel count that does not match `speakers`, a missing speaker file."""
    if speaker_audio:
        if len(speaker_audio) != speakers:
            raise ValueError(f"{len(speaker_audio)} speaker files for --speakers {speakers}")
        feeds = [AudioFeed(stream_audio(p, sample_rate=rate, max_duration_s=max_duration_s)) for p in speaker_audio]
        return SpeakerFeeds(feeds, list(speaker_audio), rate)
    feed = AudioFeed(stream_audio(audio, sample_rate=rate, max_duration_s=max_duration_s))
    if speakers == 1:
        return SpeakerFeeds([feed], [audio], rate)
    channels = channel_count(audio)
    if channels == 1:
        raise ValueError(f"{audio} is mono and --speakers {speakers} needs a voice per face: give a "
                         f"{speakers}-channel file (channel i drives face i) or a CSV manifest with columns "
                         + ", ".join(f"audio_{i + 1}" for i in range(speakers)))
    if channels != speakers:
        raise ValueError(f"{audio} has {channels} channels and --speakers {speakers} needs {speakers} "
                         "(channel i drives face i)")
    feeds = [AudioFeed(channel_blocks(audio, i, rate, max_duration_s)) for i in range(speakers)]
    return SpeakerFeeds(feeds, [f"{audio} (channel {i + 1})" for i in range(speakers)], rate)


def channel_count(path: str) -> int:
    """Channels of the file's first audio stream, from its header."""
    import av

    audio_duration(path)  # a missing, empty or non-audio file fails here with the reader's own message
    try:
        with av.open(path) as container:
            if not container.streams.audio:
                raise AudioReadError(path, "the file has no audio stream")
            return container.streams.audio[0].codec_context.channels
    except (av.error.FFmpegError, EOFError, OSError) as err:
        raise AudioReadError(path, f"not a recognised audio file (FFmpeg: {err})") from None


def channel_blocks(path: str, channel: int, rate: int, max_duration_s: float) -> Iterator[np.ndarray]:
    """One channel of a multi-channel file as mono float32 blocks at `rate` (FFmpeg decodes, planar
    float gives a row per channel, the project's resampler converts the rate)."""
    import av

    limit, produced = int(max_duration_s * rate) + 1, 0
    resampler: StreamResampler | None = None
    try:
        with av.open(path) as container:
            planar = av.AudioResampler(format="fltp")  # keeps the layout and rate: one row per channel
            for frame in container.decode(container.streams.audio[0]):
                for f in planar.resample(frame):
                    resampler = resampler or StreamResampler(PcmFormat(f.sample_rate), out_rate=rate)
                    block = resampler.process(f.to_ndarray()[channel])
                    if resampler.nonfinite_samples:
                        raise AudioReadError(path, "file contains NaN or infinite samples")
                    produced += block.size
                    if produced > limit:
                        raise AudioReadError(path, f"longer than the {max_duration_s:g} s allowed")
                    yield block
    except (av.error.FFmpegError, EOFError) as err:
        raise AudioReadError(path, f"decoding failed: {err} (truncated or corrupt?)") from None
    if resampler is not None:
        yield resampler.flush()
