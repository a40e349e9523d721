"""Chat templates for inference: the model's Jinja `chat_template`, rendered the way transformers'
apply_chat_template does, or the plain Human/Assistant fallback of a base model without one.

The one implementation is tokenizer/chat_template.py (shared with fine-tuning and evaluation); inference's modules
import these names from here.
"""
from __future__ import annotations

from tokenizer.chat_template import FALLBACK_STOP, FALLBACK_TEMPLATE, ChatTemplate, check_messages, load_chat_template

__all__ = ["FALLBACK_STOP", "FALLBACK_TEMPLATE", "ChatTemplate", "check_messages", "load_chat_template"]
