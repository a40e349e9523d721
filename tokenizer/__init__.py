"""SentencePiece tokenizer: training (tokenizer.train), loading (Tokenizer), Hugging Face export (tokenizer.hf)."""
from tokenizer.tokenizer import StreamDecoder, Tokenizer

__all__ = ["StreamDecoder", "Tokenizer"]
