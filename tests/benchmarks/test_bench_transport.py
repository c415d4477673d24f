"""benchmarks/bench_transport.py: the worker -> gateway hop at 128x128 and 512x512, as JSON."""

from __future__ import annotations

from benchmarks import bench_transport


def test_the_transport_benchmark_measures_both_sizes():
    report = bench_transport.run(frames=20)
    assert report["benchmark"] == "transport" and set(report["sizes"]) == {"128x128", "512x512"}
    for size, row in report["sizes"].items():
        h, w = map(int, size.split("x"))
        # one message: the header, the frame's pixels and its 1/25 s of float32 PCM at 48 kHz
        assert h * w * 3 + 4 * bench_transport.SAMPLES < row["message_bytes"] < h * w * 3 + 4 * bench_transport.SAMPLES + 128
        assert row["per_frame_us"] > 0 and row["gateway_cpu_us"] >= 0 and row["mb_per_s"] > 0
        assert row["encode_us"] > 0 and row["decode_us"] > 0
