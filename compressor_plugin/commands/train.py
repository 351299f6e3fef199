"""``compressor-plugin train``: pretrain / fine-tune a compressor, or plot a run's curves."""

from __future__ import annotations

import argparse
import json
import os


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a compressor (regeneration pretraining or QA fine-tuning)",
                       description="Train a compressor's LoRA adapter and memory embeddings; the decoder stays frozen. "
                                   "Resumes automatically when OUTPUT already holds a run. Runs under torchrun for DDP.")
    p.add_argument("--stage", choices=["regen", "qa", "mix"], required=True,
                   help="regen: regeneration pretraining; qa: QA fine-tuning; mix: regeneration, continuation and "
                        "QA steps in one run (shares set by --mix)")
    p.add_argument("--mode", choices=["kv", "embedding", "full-tuned"], default="kv",
                   help="kv (500xCompressor), embedding (ICAE baseline) or full-tuned (reference LoRA on the decoder)")
    p.add_argument("--k", type=int, default=16, help="compressed tokens per chunk")
    p.add_argument("--data", nargs="+", required=True, help="training JSONL files")
    p.add_argument("--val-data", nargs="*", default=[], help="validation JSONL files")
    p.add_argument("--output", required=True, help="run folder (checkpoint/, best/, log.jsonl, curves.png)")
    p.add_argument("--base", default="default", help="base model: 'default' or a Hugging Face id/folder")
    p.add_argument("--init", default=None, help="start from this checkpoint (e.g. the regen stage's best/)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant",
                   help="after the warm-up: constant (default, the paper's) or cosine, which decays to "
                        "--min-lr-ratio x --lr at --max-steps (needs --max-steps)")
    p.add_argument("--min-lr-ratio", type=float, default=0.1,
                   help="cosine schedule: the last step's learning rate as a share of --lr (default 0.1)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--max-minutes", type=float, default=None, help="stop (and save) after this long")
    p.add_argument("--max-tokens", type=int, default=512, help="chunk length cap for the encoder")
    p.add_argument("--max-target-tokens", type=int, default=384, help="regeneration target cap")
    p.add_argument("--max-chunks", type=int, default=3, help="QA: up to this many chunks per prompt")
    p.add_argument("--layouts", default="plain,fewshot,chat", help="QA prompt layouts to train on")
    p.add_argument("--mix", default="regen=0.2,continue=0.3,qa=0.5",
                   help="mix stage: share of steps per task, TASK=WEIGHT with TASK in regen, continue, qa, cloze "
                        "(default regen=0.2,continue=0.3,qa=0.5; without a cloze share, cloze questions join qa)")
    p.add_argument("--continue-tokens", type=int, default=128, help="continuation target length (default 128)")
    p.add_argument("--cloze-per-text", type=int, default=0,
                   help="mix stage: cloze questions on names, numbers and dates generated per corpus text (default 0)")
    p.add_argument("--verify-share", type=float, default=0.0,
                   help="mix stage: share of those detail questions asked as yes/no checks of a sentence as the "
                        "text has it or with its name/number swapped (answers 'yes'/'no'; default 0)")
    p.add_argument("--distill", type=float, default=0.0,
                   help="QA steps: weight of the KL to the frozen model reading the full text, against CE on the "
                        "gold answer (0 = gold only, 1 = teacher only; default 0)")
    p.add_argument("--continue-distill", type=float, default=0.0,
                   help="mix stage, continuation steps: weight of the KL to the frozen model reading the whole "
                        "text over the continuation, against CE on the text itself (0 = text only, 1 = teacher "
                        "only; default 0)")
    p.add_argument("--teacher-targets", type=float, default=0.0,
                   help="QA steps: share of samples trained on the frozen model's own full-text answer (generated "
                        "once, greedy, 3-shot layout; cached in the run folder) instead of the gold answer (default 0)")
    p.add_argument("--anchors", type=int, default=0,
                   help="QA steps: up to this many question-anchor tokens per chunk after its slots, chosen "
                        "(and shared by relevance across a prompt's chunks) as the engine does at answer time; "
                        "the embedding mode anchors one-chunk steps only (default 0: none)")
    p.add_argument("--window-share", type=float, default=0.0,
                   help="with --anchors: share of each chunk's anchors that the question's best sentence may take "
                        "verbatim (the engine's sentence window); the shipped compressors were trained with 0, "
                        "spans only (default 0)")
    p.add_argument("--anchor-workers", type=int, default=0,
                   help="with --anchors: processes that choose each step's new anchors beside the training "
                        "process (the same ids; for large batches, where choosing them on one core would "
                        "leave the GPU waiting; default 0: the training process)")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--target-modules", default="q_proj,v_proj")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="read at most this many rows per file")
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--val-samples", type=int, default=128)
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute the frozen MLP blocks in the backward pass (less activation memory, more compute; "
                        "for models of 1B parameters and more)")
    p.add_argument("--fused-kernels", action="store_true",
                   help="Liger's fused Triton kernels for RMSNorm, rotary and the MLP (CUDA; pip install "
                        "'compressor-plugin[fast]'): the same functions in fewer kernels, up to rounding")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run)

    w = sub.add_parser("train-questions", help="write training questions about any corpus (model-written or cloze)",
                       description="Write QA rows about the texts of corpus files, for `train --data`: questions the "
                                   "frozen model writes itself and answers from the full text (--kind written: "
                                   "distillation targets for agreement with the full-text answer), or cloze and "
                                   "yes/no questions on names, numbers and dates (--kind cloze, no model). "
                                   "Appends to OUTPUT; running the same command again resumes.")
    w.add_argument("--input", nargs="+", required=True, metavar="FILE",
                   help="JSONL files: corpus rows ('text') or QA rows (their 'context')")
    w.add_argument("--output", required=True, metavar="OUT.jsonl", help="QA rows are appended here")
    w.add_argument("--kind", choices=["written", "cloze"], default="written")
    w.add_argument("--per-text", type=int, default=2, help="questions per text (default 2)")
    w.add_argument("--attempts", type=int, default=2,
                   help="written: samples per wanted question; unparsable or repeated ones are dropped (default 2)")
    w.add_argument("--any-answer", action="store_true",
                   help="written: keep every answered question; by default only those whose answer is words of the "
                        "text (grounded, as extractive QA)")
    w.add_argument("--verify-share", type=float, default=0.0, help="cloze: share asked as yes/no checks (default 0)")
    w.add_argument("--max-tokens", type=int, default=192,
                   help="cut each text to this many tokens first, as training's --max-tokens (default 192)")
    w.add_argument("--limit", type=int, default=None, metavar="N", help="first N distinct texts")
    w.add_argument("--base", default="default", help="base model: 'default' or a Hugging Face id/folder")
    w.add_argument("--device", default=None)
    w.add_argument("--dtype", default=None)
    w.add_argument("--batch-size", type=int, default=64, help="prompts per generation batch (default 64)")
    w.add_argument("--temperature", type=float, default=0.8, help="written: sampling temperature (default 0.8)")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--no-progress", action="store_true", help="no progress bar")
    w.set_defaults(func=_questions)

    q = sub.add_parser("train-plot", help="plot a training run's loss curves to PNG")
    q.add_argument("log", help="log.jsonl of a run")
    q.add_argument("--output", required=True, help="PNG path")
    q.set_defaults(func=_plot)


def _run(args: argparse.Namespace) -> int:
    from ..training import TrainConfig, train
    from ..training.trainer import parse_mix

    cfg = TrainConfig(stage=args.stage, mode=args.mode, k=args.k, data=args.data, val_data=args.val_data,
                      output=args.output, base=args.base, init=args.init, lr=args.lr, warmup_steps=args.warmup_steps,
                      lr_schedule=args.lr_schedule, min_lr_ratio=args.min_lr_ratio,
                      batch_size=args.batch_size, max_steps=args.max_steps, max_minutes=args.max_minutes,
                      max_tokens=args.max_tokens, max_target_tokens=args.max_target_tokens,
                      max_chunks=args.max_chunks, layouts=[s for s in args.layouts.split(",") if s],
                      lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                      target_modules=[s for s in args.target_modules.split(",") if s], device=args.device,
                      seed=args.seed, limit=args.limit, log_every=args.log_every, eval_every=args.eval_every,
                      save_every=args.save_every, val_samples=args.val_samples, mix=parse_mix(args.mix),
                      continue_tokens=args.continue_tokens, cloze_per_text=args.cloze_per_text,
                      verify_share=args.verify_share,
                      distill=args.distill, continue_distill=args.continue_distill,
                      teacher_targets=args.teacher_targets, anchors=args.anchors,
                      window_share=args.window_share, anchor_workers=args.anchor_workers,
                      gradient_checkpointing=args.gradient_checkpointing, fused_kernels=args.fused_kernels)
    if cfg.max_steps is None and cfg.max_minutes is None:
        raise ValueError("give --max-steps or --max-minutes")
    summary = train(cfg, progress=not args.no_progress)
    if summary:
        print(json.dumps(summary, indent=2))
    return 0


def _questions(args: argparse.Namespace) -> int:
    from ..training.questions import write_question_file

    for path in args.input:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"input not found: {path}")
    if args.per_text < 1 or args.attempts < 1 or args.batch_size < 1:
        raise ValueError("--per-text, --attempts and --batch-size must be at least 1")
    if args.limit is not None and args.limit < 1:
        raise ValueError("--limit must be at least 1")
    base = tokenizer = None
    if args.kind == "written":
        from ..models import load_base_model

        base = load_base_model(None if args.base == "default" else args.base, device=args.device, dtype=args.dtype)
    else:
        from ..models import ensure_default_model, load_tokenizer

        tokenizer = load_tokenizer(ensure_default_model() if args.base == "default" else args.base)
    stats = write_question_file(args.input, args.output, kind=args.kind, base=base, tokenizer=tokenizer,
                                per_text=args.per_text, attempts=args.attempts, verify_share=args.verify_share,
                                max_tokens=args.max_tokens, limit=args.limit, batch_size=args.batch_size,
                                temperature=args.temperature, seed=args.seed, span_answers=not args.any_answer,
                                progress=not args.no_progress)
    print(json.dumps(stats))
    return 0


def _plot(args: argparse.Namespace) -> int:
    from ..training.plots import plot_log

    print(plot_log(args.log, args.output))
    return 0
