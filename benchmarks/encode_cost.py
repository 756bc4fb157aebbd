"""What recording costs per frame: OpenCV's mp4v writer (the recorder before issue 13) against
H.264 (libx264, zerolatency tune) in fragmented MP4 at three presets, at 640x480 and 1280x720.

    .venv/bin/python benchmarks/encode_cost.py [--frames 300] [--rounds 3] [--threads 1 0]

Frames are the sample clip's (camface.realtime.sample) with camera-like sensor noise added
(Gaussian, sigma `--noise` grey levels, a fixed seed), drawn before timing. Each round writes
every configuration once, in rotating order, through the writers `VideoSink` uses,
so load on a shared machine hits all alike. Prints, per configuration, the median over rounds
of: the median wall time of one `write()` (what the writer thread spends per frame), the CPU
time per frame over all threads (encoder threads included; what the rest of the live loop
loses on a machine with few cores), and the bit rate.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

SIZES = ((640, 480), (1280, 720))
PRESETS = ("ultrafast", "superfast", "veryfast")
FPS = 30.0


def clip(size: tuple[int, int], frames: int, noise: float) -> list[np.ndarray]:
    from camface.realtime.sample import SampleSource

    sample = SampleSource(frames=frames, size=size)
    rng = np.random.default_rng(0)
    out = []
    for index in range(frames):
        frame = sample.frame(index).astype(np.float32)
        frame += rng.normal(0.0, noise, frame.shape).astype(np.float32)
        out.append(np.clip(frame, 0, 255).astype(np.uint8))
    return out


def write_once(frames: list[np.ndarray], path: Path, preset: str | None, threads: int) -> dict:
    """Write `frames` with mp4v (preset None) or libx264 at `preset`; times and size."""
    from camface.realtime.fmp4 import H264Writer
    from camface.realtime.sinks import Mp4vWriter

    size = (frames[0].shape[1], frames[0].shape[0])
    writer = (Mp4vWriter(path, FPS, size) if preset is None else  # libx264 even where NVENC opens
              H264Writer(path, FPS, size, "libx264", {"preset": preset, "threads": str(threads)}))
    per_frame = []
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    for frame in frames:
        started = time.perf_counter()
        writer.write(frame)
        per_frame.append(time.perf_counter() - started)
    writer.close()
    wall, cpu = time.perf_counter() - wall_start, time.process_time() - cpu_start
    return {"write_ms": 1000 * statistics.median(per_frame), "wall_ms": 1000 * wall / len(frames),
            "cpu_ms": 1000 * cpu / len(frames), "mbit_s": path.stat().st_size * 8 / 1e6 / (len(frames) / FPS)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--frames", type=int, default=300, help="frames per file (10 s at 30 fps)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians over rounds")
    parser.add_argument("--noise", type=float, default=3.0, help="sensor noise, grey levels (sigma)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 0],
                        help="libx264 threads (0 = auto; recordings use 1)")
    args = parser.parse_args(argv)
    import cv2

    cv2.setNumThreads(1)  # as the live loop runs OpenCV
    configs = [("mp4v (OpenCV)", None, 0)] + [(f"libx264 {p}, threads {t or 'auto'}", p, t)
                                              for p in PRESETS for t in args.threads]
    with tempfile.TemporaryDirectory() as folder:
        for size in SIZES:
            frames = clip(size, args.frames, args.noise)
            results = {name: [] for name, *_ in configs}
            for round_index in range(args.rounds):
                shift = round_index % len(configs)
                for name, preset, threads in configs[shift:] + configs[:shift]:
                    results[name].append(write_once(frames, Path(folder) / "out.mp4", preset, threads))
            print(f"\n{size[0]}x{size[1]}, {args.frames} frames, {args.rounds} rounds (medians)")
            print(f"{'writer':32s} {'write() ms':>10s} {'wall ms/f':>10s} {'CPU ms/f':>9s} {'Mbit/s':>7s}")
            for name, runs in results.items():
                med = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
                print(f"{name:32s} {med['write_ms']:10.2f} {med['wall_ms']:10.2f} {med['cpu_ms']:9.2f} "
                      f"{med['mbit_s']:7.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
