"""Running trained models: chat, a continuous-batching engine, an OpenAI-compatible server and a web demo."""
