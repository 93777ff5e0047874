"""csctr: category-specific CNNs for visual-aware CTR prediction, in JAX/Flax NNX."""

import setuptools

_BEAM = ["apache-beam[gcp]>=2.77,<3", "pyarrow>=14,<26", "psutil>=5.9,<8"]
# python -m csctr.serve (HTTP parser, event loop, JSON) and the load
# clients of benchmarks/http_stacks.py (aiohttp).
_SERVE = ["httptools>=0.6,<1", "orjson>=3.9,<4",
          "uvloop>=0.19,<1; sys_platform != 'win32'", "aiohttp>=3.9,<4"]

setuptools.setup(
    name="csctr",
    version="0.1.0",
    description="Category-Specific CNN (CSCNN) and DICM visual CTR models in JAX/Flax NNX.",
    # configs and benchmarks too: config files import each other, and
    # `python benchmarks/NAME.py` then runs without editing sys.path.
    packages=setuptools.find_packages(
        include=["csctr", "csctr.*", "configs", "benchmarks"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.4.35,<0.11",
        "flax>=0.10,<0.13",
        "optax>=0.2.4,<0.3",
        "orbax-checkpoint>=0.11,<0.13",
        "grain>=0.2.10,<0.3",
        "tensorflow-datasets>=4.9.7,<5",
        "array-record>=0.7,<0.9",
        "ml-collections>=1.0,<2",
        "absl-py>=2.1,<3",
        "numpy>=1.26,<3",
        "pillow>=10,<14",
        "scikit-learn>=1.4,<2",
        "tensorboardX>=2.6,<3",
    ],
    extras_require={
        "test": ["pytest>=8,<10", "flatbuffers>=23,<30", "matplotlib>=3.8,<4", "nbclient>=0.10,<1", "nbformat>=5.9,<6", "ipykernel>=6.29,<8",
                 # [gcp] and the GCS emulator the gs:// tests run against
                 "gcsfs>=2024.2", "google-cloud-storage>=2.14,<4", "gcp-storage-emulator>=2024.8",
                 *_SERVE, *_BEAM],
        # gs:// paths: gcsfs for etils.epath, google-cloud-storage for
        # tensorboardX's event files (Orbax writes arrays with tensorstore).
        "gcp": ["gcsfs>=2024.2", "google-cloud-storage>=2.14,<4"],
        "plots": ["matplotlib>=3.8,<4"],
        # benchmarks/peer_pytorch.py only (not in [test]: its test skips
        # without it). A torch already installed that satisfies the range is
        # kept; pip's CPU wheel: pip install torch==2.13.0.
        "peer": ["torch>=2.4,<3"],
        "serving": ["flatbuffers>=23,<30"],  # jax.export serialisation
        "serve": _SERVE,
        # python -m csctr.prepare --runner=<Beam runner>; Parquet logs
        # (pyarrow also reads them in-process); psutil: benchmarks/prepare.py.
        "beam": _BEAM,
    },
)
