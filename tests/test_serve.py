"""launch/serve.py on the suite's trained run and its export (conftest.short_export), queried
over HTTP as a client would, and its search page driven by a real headless browser."""

import io
import os
import shutil
import subprocess
import sys
import wave

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import REPO, xla_flags

pytestmark = pytest.mark.slow

MAX_UPLOAD_MB = 0.5
# Where the page's screenshot goes (CI keeps the folder as a test artefact).
ARTEFACTS = os.environ.get("XMODAL_TEST_ARTEFACTS", os.path.join(REPO, ".cache", "artefacts"))


@pytest.fixture(scope="module")
def service(trained_run, short_export):
  """The base URL of launch/serve.py over the trained run and its export, on a free port."""
  args, _, _ = trained_run
  env = dict(os.environ, XLA_FLAGS=xla_flags(1), JAX_PLATFORMS="cpu")
  proc = subprocess.Popen(
      [sys.executable, os.path.join(REPO, "launch", "serve.py"), *args,
       f"--export={short_export}", "--port=0", f"--max_upload_mb={MAX_UPLOAD_MB}"],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  printed = []
  for line in proc.stdout:  # it prints where it listens once it is ready
    printed.append(line)
    if line.startswith("Serving "):
      break
  if proc.poll() is not None or not printed or not printed[-1].startswith("Serving "):
    proc.kill()
    raise AssertionError("serve.py did not start:\n" + "".join(printed)
                         + proc.stderr.read()[-5000:])
  url = printed[-1].split(" on ")[-1].strip()
  assert url.startswith("http://127.0.0.1:")  # localhost unless told otherwise
  yield url.rstrip("/")
  proc.terminate()
  proc.wait(timeout=30)


def read_export(folder):
  """(keys, {modality: float32 [N, D]}, {modality: bool[N]}) with NumPy and pyarrow."""
  import json  # pylint: disable=g-import-not-at-top
  with open(os.path.join(folder, "meta.json")) as f:
    meta = json.load(f)
  tables = [pq.read_table(os.path.join(folder, "items", f"{s['name']}.parquet"))
            for s in meta["shards"]]
  keys = np.array([k for t in tables for k in t.column("key").to_pylist()])
  emb = {m: np.concatenate([np.load(os.path.join(folder, "embeddings", m, f"{s['name']}.npy"))
                            for s in meta["shards"]]) for m in meta["dims"]}
  masks = {m: np.concatenate([t.column(f"has_{m}").to_numpy() for t in tables])
           for m in meta["dims"]}
  return keys, emb, masks


def stored_items(data_dir, count=3):
  """The first `count` test items as the dataset stores them (TFDS, not the service)."""
  from xmodal_jax.data.builders import digit_sequences  # pylint: disable=g-import-not-at-top
  ds = digit_sequences.DigitSequences(data_dir=data_dir).as_dataset(
      split="test", shuffle_files=False)
  return list(ds.take(count).as_numpy_iterator())


def dense_topk(query, gallery, k):
  """Rows by score descending, ties by row ascending, written out plainly."""
  scores = gallery @ query
  order = sorted(range(len(gallery)), key=lambda i: (-scores[i], i))[:k]
  return order, scores[order]


def test_text_query_hits_equal_exact_search_over_the_export(service, short_export,
                                                            digit_data_dir):
  keys, emb, masks = read_export(short_export)
  item = stored_items(digit_data_dir, 1)[0]
  caption = item["text"].decode()
  embedded = httpx.post(f"{service}/api/embed", data={"text": caption}, timeout=60)
  assert embedded.status_code == 200, embedded.text
  query = np.asarray(embedded.json()["text"], np.float32)
  # The query is prepared as evaluation prepared the item's caption: the export's own row.
  row = int(np.flatnonzero(keys == str(item["id"]))[0])
  np.testing.assert_allclose(query, emb["text"][row], atol=2e-5)
  gallery_rows = np.flatnonzero(masks["video"])
  expected, scores = dense_topk(query, emb["video"][gallery_rows], 10)
  for exact in ("1", "0"):  # exact search, and the export's flat FAISS index
    found = httpx.get(f"{service}/api/search", params={
        "text": caption, "gallery": "video", "k": 10, "exact": exact}, timeout=60).json()
    assert found["how"] == ("exact" if exact == "1" else "FAISS IndexIDMap2")
    assert [h["key"] for h in found["hits"]] == list(keys[gallery_rows[expected]])
    assert [h["row"] for h in found["hits"]] == list(gallery_rows[expected])
    np.testing.assert_allclose([h["score"] for h in found["hits"]], scores, atol=2e-5)
    assert [h["rank"] for h in found["hits"]] == list(range(1, 11))
    assert all(h["media"].startswith("/api/media?") and h["caption"] for h in found["hits"])


def test_files_query_and_media_come_from_the_dataset(service, short_export, digit_data_dir):
  keys, emb, _ = read_export(short_export)
  item = stored_items(digit_data_dir, 1)[0]
  key = str(item["id"])
  row = int(np.flatnonzero(keys == key)[0])
  # The item's audio, served as WAV: the stored samples at the tower's rate.
  audio = httpx.get(f"{service}/api/media", params={"key": key, "modality": "audio"})
  assert audio.status_code == 200 and audio.headers["content-type"] == "audio/wav"
  with wave.open(io.BytesIO(audio.content)) as f:
    assert (f.getframerate(), f.getnchannels()) == (8000, 1)
    np.testing.assert_array_equal(np.frombuffer(f.readframes(f.getnframes()), "<i2"),
                                  item["audio"])
  # Uploaded back as a query, it embeds as the export embedded the item's audio.
  embedded = httpx.post(f"{service}/api/embed",
                        files={"audio": ("clip.wav", audio.content, "audio/wav")}, timeout=60)
  np.testing.assert_allclose(embedded.json()["audio"], emb["audio"][row], atol=2e-5)
  # The item's video, served as WebM: its stored frames, 16x larger (8x8 pixels are tiny).
  import av  # pylint: disable=g-import-not-at-top
  video = httpx.get(f"{service}/api/media", params={"key": key, "modality": "video"})
  assert video.headers["content-type"] == "video/webm"
  with av.open(io.BytesIO(video.content)) as container:
    frames = np.stack([f.to_ndarray(format="gray") for f in container.decode(video=0)])
  stored = item["video"][..., 0].repeat(16, axis=1).repeat(16, axis=2)
  assert frames.shape == stored.shape
  assert np.abs(frames.astype(int) - stored).mean() < 6  # VP8 is lossy
  # A fused query (text + audio file) ranks as the normalized sum of the two embeddings.
  fused = emb["text"][row] + emb["audio"][row]
  fused /= np.linalg.norm(fused)
  expected, _ = dense_topk(fused, emb["video"], 5)
  found = httpx.post(f"{service}/api/search", data={"text": item["text"].decode(),
                                                    "gallery": "video", "k": 5,
                                                    "exact": "true"},
                     files={"audio": ("clip.wav", audio.content, "audio/wav")}, timeout=60)
  assert found.json()["query"] == ["audio", "text"]
  assert [h["key"] for h in found.json()["hits"]] == list(keys[expected])


BAD_REQUESTS = [
    # (method, path, params or form, files, status, part of the message)
    ("GET", "/api/search", {"image": "x", "gallery": "video"}, None, 400,
     "unknown query modality 'image'"),
    ("GET", "/api/search", {"text": "one", "gallery": "smell"}, None, 400,
     "unknown gallery modality 'smell'"),
    ("GET", "/api/search", {"text": "one"}, None, 400, "gallery: missing"),
    ("GET", "/api/search", {"text": "  ", "gallery": "video"}, None, 400,
     "expected a non-empty text"),
    ("GET", "/api/search", {"gallery": "video"}, None, 400, "no query"),
    ("GET", "/api/search", {"text": "one", "gallery": "video", "k": "0"}, None, 400,
     "k=0: expected 1 to 100"),
    ("GET", "/api/search", {"text": "one", "gallery": "video", "k": "101"}, None, 400,
     "k=101: expected 1 to 100"),
    ("GET", "/api/search", {"text": "one", "gallery": "video", "k": "ten"}, None, 400,
     "expected a whole number"),
    ("GET", "/api/search", {"text": "one", "gallery": "video", "rerank": "5"}, None, 400,
     "no fusion encoder"),
    ("POST", "/api/search", {"gallery": "text"}, {"audio": ("a.wav", b"RIFF" + bytes(99))},
     400, "cannot decode audio"),
    ("POST", "/api/search", {"gallery": "text"}, {"video": ("v.mp4", b"\0" * 500)}, 400,
     "cannot decode video"),
    ("POST", "/api/search", {"gallery": "text"}, {"text": ("t.txt", b"one two")}, 400,
     "takes a text, not a file"),
    ("POST", "/api/search", {"gallery": "text"},
     {"audio": ("big.wav", bytes(int(MAX_UPLOAD_MB * 2**20) + 1))}, 413, "upload limit"),
    ("POST", "/api/embed", {"text": "one", "k": "3"}, None, 400, "takes only queries"),
    ("GET", "/api/media", {"key": "no-such-item", "modality": "video"}, None, 404,
     "no such item in the export"),
    ("GET", "/api/media", {"key": "../../../../etc/passwd", "modality": "audio"}, None, 404,
     "no such item"),
    ("GET", "/api/media", {"key": "9933", "modality": "/etc/passwd"}, None, 400,
     "expected one of ['audio', 'video']"),
    ("GET", "/api/media", {"key": "9933"}, None, 422, "modality"),
]


def test_bad_requests_get_a_4xx_with_a_message_and_the_service_goes_on(service):
  for method, path, fields, upload, status, message in BAD_REQUESTS:
    if method == "GET":
      response = httpx.get(f"{service}{path}", params=fields, timeout=60)
    else:
      response = httpx.post(f"{service}{path}", data=fields, files=upload, timeout=60)
    assert response.status_code == status, (fields, response.text)
    assert message in response.text, (fields, response.text)
  answer = httpx.get(f"{service}/api/search", params={"text": "one two", "gallery": "audio",
                                                      "k": 3}, timeout=60)
  assert answer.status_code == 200 and len(answer.json()["hits"]) == 3


def browser():
  """Debian's chromium under selenium, headless; skipped where it is not installed unless
  XMODAL_REQUIRE_BROWSER is set (.ci/run installs it and sets it)."""
  chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
  if not (chromium and driver):
    if os.environ.get("XMODAL_REQUIRE_BROWSER"):
      raise AssertionError("no chromium and chromedriver on PATH (apt-get install chromium "
                           "chromium-driver; .ci/run does)")
    pytest.skip("chromium and chromedriver are not installed")
  from selenium import webdriver  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.chrome.service import Service  # pylint: disable=g-import-not-at-top
  options = webdriver.ChromeOptions()
  options.binary_location = chromium
  for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
               "--window-size=1280,900"):
    options.add_argument(flag)
  return webdriver.Chrome(service=Service(driver), options=options)


def test_the_page_shows_the_first_hit_with_its_video(service, digit_data_dir):
  from selenium.webdriver.common.by import By  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.support import ui  # pylint: disable=g-import-not-at-top
  caption = stored_items(digit_data_dir, 3)[2]["text"].decode()
  expected = httpx.get(f"{service}/api/search", params={"text": caption, "gallery": "video",
                                                        "k": 10}, timeout=60).json()["hits"]
  driver = browser()
  try:
    driver.get(f"{service}/")
    wait = ui.WebDriverWait(driver, 60)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#gallery option[value=video]"))
    driver.find_element(By.ID, "text").send_keys(caption)
    ui.Select(driver.find_element(By.ID, "gallery")).select_by_value("video")
    driver.find_element(By.ID, "search").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".hit video"))
    first = driver.find_elements(By.CSS_SELECTOR, ".hit")[0]
    assert first.get_attribute("data-key") == expected[0]["key"]
    assert expected[0]["key"] in first.text and f"{expected[0]['score']:.4f}" in first.text
    # The browser fetched and decoded every hit's video (HAVE_CURRENT_DATA or more).
    wait.until(lambda d: d.execute_script(
        "return [...document.querySelectorAll('.hit video')].every(v => v.readyState >= 2)"))
    os.makedirs(ARTEFACTS, exist_ok=True)
    assert driver.save_screenshot(os.path.join(ARTEFACTS, "search_page.png"))
    assert not [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
  finally:
    driver.quit()
