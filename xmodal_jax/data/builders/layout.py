"""Reading benchmark files as their publishers lay them out: JSON, CSV and whitespace tables
and folders, each error naming the file and pointing to the builder's docstring."""

import csv
import json
import os


def read_json(path):
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: missing (see the builder's docstring for the layout)")
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def read_csv(path):
  """[(line number, row dict)] of a CSV file with a header line."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: missing (see the builder's docstring for the layout)")
  with open(path, encoding="utf-8", newline="") as f:
    return [(i, row) for i, row in enumerate(csv.DictReader(f), 2)]


def find_dir(base, names, what):
  for name in names:
    if os.path.isdir(os.path.join(base, name)):
      return os.path.join(base, name)
  raise FileNotFoundError(f"{base}: no {what} folder (expected one of {list(names)})")


def read_table(path, columns):
  """[(line number, [field, ...])] of a whitespace-separated file with `columns` fields per
  line (the last one keeps any spaces)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: missing (see the builder's docstring for the layout)")
  rows = []
  with open(path, encoding="utf-8") as f:
    for line_number, line in enumerate(f, 1):
      if not line.strip():
        continue
      fields = line.strip().split(maxsplit=columns - 1)
      if len(fields) != columns:
        raise ValueError(f"{path}:{line_number}: expected {columns} fields, got "
                         f"{line.strip()!r}")
      rows.append((line_number, fields))
  return rows
