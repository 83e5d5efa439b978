from setuptools import find_packages, setup

setup(
    name="opensora_duca",
    version="0.1.0",
    description="Training-free DuCa dual feature caching for Open-Sora-style video DiTs (STDiT3)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["opensora_duca", "opensora_duca.*"]),
    # the demo model and its config ship inside the package: `opensora-duca demo` from anywhere
    package_data={"opensora_duca": ["assets/*.safetensors", "assets/*.json", "assets/*.py"]},
    entry_points={"console_scripts": ["opensora-duca = opensora_duca.cli.main:console_main"]},
    python_requires=">=3.9",
    install_requires=["torch>=2.3", "mmengine>=0.10.3", "av>=12", "safetensors", "numpy",
                      "tqdm"],
    extras_require={
        "flash-attn": ["flash-attn"],
        "xformers": ["xformers"],
        "colossalai": ["colossalai"],
        "t5": ["transformers", "sentencepiece"],
        # vbench 0.1.5 must be installed with --no-deps (see requirements-vbench.txt)
        "vbench": ["vbench==0.1.5", "decord", "opencv-python-headless", "numpy<2"],
        "tests": ["pytest", "matplotlib"],
    },
)
