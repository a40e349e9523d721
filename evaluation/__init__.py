"""Few-shot MMLU (evaluate_mmlu.py) and C-Eval (evaluate_zh.py) evaluation with the reference prompts."""
