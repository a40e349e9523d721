"""A thin, typed wrapper around a SentencePiece model: the one tokenizer every stage of the project uses.

Special ids (bos/eos/pad/unk) are read from the model itself, so a tokenizer trained with other ids, or with no
pad token at all (pad_id == -1), works everywhere without code changes.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import sentencepiece as spm

from common.errors import MissingFileError, UserError

MODEL_FILENAME = "tokenizer.model"


def resolve_model_path(path: str | os.PathLike) -> Path:
    """The tokenizer.model that `path` names: the file itself, or the one inside a directory."""
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILENAME
    if not path.is_file():
        raise MissingFileError(
            f"{path}: no SentencePiece model found; pass a tokenizer.model file or a directory that holds one"
        )
    return path


class Tokenizer:
    """Encode/decode text with a SentencePiece model (LLaMA/Baichuan style: BPE, byte fallback, dummy prefix)."""

    def __init__(self, path: str | os.PathLike, num_threads: int | None = None) -> None:
        """Load `path`: a tokenizer.model file or a directory containing one.

        num_threads bounds the threads used by encode_batch (default: all cores).
        """
        self.path: Path = resolve_model_path(path)
        data = self.path.read_bytes()
        self.sha256: str = hashlib.sha256(data).hexdigest()
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(data)
        except (RuntimeError, OSError) as e:  # sentencepiece reports a bad proto as RuntimeError/OSError
            raise UserError(f"{self.path}: not a valid SentencePiece model ({e})") from None
        self.num_threads = num_threads or os.cpu_count() or 1
        self.vocab_size: int = self.sp.vocab_size()
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        self.pad_id: int = self.sp.pad_id()
        self.unk_id: int = self.sp.unk_id()

    def _check_special(self, bos: bool, eos: bool) -> None:
        if bos and self.bos_id < 0:
            raise ValueError(f"{self.path}: this tokenizer has no BOS token, encode with bos=False")
        if eos and self.eos_id < 0:
            raise ValueError(f"{self.path}: this tokenizer has no EOS token, encode with eos=False")

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of `text`, optionally wrapped in the model's BOS/EOS ids."""
        self._check_special(bos, eos)
        return self.sp.encode(text, add_bos=bos, add_eos=eos)

    def encode_batch(self, texts: Sequence[str], bos: bool = False, eos: bool = False) -> list[list[int]]:
        """Token ids of many texts at once; SentencePiece spreads the batch over num_threads C++ threads."""
        self._check_special(bos, eos)
        if not texts:
            return []
        return self.sp.encode(list(texts), add_bos=bos, add_eos=eos, num_threads=self.num_threads)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; control tokens (BOS/EOS/pad) decode to nothing, byte-fallback pieces to their bytes."""
        ids = [int(i) for i in ids]  # accepts numpy/torch integers too
        if ids and not (0 <= min(ids) and max(ids) < self.vocab_size):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        return self.sp.decode(ids)

    def piece_to_id(self, piece: str) -> int:
        """Id of a vocabulary piece (the unk id when the piece is not in the vocabulary)."""
        return self.sp.piece_to_id(piece)

    def id_to_piece(self, id: int) -> str:
        """Vocabulary piece of a token id."""
        if not 0 <= int(id) < self.vocab_size:
            raise ValueError(f"token id {id} is outside the vocabulary [0, {self.vocab_size})")
        return self.sp.id_to_piece(int(id))

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (
            f"Tokenizer(path={str(self.path)!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
            f"eos_id={self.eos_id}, pad_id={self.pad_id}, unk_id={self.unk_id})"
        )


class StreamDecoder:
    """The text of a growing sequence of ids, a piece at a time, at a cost per token that does not grow with the
    sequence (decoding everything again at every token costs O(n) each, O(n^2) per reply).

    Each new token is decoded together with the ids since the last piece of text returned (the same start for
    "before" and "after", so SentencePiece's dropped leading space and byte-fallback pieces come out as in a whole
    decode), and its text is returned once it no longer ends in half a UTF-8 character. `context` ids (e.g. the
    prompt's last token) are decoded in front and never returned, so that a reply continuing a word keeps its
    leading space.
    """

    def __init__(self, tokenizer: Tokenizer, context: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        if "\ufffd" in tokenizer.decode(context):  # half a character: no clean boundary to continue from
            context = ()
        self.ids = [int(i) for i in context]
        self.start = 0  # ids[start:done] is the context of the next piece: already returned (or given) text
        self.done = len(self.ids)

    def push(self, token: int) -> str:
        """Add a token; return the text it completes (possibly "")."""
        self.ids.append(int(token))
        new = self._pending()
        if not new or new.endswith("\ufffd"):
            return ""  # nothing yet (a control token), or a character still incomplete
        self.start, self.done = self.done, len(self.ids)
        return new

    def flush(self) -> str:
        """The text of ids still held back (an incomplete character decodes to U+FFFD); the stream ends here."""
        new = self._pending()
        self.start = self.done = len(self.ids)
        return new

    def _pending(self) -> str:
        """The text the ids after `done` add to the returned text (decoded from `start`, see the class doc)."""
        before = self.tokenizer.decode(self.ids[self.start:self.done])
        return self.tokenizer.decode(self.ids[self.start:])[len(before):]
