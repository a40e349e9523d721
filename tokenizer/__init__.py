"""SentencePiece tokenizer: training (tokenizer.train), loading (Tokenizer), Hugging Face export (tokenizer.hf)."""
from tokenizer.tokenizer import Tokenizer

__all__ = ["Tokenizer"]
