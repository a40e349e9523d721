"""Opening the model to evaluate: our LLaMA loader (fast path) or transformers (any other causal LM).

A folder whose config.json our `Transformer` can take (LLaMA family), or one of our training run directories, is
loaded by `artifacts.open_model` and scored with the prefix cache. Any other Hugging Face causal-LM folder
(GPT-2, Qwen2, Mistral with sliding windows, LLaMA with rope scaling, ...) goes through transformers'
AutoModelForCausalLM without remote code, scored one prompt at a time (the plain path); the run says so on the
console and in results.json's settings.

The tokenizer is the folder's tokenizer.model (SentencePiece, through tokenizer.Tokenizer) when it has one, else
its tokenizer.json / tokenizer_config.json through transformers' AutoTokenizer (no remote code), wrapped in
`HFTokenizer` so that both give the evaluators the same interface. Either way the answer-letter ids are read in
context (scoring.answer_letter_ids).

This is the one place a model is opened for evaluation: `load()` hands every folder our model code takes (Hugging
Face LLaMA, training and LoRA run directories, quantized folders) to artifacts.open_model, with `--adapter` and
`--quantize`.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm import tqdm

from artifacts import check_device, load_tokenizer, open_model
from artifacts.quantized import quantized_format
from artifacts.run_dir import is_run_dir
from common.errors import MissingFileError, UserError
from common.tensors import DTYPES
from model.hf import config_from_hf

from .data import LETTERS
from .scoring import Request, score_cached, score_plain

HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class HFTokenizer:
    """A transformers tokenizer with the methods of tokenizer.Tokenizer that evaluation uses.

    encode() never lets transformers add special tokens on its own: BOS/EOS are added only when asked for, as with
    SentencePiece. `adds_bos` records what the tokenizer does by default (`tokenizer(text)`), which is what the
    reference scripts feed their models.
    """

    def __init__(self, path: str | Path) -> None:
        from transformers import AutoTokenizer

        self.path = Path(path)
        folder = self.path if self.path.is_dir() else self.path.parent
        try:
            self.tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False, local_files_only=True)
        except (OSError, ValueError) as e:
            raise UserError(f"{folder}: transformers cannot load a tokenizer from this folder ({e})") from None
        digest = hashlib.sha256()
        for name in sorted(p.name for p in folder.iterdir() if p.name.startswith(("tokenizer", "vocab", "merges"))):
            digest.update(name.encode() + b"\0" + (folder / name).read_bytes())
        self.sha256: str = digest.hexdigest()
        self.vocab_size: int = len(self.tok)
        self.bos_id: int = -1 if self.tok.bos_token_id is None else int(self.tok.bos_token_id)
        self.eos_id: int = -1 if self.tok.eos_token_id is None else int(self.tok.eos_token_id)
        self.pad_id: int = -1 if self.tok.pad_token_id is None else int(self.tok.pad_token_id)
        plain = self.tok("a", add_special_tokens=False)["input_ids"]
        default = self.tok("a")["input_ids"]
        self.adds_bos: bool = self.bos_id >= 0 and default[:1] == [self.bos_id] and plain[:1] != [self.bos_id]

    def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        if bos and self.bos_id < 0:
            raise ValueError(f"{self.path}: this tokenizer has no BOS token, encode with bos=False")
        if eos and self.eos_id < 0:
            raise ValueError(f"{self.path}: this tokenizer has no EOS token, encode with eos=False")
        return [self.bos_id] * bos + list(ids) + [self.eos_id] * eos

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return self._wrap(self.tok(text, add_special_tokens=False)["input_ids"], bos, eos)

    def encode_batch(self, texts: Sequence[str], bos: bool = False, eos: bool = False) -> list[list[int]]:
        if not texts:
            return []
        return [self._wrap(ids, bos, eos) for ids in self.tok(list(texts), add_special_tokens=False)["input_ids"]]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def id_to_piece(self, id: int) -> str:
        if not 0 <= int(id) < self.vocab_size:
            raise ValueError(f"token id {id} is outside the vocabulary [0, {self.vocab_size})")
        return self.tok.convert_ids_to_tokens(int(id))

    def __len__(self) -> int:
        return self.vocab_size


def open_tokenizer(model_path: str | Path, tokenizer_path: str | Path | None):
    """--tokenizer (a tokenizer.model file, or a folder/tokenizer.json for transformers), else the model folder's
    tokenizer.model, else its tokenizer.json through AutoTokenizer."""
    if tokenizer_path:
        path = Path(tokenizer_path)
        if path.is_file() and path.suffix == ".model":
            return None, path
        if not path.exists():
            raise MissingFileError(f"{path}: --tokenizer not found")
        sp = path / "tokenizer.model"
        return (None, sp) if sp.is_file() else (HFTokenizer(path), None)
    folder = Path(model_path)
    if (folder / "tokenizer.model").is_file() or is_run_dir(folder):
        return None, None  # the SentencePiece tokenizer beside the model: artifacts.load_tokenizer
    if any((folder / name).is_file() for name in HF_TOKENIZER_FILES):
        return HFTokenizer(folder), None
    raise MissingFileError(f"{folder}: no tokenizer (neither tokenizer.model nor tokenizer.json); "
                           "pass --tokenizer PATH")


def llama_config_problem(path: Path) -> str | None:
    """None when our Transformer can load the folder's config.json, else why not (then transformers loads it)."""
    try:
        hf = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path / 'config.json'}: unreadable ({e})") from None
    try:
        config_from_hf(hf)
    except (ValueError, KeyError) as e:
        return str(e)
    return None


@dataclass
class LoadedModel:
    """A model ready to score, its tokenizer and how it is run."""

    model: Any
    """Our Transformer, or a transformers PreTrainedModel."""
    tokenizer: Any
    """tokenizer.Tokenizer or HFTokenizer."""
    backend: str
    """"ours" (prefix cache available) or "transformers" (plain path only)."""
    max_len: int
    """The model's context in tokens."""
    bos: bool
    """Whether prompts start with BOS (as the tokenizer does by default in the reference scripts)."""
    note: str = ""
    """Why transformers runs the model, when it does."""
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def score(self, requests: Sequence[Request], batch_size: int, prefix_cache: bool,
              progress: tqdm | None = None) -> torch.Tensor:
        """Letter logits [N, 4] of every request."""
        if self.backend == "transformers":
            return score_transformers(self.model, requests, progress)
        if prefix_cache:
            return score_cached(self.model, requests, batch_size, progress)
        return score_plain(self.model, requests, progress)


def load(model_path: str | Path, tokenizer_path: str | Path | None, device: str, dtype: str,
         tag: str | None = None, adapter: str | Path | None = None, quantize: str | None = None,
         group_size: int | None = None, quantize_head: bool = False) -> LoadedModel:
    """Open the model and its tokenizer (see the module doc for which path a folder takes); `adapter` is a PEFT
    LoRA folder merged into a LLaMA-family model, `quantize` int8/int4 quantizes its linears on load (a folder
    written by inference.quantize is used as saved)."""

    path = Path(model_path)
    check_device(device)
    problem = None
    if path.is_dir() and not is_run_dir(path) and (path / "config.json").is_file() and quantized_format(path) is None:
        problem = llama_config_problem(path)
    if problem is None:
        # also the errors for a missing or unknown folder
        model = open_model(path, device, dtype, tag=tag, adapter=adapter, quantize=quantize, group_size=group_size,
                           quantize_head=quantize_head)
        hf_tok, sp_path = open_tokenizer(path, tokenizer_path)
        tokenizer = hf_tok or load_tokenizer(path, sp_path, model)
        backend, max_len = "ours", model.config.max_seq_len
        vocab = model.config.vocab_size
    else:
        if quantize is not None:
            raise UserError(f"{path}: --quantize applies to LLaMA-family models loaded by our own model code, and "
                            f"this folder is not one ({problem})")
        if adapter is not None:
            raise UserError(f"{path}: --adapter applies LoRA adapters to LLaMA-family models loaded by our own "
                            f"model code, and this folder is not one ({problem})")
        if tag is not None:
            raise UserError(f"{path}: --tag selects a checkpoint of a training run directory, not of a "
                            "Hugging Face folder")
        model = load_transformers(path, device, dtype)
        hf_tok, sp_path = open_tokenizer(path, tokenizer_path)
        tokenizer = hf_tok or load_sp_for_transformers(sp_path or path / "tokenizer.model")
        backend, max_len = "transformers", context_of(model.config)
        vocab = model.get_output_embeddings().weight.shape[0]
    if tokenizer.vocab_size > vocab:
        raise UserError(f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} ids but the model's vocabulary "
                        f"has only {vocab}: they do not belong together")
    bos = tokenizer.adds_bos if isinstance(tokenizer, HFTokenizer) else tokenizer.bos_id >= 0
    note = "" if problem is None else (f"not loadable by our LLaMA model ({problem}); running it through "
                                       "transformers, one prompt at a time (no prefix cache)")
    return LoadedModel(model, tokenizer, backend, max_len, bos, note,
                       {"backend": backend, "tokenizer_kind": "transformers" if hf_tok else "sentencepiece"})


def load_sp_for_transformers(path: Path):
    from tokenizer import Tokenizer

    if not path.is_file():
        raise MissingFileError(f"{path}: no SentencePiece tokenizer; pass --tokenizer PATH")
    return Tokenizer(path)


def load_transformers(path: Path, device: str, dtype: str):
    """AutoModelForCausalLM from a local folder, without remote code, on `device` in eval mode."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=DTYPES[dtype], trust_remote_code=False,
                                                     local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{path}: transformers cannot load this folder as a causal LM without remote code "
                        f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return model.to(device).eval()


def context_of(config: Any) -> int:
    for name in ("max_position_embeddings", "n_positions", "seq_length", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise UserError("the model's config names no context length (max_position_embeddings); pass --max_length")


@torch.inference_mode()
def score_transformers(model, requests: Sequence[Request], progress: tqdm | None = None) -> torch.Tensor:
    """Letter logits [N, 4] (float32, CPU), one prompt per forward pass through a transformers model."""
    device = next(model.parameters()).device
    out = torch.empty(len(requests), len(LETTERS))
    for n, req in enumerate(requests):
        tokens = torch.from_numpy(req.tokens).to(device)[None]
        logits = model(input_ids=tokens, logits_to_keep=1).logits[0, -1]
        out[n] = logits[list(req.choice_ids)].float().cpu()
        if progress is not None:
            progress.update(1)
    return out
