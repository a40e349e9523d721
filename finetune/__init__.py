"""Fine-tuning: instruction tuning (full or LoRA) on the shared training core, adapter merging and delta weights."""
