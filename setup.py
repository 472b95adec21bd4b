"""Ember + Leviathan on DeepSpeed: cheap token interfaces for LM pretraining."""
import runpy
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

try:  # setuptools >= 64: PEP 660 editable installs (pip install -e .)
    from setuptools.command.editable_wheel import editable_wheel
except ImportError:  # pragma: no cover
    editable_wheel = None


def autoload_pth():
    """(file name, text) of the .pth that registers Ember when deepspeed is imported, made from
    ember_ds/_autoload.py (read as a file: the package itself needs torch)."""
    hook = runpy.run_path(str(Path(__file__).resolve().parent / "ember_ds" / "_autoload.py"),
                          run_name="ember_ds_autoload_build")
    return hook["PTH_NAME"], hook["pth_line"]()


class BuildPyAutoload(build_py):
    """Wheels and ``pip install .``: the .pth goes to the top of build_lib, hence of the wheel's
    purelib, hence into site-packages."""

    def run(self):
        super().run()
        self._autoload_outputs = []
        if not getattr(self, "editable_mode", False):
            name, text = autoload_pth()
            target = Path(self.build_lib, name)
            target.write_text(text, encoding="utf-8")
            self._autoload_outputs = [str(target)]

    def get_outputs(self, include_bytecode=1):
        return super().get_outputs(include_bytecode) + getattr(self, "_autoload_outputs", [])


CMDCLASS = {"build_py": BuildPyAutoload}
if editable_wheel is not None:
    class EditableWheelAutoload(editable_wheel):
        """``pip install -e .``: the editable wheel carries the same .pth (setuptools has no
        public hook for extra files in it; _run_build_commands fills the unpacked wheel)."""

        def _run_build_commands(self, dist_name, unpacked_wheel, build_lib, tmp_dir):
            out = super()._run_build_commands(dist_name, unpacked_wheel, build_lib, tmp_dir)
            name, text = autoload_pth()
            Path(unpacked_wheel, name).write_text(text, encoding="utf-8")
            return out

    CMDCLASS["editable_wheel"] = EditableWheelAutoload

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
    package_data={"launch": ["corpus/*", "*.sh", "multinode/*"], "ember_ds": ["csrc/*.cpp"]},
    cmdclass=CMDCLASS,
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
