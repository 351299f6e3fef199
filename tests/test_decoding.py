"""The static-cache decode path, batched prefill, prompt-length and text checks."""

from __future__ import annotations

import pytest
import torch

from compressor_plugin.compressor import Compressor, CompressorConfig, CompressorError
from compressor_plugin.generation import (GenerationConfig, Generator, InvalidTextError, PromptError,
                                          PromptTooLongError, TokenIds)

CTX = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
       "It was designed by the company of Gustave Eiffel and completed in 1889 for the World's Fair.")
OTHER = "Mount Kilimanjaro is a dormant volcano in Tanzania, the highest mountain in Africa."
QUESTION = "\nQuestion: When was the Eiffel Tower completed?\nAnswer:"


@pytest.fixture(scope="module")
def both(base):
    return Generator(base, cache="static"), Generator(base, cache="dynamic")


def _chunk_prompt(gen):
    a = gen.context_from_text(CTX)
    b = gen.context_from_text(OTHER)
    return ["Context: ", b, "\n\n", a, QUESTION]


def test_static_cache_is_the_default_and_compile_only_on_cuda(base):
    gen = Generator(base)
    assert gen.cache == "static"
    assert gen.compile is False  # a CPU model: no CUDA graphs
    with pytest.raises(ValueError, match="cache"):
        Generator(base, cache="paged")
    with pytest.raises(ValueError, match="static"):
        Generator(base, cache="dynamic", compile=True)


@pytest.mark.parametrize("prompt", ["text", "chunks"])
def test_static_decode_equals_dynamic_greedy(both, prompt):
    static, dynamic = both
    segments = [CTX + QUESTION] if prompt == "text" else _chunk_prompt(dynamic)
    cfg = GenerationConfig(max_new_tokens=40, ignore_eos=True)
    a = static.generate(segments, cfg)
    b = dynamic.generate(segments, cfg)
    assert len(a.token_ids) == 40  # ignore_eos: the full length, so 40 decode steps are compared
    assert a.token_ids == b.token_ids
    assert a.text == b.text and a.prompt_tokens == b.prompt_tokens
    # the static path really ran: its cache went back to the pool
    assert sum(len(v) for v in static._pool._idle.values()) >= 1
    assert not dynamic._pool._idle


def test_static_cache_is_reused_and_not_shared_between_live_streams(both):
    static, _ = both
    static._pool.clear()
    s1 = static.stream([CTX + QUESTION], max_new_tokens=6, ignore_eos=True)
    s2 = static.stream(["The capital of France is"], max_new_tokens=6, ignore_eos=True)
    p1, p2 = [], []
    for _ in range(3):  # interleave the two streams
        p1.append(next(s1))
        p2.append(next(s2))
    p1 += list(s1)
    p2 += list(s2)
    assert "".join(p1) == static.generate([CTX + QUESTION], max_new_tokens=6, ignore_eos=True).text
    assert "".join(p2) == static.generate(["The capital of France is"], max_new_tokens=6, ignore_eos=True).text
    caches = [c for v in static._pool._idle.values() for c in v]
    assert len(caches) == 2 and caches[0] is not caches[1]  # two live streams held two caches
    before = {id(c) for c in caches}
    static.generate(["Hello"], max_new_tokens=3, ignore_eos=True)
    assert {id(c) for v in static._pool._idle.values() for c in v} == before  # reused, not reallocated


def test_static_stream_stop_strings_and_sampling(both):
    static, dynamic = both
    full = static.generate([CTX + QUESTION], max_new_tokens=20)
    assert "".join(static.stream([CTX + QUESTION], max_new_tokens=20)) == full.text
    stopped = static.generate([CTX + QUESTION], GenerationConfig(max_new_tokens=20, stop=["1889"]))
    assert "1889" not in stopped.text and stopped.finish_reason == "stop"
    cfg = GenerationConfig(max_new_tokens=12, temperature=0.8, top_p=0.9, seed=3, ignore_eos=True)
    s1, s2 = static.generate([CTX + QUESTION], cfg), static.generate([CTX + QUESTION], cfg)
    assert s1.token_ids == s2.token_ids  # seeded sampling is reproducible
    assert s1.token_ids == dynamic.generate([CTX + QUESTION], cfg).token_ids


def test_generate_batch_prefills_in_one_forward_and_matches_one_by_one(both, base):
    static, dynamic = both
    prompts = [_chunk_prompt(dynamic), [CTX + QUESTION], ["The capital of France is"],
               ["Context: ", dynamic.context_from_text(OTHER), "\nQuestion: Where is Kilimanjaro?\nAnswer:"]]
    lengths = []
    hook = base.model.register_forward_pre_hook(
        lambda mod, args, kwargs: lengths.append(
            (kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]).shape),
        with_kwargs=True)
    try:
        batch = static.generate_batch(prompts, max_new_tokens=12)
    finally:
        hook.remove()
    assert lengths[0][0] == len(prompts) and lengths[0][1] > 1  # one forward over all prompts
    assert all(shape[1] == 1 for shape in lengths[1:])  # then one token per row per step
    for gen in (static, dynamic):
        single = [gen.generate(p, max_new_tokens=12) for p in prompts]
        assert [r.token_ids for r in batch] == [r.token_ids for r in single]
        assert [r.prompt_tokens for r in batch] == [r.prompt_tokens for r in single]
    assert [r.token_ids for r in dynamic.generate_batch(prompts, max_new_tokens=12)] == \
        [r.token_ids for r in batch]


def test_batched_prefill_equals_single_prefill_logits(both):
    _, dynamic = both
    prompts = [_chunk_prompt(dynamic), ["A much shorter prompt"]]
    batch = dynamic._prefill_batch([dynamic._layout(p) for p in prompts])
    for row, p in enumerate(prompts):
        torch.testing.assert_close(batch.logits[row], dynamic.prefill(p).last_logits, atol=2e-4, rtol=1e-4)


def test_prompt_longer_than_the_model_is_refused(generator, tiny):
    limit = generator.max_positions
    assert limit == generator.base.model.config.max_position_embeddings
    with pytest.raises(PromptTooLongError, match=f"{limit + 5} positions.*{limit}"):
        generator.generate([TokenIds([42] * (limit + 5))], max_new_tokens=2)
    assert issubclass(PromptTooLongError, PromptError)
    # a prompt that fits but leaves little room: generation stops at the model's last position
    gen = Generator(tiny)
    old = tiny.model.config.max_position_embeddings
    tiny.model.config.max_position_embeddings = 12
    try:
        res = gen.generate([TokenIds([5] * 10)], max_new_tokens=20, ignore_eos=True)
        assert len(res.token_ids) == 3 and res.finish_reason == "length"  # positions 10 and 11 fed back
        with pytest.raises(PromptTooLongError):
            gen.generate([TokenIds([5] * 13)], max_new_tokens=1)
    finally:
        tiny.model.config.max_position_embeddings = old


def test_lone_surrogates_give_a_clear_error(generator, tiny_compressor):
    with pytest.raises(InvalidTextError, match=r"segment 1 of the prompt .*U\+D800"):
        generator.generate(["Context: ", "bad \ud800 text", QUESTION], max_new_tokens=2)
    with pytest.raises(InvalidTextError, match="prompt 1"):
        generator.generate_batch([["fine"], ["also \udcff bad"]], max_new_tokens=2)
    with pytest.raises(InvalidTextError, match="message 0"):
        generator.chat_segments([{"role": "user", "content": "x\udc80y"}])
    with pytest.raises(CompressorError, match=r"text 1 contains a lone surrogate U\+DC80"):
        tiny_compressor.compress(["good text", "broken \udc80 text"])


def test_compile_flag_is_ignored_off_cuda(tiny):
    gen = Generator(tiny, compile=True)
    assert gen.compile and not gen._step.active(tiny.device)
    assert gen._step.active(torch.device("cuda")) and not gen._step.active(torch.device("cuda"), 64)
    ref = Generator(tiny, cache="dynamic")
    assert gen.generate(["hello there"], max_new_tokens=5, ignore_eos=True).token_ids == \
        ref.generate(["hello there"], max_new_tokens=5, ignore_eos=True).token_ids


def test_compiled_forwards_are_one_graph_each_without_recompiles():
    """The prefill and the decode step trace as one graph each, reused across prompts of one
    bucket (CPU, eager backend): the graph depends on (batch, prefill bucket, cache bucket), not
    on the stored contexts' slots or the prompt's length."""
    from compressor_plugin import decoding
    from compressor_plugin.models import tiny_random_llama

    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    comp = Compressor(tiny_random_llama(seed=3), CompressorConfig(k=4, lora_r=4, max_length=64))
    gen = Generator(comp.base, comp, compile=True, static_prefill=True)
    gen._step = decoding.ForwardStep(True, backend=counting, mode=None, devices=("cpu",))
    ref = Generator(comp.base, comp, cache="dynamic")
    ctx = comp.compress(["some chunk of text to compress"])[0]
    cfg = GenerationConfig(max_new_tokens=10, ignore_eos=True)
    try:
        for prompt in (["hello there, how are you"], ["Context: ", ctx, "\nQuestion: what?\nAnswer:"], ["short"]):
            assert gen.generate(prompt, cfg).token_ids == ref.generate(prompt, cfg).token_ids
        # one prefill bucket (32) and one cache bucket, batch 1: the prefill and the decode step
        # compiled once each, no graph breaks, no recompiles
        assert len(graphs) == 2
        prompts = [["hello there"], ["Context: ", ctx, "\nQ?"]]
        assert [r.token_ids for r in gen.generate_batch(prompts, cfg)] == \
            [r.token_ids for r in ref.generate_batch(prompts, cfg)]
        assert len(graphs) == 4  # batch 2: one more graph each
        assert not gen._step._failed
    finally:
        decoding._compiled_forwards.pop((counting, None), None)


def test_compiled_steps_run_on_one_thread_whoever_calls():
    """CUDA-graph state is per thread: every compiled step runs on one long-lived thread."""
    import threading

    from compressor_plugin.decoding import _StepThread

    worker = _StepThread()
    seen = []

    def job(x):
        seen.append((threading.current_thread().name, torch.is_grad_enabled()))
        if x < 0:
            raise KeyError("bad step")
        return x * 2

    results = []
    callers = [threading.Thread(target=lambda i=i: results.append(worker.run(job, i))) for i in range(4)]
    for t in callers:
        t.start()
    for t in callers:
        t.join(timeout=30)
    assert sorted(results) == [0, 2, 4, 6] and worker.run(job, 5) == 10
    assert {name for name, _ in seen} == {"compressor-plugin-decode"}
    assert not any(grad for _, grad in seen)  # steps run without autograd
    with pytest.raises(KeyError, match="bad step"):
        worker.run(job, -1)
    assert worker.run(job, 1) == 2  # the thread survives a failed step


def test_cache_buckets():
    from compressor_plugin.decoding import bucket_length

    assert [bucket_length(n) for n in (1, 256, 257, 700, 1024, 1025, 2100, 4096, 4097, 8192)] == \
        [256, 256, 512, 768, 1024, 2048, 4096, 4096, 8192, 8192]
    # at most 7 distinct cache lengths up to 8,192 positions: few compilations
    assert len({bucket_length(n) for n in range(1, 8193)}) == 7


def test_pool_keeps_only_small_batches(tiny):
    from compressor_plugin.decoding import StaticCachePool

    pool = StaticCachePool(tiny.model.config, max_idle=2, max_batch=2)
    small = pool.acquire(2, 256, torch.float32, torch.device("cpu"))
    big = pool.acquire(3, 256, torch.float32, torch.device("cpu"))
    pool.release(big)
    pool.release(small)
    assert pool.acquire(2, 256, torch.float32, torch.device("cpu")) is small
    assert pool.acquire(3, 256, torch.float32, torch.device("cpu")) is not big
    extra = [pool.acquire(1, 512, torch.float32, torch.device("cpu")) for _ in range(3)]
    for c in extra:
        pool.release(c)
    assert sum(len(v) for v in pool._idle.values()) == 2  # max_idle


def test_compile_default_follows_the_environment(tiny, monkeypatch):
    import compressor_plugin.generation as generation

    class Cuda:  # a BaseModel stand-in on a CUDA device (nothing runs)
        model, device = tiny.model, torch.device("cuda")

    monkeypatch.setattr(generation, "RotaryHelper", lambda model: None)
    assert Generator(Cuda(), cache="static").compile is True
    assert Generator(Cuda(), cache="dynamic").compile is False
    monkeypatch.setenv("COMPRESSOR_PLUGIN_COMPILE", "0")
    assert Generator(Cuda(), cache="static").compile is False
    assert Generator(Cuda(), cache="static", compile=True).compile is True


def test_every_thread_gets_cuda_graph_state():
    """The decode thread and the caller both get the CUDA-graph trees' thread-local state, so a
    compiled step on one thread does not break CUDA-graph functions (transformers' static
    generate, say) on another (torch <= 2.11 created it only in the importing thread)."""
    import threading

    from torch._inductor import cudagraph_trees as graphs

    from compressor_plugin.decoding import _StepThread, prepare_graph_tls

    def has_state():
        return all(hasattr(graphs.local, n) or torch._C._is_key_in_tls(n)
                   for n in ("tree_manager_containers", "tree_manager_locks"))

    prepare_graph_tls()
    assert has_state()
    seen = []
    fresh = threading.Thread(target=lambda: seen.append((has_state(), prepare_graph_tls(), has_state())))
    fresh.start()
    fresh.join(timeout=30)
    assert seen and seen[0][2]  # prepared in a plain thread
    assert _StepThread().run(has_state)  # the decode thread prepares itself


# ---------------------------------------------------------------------- static prefill
LONG_QUESTION = "\nQuestion: where is it, what is it made of, and who designed it? Say it in full." * 2 + "\nAnswer:"


@pytest.fixture(scope="module")
def tiny_static():
    """A tiny random Llama with a k=4 compressor: the static-prefill layout run eagerly, and the reference."""
    from compressor_plugin.models import tiny_random_llama

    comp = Compressor(tiny_random_llama(seed=5), CompressorConfig(k=4, lora_r=4, max_length=64))
    static = Generator(comp.base, comp, static_prefill=True)
    ref = Generator(comp.base, comp, cache="dynamic")
    a, b = comp.compress(["some chunk of text to compress", "another chunk, a little longer than the first one"])
    exact = ref.context_from_text(OTHER)  # one slot per token: a wider context
    prompts = [
        ["Context: ", a, "\nQuestion: what?\nAnswer:"],  # one context, a few inputs
        ["The capital of France is"],  # no context: C = 0 for this row
        ["Context: ", b, " and ", exact, a, LONG_QUESTION],  # three contexts, text between, > 32 inputs
    ]
    return static, ref, prompts


def _static_batch(gen, layouts, cfg):
    batch = gen._prefill_batch(layouts, cfg)
    assert batch.static  # the static-prefill path ran
    return batch


def test_static_prefill_layout(tiny_static):
    from compressor_plugin.decoding import bucket_length, prefill_bucket

    static, ref, prompts = tiny_static
    cfg = GenerationConfig(max_new_tokens=8, ignore_eos=True)
    layouts = [static._layout(p) for p in prompts]
    assert [prefill_bucket(len(lay.ids)) for lay in layouts] == [32, 32, 64]
    C = max(lay.cached for lay in layouts)
    batch = _static_batch(static, layouts, cfg)
    try:
        assert batch.slots == C + 64  # contexts, then the inputs left-padded to their bucket
        assert batch.cache.layers[0].max_cache_len == bucket_length(C + 64 + 7)
        assert int(batch.cache.layers[0].cumulative_length) == batch.slots  # decoding writes after the prompt
        for b, lay in enumerate(layouts):  # valid: the row's contexts, then its inputs at the end
            want = torch.zeros(batch.slots, dtype=torch.bool)
            want[:lay.cached] = True
            want[batch.slots - len(lay.ids):] = True
            assert torch.equal(batch.valid[b], want)
    finally:
        static._pool.release(batch.cache)


def test_static_prefill_equals_reference(tiny_static):
    """The static prefill (contexts written into a static cache, inputs left-padded to a bucket)
    gives the reference path's last logits and greedy tokens, single prompts and a padded batch."""
    static, ref, prompts = tiny_static
    cfg = GenerationConfig(max_new_tokens=24, ignore_eos=True)
    layouts = [static._layout(p) for p in prompts]
    for rows in ([0], [1], [2], [0, 1, 2]):
        lays = [layouts[r] for r in rows]
        batch = _static_batch(static, lays, cfg)
        static._pool.release(batch.cache)
        torch.testing.assert_close(batch.logits, ref._prefill_batch(lays).logits, atol=1e-5, rtol=1e-5)
    single = [ref.generate(p, cfg).token_ids for p in prompts]
    assert [static.generate(p, cfg).token_ids for p in prompts] == single
    assert [r.token_ids for r in static.generate_batch(prompts, cfg)] == single
    assert [r.token_ids for r in ref.generate_batch(prompts, cfg)] == single


def test_static_prefill_never_reads_padding_or_stale_slots(tiny_static):
    """Slots outside a row's prompt (context padding, input padding, past the prompt) are masked
    in the prefill and in every decode step: huge values planted there change nothing."""
    static, ref, prompts = tiny_static
    cfg = GenerationConfig(max_new_tokens=16, ignore_eos=True)
    layouts = [static._layout(p) for p in prompts]
    want = [r.token_ids for r in ref.generate_batch(prompts, cfg)]
    ref_logits = ref._prefill_batch(layouts).logits
    # a pooled cache full of stale values: the next answer of this shape reuses it
    batch = _static_batch(static, layouts, cfg)
    for layer in batch.cache.layers:
        layer.keys.fill_(1e4)
        layer.values.fill_(1e4)
    static._pool.release(batch.cache)
    batch = _static_batch(static, layouts, cfg)
    torch.testing.assert_close(batch.logits, ref_logits, atol=1e-5, rtol=1e-5)
    # after the prefill: poison every slot a row must not see, then decode
    hidden = torch.ones(len(layouts), batch.cache.layers[0].max_cache_len, dtype=torch.bool)
    hidden[:, :batch.slots] = ~batch.valid
    for layer in batch.cache.layers:
        layer.keys[hidden[:, None, :].expand(-1, layer.keys.shape[1], -1)] = 1e4
        layer.values[hidden[:, None, :].expand(-1, layer.values.shape[1], -1)] = 1e4
    rows = [[] for _ in layouts]
    for step in static._token_stream(batch, cfg):
        for b, t in enumerate(step):
            rows[b].append(t)
    assert rows == want


def test_static_prefill_is_chosen_in_one_place(tiny_static, tiny):
    static, ref, prompts = tiny_static
    cfg = GenerationConfig(max_new_tokens=4)
    lay = static._layout(prompts[0])
    assert static._static_prefill_cache([lay], None) is None  # no answer follows (Generator.prefill)
    long_lay = static._layout([TokenIds([7] * 513)])
    assert static._static_prefill_cache([long_lay], cfg) is None  # past the last bucket: eager
    assert static._static_prefill_cache([lay], GenerationConfig(max_new_tokens=0)) is None
    default = Generator(static.base, static.compressor)
    assert default.static_prefill is False and default._static_prefill_cache([lay], cfg) is None  # off by default
    off = Generator(static.base, static.compressor, compile=True, static_prefill=False)
    assert off._static_prefill_cache([lay], cfg) is None
    assert ref._static_prefill_cache([lay], cfg) is None  # the dynamic cache never
    with pytest.raises(ValueError, match="static"):
        Generator(tiny, cache="dynamic", static_prefill=True)
    cache = static._static_prefill_cache([lay], cfg)
    assert cache is not None
    static._pool.release(cache)


def test_placed_contexts_are_rotated_in_one_call_with_the_same_keys(tiny_static, monkeypatch):
    from compressor_plugin.generation import _slot_layout

    static, _, prompts = tiny_static
    layouts = [static._layout(p) for p in prompts]
    C = max(lay.cached for lay in layouts)
    _, slot_pos, _ = _slot_layout(layouts, C, 64, C + 64)
    calls = []
    rotate = static.rotary.rotate
    monkeypatch.setattr(static.rotary, "rotate", lambda *a: calls.append(1) or rotate(*a))
    kv = static._placed_kv(layouts, C, slot_pos[:, :C])
    assert len(calls) == 1  # four contexts in three rows, every layer: one rotation
    monkeypatch.undo()
    for b, lay in enumerate(layouts):
        if not lay.placed:
            assert all(not k[b].any() and not v[b].any() for k, v in kv)
            continue
        keys = torch.cat([ctx.keys_at(p, static.rotary) for ctx, p in lay.placed], dim=2)  # one context at a time
        values = torch.cat([ctx.values for ctx, _ in lay.placed], dim=2)
        for i, (k, v) in enumerate(kv):
            assert torch.equal(k[b, :, :lay.cached], keys[i]) and torch.equal(v[b, :, :lay.cached], values[i])
            assert not k[b, :, lay.cached:].any()


def test_failed_compilation_falls_back_with_one_warning(tiny_static):
    """A forward that fails to compile is rerun eagerly: one warning, the same tokens, no retry."""
    from compressor_plugin import decoding

    static, ref, prompts = tiny_static
    calls = []

    def broken(gm, example_inputs):
        calls.append(1)
        raise RuntimeError("no compiler here")

    gen = Generator(static.base, static.compressor, compile=True)
    gen._step = decoding.ForwardStep(True, backend=broken, mode=None, devices=("cpu",))
    cfg = GenerationConfig(max_new_tokens=10, ignore_eos=True)
    try:
        with pytest.warns(RuntimeWarning, match="compiled forward failed"):
            first = gen.generate(prompts[2], cfg)
        assert gen._step._failed and len(calls) == 1
        assert first.token_ids == ref.generate(prompts[2], cfg).token_ids
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert [r.token_ids for r in gen.generate_batch(prompts, cfg)] == \
                [r.token_ids for r in ref.generate_batch(prompts, cfg)]
        assert len(calls) == 1
    finally:
        decoding._compiled_forwards.pop((broken, None), None)


def test_last_position_keeps_the_last_logits_as_a_plain_tensor(tiny):
    """The eager prefill asks for the last position's logits by index: the same logits as
    ``logits_to_keep=1``, from a hidden state laid out plainly (torch's CPU bf16 linear is slow
    on the strided slice that the int gives)."""
    from compressor_plugin.generation import last_position

    assert last_position(1, "cpu") == 1
    idx = last_position(7, "cpu")
    assert isinstance(idx, torch.Tensor) and idx.tolist() == [6]
    ids = torch.randint(5, 100, (2, 7))
    with torch.no_grad():
        by_index = tiny.model(input_ids=ids, logits_to_keep=idx).logits
        by_int = tiny.model(input_ids=ids, logits_to_keep=1).logits
    assert by_index.shape == by_int.shape == (2, 1, tiny.model.config.vocab_size)
    assert torch.allclose(by_index, by_int, rtol=1e-5, atol=1e-6)  # the same up to the kernel's summation order
