"""Serves an embedding export over HTTP: a JSON API and a search page.

  python launch/serve.py --config=configs/audio_video_text.py --workdir=runs/avt \
      --export=emb/ [--port=8000] [--host=127.0.0.1]

Loads the run's model at the export's step once, compiles each query modality's embedding
step once, and answers queries (a text, or an uploaded audio, image or video file; several
make one fused query) with the top-k items of a gallery modality, their keys and scores,
through the export's FAISS index where it has one. The page at / shows the hits with their
media, read from the dataset's own records. API: xmodal_jax/serve/app.py and docs/guide.md,
"Serving an export". Listens on localhost unless --host says otherwise.
"""

import os
import socket
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import uvicorn

from common import ALLOW_CONFIG_CHANGE, CONFIG, WORKDIR  # launch/common.py
from xmodal_jax import experiment as experiment_lib
from xmodal_jax.eval import export, query
from xmodal_jax.serve import app as app_lib, searcher as searcher_lib

_EXPORT = flags.DEFINE_string("export", None, "An export folder (launch/export.py).")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (0.0.0.0: every "
                            "interface).")
_PORT = flags.DEFINE_integer("port", 8000, "Port to listen on (0: any free one).")
_MAX_UPLOAD_MB = flags.DEFINE_float("max_upload_mb", 20, "Largest query file accepted.")
_MAX_K = flags.DEFINE_integer("max_k", 100, "Most hits one search may ask for.")
_ACCESS_LOG = flags.DEFINE_bool("access_log", False, "Print a line per request.")
_ALLOW_OTHER_EXPORT = flags.DEFINE_bool(
    "allow_other_export", False, "Serve an export that another run or model config made.")
flags.mark_flags_as_required(["export"])


def listening_socket(host, port):
  """A socket bound to (host, port) and listening: the address is known (port 0 picks one)
  before the server starts, and a port in use is a usage error."""
  family = socket.AF_INET6 if ":" in host else socket.AF_INET
  sock = socket.socket(family, socket.SOCK_STREAM)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  try:
    sock.bind((host, port))
  except OSError as e:
    raise app.UsageError(f"--host={host} --port={port}: cannot listen there ({e})") from e
  sock.listen(128)
  return sock


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  if _MAX_K.value < 1 or _MAX_UPLOAD_MB.value <= 0:
    raise app.UsageError("--max_k and --max_upload_mb: expected positive values")
  exported = export.read_export(_EXPORT.value)
  sock = listening_socket(_HOST.value, _PORT.value)
  experiment = experiment_lib.setup(CONFIG.value, WORKDIR.value, step=exported.meta["step"],
                                    require_checkpoint=True,
                                    allow_config_change=ALLOW_CONFIG_CHANGE.value)
  problems = query.export_mismatches(exported.meta, WORKDIR.value, experiment.config.model)
  if problems and not _ALLOW_OTHER_EXPORT.value:
    raise app.UsageError(f"--export={_EXPORT.value}: " + "; ".join(problems)
                         + " (--allow_other_export to serve it anyway)")
  searcher = searcher_lib.Searcher(experiment, exported, max_k=_MAX_K.value)
  searcher.compile()
  service = app_lib.create_app(searcher,
                               max_upload_bytes=int(_MAX_UPLOAD_MB.value * (1 << 20)))
  host, port = sock.getsockname()[:2]
  shown = f"[{host}]" if ":" in host else host
  print(f"Serving {exported.meta['workdir']} (step {exported.meta['step']}) and "
        f"{_EXPORT.value} on http://{shown}:{port}/", flush=True)
  server = uvicorn.Server(uvicorn.Config(service, log_level="warning",
                                         access_log=_ACCESS_LOG.value))
  server.run(sockets=[sock])


if __name__ == "__main__":
  app.run(main)
