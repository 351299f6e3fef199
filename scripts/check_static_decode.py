"""Check that the static-cache paths give the tokens of the dynamic (reference) path, and time their first token.

Runs the default engine on one device and dtype, greedy, end-of-sequence ignored, with the chunk
texts in the prompt, with the chunks as stored compressed contexts and with a prompt of more
than 512 text tokens (prefilled eagerly), single prompts and a batch, and prints for each case
whether the token ids are equal (and where they first differ). Two static generators are
checked: one with ``static_prefill=True`` (on a CUDA device: the captured prefill straight into
the static cache and the compiled decode step) and the default one (``static_prefill=False``:
eager prefill, copied into the static cache). Then it prints the median time to the first token of a stored-chunk prompt
for the three generators, after warm-up.

    python scripts/check_static_decode.py --device cuda --dtype float32
    python scripts/check_static_decode.py --device cuda --dtype bfloat16

Exit status 0 when every case matches (and, on a GPU, the compiled forward never failed).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CHUNKS = [
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It was designed "
    "by the company of Gustave Eiffel and completed in 1889 for the World's Fair. Locally nicknamed the iron "
    "lady, it was first criticised by some of France's leading artists and intellectuals for its design, but "
    "it has become a global cultural icon of France and one of the most recognisable structures in the world.",
    "Mount Kilimanjaro is a dormant volcano in Tanzania. With its summit about 5,895 metres above sea level, "
    "it is the highest mountain in Africa and the highest single free-standing mountain above sea level. "
    "It has three volcanic cones, Kibo, Mawenzi and Shira, and the first people known to reach its summit "
    "were Hans Meyer and Ludwig Purtscheller in 1889. It is part of Kilimanjaro National Park.",
]
QUESTIONS = ["When was the Eiffel Tower completed?", "How high is Mount Kilimanjaro?"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=10, help="timed first-token runs per generator")
    args = ap.parse_args()

    import warnings

    from compressor_plugin.engine import CompressionEngine
    from compressor_plugin.generation import GenerationConfig, Generator
    from compressor_plugin.store import ContextStore

    tmp = tempfile.TemporaryDirectory()
    eng = CompressionEngine.from_pretrained(store=ContextStore(tmp.name), device=args.device, dtype=args.dtype)
    comp = eng.compressor
    gens = {
        "static": Generator(comp.base, comp, cache="static", static_prefill=True),
        "static, eager prefill": Generator(comp.base, comp, cache="static", static_prefill=False),
        "dynamic": Generator(comp.base, comp, cache="dynamic"),
    }
    static = gens["static"]
    markers = eng.mark(CHUNKS)
    long_text = " ".join(CHUNKS * 8)  # more than 512 text tokens: the eager prefill in every generator
    prompts = {
        "text": [f"Context: {CHUNKS[0]}\n{CHUNKS[1]}\nQuestion: {q}\nAnswer:" for q in QUESTIONS],
        "chunks": [f"Context: {markers[0]}{markers[1]}\nQuestion: {q}\nAnswer:" for q in QUESTIONS],
        "long": [f"Context: {long_text}\nQuestion: {q}\nAnswer:" for q in QUESTIONS],
    }
    cfg = GenerationConfig(max_new_tokens=args.new_tokens, ignore_eos=True)
    layout = static._layout(eng.resolve(prompts["chunks"][0]).segments)
    print(f"device {comp.base.device}, dtype {comp.base.dtype}, compiled forward: {static.compile}, "
          f"captured prefill of a stored-chunk prompt: {static._step.active(comp.base.device)} "
          f"({len(layout.ids)} text inputs, {layout.cached} stored slots)")
    if not layout.cached:
        raise SystemExit("the chunks stayed text (short-chunk rule): nothing stored to check")
    ok = True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for kind, texts in prompts.items():
            segments = [eng.resolve(x).segments for x in texts]
            for label, run in (("single", lambda g: [g.generate(s, cfg) for s in segments]),
                               ("batch", lambda g: g.generate_batch(segments, cfg))):
                times, results = {}, {}
                for name, gen in gens.items():
                    t0 = time.perf_counter()
                    results[name] = run(gen)
                    times[name] = time.perf_counter() - t0
                for name in list(gens)[:2]:
                    for i, (x, y) in enumerate(zip(results[name], results["dynamic"])):
                        same = x.token_ids == y.token_ids
                        ok &= same
                        first = next((j for j, (p, q) in enumerate(zip(x.token_ids, y.token_ids)) if p != q), None)
                        print(f"{kind:6} {label:6} prompt {i} {name:22}: "
                              f"{'equal' if same else f'DIFFER at token {first}'} ({len(x.token_ids)} tokens, "
                              f"{x.prompt_tokens} positions; {times[name]:.2f}s incl. any compilation, "
                              f"dynamic {times['dynamic']:.2f}s)")
    for w in caught:
        if "compiled forward failed" in str(w.message):
            ok = False
        print(f"warning: {w.category.__name__}: {w.message}")

    # time to the first token of a stored-chunk prompt (the shapes are compiled above)
    segments = eng.resolve(prompts["chunks"][0]).segments
    one = GenerationConfig(max_new_tokens=2, ignore_eos=True)
    ttft = {name: [] for name in gens}
    for _ in range(args.repeats):
        for name, gen in gens.items():  # in turns, so drifts hit all three alike
            ttft[name].append(gen.generate(segments, one).ttft_s)
    print("time to first token, stored-chunk prompt (median of "
          f"{args.repeats}): " + ", ".join(f"{name} {statistics.median(v) * 1e3:.1f} ms" for name, v in ttft.items()))
    tmp.cleanup()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
