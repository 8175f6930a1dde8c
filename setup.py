"""Installs peft_jax (the library) and experiments (configs + the one trainer)."""

import pathlib

import setuptools


def _requirements(name):
  lines = pathlib.Path(__file__).with_name(name).read_text().splitlines()
  specs = (line.split('#')[0].strip() for line in lines)
  return [spec for spec in specs if spec]


setuptools.setup(
  name='peft_jax',
  version='0.1.0',
  description='Parameter-efficient fine-tuning for JAX/Flax, as pure functions '
  'over parameter pytrees.',
  long_description=pathlib.Path(__file__).with_name('README.md').read_text(),
  long_description_content_type='text/markdown',
  python_requires='>=3.11',
  packages=setuptools.find_packages(include=['peft_jax*', 'experiments*']),
  install_requires=_requirements('requirements.txt'),
  extras_require={'test': _requirements('requirements-test.txt')},
  license='Apache-2.0',
)
