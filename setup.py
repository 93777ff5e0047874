"""csctr: category-specific CNNs for visual-aware CTR prediction, in JAX/Flax NNX."""

import setuptools

BEAM = ["apache-beam[gcp]>=2.77,<3", "pyarrow>=14,<26", "psutil>=5.9,<8"]

setuptools.setup(
    name="csctr",
    version="0.1.0",
    description="Category-Specific CNN (CSCNN) and DICM visual CTR models in JAX/Flax NNX.",
    packages=setuptools.find_packages(include=["csctr", "csctr.*"]),
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
                 *BEAM],
        "plots": ["matplotlib>=3.8,<4"],
        "serving": ["flatbuffers>=23,<30"],  # jax.export serialisation
        # python -m csctr.prepare --runner=<Beam runner>; Parquet logs
        # (pyarrow also reads them in-process); psutil: benchmarks/prepare.py.
        "beam": BEAM,
    },
)
