"""Calibrated weight quantization (GPTQ) of our decoder, layer by layer, on a sample of real text.

    python -m inference.quantize --model M --scheme int4 --method gptq --calibration data/sample --output_dir D

The model's blocks are run one at a time over the calibration sequences: the inputs of the first block are
caught once (embeddings), then for each block the inputs of its linear layers are accumulated into Hessians, the
layers are rounded with GPTQ (model/gptq.py) on the same grid round-to-nearest would use, and the block is run
again with the rounded weights to give the next block its inputs (so later blocks see, and correct for, the
rounding of earlier ones). Beyond the model, memory holds one block's input and output activations for all
sequences (N x T x dim floats each) and the Hessians of one block.

Why our own GPTQ and not a library: see model/gptq.py and docs/quantization.md.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn
from tqdm import tqdm

from common.errors import MissingFileError, UserError
from model import Transformer
from model.gptq import HessianAccumulator, gptq_int4, gptq_int8
from model.quant import (Int4Linear, Int8Linear, QuantizationConfig, check_scheme, dequantize_int4, dequantize_int8,
                         pack_int4, plan_group_sizes, quantization_targets, quantize_int4, quantize_int8, set_module)
from tokenizer import Tokenizer
from tokenizer.corpus import iter_documents, resolve_inputs

DEFAULT_CALIBRATION = Path(__file__).resolve().parents[1] / "data" / "sample"
"""The shipped sample corpus (English, Chinese, code, arithmetic)."""
DEFAULT_SEQUENCES = 256
DEFAULT_SEQ_LEN = 256
METHODS = ("rtn", "gptq")


def calibration_tokens(paths: Sequence[str | Path], tokenizer: Tokenizer, n_sequences: int = DEFAULT_SEQUENCES,
                       seq_len: int = DEFAULT_SEQ_LEN, seed: int = 0) -> torch.Tensor:
    """`n_sequences` windows of `seq_len` tokens [N, T] (int64), drawn without overlap from the documents of
    `paths` (files, folders or globs of .txt/.jsonl[.gz]) joined into one token stream: up to 4 x N x T tokens,
    the same share from each file.

    A corpus with fewer than N x T tokens is an error (a smaller sample would calibrate on repeats)."""
    if n_sequences < 1 or seq_len < 2:
        raise UserError(f"--calibration_sequences ({n_sequences}) must be >= 1 and --calibration_seq_len "
                        f"({seq_len}) >= 2")
    shown = " ".join(map(str, paths))
    try:
        files = resolve_inputs(paths)
    except ValueError as e:
        raise MissingFileError(f"--calibration: {e}; pass text files or folders (.txt, .jsonl, .gz)") from None
    need = n_sequences * seq_len
    # Read up to 4x what is needed, an equal share from each file, so that the windows come from every file (a
    # mixed corpus: each language), not only from the first one.
    share = -(-4 * need // len(files))
    stream: list[int] = []
    bos = tokenizer.bos_id >= 0
    eos = tokenizer.eos_id >= 0
    for file in files:
        start = len(stream)
        for doc in iter_documents(file):
            stream.extend(tokenizer.encode(doc, bos=bos, eos=eos))
            if len(stream) - start >= share:
                break
    if len(stream) < need:
        raise UserError(f"--calibration {shown}: {len(stream)} tokens, fewer than the {n_sequences} x {seq_len} = "
                        f"{need} needed; add text or lower --calibration_sequences / --calibration_seq_len")
    windows = len(stream) // seq_len
    starts = sorted(random.Random(seed).sample(range(windows), n_sequences))
    data = torch.tensor(stream[:windows * seq_len], dtype=torch.long).view(windows, seq_len)
    return data[starts]


class _Caught(Exception):
    """Raised by the hook on the first block to stop the forward pass once its inputs are caught."""


def _block_inputs(model: Transformer, tokens: torch.Tensor, batch_size: int
                  ) -> tuple[list[torch.Tensor], list[tuple[tuple, dict]]]:
    """The first block's hidden-state inputs, one tensor per batch, and the other arguments each batch called it
    with (rotary table, attention metadata), caught without running the rest of the model."""
    hidden: list[torch.Tensor] = []
    rest: list[tuple[tuple, dict]] = []

    def catch(_module, args, kwargs):
        hidden.append(args[0])
        rest.append((args[1:], kwargs))
        raise _Caught

    handle = model.layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for i in range(0, len(tokens), batch_size):
            try:
                model(tokens[i:i + batch_size])
            except _Caught:
                pass
    finally:
        handle.remove()
    return hidden, rest


def int4_symmetric_grid(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The symmetric INT4 grid of compressed-tensors' W4A16 checkpoints (llm-compressor's default, what vLLM's
    Marlin kernels take): per group, scale = max|w| / 7.5 and no zero point, w ~= q * scale with q in [-8, 7].

    Returns (scales, zeros) in our Int4Linear layout (w ~= (c - 8) * scale + zero, c = q + 8): zeros are 0."""
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"group size {group_size} does not divide in_features {k}")
    g = w.float().reshape(n, k // group_size, group_size)
    scales = (g.abs().amax(dim=-1) / 7.5).clamp(min=1e-8)
    return scales, torch.zeros_like(scales)


def round_to_grid(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """Round-to-nearest INT4 codes (uint8 in [0, 15]) of w on a given grid."""
    n, k = w.shape
    g = w.float().reshape(n, k // group_size, group_size)
    q = torch.round((g - zeros[..., None]) / scales[..., None] + 8).clamp(0, 15)
    return q.reshape(n, k).to(torch.uint8)


def _int4_layer(linear: nn.Linear, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                group_size: int, is_head: bool) -> nn.Module:
    layer = Int4Linear(linear.in_features, linear.out_features, group_size, is_head, device="meta")
    layer.weight, layer.scales, layer.zeros = pack_int4(codes), scales.float(), zeros.float()
    return layer


def _int8_layer(linear: nn.Linear, codes: torch.Tensor, scales: torch.Tensor, is_head: bool) -> nn.Module:
    layer = Int8Linear(linear.in_features, linear.out_features, is_head, device="meta")
    layer.weight, layer.scales = codes, scales.float()
    return layer


def _quantize_linear(linear: nn.Linear, name: str, scheme: str, group_size: int, hessian: torch.Tensor | None,
                     symmetric: bool, act_order: bool, damp: float) -> tuple[nn.Module, torch.Tensor]:
    """(the quantized layer, its dequantized weight). hessian None: round to nearest."""
    w = linear.weight.detach().float()
    is_head = name == "output"
    if scheme == "int8":
        q, s = quantize_int8(w)
        if hessian is not None:
            q = gptq_int8(w, hessian, s, act_order=act_order, damp=damp)
        return _int8_layer(linear, q, s, is_head), dequantize_int8(q, s)
    if symmetric:
        s, z = int4_symmetric_grid(w, group_size)
        q = round_to_grid(w, s, z, group_size)
    else:
        q, s, z = quantize_int4(w, group_size)
    if hessian is not None:
        q = gptq_int4(w, hessian, s, z, group_size, act_order=act_order, damp=damp)
    return _int4_layer(linear, q, s, z, group_size, is_head), dequantize_int4(q, s, z)


@torch.no_grad()
def quantize_model_calibrated(model: Transformer, scheme: str, group_sizes: dict[str, int], layers: Sequence[str],
                              tokens: torch.Tensor | None, symmetric: bool = False, act_order: bool = True,
                              damp: float = 0.01, batch_size: int = 8, progress: bool = True) -> Transformer:
    """Swap `layers` (our module names) for Int8Linear / Int4Linear in place, rounded with GPTQ over `tokens`
    [N, T] (None: round to nearest, no calibration). `group_sizes`: each int4 layer's group size.
    `symmetric`: int4 on the symmetric grid of int4_symmetric_grid (what compressed-tensors W4A16 checkpoints
    store) instead of model.quant's asymmetric min/max grid."""
    targets = list(layers)
    if tokens is None:
        for name in targets:
            layer, _ = _quantize_linear(model.get_submodule(name), name, scheme, group_sizes.get(name, 0), None,
                                        symmetric, act_order, damp)
            set_module(model, name, layer)
        return model
    device = next(model.parameters()).device
    tokens = tokens.to(device)
    hidden, rest = _block_inputs(model, tokens, batch_size)
    swaps: dict[str, nn.Module] = {}

    def run_block(block: nn.Module, names: list[str], prefix: str) -> None:
        """Accumulate the Hessians of `names` (inside `block`), GPTQ them, then advance `hidden` through the
        block with the rounded weights."""
        accs = {n: HessianAccumulator(block.get_submodule(n.removeprefix(prefix)).in_features, device)
                for n in names}
        hooks = [block.get_submodule(n.removeprefix(prefix)).register_forward_hook(
            lambda _m, inp, _out, acc=accs[n]: acc.add(inp[0])) for n in names]
        try:
            for h, (args, kwargs) in zip(hidden, rest):
                block(h, *args, **kwargs)
        finally:
            for hook in hooks:
                hook.remove()
        for n in names:
            linear = block.get_submodule(n.removeprefix(prefix))
            swaps[n], deq = _quantize_linear(linear, n, scheme, group_sizes.get(n, 0), accs[n].hessian,
                                             symmetric, act_order, damp)
            linear.weight.data.copy_(deq.to(linear.weight.dtype))  # later layers see the rounded weights
        del accs
        for i, (h, (args, kwargs)) in enumerate(zip(hidden, rest)):
            hidden[i] = block(h, *args, **kwargs)

    bar = tqdm(range(len(model.layers)), desc=f"GPTQ {scheme}", unit="block", disable=not progress)
    for i in bar:
        prefix = f"layers.{i}."
        run_block(model.layers[i], [n for n in targets if n.startswith(prefix)], prefix)
    if "output" in targets:
        acc = HessianAccumulator(model.output.in_features, device)
        for h in hidden:
            acc.add(model.norm(h))
        swaps["output"], _ = _quantize_linear(model.output, "output", scheme, group_sizes.get("output", 0),
                                              acc.hessian, symmetric, act_order, damp)
    del hidden
    for name, layer in swaps.items():
        set_module(model, name, layer)
    return model


def quantize_model_gptq(model: Transformer, scheme: str, group_size: int | None, quantize_head: bool,
                       tokens: torch.Tensor | None, symmetric: bool = False) -> Transformer:
    """model.quant.quantize_model's counterpart with GPTQ over `tokens` (None: round to nearest on the grid
    `symmetric` picks): the same layers and group sizes, the portable INT4 layout (ready to save), and
    model.quantization recording the method."""
    check_scheme(scheme)
    sizes = plan_group_sizes(model, group_size, quantize_head) if scheme == "int4" else {}
    layers = [n for n, _ in quantization_targets(model, quantize_head)]
    quantize_model_calibrated(model, scheme, sizes, layers, tokens, symmetric)
    model.quantization = QuantizationConfig(scheme, group_size, quantize_head, sizes, layers,
                                            method="gptq" if tokens is not None else "rtn")
    return model


__all__ = ["DEFAULT_CALIBRATION", "DEFAULT_SEQUENCES", "DEFAULT_SEQ_LEN", "METHODS", "calibration_tokens",
           "int4_symmetric_grid", "quantize_model_calibrated", "quantize_model_gptq", "round_to_grid"]
