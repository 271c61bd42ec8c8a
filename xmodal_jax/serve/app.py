"""The retrieval service's HTTP interface (FastAPI): JSON endpoints over a Searcher and the
search page (docs/guide.md, "Serving an export").

  GET  /                 the search page
  GET  /api/info         the run, the export, the query and gallery modalities
  GET  /api/search       ?text=...&gallery=video&k=10[&exact=1][&rerank=N]
  POST /api/search       the same as a form; file fields (audio=@clip.wav) are queries, and
                         several query fields make one fused query
  POST /api/embed        a form of query fields -> their embeddings
  GET  /api/media        ?key=...&modality=... an item's media from the dataset's records

A request the searcher cannot answer gets a 4xx with {"detail": why}.
"""

import os

import fastapi
import numpy as np
from fastapi import responses
from starlette import concurrency, datastructures

from xmodal_jax.serve import searcher as searcher_lib

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "page.html")
MAX_FIELDS = 16


async def read_fields(request, max_upload_bytes):
  """{name: str or bytes} of a GET request's query or a POST request's form (files as
  bytes); QueryError (413) for a body or a file over `max_upload_bytes`."""
  if request.method == "GET":
    items = list(request.query_params.multi_items())
  else:
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > max_upload_bytes + 65_536:
      raise searcher_lib.QueryError(
          f"the request has {int(length)} bytes; uploads are limited to {max_upload_bytes} "
          "(--max_upload_mb)", status=413)
    form = await request.form(max_files=MAX_FIELDS, max_fields=MAX_FIELDS,
                              max_part_size=max_upload_bytes)
    items = list(form.multi_items())
  fields = {}
  for name, value in items:
    if name in fields:
      raise searcher_lib.QueryError(f"{name}: given twice")
    if isinstance(value, datastructures.UploadFile):
      data = await value.read(max_upload_bytes + 1)
      if len(data) > max_upload_bytes:
        raise searcher_lib.QueryError(
            f"{name}: the file {value.filename!r} is over the {max_upload_bytes}-byte upload "
            "limit (--max_upload_mb)", status=413)
      if not data:
        raise searcher_lib.QueryError(f"{name}: the file {value.filename!r} is empty")
      value = data
    fields[name] = value
  return fields


def split_fields(fields):
  """(queries, options) of a request's fields."""
  queries = {k: v for k, v in fields.items() if k not in searcher_lib.OPTIONS}
  return queries, {k: v for k, v in fields.items() if k in searcher_lib.OPTIONS}


def create_app(searcher, *, max_upload_bytes=20 << 20):
  """The FastAPI app serving `searcher` (serve/searcher.py)."""
  app = fastapi.FastAPI(title="xmodal_jax retrieval", docs_url="/api/docs",
                        openapi_url="/api/openapi.json", redoc_url=None)

  @app.exception_handler(searcher_lib.QueryError)
  async def query_error(request, error):
    del request
    return responses.JSONResponse({"detail": str(error)}, status_code=error.status)

  @app.get("/", response_class=responses.HTMLResponse)
  def page():
    with open(PAGE, encoding="utf-8") as f:
      return f.read()

  @app.get("/api/info")
  def info():
    return searcher.info()

  @app.api_route("/api/search", methods=["GET", "POST"])
  async def search(request: fastapi.Request):
    queries, options = split_fields(await read_fields(request, max_upload_bytes))
    if "gallery" not in options:
      raise searcher_lib.QueryError(f"gallery: missing; expected one of "
                                    f"{sorted(searcher.galleries)}")
    return await concurrency.run_in_threadpool(searcher.search, queries, **options)

  @app.post("/api/embed")
  async def embed(request: fastapi.Request):
    queries, options = split_fields(await read_fields(request, max_upload_bytes))
    if options:
      raise searcher_lib.QueryError(f"{sorted(options)}: /api/embed takes only queries")
    embedded = await concurrency.run_in_threadpool(searcher.embed, queries)
    return {name: np.asarray(emb[0], np.float32).tolist()
            for name, (emb, _) in embedded.items()}

  @app.get("/api/media")
  def media(key: str, modality: str):
    data, media_type = searcher.media(key, modality)
    return responses.Response(data, media_type=media_type,
                              headers={"Cache-Control": "max-age=3600"})

  return app
