"""Readable class names for the released heads and for user label files.

`get_label_names('imagenet2012')` gives the 1000 ImageNet-1k names in class
order (the order of the released imagenet1k/sam/gsam heads and of TFDS
`imagenet2012`); `'imagenet21k'` the 21843 names in the order of the released
ImageNet-21k heads. The lists ship in `mixer/data/` (see its README.md for
their source and licence).
"""

from __future__ import annotations

import importlib.resources
import os

# Label-set name -> file in mixer/data, one 'synset<TAB>names' line per class.
_BUILTIN = {
    'imagenet2012': 'imagenet2012_labels.txt',
    'imagenet21k': 'imagenet21k_labels.txt',
}


def _parse(text: str, source: str) -> list[str]:
  """One class a line; of a 'id<TAB>name' line only the name is kept."""
  lines = text.splitlines()
  while lines and not lines[-1].strip():  # A trailing newline is not a class.
    lines.pop()
  names = [line.split('\t', 1)[-1].strip() for line in lines]
  empty = [i + 1 for i, name in enumerate(names) if not name]
  if empty:
    raise ValueError(
        f'{source}: line(s) {empty[:5]} have no class name. Write one name per line, '
        'without blank lines, in class-index order.')
  if not names:
    raise ValueError(f'{source}: no class names. Write one name per line, in class order.')
  return names


def get_label_names(spec: str | os.PathLike[str]) -> list[str]:
  """Class names, in class-index order.

  Args:
    spec: 'imagenet2012', 'imagenet21k', or the path of a UTF-8 text file with
      one class name a line (a line 'id<TAB>name' gives 'name').

  Raises:
    ValueError: `spec` is neither a known label set nor a readable file, or the
      file has an empty line.
  """
  spec_str = os.fspath(spec)
  if spec_str in _BUILTIN:
    resource = importlib.resources.files('mixer') / 'data' / _BUILTIN[spec_str]
    return _parse(resource.read_text(encoding='utf-8'), spec_str)
  if not os.path.isfile(spec_str):
    raise ValueError(
        f'Labels {spec_str!r}: not a known label set and no such file. Use '
        f'{" or ".join(repr(k) for k in _BUILTIN)}, or the path of a text file with one '
        'class name a line.')
  with open(spec_str, encoding='utf-8') as f:
    return _parse(f.read(), spec_str)
