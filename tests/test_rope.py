"""RoPE scaling: inverse frequencies and logits against transformers per type, config I/O, bad input."""
import json

import pytest
import torch

from model import ModelConfig, Transformer
from model.hf import config_from_hf, config_to_hf
from model.rope import inv_freq

transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

ORIGINAL = 64  # the "pretraining" context of the tiny models; tests run at 3x to 4x it
# One config per type; max_seq_len is the extended context.
SCALINGS = {
    "default": dict(rope_theta=10000.0, max_seq_len=256),
    "abf": dict(rope_theta=500000.0, max_seq_len=256),  # adjusted base frequency: a plain rope_theta change
    "linear": dict(rope_type="linear", rope_factor=4.0, max_seq_len=256),
    "dynamic": dict(rope_type="dynamic", rope_factor=4.0, rope_original_max_seq_len=ORIGINAL, max_seq_len=256),
    "yarn": dict(rope_type="yarn", rope_factor=4.0, rope_original_max_seq_len=ORIGINAL, max_seq_len=256,
                 rope_beta_fast=16.0, rope_beta_slow=2.0),
    "yarn_attention_factor": dict(rope_type="yarn", rope_factor=4.0, rope_original_max_seq_len=ORIGINAL,
                                  max_seq_len=256, rope_attention_factor=1.3),
    "yarn_no_truncate": dict(rope_type="yarn", rope_factor=4.0, rope_original_max_seq_len=ORIGINAL,
                             max_seq_len=256, rope_truncate=False),  # transformers >= 4.5x / 5 only
    "llama3": dict(rope_type="llama3", rope_factor=8.0, rope_original_max_seq_len=ORIGINAL, max_seq_len=256,
                   rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_theta=50000.0),
}


def tiny(**overrides) -> ModelConfig:
    # head_dim 32 gives 16 frequencies, enough for yarn's and llama3's piecewise ranges to all be exercised.
    return ModelConfig.from_preset("debug", **{"attn_impl": "eager", "dim": 128, "n_heads": 4, "n_kv_heads": 2,
                                               **overrides})


def hf_config(config: ModelConfig):
    return transformers.LlamaConfig(**config_to_hf(config, torch.float32, None, None, None))


@pytest.mark.parametrize("name", SCALINGS)
def test_inverse_frequencies_match_transformers(name):
    config = tiny(**SCALINGS[name])
    hf = hf_config(config)
    kind = hf.rope_parameters["rope_type"]
    for seq_len in (None, 100, 256):  # only dynamic depends on it
        ours, scale = inv_freq(config, seq_len=seq_len)
        if kind == "default":
            theirs, their_scale = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding \
                .compute_default_rope_parameters(hf)
        else:
            theirs, their_scale = ROPE_INIT_FUNCTIONS[kind](hf, None, seq_len=seq_len)
        assert ours.dtype == torch.float32 and ours.shape == theirs.shape
        assert (ours - theirs).abs().max() <= 1e-6 * theirs.abs().max()
        assert scale == pytest.approx(their_scale, rel=1e-12)
    if kind not in ("default",):
        assert not torch.allclose(ours, inv_freq(tiny(max_seq_len=256))[0])  # the scaling did something


@pytest.mark.parametrize("name", SCALINGS)
def test_logits_match_transformers_beyond_the_original_context(tmp_path, name):
    torch.manual_seed(0)
    ours = Transformer(tiny(**SCALINGS[name])).eval()
    ours.to_hf(tmp_path / "hf")
    # A fresh transformers model per length: its dynamic rope keeps state between calls (see docs/long_context.md).
    for length in (200, 40):  # beyond the original context of 64, then within it
        theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
        x = torch.randint(0, ours.config.vocab_size, (2, length))
        with torch.no_grad():
            assert (ours(x) - theirs(x).logits).abs().max() < 1e-4
    # transformers' own save loads back into the same config (its writer, our reader).
    theirs.save_pretrained(tmp_path / "hf2")
    back = Transformer.from_hf(tmp_path / "hf2", attn_impl="eager")
    assert back.config == ours.config


@pytest.mark.parametrize("name", SCALINGS)
def test_export_import_round_trip(tmp_path, name):
    torch.manual_seed(1)
    model = Transformer(tiny(**SCALINGS[name])).eval()
    model.to_hf(tmp_path / "hf")
    back = Transformer.from_hf(tmp_path / "hf", attn_impl="eager").eval()
    assert back.config == model.config
    x = torch.randint(0, 512, (1, 180))
    with torch.no_grad():
        assert torch.equal(back(x), model(x))


def test_dynamic_frequencies_follow_the_sequence_length_with_a_cache():
    torch.manual_seed(0)
    model = Transformer(tiny(**SCALINGS["dynamic"])).eval()
    x = torch.randint(0, 512, (1, 150))
    with torch.no_grad():
        full = model(x)
        # With position_ids the furthest position sets the length, as in transformers.
        assert torch.allclose(model(x, position_ids=torch.arange(150)[None]), full, atol=1e-5)
        short = model(x[:, :100])
    # Within the original context the frequencies are the unscaled ones; beyond it they change.
    assert torch.allclose(short[:, :50], full[:, :50], atol=1e-5) is False
    within = Transformer(tiny(**{**SCALINGS["dynamic"], "rope_type": "default", "rope_factor": 1.0,
                                 "rope_original_max_seq_len": None}))
    within.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.allclose(within.eval()(x[:, :60]), model(x[:, :60]), atol=1e-6)


def test_llama31_style_config_loads(tmp_path):
    """A transformers 4.4x config.json (rope_scaling + rope_theta, no rope_parameters), Llama 3.1's values."""
    hf = config_to_hf(tiny(), torch.float32, 1, 2, None)
    for key in ("rope_parameters", "rope_scaling"):
        hf.pop(key)
    hf.update(rope_theta=500000.0, max_position_embeddings=1024, rope_scaling={
        "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 128,
        "rope_type": "llama3"})
    config = config_from_hf(hf)
    assert (config.rope_type, config.rope_factor, config.rope_original_max_seq_len, config.max_seq_len,
            config.rope_theta) == ("llama3", 8.0, 128, 1024, 500000.0)
    old = dict(hf, rope_scaling={"type": "linear", "factor": 2.0})  # transformers 4.3x spelling
    assert config_from_hf(old).rope_type == "linear"
    hf_dynamic = dict(hf, max_position_embeddings=100, rope_scaling={"type": "dynamic", "factor": 2.0})
    config = config_from_hf(hf_dynamic)
    assert (config.rope_original_max_seq_len, config.max_seq_len) == (100, 200)
    assert config_from_hf(hf_dynamic, max_seq_len=150).max_seq_len == 150
    # Qwen2.5-style yarn: max_position_embeddings stays at the original context, yarn runs to factor times it.
    qwen = dict(hf, max_position_embeddings=128, rope_scaling={"type": "yarn", "factor": 4.0,
                                                               "original_max_position_embeddings": 128})
    config = config_from_hf(qwen)
    assert (config.rope_original_max_seq_len, config.max_seq_len, config.rope_factor) == (128, 512, 4.0)


def test_set_rope_changes_only_rotary_settings():
    torch.manual_seed(0)
    model = Transformer(tiny(max_seq_len=128)).eval()
    x = torch.randint(0, 512, (1, 100))
    with torch.no_grad():
        before = model(x)
        model.set_rope(rope_type="dynamic", rope_factor=2.0, rope_original_max_seq_len=128, max_seq_len=256)
        assert torch.equal(model(x), before)  # within the original context dynamic NTK changes nothing
        assert model(torch.randint(0, 512, (1, 200))).shape == (1, 200, 512)
    with pytest.raises(ValueError, match="set_rope takes only"):
        model.set_rope(dim=256)
    with pytest.raises(ValueError, match="rope_factor must be >= 1"):
        model.set_rope(rope_factor=0.5)


@pytest.mark.parametrize("scaling, message", [
    ({"rope_type": "longrope", "factor": 2.0}, r"rope_scaling\.rope_type='longrope' is not supported"),
    ({"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
     r"lacks the required key 'low_freq_factor'"),
    ({"rope_type": "linear"}, r"lacks the required key 'factor'"),
    ({"rope_type": "yarn", "factor": 2.0, "mscale": 0.7}, r"has key 'mscale'"),
    ({"rope_type": "linear", "factor": 0.5}, r"rope_factor must be >= 1"),
])
def test_bad_rope_scaling_in_config_json_is_one_line(tmp_path, scaling, message):
    torch.manual_seed(0)
    Transformer(tiny()).to_hf(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["rope_scaling"] = scaling
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=message) as err:
        Transformer.from_hf(tmp_path / "hf")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("bad, message", [
    (dict(rope_type="ntk"), r"rope_type must be one of default, linear, dynamic, yarn, llama3, got 'ntk'"),
    (dict(rope_type="linear", rope_factor=0.5), r"rope_factor must be >= 1"),
    (dict(rope_factor=2.0), r"no effect with rope_type 'default'"),
    (dict(rope_type="yarn", rope_factor=2.0), r"rope_original_max_seq_len is required for rope_type 'yarn'"),
    (dict(rope_type="yarn", rope_factor=2.0, rope_original_max_seq_len=64, max_seq_len=256),
     r"max_seq_len=256 exceeds what the rope settings allow: rope_factor 2.0 x rope_original_max_seq_len 64 = 128"),
    (dict(rope_type="llama3", rope_factor=8.0, rope_original_max_seq_len=64, rope_low_freq_factor=4.0),
     r"rope_high_freq_factor \(4.0\) must exceed"),
])
def test_bad_rope_config_is_one_line(bad, message):
    with pytest.raises(ValueError, match=message) as err:
        tiny(**bad)
    assert "\n" not in str(err.value)


def test_sequence_beyond_the_scaled_context_is_rejected():
    model = Transformer(tiny(**SCALINGS["yarn"]))
    with pytest.raises(ValueError, match="exceeds max_seq_len=256"):
        model(torch.zeros(1, 257, dtype=torch.long))


def test_xverse_preset_and_long_context_config():
    from pretrain.config import deepspeed_config, load_config

    xverse = ModelConfig.from_preset("xverse-13b")
    assert (xverse.n_layers, xverse.dim, xverse.n_heads, xverse.hidden_dim, xverse.max_seq_len) == (
        40, 5120, 40, 13824, 8192)
    assert xverse.vocab_size >= 100278 and xverse.vocab_size % 64 == 0
    assert config_to_hf(xverse, torch.bfloat16, 1, 2, None)["max_position_embeddings"] == 8192

    repo = __import__("pathlib").Path(__file__).resolve().parents[1]
    cfg = load_config(repo / "config" / "long_context.yaml")
    # What build_model does with init_from_hf: the exported model's config plus cfg.model.
    base = ModelConfig.from_preset("baichuan-7b")
    extended = ModelConfig.from_dict({**base.to_dict(), **cfg.model})
    assert extended.rope_theta == 500000.0 > base.rope_theta and extended.rope_type == "default"
    assert cfg.seq_len == extended.max_seq_len > base.max_seq_len
    assert cfg.lr == 2e-5 and deepspeed_config(cfg, 64, "bf16")["train_batch_size"] == cfg.global_batch_size
