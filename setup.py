"""Package metadata for delf-tf: DELF local features and landmark retrieval on TensorFlow."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="delf-tf",
    version="0.1.0",
    description="DELF (DEep Local Features) landmark retrieval on TensorFlow, Keras 3 and TF Serving",
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["delf_tf", "delf_tf.*"]),
    install_requires=[
        "tensorflow>=2.21",
        "keras>=3",
        "tensorflow-datasets",
        "numpy",
        "scipy",
        "scikit-image",
        "absl-py",
        "pillow",
        "tqdm",
        "tensorflow-serving-api",
        "grpcio",
        "faiss-cpu",
        "threadpoolctl",
        "apache-beam",
        "prometheus-client",
    ],
    extras_require={
        # The Milvus back end of first-stage retrieval (Milvus Lite: embedded, no server).
        "milvus": ["pymilvus", "milvus-lite"],
        # jax[cpu]: tests/model/test_backends.py builds every architecture on JAX too.
        "dev": [
            "pytest",
            "pytest-xdist",
            "ruff",
            "selenium",
            "jax[cpu]",
            "pymilvus",
            "milvus-lite",
        ],
    },
    entry_points={"console_scripts": ["delf=delf_tf.cli:run_main"]},
)
