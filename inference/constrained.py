"""Constrained decoding: a per-request grammar that masks the logits before each token is sampled, so the reply is
always a valid JSON value of a schema (response_format) or a tool call (tool_choice required / a named function).

The grammar engine is llguidance (Microsoft, Rust with a Python wheel for CPU, no torch dependency; the engine
behind the structured output of vLLM, SGLang and llama.cpp). It takes any tokenizer given as its tokens' bytes, so
our SentencePiece vocabulary works without converting it to a Hugging Face tokenizer, and it computes a mask in
tens of microseconds (it walks the vocabulary as a trie, not token by token). It is an optional extra:
`pip install -e .[constrained]`; without it a request for response_format gets one error line saying so.

    constraint = Constraint.json_schema(tokenizer, vocab_size, {"type": "object", ...})
    logits = constraint.mask(logits)       # [V]: disallowed tokens -inf
    constraint.accept(token)                # after sampling
    constraint.done                         # the grammar is complete: end the reply

The engine (inference/engine.py) and generate_ragged (model/generate.py) call these three on a request's or row's
constraint; anything with the same three members works there (model/generate.py TokenConstraint).
"""
from __future__ import annotations

import argparse
import json
import threading
from pathlib import Path
from typing import Any, Mapping

import torch

from common.errors import UserError
from tokenizer import Tokenizer

_lock = threading.Lock()
_ll_tokenizers: dict[tuple[str, int], Any] = {}


JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
"""The spacing of constrained JSON: json.dumps' default, as the chat templates write tool calls (`tojson`), so a
model tuned on them meets the spacing it was trained on."""


class ConstraintError(ValueError):
    """A schema or grammar the grammar engine refuses (the request's fault: HTTP 400 naming the field)."""


def llguidance_module():
    """The llguidance package, or ConstraintError saying how to install it."""
    try:
        import llguidance
    except ImportError:  # an optional extra: say how to get it
        raise ConstraintError("constrained decoding (response_format, tool_choice required) needs llguidance: "
                              "pip install -e .[constrained]") from None
    return llguidance


def token_bytes(tokenizer: Tokenizer, vocab_size: int) -> list[bytes]:
    """The bytes each token id decodes to inside a text: SentencePiece's ▁ is a space, a byte-fallback piece
    <0xAB> is that byte. Control and unknown pieces (bos, eos, unk) are special, which llguidance marks by a
    leading 0xFF; ids past the tokenizer's vocabulary (a model's padded embedding) are empty and never allowed."""
    sp = tokenizer.sp
    out: list[bytes] = []
    for i in range(vocab_size):
        if i >= tokenizer.vocab_size:
            out.append(b"")
        elif sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            out.append(b"\xff" + sp.id_to_piece(i).encode("utf-8"))
        elif sp.is_byte(i):
            out.append(bytes([int(sp.id_to_piece(i)[3:5], 16)]))
        else:
            out.append(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
    return out


class _Wrapped:
    """What llguidance's TokenizerWrapper reads from a tokenizer."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        self.eos_token_id = tokenizer.eos_id
        self.bos_token_id = tokenizer.bos_id if tokenizer.bos_id >= 0 else None
        self.tokens = token_bytes(tokenizer, vocab_size)
        self.special_token_ids = [i for i, t in enumerate(self.tokens) if t.startswith(b"\xff")]
        self._tokenizer = tokenizer

    def __call__(self, text: str) -> list[int]:
        # SentencePiece puts a ▁ in front of a text; llguidance tokenizes pieces of a text, not texts
        ids = self._tokenizer.encode("\n" + text) if text else []
        nl = self._tokenizer.encode("\n")
        return ids[len(nl):] if ids[:len(nl)] == nl else self._tokenizer.encode(text)


def ll_tokenizer(tokenizer: Tokenizer, vocab_size: int):
    """llguidance's view of `tokenizer` over `vocab_size` ids (built once per tokenizer and size: ~0.1 s)."""
    llg = llguidance_module()
    key = (str(tokenizer.path), vocab_size)
    with _lock:
        if key not in _ll_tokenizers:
            _ll_tokenizers[key] = llg.LLTokenizer(llg.TokenizerWrapper(_Wrapped(tokenizer, vocab_size)),
                                                  n_vocab=vocab_size)
        return _ll_tokenizers[key]


def json_schema_grammar(schema: Mapping[str, Any] | bool | None) -> str:
    """The llguidance grammar of JSON text valid under `schema` (None: any JSON object, OpenAI's json_object).
    Spacing is fixed to JSON_STYLE, so a model cannot spend its tokens on whitespace."""
    llg = llguidance_module()
    if schema is None:
        schema = {"type": "object"}
    try:
        return llg.LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=JSON_STYLE)
    except (ValueError, TypeError) as e:
        raise ConstraintError(f"the JSON schema is not valid: {e}") from None


class Constraint:
    """One reply's grammar state: which tokens may come next, and whether the reply is complete."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, grammar: str):
        llg = llguidance_module()
        lltok = ll_tokenizer(tokenizer, vocab_size)
        error = llg.LLMatcher.validate_grammar(grammar, lltok)
        if error:
            raise ConstraintError(f"the schema cannot be enforced: {error.splitlines()[0]}")
        self.matcher = llg.LLMatcher(lltok, grammar, log_level=0)
        if self.matcher.is_error():
            raise ConstraintError(f"the schema cannot be enforced: {self.matcher.get_error()}")
        self.vocab_size = vocab_size
        self.eos_id = tokenizer.eos_id

    @classmethod
    def json_schema(cls, tokenizer: Tokenizer, vocab_size: int,
                    schema: Mapping[str, Any] | bool | None = None) -> "Constraint":
        return cls(tokenizer, vocab_size, json_schema_grammar(schema))

    def allowed(self) -> torch.Tensor:
        """Bool [vocab_size]: the tokens the grammar allows next (EOS once the grammar is complete)."""
        bits = torch.frombuffer(bytearray(self.matcher.compute_bitmask()), dtype=torch.uint8)
        # bit j of byte k is token 8k + j (llguidance's little-endian 32-bit words, read bytewise)
        unpacked = (bits.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)) & 1
        return unpacked.flatten()[:self.vocab_size].bool()

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` ([V] or [1, V]) with the tokens the grammar forbids at -inf (a new tensor)."""
        allowed = self.allowed().to(logits.device)
        if not bool(allowed.any()):  # a grammar in an error state: only EOS, the reply ends
            allowed[self.eos_id] = True
        return logits.masked_fill(~allowed.expand_as(logits), float("-inf"))

    def accept(self, token: int) -> None:
        self.matcher.consume_token(int(token))

    @property
    def done(self) -> bool:
        """The grammar cannot take another token (the JSON value is closed): the reply ends here."""
        return self.matcher.is_stopped() or self.matcher.is_error()

    @property
    def failed(self) -> str | None:
        return self.matcher.get_error() if self.matcher.is_error() else None


def add_json_schema_arg(p: argparse.ArgumentParser) -> None:
    """--json_schema FILE: every reply is JSON valid under the schema in FILE ("object": any JSON object)."""
    p.add_argument("--json_schema", default=None, metavar="FILE",
                   help='reply with JSON valid under the JSON schema in FILE ("object": any JSON object); '
                        "constrained decoding, needs the [constrained] extra (llguidance)")


def schema_from_arg(value: str | None, flag: str = "--json_schema") -> tuple[bool, Any]:
    """(constrained?, schema) of the --json_schema flag; a missing or unreadable file or a schema llguidance
    refuses is a UserError naming the flag, raised before any model is loaded."""
    if value is None:
        return False, None
    if value == "object":
        schema = None
    else:
        path = Path(value)
        if not path.is_file():
            raise UserError(f"{flag} {value}: no such file (a JSON schema file, or \"object\")")
        try:
            schema = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{flag} {value}: not JSON ({e})") from None
        if not isinstance(schema, (dict, bool)):
            raise UserError(f"{flag} {value}: a JSON schema is an object")
    try:
        error = llguidance_module().LLMatcher.validate_grammar(json_schema_grammar(schema))
    except ConstraintError as e:
        raise UserError(f"{flag} {value}: {e}") from None
    if error:
        raise UserError(f"{flag} {value}: the schema cannot be enforced: {error.splitlines()[0]}")
    return True, schema
