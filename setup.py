"""Ember + Leviathan on DeepSpeed: cheap token interfaces for LM pretraining."""
from setuptools import find_packages, setup

setup(
    name="ember-ds",
    version="0.1.0",
    description="Ember (O(V+D) optimizer for token tables) and Leviathan (continuous "
    "embedding generator) for DeepSpeed / megatron-core pretraining",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["ember_ds", "ember_ds.*", "models", "models.*",
                                    "launch", "launch.*"]),
    package_data={"launch": ["corpus/*", "*.sh", "multinode/*"]},
    install_requires=[
        "torch>=2.4,<2.14",
        "deepspeed>=0.19.5,<0.20",
        "megatron-core>=0.16.1,<0.17",
        "sentencepiece>=0.2,<0.3",
        "triton>=3.0",
        "numpy>=1.24",
        "tqdm>=4.60",
    ],
    extras_require={
        # NVIDIA apex is optional (fused norms when present) and built from source by the
        # user: never the unrelated PyPI package named "apex".
        "plots": ["matplotlib>=3.7"],
        "test": ["pytest>=8", "matplotlib>=3.7", "transformers>=4.45", "accelerate>=1.0"],
        # Hugging Face models and the HF Trainer route (ds_config with "auto" values).
        "hf": ["transformers>=4.45", "accelerate>=1.0"],
    },
)
