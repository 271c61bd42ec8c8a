"""Config-string variants: `--config=configs/x.py:tiny,align_fuse` -> flags by name.

A config file lists the variants it takes and reads them as booleans; each variant's
settings are written once, so the order of names in the string never matters.
"""

import types


def parse(variant, choices, path):
  """`variant` ("a,b", possibly empty) -> a namespace with one bool per name in `choices`;
  an unknown name is an error naming the config file `path` and the choices."""
  given = set(filter(None, (name.strip() for name in variant.split(","))))
  unknown = given - set(choices)
  if unknown:
    raise ValueError(f"{path}: unknown variant(s) {sorted(unknown)}; expected some of "
                     f"{', '.join(choices)}")
  return types.SimpleNamespace(**{name: name in given for name in choices})
