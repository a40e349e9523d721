"""Opening what the pipeline writes: Hugging Face model folders, training run directories (pretraining, full and
LoRA fine-tuning) and quantized folders, with tokenizers. `open_model` is the one opener every command uses.

Above model/ and tokenizer/ (and DeepSpeed, imported only to read ZeRO-partitioned run directories); below every
stage that runs a trained model (evaluation, inference, fine-tuning's starting point).
"""
from .devices import check_device, default_device, default_dtype
from .open import add_quantize_args, load_tokenizer, open_model
from .run_dir import is_run_dir, load_checkpoint_model

__all__ = ["add_quantize_args", "check_device", "default_device", "default_dtype", "load_tokenizer", "open_model",
           "is_run_dir", "load_checkpoint_model"]
