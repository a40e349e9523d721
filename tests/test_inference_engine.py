"""The continuous-batching engine: batched greedy decoding equals one-at-a-time decoding, per-request sampling,
stop strings, cancellation, and its limits (slots, queue, context)."""
import threading

import pytest
import torch

from fixtures_inference import make_model_folder
from fixtures_time import limit
from inference.engine import Engine, QueueFull, SamplingParams

PROMPTS = ["Order 12", "the city of", "床前明月", "def f(x):", "Hello world and more words here", "a", "Order 9 of"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_model_folder(tmp_path_factory.mktemp("engine"))


def run_all(engine, requests):
    """Submit (ids, params) pairs at once and step the engine by hand until all are done."""
    reqs = [engine.submit(ids, params, lambda ev: None) for ids, params in requests]
    while not all(r.done for r in reqs):
        engine.step()
    return reqs


def test_batched_greedy_equals_one_at_a_time(folder):
    _, _, model, tok = folder
    # 3 slots for 7 prompts of different lengths and budgets: requests join while others are mid-reply, and rows
    # stop being one contiguous block of slots.
    engine = Engine(model, tok, slots=3)
    jobs = [(tok.encode(p, bos=True), SamplingParams(max_tokens=10 + 3 * i)) for i, p in enumerate(PROMPTS)]
    for req, (ids, params) in zip(run_all(engine, jobs), jobs):
        ref = model.generate(torch.tensor([ids]), params.max_tokens, eos_id=tok.eos_id)[0, len(ids):].tolist()
        if tok.eos_id in ref:
            ref = ref[:ref.index(tok.eos_id) + 1]
        assert req.output_ids == ref
        assert req.finish_reason == ("stop" if ref[-1] == tok.eos_id else "length")
        assert req.text == tok.decode([i for i in ref if i != tok.eos_id])
    engine.step()  # finished requests give their slots back at the next step
    assert engine.free_slots() == 3


def test_sampling_is_seeded_per_request_whatever_runs_beside_it(folder):
    _, _, model, tok = folder
    ids = tok.encode("the city of", bos=True)
    sampled = SamplingParams(max_tokens=20, temperature=1.0, top_k=50, top_p=0.95, repetition_penalty=1.2, seed=7)
    alone = run_all(Engine(model, tok, slots=1), [(ids, sampled)])[0].output_ids
    others = [(tok.encode(p, bos=True), SamplingParams(max_tokens=15, temperature=0.8, seed=i))
              for i, p in enumerate(PROMPTS[:3])]
    crowded = run_all(Engine(model, tok, slots=4), [others[0], (ids, sampled), *others[1:]])[1].output_ids
    assert crowded == alone
    other_seed = SamplingParams(**{**sampled.__dict__, "seed": 8})
    assert run_all(Engine(model, tok, slots=1), [(ids, other_seed)])[0].output_ids != alone


def test_stop_string_ends_the_reply_before_it(folder):
    _, _, model, tok = folder
    engine = Engine(model, tok, slots=2)
    ids = tok.encode("Order 12", bos=True)
    full = run_all(engine, [(ids, SamplingParams(max_tokens=30))])[0].text
    stop = full[len(full) // 2:len(full) // 2 + 2]
    events = []
    req = engine.submit(ids, SamplingParams(max_tokens=30, stop=("zzzz", stop)), events.append)
    while not req.done:
        engine.step()
    assert req.finish_reason == "stop" and req.text == full[:full.find(stop)]
    assert "".join(e.text for e in events) == req.text  # the streamed pieces never showed the stop string


def test_cancel_frees_the_slot_and_stream_runs_on_a_thread(folder):
    _, _, model, tok = folder
    engine = Engine(model, tok, slots=1, max_queue=1).start()
    try:
        ids = tok.encode("Order 12", bos=True)
        events = []
        first_event = threading.Event()
        req = engine.submit(ids, SamplingParams(max_tokens=200), lambda e: (events.append(e), first_event.set()))
        assert first_event.wait(limit(30))  # the slot is taken
        done = threading.Event()
        waiting = engine.submit(ids, SamplingParams(max_tokens=5), lambda e: e.finish_reason and done.set())
        with pytest.raises(QueueFull):
            engine.submit(ids, SamplingParams(max_tokens=5), lambda e: None)
        req.cancel()
        assert done.wait(limit(30))
        pieces = list(engine.stream(ids, SamplingParams(max_tokens=5)))  # runs once the slot is free again
        assert pieces[-1].finish_reason == "length"
        assert req.finish_reason == "cancelled" and len(req.output_ids) < 200 and waiting.done
    finally:
        engine.stop()


def test_limits_are_one_line_errors(folder):
    _, _, model, tok = folder
    with pytest.raises(ValueError, match="--slots 100000000 needs .* GiB of KV cache"):
        Engine(model, tok, slots=100_000_000)
    engine = Engine(model, tok, slots=1, max_len=16)
    with pytest.raises(ValueError, match="the prompt is 20 tokens; the context holds 16"):
        engine.submit([tok.bos_id] * 20, SamplingParams(), lambda e: None)
    with pytest.raises(ValueError, match="top_p"):
        engine.submit([tok.bos_id], SamplingParams(top_p=0.0), lambda e: None)
    # The context bounds the reply: 16 positions hold a 4-token prompt and at most 12 new tokens.
    req = run_all(engine, [([tok.bos_id] * 4, SamplingParams())])[0]
    assert req.finish_reason in ("length", "stop") and len(req.output_ids) <= 12
    if req.finish_reason == "length":
        assert len(req.output_ids) == 12


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_batched_greedy_equals_one_at_a_time_on_cuda(folder):
    _, _, model, tok = folder
    model = model.to("cuda")
    try:
        engine = Engine(model, tok, slots=3)
        jobs = [(tok.encode(p, bos=True), SamplingParams(max_tokens=12, ignore_eos=True)) for p in PROMPTS]
        for req, (ids, params) in zip(run_all(engine, jobs), jobs):
            ref = model.generate(torch.tensor([ids], device="cuda"), params.max_tokens)[0, len(ids):].tolist()
            assert req.output_ids == ref
    finally:
        model.to("cpu")


def test_packed_weights_decode_the_same_tokens(folder):
    """CPU fp32: linears packed for MKL's GEMM at the engine's row count (inference/packing.py) give the plain
    weights' logits to float32 rounding and the same greedy replies; other row counts and the state dict are
    untouched; the debug model's small matrices are left alone by default."""
    import copy

    import torch.nn.functional as F

    from inference.packing import PackedLinear, available, pack_linears

    if not available():
        pytest.skip("this torch build has no MKL packed sgemm")
    _, _, model, tok = folder
    assert Engine(copy.deepcopy(model), tok, slots=3).packed == []  # under MIN_WEIGHTS
    packed, names = pack_linears(model, rows=3, min_weights=0)
    assert type(model.output) is not PackedLinear  # the model given is left as it was
    assert "output" in names and len(names) == 1 + 4 * model.config.n_layers  # head; wqkv, wo, w13, w2 per layer
    assert isinstance(packed.output, PackedLinear)
    plain, swapped = model.state_dict(), packed.state_dict()
    assert plain.keys() == swapped.keys() and all(torch.equal(plain[k], swapped[k]) for k in plain)
    w = model.output.weight
    with torch.no_grad():
        x = torch.randn(3, 1, w.shape[1])
        torch.testing.assert_close(packed.output(x), F.linear(x, w), rtol=1e-5, atol=1e-5)
        assert torch.equal(packed.output(x[:2]), F.linear(x[:2], w))  # not the packed row count: the plain GEMM

    jobs = [(tok.encode(p, bos=True), SamplingParams(max_tokens=24)) for p in PROMPTS]
    ours = run_all(Engine(packed, tok, slots=3, pack_weights=False), jobs)
    ref = run_all(Engine(model, tok, slots=3, pack_weights=False), jobs)
    assert [r.output_ids for r in ours] == [r.output_ids for r in ref]


def test_engine_packs_its_own_copy_not_the_model_given(folder, monkeypatch):
    """The engine packs linears in a copy of the model that shares its weights: the caller's model keeps its
    modules (and can still compute a loss, which a packed head refuses)."""
    import functools

    import inference.engine as engine_module
    from inference.packing import PackedLinear, available, pack_linears

    if not available():
        pytest.skip("this torch build has no MKL packed sgemm")
    _, _, model, tok = folder
    monkeypatch.setattr(engine_module, "pack_linears", functools.partial(pack_linears, min_weights=0))
    before = {name: type(m) for name, m in model.named_modules()}
    engine = Engine(model, tok, slots=3)
    assert "output" in engine.packed and isinstance(engine.model.output, PackedLinear)
    assert {name: type(m) for name, m in model.named_modules()} == before
    assert engine.model.output.weight is model.output.weight  # shared, not copied
    x = torch.tensor([tok.encode("the city of", bos=True)])
    with torch.no_grad():
        assert torch.isfinite(model(x[:, :-1], targets=x[:, 1:]))
    ids = tok.encode(PROMPTS[0], bos=True)
    ref = model.generate(torch.tensor([ids]), 12)[0, len(ids):].tolist()
    out = run_all(engine, [(ids, SamplingParams(max_tokens=12, ignore_eos=True))])[0].output_ids
    assert out == ref


class _WatchedLock:
    """The engine's Condition, reporting (through `wanted`) when the engine thread asks for it after `armed` is
    set; everything else is delegated."""

    def __init__(self, lock: threading.Condition, wanted: threading.Event):
        self.lock, self.wanted, self.armed, self.engine_thread = lock, wanted, threading.Event(), None

    def __enter__(self):
        if self.armed.is_set() and threading.current_thread() is self.engine_thread:
            self.wanted.set()
        return self.lock.__enter__()

    def __exit__(self, *exc):
        return self.lock.__exit__(*exc)

    def wait(self, timeout=None):
        return self.lock.wait(timeout)

    def notify(self, n=1):
        self.lock.notify(n)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the injected fault
def test_a_request_submitted_while_a_step_fails_is_finished_with_the_error(folder):
    """A step fails while another thread is inside submit (it has checked that the engine has no error and not
    yet queued its request). The failing engine must still finish that request with "error": it may not collect
    the queue without the lock, or the request is queued after the engine looked and waits forever."""
    _, _, model, tok = folder
    ids = tok.encode("Order 12", bos=True)
    in_submit, moved_on = threading.Event(), threading.Event()

    class Faulty(Engine):
        def free_slots(self):  # called by submit under the lock, after the engine's error was checked
            if threading.current_thread().name == "late-submit":
                in_submit.set()
                # The engine fails meanwhile: it either finishes the requests it knows of (first's sink sets
                # moved_on) or asks for the lock (the watched lock sets it). Either way submit goes on.
                assert moved_on.wait(limit(60))
            return super().free_slots()

        def step(self):
            assert in_submit.wait(limit(60))
            self._lock.armed.set()
            raise RuntimeError("injected fault")

    engine = Faulty(model, tok, slots=1)
    engine._lock = _WatchedLock(engine._lock, moved_on)
    first = engine.submit(ids, SamplingParams(max_tokens=5),
                          lambda e: e.finish_reason == "error" and moved_on.set())
    late: list = []
    submitter = threading.Thread(name="late-submit", target=lambda: late.append(
        engine.submit(ids, SamplingParams(max_tokens=5), lambda e: None)))
    engine.start()
    engine._lock.engine_thread = engine._thread
    submitter.start()
    submitter.join(limit(60))
    engine._thread.join(limit(60))
    assert first.finish_reason == "error"
    assert late and late[0].finish_reason == "error"  # without the lock in the error path: None, forever
    with pytest.raises(RuntimeError, match="stopped after an error: injected fault"):
        engine.submit(ids, SamplingParams(max_tokens=5), lambda e: None)


@pytest.mark.slow  # ~40 s on 2 loaded cores: a dozen generations of 30 tokens
def test_dynamic_rope_past_the_original_context_decodes_as_generate_alone(folder):
    """rope_type dynamic: past the original context the rotary table depends on the sequence's length. The engine
    (rows of different lengths in one step, joining at different times) and batch generation give each prompt
    Transformer.generate's greedy tokens for that prompt alone, prompts longer than the original context too."""
    import copy

    from model.generate import generate_ragged

    _, _, model, tok = folder
    sharp = copy.deepcopy(model)
    with torch.no_grad():  # sharper attention: the random model's tokens then depend on the rotary angles
        for layer in sharp.layers:
            layer.attention.wqkv.weight *= 4
    dynamic = copy.deepcopy(sharp)
    dynamic.set_rope(rope_type="dynamic", rope_factor=4.0, rope_original_max_seq_len=16, max_seq_len=64)
    words = tok.encode(" ".join(PROMPTS), bos=True)
    prompts = [words[:n] for n in (3, 9, 15, 17, 24)] + [tok.encode(p, bos=True) for p in PROMPTS[:2]]
    assert max(map(len, prompts)) > 16
    alone = [dynamic.generate(torch.tensor([p]), 30)[0, len(p):].tolist() for p in prompts]
    default = [sharp.generate(torch.tensor([p]), 30)[0, len(p):].tolist() for p in prompts]
    assert sum(a != b for a, b in zip(alone, default)) >= 5  # the scaling changes the tokens: this test sees it
    assert generate_ragged(dynamic, prompts, 30) == alone
    jobs = [(p, SamplingParams(max_tokens=30, ignore_eos=True)) for p in prompts]
    assert [r.output_ids for r in run_all(Engine(dynamic, tok, slots=3), jobs)] == alone


def test_presence_and_frequency_penalties_follow_openais_definition(folder):
    """Greedy decoding with presence/frequency penalties equals a plain loop over Transformer.forward that
    subtracts OpenAI's frequency_penalty * count + presence_penalty * (count > 0) over the reply's tokens; beside
    an unpenalized request in the same batch, which stays plain greedy."""
    _, _, model, tok = folder
    ids = tok.encode("the city of", bos=True)
    penalized = SamplingParams(max_tokens=24, presence_penalty=0.7, frequency_penalty=1.3, ignore_eos=True)
    plain = SamplingParams(max_tokens=24, ignore_eos=True)
    got, beside = (r.output_ids for r in run_all(Engine(model, tok, slots=2), [(ids, penalized), (ids, plain)]))
    out: list[int] = []
    with torch.no_grad():
        for _ in range(24):
            logits = model(torch.tensor([ids + out]))[0, -1].clone()
            for t in set(out):
                logits[t] -= 1.3 * out.count(t) + 0.7
            out.append(int(logits.argmax()))
    assert got == out
    assert beside == model.generate(torch.tensor([ids]), 24)[0, len(ids):].tolist()
    assert got != beside  # the penalties changed the reply (24 greedy tokens of a tiny model repeat)
