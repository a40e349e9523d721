"""GPTQ math (model/gptq.py): it must beat round-to-nearest on the calibration objective, on the same grid."""
import pytest
import torch

from model.quant import dequantize_int4, quantize_int4
from model.gptq import HessianAccumulator, gptq_int4


def _problem(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    k, n, g = 128, 48, 32
    # Correlated inputs with uneven scales, as real activations are: where second-order rounding pays off.
    mix = torch.randn(k, k, generator=gen) / k ** 0.5 + torch.eye(k)
    x = torch.randn(512, k, generator=gen) @ mix * torch.linspace(0.2, 3.0, k)
    w = torch.randn(n, k, generator=gen) * 0.05
    return x, w, g


def _output_error(x, w, wq):
    return ((x @ w.t() - x @ wq.t()) ** 2).mean().item()


def test_hessian_accumulator_is_batch_independent():
    x, _, _ = _problem()
    one, two = HessianAccumulator(x.shape[1]), HessianAccumulator(x.shape[1])
    one.add(x)
    two.add(x[:200])
    two.add(x[200:])
    assert torch.allclose(one.hessian, two.hessian, rtol=1e-4, atol=1e-5)
    assert torch.allclose(one.hessian, 2 * x.t() @ x / x.shape[0], rtol=1e-4, atol=1e-4)


def test_gptq_beats_rtn_on_calibration_output_error():
    x, w, g = _problem()
    q_rtn, s, z = quantize_int4(w, g)
    acc = HessianAccumulator(w.shape[1])
    acc.add(x)
    for act_order in (False, True):
        q = gptq_int4(w, acc.hessian, s, z, g, act_order=act_order, block_size=32)
        assert q.dtype == torch.uint8 and q.shape == w.shape and int(q.max()) <= 15
        rtn = _output_error(x, w, dequantize_int4(q_rtn, s, z))
        gptq = _output_error(x, w, dequantize_int4(q, s, z))
        assert gptq < 0.8 * rtn, (act_order, gptq, rtn)


def test_gptq_with_identity_hessian_is_rtn():
    # With uncorrelated, equal-scale inputs there is no error to redistribute: GPTQ reduces to nearest rounding.
    _, w, g = _problem()
    q_rtn, s, z = quantize_int4(w, g)
    q = gptq_int4(w, torch.eye(w.shape[1]), s, z, g, act_order=False, damp=0.0)
    assert torch.equal(q, q_rtn)


def test_gptq_rejects_group_size_not_dividing():
    _, w, _ = _problem()
    q, s, z = quantize_int4(w, 32)
    with pytest.raises(ValueError, match="group size 48 does not divide in_features 128"):
        gptq_int4(w, torch.eye(128), s, z, 48)
