import pathlib
import sys

from setuptools import find_packages, setup

if {"develop", "editable_wheel", "build_ext", "bdist_wheel"} & set(sys.argv):   # a build: the helper's old modules go
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent / "native"))
    from build_native import drop_other_builds
    drop_other_builds()

setup(
    name="shmrt",
    version="0.1.0",
    description="Shared-memory zero-copy split inference runtime for LLaMA (SGX enclave client + GPU daemon)",
    packages=find_packages(include=["shmrt", "shmrt.*"]),
    python_requires=">=3.10",
    setup_requires=["cffi>=1.16"],
    cffi_modules=["native/build_native.py:ffibuilder"],
    install_requires=[
        # torch is deliberately unpinned here; install the CPU build first (README): an
        # unpinned resolve on a machine without torch would pull a multi-GB CUDA build.
        "torch>=2.1",
        "numpy>=1.24",
        "posix_ipc>=1.1",
        "pyzmq>=25",
        "cffi>=1.16",
        "msgpack>=1.0",
        "safetensors>=0.4",
        "tokenizers>=0.15",
        "gguf>=0.10",      # llama.cpp's own GGUF reader and dequantizer
        "jinja2>=3",       # chat templates (rendered sandboxed)
    ],
    extras_require={
        "test": ["pytest>=7", "hypothesis>=6", "transformers>=4.45", "accelerate>=0.26"],
        "plot": ["matplotlib>=3.7"],
    },
    entry_points={"console_scripts": ["shmrt=shmrt.cli:main"]},
)
