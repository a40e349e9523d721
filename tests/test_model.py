"""Model correctness on CPU: transformers parity, causality, kernels, cache, loss, config validation."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from model import KVCache, ModelConfig, Transformer
from model.attention import available, resolve

transformers = pytest.importorskip("transformers")


def tiny(**overrides) -> ModelConfig:
    return ModelConfig.from_preset("debug", **{"attn_impl": "eager", **overrides})


def make(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(tiny(**overrides)).eval()


PARITY_CONFIGS = [
    dict(n_heads=4, n_kv_heads=4),  # plain multi-head
    dict(n_heads=4, n_kv_heads=2),  # grouped-query
    dict(n_heads=4, n_kv_heads=1, tie_embeddings=True),  # multi-query, tied
    dict(dim=96, n_heads=6, n_kv_heads=3, hidden_dim=200, n_layers=3, rope_theta=500000.0, norm_eps=1e-5),
]


@pytest.mark.parametrize("overrides", PARITY_CONFIGS)
def test_hf_parity_both_directions(tmp_path, overrides):
    ours = make(**overrides)
    ours.to_hf(tmp_path / "hf")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    x = torch.randint(0, ours.config.vocab_size, (2, 50))
    with torch.no_grad():
        assert (ours(x) - theirs(x).logits).abs().max() < 1e-4
    # transformers -> ours: perturb their weights so a stale copy could not pass, save, load back.
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    theirs.save_pretrained(tmp_path / "hf2")
    back = Transformer.from_hf(tmp_path / "hf2", attn_impl="eager").eval()
    assert back.config.tie_embeddings == ours.config.tie_embeddings
    with torch.no_grad():
        assert (back(x) - theirs(x).logits).abs().max() < 1e-4


def test_from_hf_reads_pytorch_bin(tmp_path):
    ours = make()
    ours.to_hf(tmp_path / "hf")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    out = tmp_path / "bin"
    out.mkdir()
    (out / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    torch.save(theirs.state_dict(), out / "pytorch_model.bin")
    back = Transformer.from_hf(out, attn_impl="eager").eval()
    x = torch.randint(0, 512, (1, 20))
    with torch.no_grad():
        assert torch.allclose(back(x), ours(x), atol=1e-5)


def test_checkpoint_that_does_not_fit_names_the_tensor(tmp_path):
    make().to_hf(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["intermediate_size"] = 200
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.(gate|down|up)_proj\.weight"):
        Transformer.from_hf(tmp_path / "hf")
    cfg["intermediate_size"], cfg["num_hidden_layers"] = 176, 3
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"missing \['model\.layers\.2\."):
        Transformer.from_hf(tmp_path / "hf")


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_causality(impl):
    model = make(attn_impl=impl)
    x = torch.randint(0, 512, (1, 40))
    y = x.clone()
    y[0, 25] = (x[0, 25] + 1) % 512
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.allclose(a[:, :25], b[:, :25], atol=1e-6)
    assert not torch.allclose(a[:, 25:], b[:, 25:], atol=1e-3)


def test_backends_agree_and_document_masking_isolates_documents():
    eager, sdpa = make(attn_impl="eager"), make(attn_impl="sdpa")
    x = torch.randint(0, 512, (2, 48))
    with torch.no_grad():
        assert (eager(x) - sdpa(x)).abs().max() < 1e-5
    # Row 0 packs documents of 20 and 28 tokens, row 1 one of 48; positions restart per document.
    cu = torch.tensor([0, 20, 48, 96], dtype=torch.int32)
    pos = torch.cat([torch.arange(20), torch.arange(28), torch.arange(48)]).view(2, 48)
    with torch.no_grad():
        packed = {m.config.attn_impl: m(x, position_ids=pos, cu_seqlens=cu) for m in (eager, sdpa)}
        alone = eager(x[:1, 20:])  # the second document run on its own
    assert (packed["eager"] - packed["sdpa"]).abs().max() < 1e-5
    assert (packed["eager"][0, 20:] - alone[0]).abs().max() < 1e-5
    assert (packed["eager"][1] - eager(x[1:])[0]).abs().max() < 1e-5


def test_unavailable_kernels_raise_clear_errors():
    cpu = torch.device("cpu")
    assert resolve("auto", cpu, torch.float32) == "sdpa"
    for impl in ("flash", "xformers", "flex"):
        assert "CUDA" in available(impl, cpu)
        with pytest.raises(RuntimeError, match=impl):
            make(attn_impl=impl)(torch.zeros(1, 4, dtype=torch.long))


def test_chunked_loss_matches_full_cross_entropy_and_gradients(monkeypatch):
    import model.model as mm

    monkeypatch.setattr(mm, "LOSS_CHUNK_BYTES", 7 * 4 * 512)  # 7-row chunks: several, the last one ragged
    assert mm.loss_chunk_rows(512) == 7
    for tie in (False, True):
        model = make(tie_embeddings=tie).train()
        x = torch.randint(0, 512, (3, 17))
        t = torch.randint(0, 512, (3, 17))
        t[0, :5] = -100
        loss = model(x, targets=t)
        loss.backward()
        ours = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        ref = F.cross_entropy(model(x).flatten(0, 1), t.flatten(), ignore_index=-100)
        ref.backward()
        assert abs(loss.item() - ref.item()) < 1e-5
        for n, p in model.named_parameters():
            assert torch.allclose(ours[n], p.grad, atol=1e-6), n
        with torch.no_grad():
            assert abs(model(x, targets=t).item() - ref.item()) < 1e-5


def test_activation_checkpointing_gives_same_gradients():
    x, t = torch.randint(0, 512, (2, 16)), torch.randint(0, 512, (2, 16))
    grads = []
    for ckpt in (False, True):
        model = make(activation_checkpointing=ckpt).train()
        model(x, targets=t).backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_kv_cache_matches_full_forward(impl):
    model = make(attn_impl=impl, n_kv_heads=2)
    x = torch.randint(0, 512, (2, 30))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(2, 40)
        parts = [model(x[:, :11], cache=cache), model(x[:, 11:12], cache=cache), model(x[:, 12:], cache=cache)]
    assert cache.length == 30
    assert (torch.cat(parts, dim=1) - full).abs().max() < 1e-5


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_cache_rows_at_different_lengths_continue_in_one_forward(impl):
    """Continuous batching: rows of one KV cache, chosen in any order, prefilled right-padded (input_lengths) and then
    continued at different lengths in one forward, each give the logits of their own sequence run alone."""
    model = make(attn_impl=impl, n_kv_heads=2)
    torch.manual_seed(0)
    seqs = {2: torch.randint(0, 512, (5,)), 0: torch.randint(0, 512, (9,)), 3: torch.randint(0, 512, (3,))}
    with torch.no_grad():
        cache = model.new_cache(4, 16)
        rows = list(seqs)
        tokens = torch.zeros(3, 9, dtype=torch.long)  # padding after each row's tokens
        for i, r in enumerate(rows):
            tokens[i, :len(seqs[r])] = seqs[r]
        lengths = [len(seqs[r]) for r in rows]
        got = model(tokens, cache=cache, cache_rows=rows, input_lengths=lengths,
                    output_positions=[n - 1 for n in lengths])
        assert cache.lengths == [9, 0, 5, 3]
        for i, r in enumerate(rows):
            assert (got[i] - model(seqs[r][None])[0, -1]).abs().max() < 1e-5
        for step in range(2):  # rows at lengths 3, 9, 5 (then one more each) in one forward
            order = [3, 0, 2]
            new = torch.randint(0, 512, (3, 1))
            got = model(new, cache=cache, cache_rows=order)[:, -1]
            for i, r in enumerate(order):
                seqs[r] = torch.cat([seqs[r], new[i]])
                assert (got[i] - model(seqs[r][None])[0, -1]).abs().max() < 1e-5
    assert cache.lengths == [11, 0, 7, 5]
    with pytest.raises(ValueError, match="different lengths"):
        cache.length


def test_cache_repeat_scores_continuations_of_a_shared_prefix():
    model = make()
    prefix, conts = torch.randint(0, 512, (1, 12)), torch.randint(0, 512, (3, 5))
    lengths = torch.tensor([5, 3, 4])
    with torch.no_grad():
        cache = model.new_cache(1, 20)
        model(prefix, cache=cache)
        fork = cache.repeat(3, max_len=17)
        got = model(conts, cache=fork, output_positions=lengths - 1)
        for row in range(3):
            full = model(torch.cat([prefix[0], conts[row, :lengths[row]]])[None])[0, -1]
            assert (got[row] - full).abs().max() < 1e-5
    assert cache.length == 12 and fork.length == 17
    with pytest.raises(ValueError, match="batch-1"):
        fork.repeat(2)


def test_generate_greedy_same_with_and_without_cache():
    model = make()
    idx = torch.randint(0, 512, (2, 7))
    a = model.generate(idx, 20)
    b = model.generate(idx, 20, use_cache=False)
    assert a.shape == (2, 27) and torch.equal(a, b)
    assert torch.equal(model.generate(idx, 20), a)  # deterministic


def test_generate_sampling_and_eos():
    model = make()
    idx = torch.randint(0, 512, (2, 5))
    g = torch.Generator().manual_seed(1)
    out = model.generate(idx, 15, temperature=0.8, top_k=50, top_p=0.9, generator=g)
    assert out.shape == (2, 20) and torch.equal(out[:, :5], idx)
    greedy = model.generate(idx[:1], 15)
    eos = int(greedy[0, 8])  # the greedy token at step 3 becomes "end of sequence"
    stopped = model.generate(idx[:1], 15, eos_id=eos)
    first = 5 + int((greedy[0, 5:] == eos).nonzero()[0])  # generation stops at eos's first appearance
    assert stopped.shape[1] == first + 1 and stopped[0, -1] == eos
    assert torch.equal(stopped[0], greedy[0, :first + 1])


def test_ragged_generation_equals_each_prompt_alone():
    from model.generate import generate_ragged, length_sorted_batches

    model = make(n_kv_heads=2)  # fp32
    torch.manual_seed(1)
    prompts = [torch.randint(0, 512, (n,)).tolist() for n in (6, 1, 11, 3)]
    alone = [model.generate(torch.tensor([p]), 10)[0, len(p):].tolist() for p in prompts]
    assert generate_ragged(model, prompts, 10) == alone and all(len(a) == 10 for a in alone)
    # An EOS ends the rows that emit it (without the EOS) and only those; rows stop as Transformer.generate does.
    eos = alone[2][3]
    stopped = generate_ragged(model, prompts, 10, eos_id=eos)
    assert any(eos not in a for a in alone) and len(stopped[2]) <= 3
    for p, got in zip(prompts, stopped):
        ref = model.generate(torch.tensor([p]), 10, eos_id=eos)[0, len(p):].tolist()
        assert got == (ref[:ref.index(eos)] if eos in ref else ref)
    # The context bounds every row as it bounds each prompt alone; ids >= vocab_size are never picked.
    short = make(n_kv_heads=2, max_seq_len=14)
    assert generate_ragged(short, prompts, 10) == \
        [short.generate(torch.tensor([p]), 10)[0, len(p):].tolist() for p in prompts]
    assert max(max(new) for new in generate_ragged(model, prompts, 10, vocab_size=40)) < 40
    assert length_sorted_batches([6, 1, 11, 3, 6], 2) == [[1, 3], [0, 4], [2]]
    with pytest.raises(ValueError, match="at least one token"):
        generate_ragged(model, [[1, 2], []], 4)


def test_sequence_longer_than_context_is_rejected():
    model = make(max_seq_len=16)
    with pytest.raises(ValueError, match="max_seq_len=16"):
        model(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("bad, message", [
    (dict(dim=100, n_heads=3), "divisible by n_heads"),
    (dict(n_heads=4, n_kv_heads=3), "multiple of n_kv_heads"),
    (dict(vocab_size=0), "vocab_size must be a positive integer"),
    (dict(attn_impl="fast"), "attn_impl must be one of"),
    (dict(norm_eps=0.0), "norm_eps must be > 0"),
    (dict(dim=36, n_heads=4), "must be even"),
])
def test_config_validation(bad, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_preset("debug", **bad)


def test_config_presets_and_unknown_fields():
    seven = ModelConfig.from_preset("baichuan-7b")
    assert (seven.vocab_size, seven.dim, seven.n_layers, seven.hidden_dim) == (64000, 4096, 32, 11008)
    assert 6.9e9 < seven.num_params() < 7.1e9
    assert 0.9e9 < ModelConfig.from_preset("1b").num_params() < 1.4e9
    with pytest.raises(ValueError, match="unknown ModelConfig field.*wdith"):
        ModelConfig.from_dict({"wdith": 3})
    with pytest.raises(ValueError, match="unknown model preset"):
        ModelConfig.from_preset("nope")
    assert ModelConfig(dim=4096).hidden_dim == 11008  # LLaMA's derived SwiGLU width


def test_cache_object_shape():
    cache = make().new_cache(3, 10)
    assert isinstance(cache, KVCache) and cache.k.shape == (2, 3, 10, 2, 16) and cache.max_len == 10


@pytest.mark.slow  # ~24 s: torch.compile (scripts/test.sh --fast skips it)
def test_torch_compile_gives_same_loss_and_gradients():
    """The compile switch (fused kernels through Inductor) must not change the numbers."""
    model = make(attn_impl="sdpa").train()
    x, t = torch.randint(0, 512, (2, 32)), torch.randint(0, 512, (2, 32))
    ref = model(x, targets=t)
    ref.backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss = torch.compile(model)(x, targets=t)
    loss.backward()
    assert abs(loss.item() - ref.item()) < 1e-5
    for a, p in zip(ref_grads, model.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-6)


def test_loss_kept_out_of_compiled_graphs(monkeypatch):
    """The training loss (hand-written backward) runs eagerly inside a compiled model, as under the
    torch.compiler.disable decorator it had: traced, its body would see is_compiling() True."""
    import model.model as mm

    seen = []
    real = mm.chunked_cross_entropy

    def spy(*args, **kwargs):
        seen.append(torch.compiler.is_compiling())
        return real(*args, **kwargs)

    monkeypatch.setattr(mm, "chunked_cross_entropy", spy)
    model = make(attn_impl="sdpa").train()
    x, t = torch.randint(0, 512, (2, 16)), torch.randint(0, 512, (2, 16))
    ref = model(x, targets=t)
    loss = torch.compile(model, backend="eager")(x, targets=t)
    assert seen == [False, False] and torch.allclose(loss, ref)


def test_importing_the_model_does_not_import_dynamo():
    """torch._dynamo costs seconds to import; commands that never compile (evaluation, inference) must not pay it."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys, model.model, model.generate, evaluation.decoding, evaluation.generation, evaluation.suite, "
            "artifacts; print('torch._dynamo' in sys.modules)")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "PYTHONPATH": str(root)})
    assert out.stdout.strip() == "False", out.stderr


def test_initialisation_scales_residual_projections_with_depth():
    config = ModelConfig.from_preset("debug", n_layers=8, init_std=0.05)
    model = Transformer(config)
    residual = 0.05 / math.sqrt(2 * 8)
    for name, p in model.named_parameters():
        if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
            expected = residual
        elif p.ndim == 2:
            expected = 0.05
        else:  # RMSNorm gains
            assert torch.equal(p, torch.ones_like(p)), name
            continue
        assert abs(p.mean().item()) < 0.1 * expected, name
        assert p.std().item() == pytest.approx(expected, rel=0.1), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_backward_matches_autograd_and_saves_only_its_input(dtype):
    from model.model import RMSNorm

    norm = RMSNorm(64, 1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64))
    x = torch.randn(3, 5, 64, dtype=dtype, requires_grad=True)
    g = torch.randn(3, 5, 64, dtype=dtype)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                  lambda t: t):
        y = norm(x)
    y.backward(g)
    grads = x.grad.clone(), norm.weight.grad.clone()
    x.grad = norm.weight.grad = None
    x32 = x.float()  # the plain formula, differentiated by autograd
    ref = norm.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
    ref.backward(g)
    assert torch.equal(y, ref)
    assert torch.allclose(grads[0], x.grad, atol=1e-5) and torch.allclose(grads[1], norm.weight.grad, atol=1e-5)
    assert sum(saved) == x.numel() * x.element_size() + 64 * norm.weight.element_size() + 15 * 4  # x, weight, rstd
