"""One training run per workdir: an exclusive lock on {workdir}/run.lock.

The lock is the kernel's (fcntl.flock on an open file): it is released however its holder
ends, SIGKILL included, so a dead run's lock is never stale. The file names the holder (host,
PID, start time) for the refusal message. Only local workdirs can be locked: a bucket has no
such lock, so a gs:// workdir is protected by nothing but the user (docs/architecture.md).
"""

import contextlib
import fcntl
import json
import os
import socket
import time

LOCK_FILE = "run.lock"


class WorkdirLocked(RuntimeError):
  """Another live process trains in this workdir."""


@contextlib.contextmanager
def hold(workdir):
  """Holds the workdir's lock for the block; raises WorkdirLocked naming the holder when
  another process has it. A bucket workdir (a "scheme://" path) is not locked."""
  if "://" in workdir:
    yield
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_FILE)
  with open(path, "a+") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      raise WorkdirLocked(f"{workdir}: another run trains here ({holder(f.read())}); two runs "
                          "in one workdir overwrite each other's checkpoints and metrics. "
                          "Wait for it, stop it, or choose another --workdir") from None
    f.seek(0)
    f.truncate()
    f.write(json.dumps(dict(host=socket.gethostname(), pid=os.getpid(),
                            started=time.strftime("%Y-%m-%d %H:%M:%S"))) + "\n")
    f.flush()
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def holder(text):
  """The lock file's holder in words."""
  try:
    held = json.loads(text)
    return f"host {held['host']}, PID {held['pid']}, since {held['started']}"
  except (ValueError, KeyError, TypeError):
    return "holder unknown"
