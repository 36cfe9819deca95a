from setuptools import find_packages, setup

setup(
    name="smaf",
    version="0.1.0",
    description="Weakly supervised semantic segmentation toolkit: SMAF multi-scale attention fusion + self-training",
    packages=find_packages(include=["smaf", "smaf.*"]),
    package_data={"smaf": ["configs/*.yaml", "configs/*/*.yaml", "configs/*/*/*.yaml"]},
    python_requires=">=3.9",
)
