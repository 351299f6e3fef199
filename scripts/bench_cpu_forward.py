"""The default model's forward on the CPU, by dtype and prompt length, and its output head on the
last position laid out two ways; for comparing thread settings (set them before this runs):

    OMP_WAIT_POLICY=PASSIVE python scripts/bench_cpu_forward.py
    GOMP_SPINCOUNT=10000 python scripts/bench_cpu_forward.py

Prints the median and fastest of 7 timed runs (after 2 warm-ups) in milliseconds.
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F


def timed(fn, runs: int = 7) -> tuple[float, float]:
    for _ in range(2):
        fn()
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3, min(ts) * 1e3


def main() -> None:
    from compressor_plugin.models import load_base_model

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for dtype in (torch.float32, torch.bfloat16):
        lm = load_base_model(device="cpu", dtype=dtype).model.eval()
        with torch.inference_mode():
            for n in (1, 60):
                ids = torch.randint(100, 10000, (1, n))
                med, best = timed(lambda: lm.model(ids))
                print(f"{str(dtype):15s} decoder body, {n:2d} positions: median {med:6.1f} ms, fastest {best:6.1f} ms")
            w = lm.lm_head.weight
            hidden = torch.randn(1, 13, w.shape[1]).to(dtype)
            strided = hidden[:, -1:, :]  # what logits_to_keep=1 hands the head
            plain = hidden[:, torch.tensor([12]), :]  # what an index tensor hands it
            for name, h in (("strided slice", strided), ("plain copy", plain)):
                med, best = timed(lambda: F.linear(h, w))
                print(f"{str(dtype):15s} output head, last position as a {name}: median {med:6.1f} ms, fastest {best:6.1f} ms")


if __name__ == "__main__":
    main()
