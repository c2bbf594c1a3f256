"""Installs the `mixer` package: MLP-Mixer training, fine-tuning and released-weight tools."""

import pathlib

import setuptools

_HERE = pathlib.Path(__file__).parent


def _read_requirements(name):
  lines = (_HERE / name).read_text().splitlines()
  return [l.split('#')[0].strip() for l in lines if l.split('#')[0].strip()]


_RUNTIME = _read_requirements('requirements.txt')
_JAX_VERSION = next(r.split('==')[1] for r in _RUNTIME if r.startswith('jax=='))

setuptools.setup(
    name='mixer',
    version='0.1.0',
    description='JAX/Flax framework for MLP-Mixer: the paper recipe on TPU pods, GPUs and CPUs.',
    long_description=(_HERE / 'README.md').read_text(),
    long_description_content_type='text/markdown',
    python_requires='>=3.11',
    # Namespace discovery so the data folder (class names) is a package too.
    packages=setuptools.find_namespace_packages(include=['mixer', 'mixer.*'],
                                                exclude=['*.__pycache__']),
    package_data={'mixer': ['data/*.txt', 'data/README.md']},
    include_package_data=True,
    install_requires=_RUNTIME,
    extras_require={
        'dev': _read_requirements('requirements-dev.txt'),
        # Same jax version as the CPU stack, with the accelerator runtime. jax[tpu] asks
        # for libtpu==0.0.42.*; the exact build is pinned here (and in constraints.txt).
        # `make install` installs it too: compile_check compiles for TPU slices with it.
        'tpu': [f'jax[tpu]=={_JAX_VERSION}', 'libtpu==0.0.42.1'],
        'gpu': [f'jax[cuda12]=={_JAX_VERSION}'],
        # mixer.export / mixer.serving: build and run ONNX, run TFLite (tf.lite.Interpreter
        # is deprecated in favour of ai-edge-litert). SavedModel/TFLite conversion is TF's own.
        'export': ['onnx==1.23.2', 'onnxruntime==1.31.1', 'ai-edge-litert==2.3.0'],
    },
    license='Apache-2.0',
)
