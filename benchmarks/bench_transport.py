"""What the worker -> gateway hop costs per frame: the protocol's encoding (app/workers/protocol.py)
through a `multiprocessing` pipe between two processes, as a local engine worker sends its frames.

For each size: `encode_us` and `decode_us` (one frame + its 1/25 s of 48 kHz PCM, in this process),
and the streamed figures: a spawned sender process encodes and sends `frames` frames as fast as the
pipe takes them while this process receives and decodes them; `per_frame_us` is wall time per frame,
`gateway_cpu_us` this (the gateway's) side's CPU time per frame, `mb_per_s` the payload rate. Prints JSON.

    python -m benchmarks.bench_transport --frames 500
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time

import numpy as np

SIZES = ((128, 128), (512, 512))
SAMPLES = 48_000 // 25


def _frame(h: int, w: int, pts: int = 0):
    from avatar.types import AvatarFrame, Timing

    rng = np.random.default_rng(pts)
    return AvatarFrame(video=rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
                       audio=rng.uniform(-1, 1, SAMPLES).astype(np.float32), sample_rate=48_000, pts=pts,
                       timing=Timing(0.0, 1.0, 100.0, 50.0, 200.0))


def _sender(conn, h: int, w: int, frames: int) -> None:
    from app.workers.protocol import encode_item

    frame = _frame(h, w)
    conn.recv()  # go
    for _ in range(frames):
        conn.send_bytes(encode_item(1, 0, frame, time.monotonic()))
    conn.close()


def _timed(fn, repeats: int) -> float:
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats * 1e6


def run(frames: int = 500) -> dict:
    from app.workers.protocol import decode_output, encode_item

    out = {"benchmark": "transport", "transport": "multiprocessing Pipe (spawn), struct header + raw bytes",
           "frames": frames, "cpu_count": os.cpu_count(), "sizes": {}}
    ctx = multiprocessing.get_context("spawn")
    for h, w in SIZES:
        frame = _frame(h, w)
        message = encode_item(1, 0, frame, 0.0)
        row = {"message_bytes": len(message),
               "encode_us": round(_timed(lambda: encode_item(1, 0, frame, 0.0), 200), 1),
               "decode_us": round(_timed(lambda: decode_output(message), 200), 1)}
        here, there = ctx.Pipe()
        proc = ctx.Process(target=_sender, args=(there, h, w, frames))
        proc.start()
        there.close()
        here.send("go")
        cpu0, t0 = time.process_time(), time.perf_counter()
        got = 0
        while got < frames:
            out_msg = decode_output(here.recv_bytes())
            assert out_msg.item.video.shape == (h, w, 3)
            got += 1
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        proc.join(10)
        row.update(per_frame_us=round(wall / frames * 1e6, 1), gateway_cpu_us=round(cpu / frames * 1e6, 1),
                   mb_per_s=round(len(message) * frames / wall / 1e6, 1),
                   fps_one_pipe=round(frames / wall, 1))
        out["sizes"][f"{h}x{w}"] = row
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=500)
    print(json.dumps(run(parser.parse_args().frames), indent=2))


if __name__ == "__main__":
    main()
