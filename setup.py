"""Install with `pip install torch==2.13.0 && pip install -c constraints.txt -e .[test]`.

torch is pinned through constraints.txt on CPU machines: an unpinned torch pulls the CUDA build.
"""
from setuptools import find_packages, setup

setup(
    name="llama-pretrain",
    version="0.1.0",
    description="Pretrain LLaMA-style Chinese/English base models: tokenizer, data, model, DeepSpeed training, evaluation",
    python_requires=">=3.10",
    packages=find_packages(include=["common*", "model*", "tokenizer*", "artifacts*", "pretrain*", "evaluation*",
                                    "inference*"]),
    install_requires=[
        "torch>=2.1",
        "deepspeed>=0.14",
        "sentencepiece>=0.2",
        "numpy>=1.24",
        "safetensors>=0.4",
        "transformers>=4.40",
        "tokenizers>=0.19",  # tokenizer/hf.py builds tokenizer.json directly
        "protobuf>=3.20",  # transformers needs it to read SentencePiece models
        "tqdm>=4.60",
        "pyyaml>=6.0",
        "matplotlib>=3.7",
        "tensorboard>=2.14",
        "psutil>=5.9",
        "gguf>=0.10",  # inference/gguf.py: GGUF export for llama.cpp
    ],
    extras_require={
        "gpu": ["flash-attn>=2.5", "xformers>=0.0.25"],
        "wandb": ["wandb>=0.16"],
        "test": ["pytest>=7.4", "pytest-timeout>=2.2"],
        "bench": ["lm_eval>=0.4"],
    },
    entry_points={
        "console_scripts": [
            "llama-train-tokenizer=tokenizer.train:main",
            "llama-tokenizer-stats=tokenizer.stats:main",
            "llama-prepare-data=pretrain.prepare_data:main",
            "llama-export=pretrain.export:main",
            "llama-generate=model.generate:main",
            "llama-quantize=inference.quantize:main",
            "llama-gguf=inference.gguf:main",
        ]
    },
)
