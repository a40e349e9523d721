"""Inference: quantized models, GGUF export, chat, the OpenAI-compatible server and the web demo."""
