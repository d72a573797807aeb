"""SynthDrive generation speed on one core (the floor it was built to: 30 frames/s at 512x256), per domain.

    python bench/bench_synthdrive.py [--frames 100]
"""
import argparse
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--frames", type=int, default=100)
    args = parser.parse_args(argv)
    import cv2

    cv2.setNumThreads(1)
    from sdca.data.synthdrive import GENERATOR_VERSION, generate_frame

    print(f"{GENERATOR_VERSION}, 512x256, one thread")
    for domain in ("sim", "real"):
        generate_frame(domain, "bench", 0)
        t0 = time.perf_counter()
        for i in range(args.frames):
            generate_frame(domain, "bench", i)
        fps = args.frames / (time.perf_counter() - t0)
        print(f"{domain:<5} {fps:7.1f} frames/s (target >= 30: {'met' if fps >= 30 else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
