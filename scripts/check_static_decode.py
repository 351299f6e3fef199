"""Check that the static-cache decode path gives the tokens of the dynamic (reference) path.

Runs the default engine on one device and dtype, greedy, end-of-sequence ignored, with the chunk
texts in the prompt and with the chunks as stored compressed contexts, single prompts and a
batch, and prints for each case whether the token ids are equal (and where they first differ).
On a CUDA device the static path uses the compiled (CUDA-graph) decode step.

    python scripts/check_static_decode.py --device cuda --dtype float32
    python scripts/check_static_decode.py --device cuda --dtype bfloat16

Exit status 0 when every case matches.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CHUNKS = [
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It was designed "
    "by the company of Gustave Eiffel and completed in 1889 for the World's Fair.",
    "Mount Kilimanjaro is a dormant volcano in Tanzania. With its summit about 5,895 metres above sea level, "
    "it is the highest mountain in Africa and the highest single free-standing mountain above sea level.",
]
QUESTIONS = ["When was the Eiffel Tower completed?", "How high is Mount Kilimanjaro?"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--new-tokens", type=int, default=48)
    args = ap.parse_args()

    from compressor_plugin.engine import CompressionEngine
    from compressor_plugin.generation import GenerationConfig, Generator
    from compressor_plugin.store import ContextStore

    tmp = tempfile.TemporaryDirectory()
    eng = CompressionEngine.from_pretrained(store=ContextStore(tmp.name), device=args.device, dtype=args.dtype)
    comp = eng.compressor
    static = Generator(comp.base, comp, cache="static")
    dynamic = Generator(comp.base, comp, cache="dynamic")
    markers = eng.mark(CHUNKS)
    prompts = {
        "text": [f"Context: {CHUNKS[0]}\n{CHUNKS[1]}\nQuestion: {q}\nAnswer:" for q in QUESTIONS],
        "chunks": [f"Context: {markers[0]}{markers[1]}\nQuestion: {q}\nAnswer:" for q in QUESTIONS],
    }
    cfg = GenerationConfig(max_new_tokens=args.new_tokens, ignore_eos=True)
    print(f"device {comp.base.device}, dtype {comp.base.dtype}, compiled static step: {static.compile}")
    ok = True
    for kind, texts in prompts.items():
        for label, run in (("single", lambda g, t: [g.generate(eng.resolve(x).segments, cfg) for x in t]),
                           ("batch", lambda g, t: g.generate_batch([eng.resolve(x).segments for x in t], cfg))):
            t0 = time.perf_counter()
            a = run(static, texts)
            t1 = time.perf_counter()
            b = run(dynamic, texts)
            t2 = time.perf_counter()
            for i, (x, y) in enumerate(zip(a, b)):
                same = x.token_ids == y.token_ids
                ok &= same
                first = next((j for j, (p, q) in enumerate(zip(x.token_ids, y.token_ids)) if p != q), None)
                print(f"{kind:6} {label:6} prompt {i}: {'equal' if same else f'DIFFER at token {first}'} "
                      f"({len(x.token_ids)} tokens; static {t1 - t0:.2f}s incl. any compilation, "
                      f"dynamic {t2 - t1:.2f}s)")
    tmp.cleanup()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
