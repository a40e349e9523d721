"""The engine's scheduling: chunked prefill (a long prompt enters in pieces between decode steps) and prefix caching
(a prompt sharing a prefix with an earlier or running request reuses that prefix's keys and values). Both must
leave greedy outputs exactly as without them; the tests count steps, forwards and prefilled tokens, never time."""
import copy

import pytest
import torch

from fixtures_inference import make_model_folder
from inference.engine import Engine, SamplingParams

TEXT = ("Order 12 of the city of the north, and the words here go on for a while so that the prompt is long; "
        "def f(x): return x and more words here, the city of 床前明月 and more")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_model_folder(tmp_path_factory.mktemp("sched"))


@pytest.fixture(scope="module")
def sharp(folder):
    """The fixture model with sharper attention (q and k scaled): its random-weight tokens then depend on every cached
    key and value, so a wrong or missing reused prefix shows in the output."""
    model = copy.deepcopy(folder[2])
    with torch.no_grad():
        for layer in model.layers:
            layer.attention.wqkv.weight *= 10
    return model


@pytest.fixture(scope="module")
def words(folder):
    """A long run of token ids (prefixes and pieces of it make the prompts)."""
    tok = folder[3]
    ids = tok.encode(TEXT, bos=True)
    assert len(ids) >= 60
    return ids


def run(engine, jobs):
    """Submit (ids, params) pairs at once and step until all are done."""
    reqs = [engine.submit(ids, params, lambda ev: None) for ids, params in jobs]
    while not all(r.done for r in reqs):
        engine.step()
    engine.step()  # give the slots back
    return reqs


def reference(model, ids, n):
    return model.generate(torch.tensor([ids]), n)[0, len(ids):].tolist()


def shared(a, b):
    """How many leading tokens a and b share."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def greedy(n):
    return SamplingParams(max_tokens=n, ignore_eos=True)


def test_chunked_prefill_gives_the_unchunked_tokens(folder, words, sharp):
    tok, model = folder[3], sharp
    prompts = [words[:60], words[:5], words[10:47], words[:1] + words[30:33]]
    jobs = [(p, greedy(12)) for p in prompts]
    whole = run(Engine(model, tok, slots=2, prefill_chunk=None, prefix_caching=False), jobs)
    chunked_engine = Engine(model, tok, slots=2, prefill_chunk=7, prefix_caching=False)
    chunked = run(chunked_engine, jobs)
    assert [r.output_ids for r in chunked] == [r.output_ids for r in whole]
    assert [r.output_ids for r in chunked] == [reference(model, p, 12) for p in prompts]
    # Every prompt token was prefilled once, at most 7 per forward.
    assert chunked_engine.stats["prefilled_tokens"] == sum(map(len, prompts))
    assert chunked_engine.stats["prefill_forwards"] >= sum(map(len, prompts)) // 7


def test_a_long_prompt_is_prefilled_between_decode_steps(folder, words, sharp):
    tok, model = folder[3], sharp
    chunk, long_prompt = 8, words[:60]
    for prefill_chunk in (chunk, None):
        engine = Engine(model, tok, slots=2, prefill_chunk=prefill_chunk, prefix_caching=False)
        running = engine.submit(words[:4], greedy(40), lambda ev: None)
        engine.step()
        assert running.decoding and len(running.output_ids) == 2  # first token from the prefill, one decoded
        late = engine.submit(long_prompt, greedy(5), lambda ev: None)
        steps = 0
        while not late.decoding:
            before, prefilled = len(running.output_ids), late.prefilled
            engine.step()
            steps += 1
            # The running stream gets its token at every step, whatever the long prompt needs.
            assert len(running.output_ids) == before + 1
            assert late.prefilled - prefilled <= (prefill_chunk or len(long_prompt))
        assert steps == (-(-len(long_prompt) // chunk) if prefill_chunk else 1)
        # One prefill forward per step while the long prompt went in, plus the first request's one.
        assert engine.stats["prefill_forwards"] == 1 + steps
        assert engine.stats["decode_forwards"] == 1 + steps


def test_prefix_cache_reuses_an_earlier_requests_prefix_with_identical_output(folder, words, sharp):
    tok, model = folder[3], sharp
    first = words[:55]
    same, other = list(first), words[:50] + words[56:60]
    common = shared(first, other)
    assert common >= 50
    prompts = (first, same, other)
    outputs = {}
    for caching in (False, True):
        engine = Engine(model, tok, slots=2, prefill_chunk=16, prefix_caching=caching)
        reqs = [run(engine, [(p, greedy(10))])[0] for p in prompts]  # one after another
        outputs[caching] = [r.output_ids for r in reqs]
        cached = [r.cached_tokens for r in reqs]
        if caching:
            # The second prompt is the first again: all but its last token (whose logits give the first reply
            # token) are reused; the third shares `common` tokens with both.
            assert cached == [0, len(same) - 1, common]
        else:
            assert cached == [0, 0, 0]
        assert engine.stats["cached_tokens"] == sum(cached)
        assert engine.stats["prefilled_tokens"] == sum(map(len, prompts)) - sum(cached)
    assert outputs[True] == outputs[False] == [reference(model, p, 10) for p in prompts]


def test_prefix_cache_copies_from_a_running_request(folder, words, sharp):
    tok, model = folder[3], sharp
    prefix = words[:40]
    engine = Engine(model, tok, slots=3, prefill_chunk=None)
    a = engine.submit(prefix + words[45:48], greedy(20), lambda ev: None)
    engine.step()
    engine.step()
    b = engine.submit(prefix + words[41:44], greedy(10), lambda ev: None)  # a is still decoding: its row is copied
    while not (a.done and b.done):
        engine.step()
    assert b.cached_tokens == shared(a.prompt_ids, b.prompt_ids) >= 40 and a.cached_tokens == 0
    assert a.output_ids == reference(model, a.prompt_ids, 20)
    assert b.output_ids == reference(model, b.prompt_ids, 10)


def test_a_free_slot_keeps_its_prefix_until_it_is_reused(folder, words, sharp):
    tok, model = folder[3], sharp
    engine = Engine(model, tok, slots=2, prefill_chunk=None)
    p, q = words[:30], words[30:60]
    held = p + run(engine, [(p, greedy(3))])[0].output_ids[:2]  # the last token's keys were never computed
    run(engine, [(q, greedy(3))])  # goes to the other (least recently used) slot: p's row is kept
    again = run(engine, [(p + words[40:42], greedy(3))])[0]
    assert again.cached_tokens == min(shared(held, again.prompt_ids), len(again.prompt_ids) - 1) >= 30
    assert again.output_ids == reference(model, again.prompt_ids, 3)


def test_prefill_chunk_is_checked_and_dynamic_rope_turns_both_off(folder):
    model, tok = folder[2], folder[3]
    with pytest.raises(ValueError, match="--prefill_chunk must be at least 1"):
        Engine(model, tok, slots=1, prefill_chunk=0)
    dynamic = copy.deepcopy(model)
    dynamic.set_rope(rope_type="dynamic", rope_factor=4.0, rope_original_max_seq_len=16, max_seq_len=64)
    engine = Engine(dynamic, tok, slots=1, prefill_chunk=8)
    assert engine.prefill_chunk is None and not engine.prefix_caching


def test_server_prefill_chunk_flag_is_checked_before_the_model_loads(tmp_path):
    """--model names no folder, so the one-line error shows the flag was checked first."""
    import subprocess
    import sys

    from fixtures_time import limit

    proc = subprocess.run([sys.executable, "-m", "inference.server", "--model", str(tmp_path / "absent"),
                           "--prefill_chunk", "-1"], capture_output=True, text=True, timeout=limit(120))
    assert proc.returncode == 1 and proc.stderr.splitlines() == [
        "error: --prefill_chunk must be >= 0 (0: whole prompts at once), got -1"], proc.stderr


def test_a_prompt_whose_padding_would_overflow_the_cache_waits_a_step(folder, words, sharp):
    """Prompt pieces prefilled together are right-padded: a row far into its cache (a reused prefix) and a long new
    piece would need max(start) + max(piece) positions, more than the cache has; the new one waits a step."""
    tok, model = folder[3], sharp
    engine = Engine(model, tok, slots=2, max_len=64, prefill_chunk=None)
    run(engine, [(words[:55], greedy(3))])
    near_end = words[:54] + words[56:57]  # 54 tokens reused: its one new token goes at position 54
    fresh = words[1:31]  # 30 new tokens from position 0: padded together, 54 + 30 > 64
    assert shared(fresh, words) == 0
    a = engine.submit(near_end, greedy(5), lambda ev: None)
    b = engine.submit(fresh, greedy(5), lambda ev: None)
    engine.step()
    assert a.cached_tokens == 54 and a.decoding and b.prefilled == 0
    engine.step()
    assert b.decoding
    while not (a.done and b.done):
        engine.step()
    assert a.output_ids == reference(model, near_end, 5) and b.output_ids == reference(model, fresh, 5)


def test_server_usage_counts_cached_prompt_tokens(folder, words, sharp):
    """OpenAI's usage.prompt_tokens_details.cached_tokens: 0 for a first request, the reused prefix for a second
    one sharing it; the replies are the model's greedy tokens either way."""
    openai = pytest.importorskip("openai")
    from fixtures_inference import ServerThread
    from fixtures_time import limit
    from inference.server import create_app
    from inference.templates import load_chat_template

    _, chat_dir, _, tok = folder
    engine = Engine(sharp, tok, slots=2).start()
    try:
        with ServerThread(create_app(engine, load_chat_template(chat_dir, tok), "tiny")) as srv:
            client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=limit(60))
            first, second = words[:50], words[:45] + words[51:54]
            replies = [client.completions.create(model="tiny", prompt=p, max_tokens=6, temperature=0,
                                                 extra_body={"ignore_eos": True}) for p in (first, second)]
    finally:
        engine.stop()
    assert [r.usage.prompt_tokens_details.cached_tokens for r in replies] == [0, shared(first, second)]
    assert shared(first, second) >= 45
    assert [r.choices[0].text for r in replies] == [tok.decode(reference(sharp, p, 6)) for p in (first, second)]
