"""GPTQ (Frantar et al., 2022): second-order weight rounding for group-wise INT4, pure torch on the layer's device.

Why our own: the maintained GPTQ libraries do not install beside the project's pins (gptqmodel needs numpy 2.2,
llm-compressor needs transformers 5.17), and the algorithm is a few dozen lines over our own Linear weights.

The grid (scales, zeros) is an input, fixed per group before rounding ("static groups"): with act-order the columns are
visited in decreasing Hessian-diagonal order, but each column keeps the grid of the group it sits in, so the result is
the same contiguous group layout as round-to-nearest (no g_idx) and every INT4 kernel and reader takes it unchanged.
Grid conventions: INT4 (model.quant.quantize_int4) w ~= (q - 8) * scale + zero, q in [0, 15]; INT8
(quantize_int8) w ~= q * scale per output row, q in [-127, 127].
"""
from __future__ import annotations

import torch


class HessianAccumulator:
    """Running H = 2/n * sum x x^T over a layer's input rows (x: [..., in_features]), in fp32."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        n = x.shape[0]
        # Running mean keeps the scale independent of how many batches were seen.
        self.hessian *= self.rows / (self.rows + n)
        self.rows += n
        x = x * (2.0 / self.rows) ** 0.5
        self.hessian += x.t() @ x


def gptq_round(weight: torch.Tensor, hessian: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
               group_size: int, qmin: int, qmax: int, offset: int, act_order: bool = True, damp: float = 0.01,
               block_size: int = 128) -> torch.Tensor:
    """Integer codes (int32 [N, K], in [qmin, qmax]) for `weight` [N, K] on the grid w ~= (q - offset) * s + z,
    (scales, zeros) [N, K/group_size] fixed per group.

    Each column is rounded, and its rounding error is pushed onto the columns not yet rounded through the inverse
    Hessian, which minimises ||X W^T - X Q^T|| for the calibration inputs X rather than ||W - Q||.
    """
    n, k = weight.shape
    if k % group_size:
        raise ValueError(f"group size {group_size} does not divide in_features {k}")
    if hessian.shape != (k, k) or scales.shape != (n, k // group_size) or zeros.shape != scales.shape:
        raise ValueError(f"shape mismatch: weight {tuple(weight.shape)}, hessian {tuple(hessian.shape)}, "
                         f"scales {tuple(scales.shape)}, zeros {tuple(zeros.shape)}")
    w = weight.detach().float().clone()
    h = hessian.detach().float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0  # an input that is always 0: its weights do not matter, keep H invertible
    w[:, dead] = 0.0
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(k, device=w.device)
    w, h = w[:, perm], h[perm][:, perm]
    h += damp * torch.mean(torch.diag(h)) * torch.eye(k, device=h.device)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    group_of = perm // group_size  # the (original) group of each visited column
    scales, zeros = scales.float(), zeros.float()
    codes = torch.empty(n, k, dtype=torch.int32, device=w.device)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1, hinv1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        for i in range(i2 - i1):
            col = w1[:, i]
            g = group_of[i1 + i]
            s, z = scales[:, g], zeros[:, g]
            q = torch.round((col - z) / s + offset).clamp(qmin, qmax)
            codes[:, perm[i1 + i]] = q.to(torch.int32)
            e = (col - ((q - offset) * s + z)) / hinv1[i, i]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return codes


def gptq_int4(weight: torch.Tensor, hessian: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
              group_size: int, act_order: bool = True, damp: float = 0.01, block_size: int = 128) -> torch.Tensor:
    """Codes uint8 [N, K] in [0, 15] for `weight` [N, K] on the INT4 grid (scales, zeros) [N, K/group_size]."""
    return gptq_round(weight, hessian, scales, zeros, group_size, 0, 15, 8, act_order, damp,
                      block_size).to(torch.uint8)


def gptq_int8(weight: torch.Tensor, hessian: torch.Tensor, scales: torch.Tensor, act_order: bool = True,
              damp: float = 0.01, block_size: int = 128) -> torch.Tensor:
    """Codes int8 [N, K] in [-127, 127] for `weight` [N, K] on the symmetric per-row grid w ~= q * scales[:, None]."""
    s = scales.float().reshape(-1, 1)
    return gptq_round(weight, hessian, s, torch.zeros_like(s), weight.shape[1], -127, 127, 0, act_order, damp,
                      block_size).to(torch.int8)
