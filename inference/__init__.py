"""Running trained models: text generation (and, later, serving)."""
