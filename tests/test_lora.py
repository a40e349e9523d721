"""LoRA: zero-initialised adapters change nothing, PEFT's format both ways (against peft + transformers), merging,
training only the adapter, and one-line errors for adapters that do not fit."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import ModelConfig, Transformer
from finetune.lora import prepare_lora
from model.lora import (LoRAConfig, LoRALinear, gather_lora_state_dict, lora_state_dict, mark_only_lora_trainable,
                        merge_lora)
from model.lora_peft import CONFIG_FILE, WEIGHTS_FILE, apply_adapter, read_adapter, save_adapter

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

CONFIGS = [dict(n_heads=4, n_kv_heads=2), dict(n_heads=4, n_kv_heads=4, tie_embeddings=True)]


def make(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig.from_preset("debug", **{"attn_impl": "eager", **overrides})).eval()


def randomize_adapters(model: torch.nn.Module, seed: int = 1) -> None:
    """Non-zero B (and a fresh A) so the adapter really changes the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def tokens(vocab: int = 512) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(7))


@torch.no_grad()
def test_zero_initialised_lora_keeps_logits_and_trains_only_adapters():
    base = make()
    x = tokens()
    ref = base(x)
    model = prepare_lora(make(), LoRAConfig(r=4, alpha=8, target_modules=["all"]))
    assert torch.equal(model(x), ref)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora." in n for n in trainable)
    # one adapter per PEFT projection: q, k, v share wqkv, gate and up share w13
    wqkv = model.layers[0].attention.wqkv
    assert isinstance(wqkv, LoRALinear) and list(wqkv.lora) == ["q_proj", "k_proj", "v_proj"]
    assert wqkv.lora["k_proj"].B.shape == (2 * 16, 4)  # n_kv_heads * head_dim rows
    assert list(model.layers[1].feed_forward.w13.lora) == ["gate_proj", "up_proj"]
    assert len(lora_state_dict(model)) == 2 * 7 * 2  # layers x projections x (A, B)
    # The base keeps its names: a LoRA model's state dict is the base's plus adapters.
    assert set(base.state_dict()) == {k for k in model.state_dict() if ".lora." not in k}


def test_gradients_reach_only_adapters_and_a_step_changes_the_output():
    model = prepare_lora(make(), LoRAConfig(r=2, alpha=4, target_modules=["q_proj", "down_proj"]))
    model.train()
    x = tokens()
    loss = model(x, targets=x)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(".lora." in n for n in grads)
    assert any(g.abs().sum() > 0 for n, g in grads.items() if n.endswith(".B"))  # B gets the first gradient
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    opt.step()
    model.eval()
    with torch.no_grad():
        assert not torch.equal(model(x), make()(x))


@pytest.mark.parametrize("overrides", CONFIGS)
def test_our_adapter_loads_in_peft_with_the_same_logits(tmp_path, overrides):
    ours = make(**overrides)
    ours.to_hf(tmp_path / "base")
    cfg = LoRAConfig(r=4, alpha=8, target_modules=["all"])
    prepare_lora(ours, cfg)
    randomize_adapters(ours)
    save_adapter(ours, cfg, tmp_path / "adapter", tmp_path / "base")
    raw = json.loads((tmp_path / "adapter" / CONFIG_FILE).read_text())
    assert raw["base_model_name_or_path"] == str((tmp_path / "base").resolve())
    assert "base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight" in load_file(
        str(tmp_path / "adapter" / WEIGHTS_FILE))
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    x = tokens()
    with torch.no_grad():
        mine, ref = ours.eval()(x), theirs(input_ids=x).logits
        base_logits = make(**overrides)(x)
    assert (mine - base_logits).abs().max() > 1e-2  # the adapter does change the output
    assert (mine - ref).abs().max() < 1e-5


def test_adapter_written_by_peft_loads_into_our_model(tmp_path):
    make().to_hf(tmp_path / "base")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    torch.manual_seed(3)
    lcfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj", "o_proj"],
                           init_lora_weights=False, task_type="CAUSAL_LM")  # random non-zero B
    theirs = peft.get_peft_model(hf, lcfg).eval()
    theirs.save_pretrained(tmp_path / "adapter")
    ours = Transformer.from_hf(tmp_path / "base", attn_impl="eager").eval()
    cfg = apply_adapter(ours, tmp_path / "adapter")
    assert cfg.target_modules == ["q_proj", "v_proj", "o_proj", "up_proj"] and cfg.scale == 4.0
    x = tokens()
    with torch.no_grad():
        mine, ref = ours(x), theirs(input_ids=x).logits
        assert (mine - make()(x)).abs().max() > 1e-2
    assert (mine - ref).abs().max() < 1e-5


def test_peft_all_linear_adapter_with_full_module_paths_loads(tmp_path):
    make().to_hf(tmp_path / "base")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    lcfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", init_lora_weights=False,
                           use_rslora=True, task_type="CAUSAL_LM")
    theirs = peft.get_peft_model(hf, lcfg).eval()
    theirs.save_pretrained(tmp_path / "adapter")
    ours = Transformer.from_hf(tmp_path / "base", attn_impl="eager").eval()
    assert apply_adapter(ours, tmp_path / "adapter").target_modules == list(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    x = tokens()
    with torch.no_grad():
        assert (ours(x) - theirs(input_ids=x).logits).abs().max() < 1e-5


def test_merge_equals_base_plus_adapter():
    model = prepare_lora(make(), LoRAConfig(r=4, alpha=8, target_modules=["all"]))
    randomize_adapters(model)
    x = tokens()
    with torch.no_grad():
        before = model(x)
        merged = merge_lora(model)
        after = merged(x)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert set(merged.state_dict()) == set(make().state_dict())
    assert (before - after).abs().max() < 1e-5


def test_gather_and_save_round_trip(tmp_path):
    cfg = LoRAConfig(r=3, alpha=6, dropout=0.1, target_modules="k_proj,gate_proj")
    model = prepare_lora(make(), cfg)
    randomize_adapters(model)
    state = gather_lora_state_dict(model)
    save_adapter(state, cfg, tmp_path / "a", None)
    back_cfg, back, raw = read_adapter(tmp_path / "a")
    assert back_cfg == cfg and raw["lora_dropout"] == 0.1
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


# ---- bad input: one line each ----

def write_adapter(path, config: dict, tensors: dict | None = None):
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_FILE).write_text(json.dumps(config))
    if tensors is not None:
        save_file(tensors, str(path / WEIGHTS_FILE))


@pytest.mark.parametrize("kwargs, message", [
    (dict(r=0), "rank r must be a positive integer"),
    (dict(alpha=None), "alpha (lora_alpha) is missing"),
    (dict(target_modules=["q_proj", "lm_head"]), "lm_head do not exist"),
    (dict(dropout=1.0), "dropout must be in [0, 1)"),
])
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=None) as e:
        LoRAConfig(**kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)


def good_adapter(tmp_path, **cfg_overrides):
    model = prepare_lora(make(), LoRAConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"]))
    save_adapter(model, LoRAConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"]), tmp_path / "good", None)
    raw = json.loads((tmp_path / "good" / CONFIG_FILE).read_text())
    raw.update(cfg_overrides)
    return raw, load_file(str(tmp_path / "good" / WEIGHTS_FILE))


def test_adapter_errors_are_one_line(tmp_path):
    raw, tensors = good_adapter(tmp_path)
    cases = {}
    (tmp_path / "noconfig").mkdir()
    cases["noconfig"] = "no adapter_config.json"
    write_adapter(tmp_path / "r0", {**raw, "r": 0}, tensors)
    cases["r0"] = "rank r must be a positive integer"
    write_adapter(tmp_path / "noalpha", {k: v for k, v in raw.items() if k != "lora_alpha"}, tensors)
    cases["noalpha"] = "lora_alpha is missing"
    write_adapter(tmp_path / "targets", {**raw, "target_modules": ["q_proj", "k_proj"]}, tensors)
    cases["targets"] = "do not match the tensors"
    wide = {k: torch.zeros(v.shape[0], 128) if "lora_A" in k else v for k, v in tensors.items()}
    write_adapter(tmp_path / "shape", raw, wide)
    cases["shape"] = "has shape (2, 128), the model expects (2, 64)"
    extra = {**tensors, "base_model.model.model.layers.5.self_attn.q_proj.lora_A.weight": torch.zeros(2, 64),
             "base_model.model.model.layers.5.self_attn.q_proj.lora_B.weight": torch.zeros(64, 2),
             "base_model.model.model.layers.5.self_attn.v_proj.lora_A.weight": torch.zeros(2, 64),
             "base_model.model.model.layers.5.self_attn.v_proj.lora_B.weight": torch.zeros(32, 2)}
    write_adapter(tmp_path / "layers", raw, extra)
    cases["layers"] = "layer 5, the base model has only 2 layers"
    write_adapter(tmp_path / "embed", {**raw, "target_modules": ["embed_tokens"]},
                  {"base_model.model.model.embed_tokens.lora_A.weight": torch.zeros(2, 512)})
    cases["embed"] = "do not exist in this model"
    write_adapter(tmp_path / "dora", {**raw, "use_dora": True}, tensors)
    cases["dora"] = "use_dora=True is not supported"
    for name, message in cases.items():
        with pytest.raises((ValueError, FileNotFoundError)) as e:
            apply_adapter(make(), tmp_path / name)
        assert message in str(e.value) and "\n" not in str(e.value), (name, str(e.value))
        assert str(tmp_path / name) in str(e.value), name


def test_no_adapters_to_train_is_an_error():
    with pytest.raises(ValueError, match="no LoRA adapters"):
        mark_only_lora_trainable(make())
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        prepare_lora(prepare_lora(make(), LoRAConfig()), LoRAConfig())


def test_hot_start_from_an_adapter(tmp_path):
    cfg = LoRAConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"])
    first = prepare_lora(make(), cfg)
    randomize_adapters(first)
    save_adapter(first, cfg, tmp_path / "round1", None)
    nxt = prepare_lora(make(), LoRAConfig(r=2, alpha=4, dropout=0.2, target_modules=["v_proj", "q_proj"]),
                       init_adapter=tmp_path / "round1")
    x = tokens()
    with torch.no_grad():
        assert torch.equal(nxt.eval()(x), first.eval()(x))
    assert all(p.requires_grad == (".lora." in n) for n, p in nxt.named_parameters())
    assert nxt.layers[0].attention.wqkv.lora["q_proj"].dropout.p == 0.2  # the run's dropout, not the file's
    with pytest.raises(ValueError) as e:
        prepare_lora(make(), LoRAConfig(r=4, alpha=4, target_modules=["q_proj", "v_proj"]),
                     init_adapter=tmp_path / "round1")
    assert "r=2 (config: 4)" in str(e.value) and str(tmp_path / "round1") in str(e.value)


def test_frozen_output_layer_skips_its_gradient_and_keeps_the_rest():
    from model.model import chunked_cross_entropy

    h, w = torch.randn(40, 16), torch.randn(50, 16)
    t = torch.randint(0, 50, (40,))
    loss, gh, gw = chunked_cross_entropy(h, w, t, chunk=16, want_grad=True)
    loss2, gh2, gw2 = chunked_cross_entropy(h, w, t, chunk=16, want_grad=True, want_grad_w=False)
    assert gw is not None and gw2 is None and torch.equal(gh, gh2) and torch.equal(loss, loss2)
