"""IronCore: Megatron-style distributed pretraining for GPT and LLaMA models."""

from setuptools import find_packages, setup

setup(
    name="ironcore",
    version="0.1.0",
    description="Megatron-style tensor/pipeline/data-parallel pretraining toolkit for GPT and LLaMA",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["ironcore", "ironcore.*"]),
    package_data={"ironcore": ["assets/*.tiktoken", "assets/*.txt", "assets/*.jsonl"]},
    include_package_data=True,
    # torch is left unpinned here so GPU clusters keep the build their site provides; CPU machines
    # pin torch==2.13.0 on the install line (see README) to avoid pulling a CUDA build.
    install_requires=[
        "torch>=2.4",
        "numpy>=1.24",
        "pyyaml>=6.0",
        "tiktoken>=0.7",
        "tensorboard>=2.14",
        "mlflow-skinny>=2.10",
        "tqdm>=4.60",
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-timeout>=2.2", "transformers>=4.40", "safetensors>=0.4"],
        "gpu": ["flash-attn>=2.5"],
        # optional test peers: the DPO loss is checked against TRL's when it is installed
        "peers": ["trl>=1.0"],
        # lm-evaluation-harness for the `ironcore` model type (ironcore.inference.lm_eval_adapter); [hf]
        # brings accelerate, which lm-eval's own `hf` model type (the parity reference) needs.
        "eval": ["lm-eval[hf]>=0.4.13,<0.5"],
    },
    entry_points={"console_scripts": ["ironcore=ironcore.cli:main"]},
)
