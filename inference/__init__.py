"""Running trained models: generation, chat, a continuous-batching engine, an OpenAI-compatible server, a web
demo, INT8/INT4 quantization and GGUF export."""
