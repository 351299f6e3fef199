"""``compressor-plugin bench``: latency, throughput and size benchmarks."""

from __future__ import annotations

import argparse
import json
import sys

from .eval import int_list

#: the systems of ``bench generate`` (compressor_plugin.evaluation.bench.GENERATE_SYSTEMS; repeated here so
#: ``--help`` does not import torch)
GENERATE_SYSTEMS = ("engine-text-static", "engine-text-dynamic", "engine-chunks-static", "engine-chunks-dynamic",
                    "hf-dynamic", "hf-static")


def _device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA when available)")
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: bf16 on GPU, fp32 on CPU)")


def _compressor_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default="default",
                   help="compressor checkpoint folder or shipped name (default: 'default'; an untrained kv k=16 "
                        "compressor when it is not available: timings depend on shapes only)")
    p.add_argument("--k", type=int, default=None, help="use an UNTRAINED compressor with k compressed tokens")
    p.add_argument("--mode", choices=["kv", "embedding"], default="kv")


def _output_args(p: argparse.ArgumentParser, plot: bool = True) -> None:
    p.add_argument("--data", default=None,
                   help="JSONL file to cut chunks from (default: arxiv val abstracts or SQuAD contexts from "
                        "$COMPRESSOR_PLUGIN_DATA, ./shared/data or /work/shared/data; else bundled text)")
    p.add_argument("--output", default=None, help="result JSON file")
    if plot:
        p.add_argument("--plot", default=None, help="also write a PNG plot")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def register(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("bench", help="benchmarks: RAG latency, decode speed, compression throughput, store, disk size",
                       description="Latency, throughput and size benchmarks of compressed contexts.")
    bsub = b.add_subparsers(dest="bench_command", metavar="BENCH")
    bsub.required = True

    rag = bsub.add_parser(
        "rag", help="TTFT and latency: full text vs store hit vs compress on miss",
        description="For a RAG query over N chunks of T tokens, time to first token and end-to-end latency "
                    "(16 new tokens) with (a) the texts in the prompt, (b) compressed chunks already in a "
                    "ContextStore, (c) chunks compressed on a store miss; peak memory and prompt tokens.")
    rag.add_argument("--n", type=int_list, default=[1, 2, 4, 8], help="chunk counts (default 1,2,4,8)")
    rag.add_argument("--tokens", type=int_list, default=[128, 256, 512], help="chunk lengths (default 128,256,512)")
    rag.add_argument("--repeats", type=int, default=3, help="timed repeats per cell after a warm-up (default 3)")
    rag.add_argument("--max-new-tokens", type=int, default=16)
    rag.add_argument("--anchors", type=int, default=0,
                     help="anchor tokens per compressed chunk (default 0: the K/V alone; the engine's default is 32)")
    rag.add_argument("--static-prefill", action="store_true",
                     help="answer with the captured prefill (Generator(static_prefill=True); on a GPU each new "
                          "shape compiles first, outside the timing)")
    rag.add_argument("--store-dir", default=None,
                     help="folder in which the benchmark makes its temporary store (default: the system temp dir); "
                          "existing stores there are not touched")
    _compressor_args(rag)
    _device_args(rag)
    _output_args(rag)
    rag.set_defaults(func=_rag)

    cp = bsub.add_parser(
        "compress", help="compression throughput (chunks/s, tokens/s, TFLOP/s) by batch size",
        description="Encoder throughput by batch size with a FLOP count: 2*P*B*S + 4*L*B*S^2*d "
                    "(see docs/evaluation.md).")
    cp.add_argument("--batch-sizes", type=int_list, default=[1, 8, 32, 128], help="default 1,8,32,128")
    cp.add_argument("--tokens", type=int, default=512, help="tokens per chunk (default 512)")
    cp.add_argument("--repeats", type=int, default=3, help="timed forwards per batch size (default 3)")
    cp.add_argument("--peak-tflops", type=float, default=None,
                    help="peak TFLOP/s for the fraction-of-peak column (default 989 = H200 bf16 dense on CUDA)")
    cp.add_argument("--merge-lora", action="store_true",
                    help="fold the LoRA into the weights while timing, as `cache build` does")
    _compressor_args(cp)
    _device_args(cp)
    _output_args(cp)
    cp.set_defaults(func=_compress)

    gn = bsub.add_parser(
        "generate", help="decode ms/token and time to first token: the engine vs transformers generate",
        description="One RAG prompt (N chunks of T tokens), answered with exactly --new-tokens greedy tokens by the "
                    "engine (chunk texts in the prompt, and stored compressed chunks; static and dynamic K/V cache) "
                    "and by plain transformers generate (dynamic cache, and cache_implementation='static', which "
                    "transformers compiles on a GPU), in the same run. Prints a markdown table; writes JSON "
                    "(--output), the table (--table) and a plot (--plot).")
    gn.add_argument("--n", type=int, default=4, help="chunks in the prompt (default 4)")
    gn.add_argument("--tokens", type=int, default=512, help="tokens per chunk (default 512)")
    gn.add_argument("--new-tokens", type=int, default=64, help="tokens generated per answer (default 64)")
    gn.add_argument("--repeats", type=int, default=3, help="timed runs per system after a warm-up (default 3)")
    gn.add_argument("--systems", default=",".join(GENERATE_SYSTEMS),
                    help=f"comma-separated subset of {','.join(GENERATE_SYSTEMS)}")
    gn.add_argument("--no-compile", action="store_true",
                    help="engine static cache without the compiled (CUDA-graph) decode step")
    gn.add_argument("--table", default=None, help="also write the markdown table to this file")
    _compressor_args(gn)
    _device_args(gn)
    _output_args(gn)
    gn.set_defaults(func=_generate)

    st = bsub.add_parser("store", help="store hit path: read + verify one stored chunk",
                         description="Runs compressor_plugin.evaluation.bench_store.bench_hit_path.")
    st.add_argument("--n", type=int, default=200, help="chunks to store and read (default 200)")
    st.add_argument("--k", type=int, default=16)
    st.add_argument("--tokens", type=int, default=512, help="source tokens for the full-K/V comparison")
    st.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    st.add_argument("--dir", default=None, help="store folder (default: a temporary one)")
    st.add_argument("--output", default=None, help="result JSON file")
    st.set_defaults(func=_store)

    dk = bsub.add_parser("disk", help="bytes per stored chunk vs the full K/V of the same text",
                         description="Stored bytes of compressed chunks (k=1,4,16; kv and embedding) against the "
                                     "exact K/V of the same text, for several chunk lengths.")
    dk.add_argument("--ks", type=int_list, default=[1, 4, 16], help="default 1,4,16")
    dk.add_argument("--modes", default="kv,embedding", help="default kv,embedding")
    dk.add_argument("--tokens", type=int_list, default=[128, 256, 512], help="default 128,256,512")
    _device_args(dk)
    _output_args(dk, plot=False)
    dk.set_defaults(func=_disk)

    sc = bsub.add_parser(
        "scale", help="training and serving cost on random models with the shapes of 1B-8B checkpoints",
        description="Randomly initialised models with the shapes of Llama-3.2-1B, Qwen2.5-3B and Llama-3.1-8B "
                    "(bf16, frozen base, LoRA r=16 on q_proj,v_proj): training samples/s and peak memory of the "
                    "real training step (regeneration and QA at the shipped recipe's lengths, with and without "
                    "gradient checkpointing), compression chunks/s (512 tokens), stored bytes per chunk (k=16) "
                    "and one store-hit answer. Writes scale.json and scale.md to --out.")
    sc.add_argument("--shapes", default="llama-1b,qwen-3b,llama-8b",
                    help="comma-separated: llama-1b, qwen-3b, llama-8b, smollm2-135m, tiny (default: the first three)")
    sc.add_argument("--batch-size", type=int_list, default=[32],
                    help="training batch sizes, comma-separated (default 32, the recipe's)")
    sc.add_argument("--fused-kernels", action="store_true",
                    help="Liger's fused Triton kernels in the training step (CUDA; the [fast] extra)")
    sc.add_argument("--training-only", action="store_true",
                    help="skip the compression throughput and store-hit measurements")
    sc.add_argument("--steps", type=int, default=5, help="timed training steps per stage and setting (default 5)")
    sc.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    sc.add_argument("--stages", default="regen,qa", help="default regen,qa")
    sc.add_argument("--checkpointing", choices=["both", "on", "off"], default="both",
                    help="gradient checkpointing settings to measure (default both)")
    sc.add_argument("--compress-batch-sizes", type=int_list, default=[1, 16, 64], help="default 1,16,64")
    sc.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA when available)")
    sc.add_argument("--out", required=True, help="folder for scale.json and scale.md")
    sc.set_defaults(func=_scale)


def _write(result: dict, args: argparse.Namespace) -> None:
    from ..evaluation.report import write_json

    if getattr(args, "output", None):
        print(f"\nwrote {write_json(args.output, result)}", file=sys.stderr)


def _rag(args: argparse.Namespace) -> int:
    from ..evaluation.bench import bench_rag, rag_table
    from ..evaluation.plots import plot_rag

    result = bench_rag(args.n, args.tokens, checkpoint=args.checkpoint, k=args.k, mode=args.mode,
                       repeats=args.repeats, max_new_tokens=args.max_new_tokens, device=args.device,
                       dtype=args.dtype, data=args.data, store_dir=args.store_dir, progress=not args.no_progress,
                       anchors=args.anchors, static_prefill=args.static_prefill)
    print(rag_table(result))
    print(f"\n{result['config']['memory_note']}")
    _write(result, args)
    if args.plot:
        print(f"wrote {plot_rag(result, args.plot)}", file=sys.stderr)
    return 0


def _compress(args: argparse.Namespace) -> int:
    from ..evaluation.bench import bench_compress, compress_table
    from ..evaluation.plots import plot_compress

    result = bench_compress(args.batch_sizes, args.tokens, checkpoint=args.checkpoint, k=args.k, mode=args.mode,
                            repeats=args.repeats, peak_tflops=args.peak_tflops, device=args.device,
                            dtype=args.dtype, data=args.data, progress=not args.no_progress,
                            merge_lora=args.merge_lora)
    print(compress_table(result))
    print(f"\nFLOPs per batch: {result['config']['flops_formula']}")
    _write(result, args)
    if args.plot:
        print(f"wrote {plot_compress(result, args.plot)}", file=sys.stderr)
    return 0


def _generate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..evaluation.bench import bench_generate, generate_table, plot_generate

    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    result = bench_generate(args.n, args.tokens, args.new_tokens, repeats=args.repeats, systems=systems,
                            checkpoint=args.checkpoint, k=args.k, mode=args.mode, device=args.device,
                            dtype=args.dtype, data=args.data, compile=False if args.no_compile else None,
                            progress=not args.no_progress)
    table = generate_table(result)
    print(table)
    print(f"\n{result['config']['timing']}")
    _write(result, args)
    if args.table:
        Path(args.table).write_text(table + "\n")
        print(f"wrote {args.table}", file=sys.stderr)
    if args.plot:
        print(f"wrote {plot_generate(result, args.plot)}", file=sys.stderr)
    return 0


def _store(args: argparse.Namespace) -> int:
    from ..evaluation.bench import bench_store

    result = bench_store(args.n, k=args.k, tokens=args.tokens, dtype=args.dtype, directory=args.dir)
    print(json.dumps(result["result"], indent=2, default=str))
    _write(result, args)
    return 0


def _disk(args: argparse.Namespace) -> int:
    from ..evaluation.bench import bench_disk, disk_table

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    result = bench_disk(args.ks, modes, args.tokens, device=args.device, dtype=args.dtype, data=args.data,
                        progress=not args.no_progress)
    print(disk_table(result))
    _write(result, args)
    return 0


def _scale(args: argparse.Namespace) -> int:
    from ..evaluation.bench_scale import ScaleSettings, bench_scale, scale_table, write_scale

    ckpt = {"both": (False, True), "on": (True,), "off": (False,)}[args.checkpointing]
    settings = ScaleSettings(batch_sizes=tuple(args.batch_size), fused_kernels=args.fused_kernels,
                             serving=not args.training_only, steps=args.steps, warmup=args.warmup,
                             stages=tuple(s for s in args.stages.split(",") if s), checkpointing=ckpt,
                             compress_batch_sizes=tuple(args.compress_batch_sizes))
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    result = bench_scale(shapes, device=args.device, settings=settings)
    js, md = write_scale(result, args.out)
    print(scale_table(result))
    print(f"\nwrote {js} and {md}", file=sys.stderr)
    return 0
