"""Opening what the pipeline writes: Hugging Face model folders and training run directories, with tokenizers.

Above model/ and tokenizer/ (and DeepSpeed, imported only to read ZeRO-partitioned run directories); below every
stage that runs a trained model (evaluation, inference, fine-tuning's starting point).
"""
from .open import check_device, default_device, default_dtype, load_model, load_tokenizer
from .run_dir import is_run_dir, load_checkpoint_model

__all__ = ["check_device", "default_device", "default_dtype", "load_model", "load_tokenizer", "is_run_dir",
           "load_checkpoint_model"]
