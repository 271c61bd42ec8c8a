"""TensorBoard scalars, written as the event file format TensorBoard reads: a TFRecord stream
of `Event` protocol buffers. Scalars are all a run logs, so the few fields they need are
encoded here rather than through a TensorBoard writer library (tensorboardX imports PyTorch
wherever it is installed, a second per process)."""

import os
import socket
import struct
import time

from xmodal_jax import files


def _crc32c_table():
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    table.append(crc)
  return table


_CRC32C = _crc32c_table()


def crc32c(data):
  """CRC-32C (Castagnoli) of `data`."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC32C[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data):
  """TFRecord's checksum: the CRC-32C rotated and offset."""
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tf_record(data):
  """One TFRecord: length, its checksum, the data, its checksum."""
  length = struct.pack("<Q", len(data))
  return (length + struct.pack("<I", masked_crc32c(length)) + data +
          struct.pack("<I", masked_crc32c(data)))


def _varint(value):
  out = bytearray()
  while True:
    out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
    value >>= 7
    if not value:
      return bytes(out)


def _field(number, wire_type, payload):
  """A protocol-buffer field: key, then the payload (length-prefixed for wire type 2)."""
  key = _varint(number << 3 | wire_type)
  return key + (_varint(len(payload)) + payload if wire_type == 2 else payload)


def event(wall_time, step=0, file_version=None, scalars=None):
  """An encoded `Event`: wall_time (1), step (2), file_version (3), and a `Summary` (5) of
  `Value`s with tag (1) and simple_value (2)."""
  out = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
  if file_version:
    out += _field(3, 2, file_version.encode())
  if scalars:
    values = b"".join(
        _field(1, 2, _field(1, 2, tag.encode()) + _field(2, 5, struct.pack("<f", value)))
        for tag, value in scalars.items())
    out += _field(5, 2, values)
  return out


class EventFile:
  """An event file in the existing folder `logdir`, named as TensorBoard looks for them; each
  write appends (on an object store, files.py rewrites the object)."""

  def __init__(self, logdir):
    self.path = os.path.join(
        logdir, f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}")
    self._append(event(time.time(), file_version="brain.Event:2"))

  def _append(self, encoded):
    with files.open_file(self.path, "ab") as f:
      f.write(tf_record(encoded))

  def write_scalars(self, step, scalars):
    """Appends one event holding `scalars` ({tag: number}) at `step`."""
    self._append(event(time.time(), step=int(step), scalars=scalars))
