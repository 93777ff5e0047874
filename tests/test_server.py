"""The HTTP scorer in a subprocess, over real HTTP on 127.0.0.1.

Raw ids in -> the trainer's eval logits out; bad requests -> their 4xx; a
table and a checkpoint swapped in under concurrent load without a lost or
mixed request.
"""

import base64
import concurrent.futures
import http.client
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import urllib.parse

import numpy as np
from PIL import Image
import pytest

from csctr import rundir
from csctr.data import pipeline
from csctr.data import vocab as vocab_lib
from csctr.serving import export
from csctr.serving import server
import testutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKEN = "s3cret"
MAX_CANDIDATES = 300
MAX_BODY = 64 * 1024
ATOL = 1e-5


def _item_rows(data_path):
  """image row -> item_id vocabulary row, from the dataset's impressions."""
  rows = {}
  for split in ("train", "test"):
    groups = pipeline.groups_source(data_path, split)
    for i in range(len(groups)):
      rows[int(groups[i]["item"])] = int(groups[i]["sparse"][0, 1])
  return rows


@pytest.fixture(scope="module")
def run(trained_tiny_workdir, tmp_path_factory):
  """A copy of the tiny run whose dataset has raw-id vocabularies and whose
  table is keyed by raw item ids 'item-K' (K = image row)."""
  root = tmp_path_factory.mktemp("served")
  workdir = str(root / "run")
  shutil.copytree(trained_tiny_workdir, workdir)
  shutil.rmtree(os.path.join(workdir, export.TABLES_DIR), ignore_errors=True)
  _, info, data_path = rundir.load_run_files(workdir)
  data = str(root / "data")
  shutil.copytree(data_path, data)
  with open(os.path.join(workdir, rundir.DATA_INFO_FILE)) as f:
    data_info = json.load(f)
  with open(os.path.join(workdir, rundir.DATA_INFO_FILE), "w") as f:
    json.dump({**data_info, "data_path": data}, f)
  item_rows = _item_rows(data)
  by_row = {r: k for k, r in item_rows.items() if r}
  users, items, cats = info.vocab_sizes[:3]
  vocab_lib.save_vocabularies(data, {  # position: no file (integer rows)
      "user_id": _vocab("user_id", [f"user-{r}" for r in range(1, users)]),
      "item_id": _vocab("item_id", [f"item-{by_row.get(r, -r)}"
                                    for r in range(1, items)]),
      "category_id": _vocab("category_id",
                            [f"cat-{r}" for r in range(1, cats)])})
  images = np.load(os.path.join(data, "images.npy"))
  categories = np.load(os.path.join(data, "item_category.npy"))
  npz = str(root / "catalogue.npz")
  old = np.arange(100)  # the first table lacks items 100..119
  np.savez(npz, images=images[old], categories=categories[old], ids=old,
           raw_ids=np.array([f"item-{k}" for k in old]))
  export.export(workdir, images=npz, progress=False)
  cold = [k for k in old if item_rows.get(k, 0) == 0]  # OOV item_id rows
  return {"workdir": workdir, "data": data, "root": root, "info": info,
          "images": images, "categories": categories, "cold": cold}


def server_env():
  return {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}


def _vocab(name, ids):
  return vocab_lib.Vocabulary(name, tuple(ids), np.ones(len(ids), np.int64))


@pytest.fixture(scope="module")
def url(run):
  token_file = run["root"] / "token"
  token_file.write_text(TOKEN + "\n")
  log = open(run["root"] / "server.log", "w")  # pylint: disable=consider-using-with
  proc, base = server.spawn(
      run["workdir"], f"--auth_token_file={token_file}",
      f"--max_candidates={MAX_CANDIDATES}", f"--max_body_bytes={MAX_BODY}",
      "--batch_wait_ms=20", "--watch_interval_s=0", stderr=log)
  yield base
  proc.terminate()
  assert proc.wait(timeout=60) == 0  # a clean shutdown, no crash
  log.close()


class Client:
  """One keep-alive connection (http.client), a request at a time."""

  def __init__(self, base):
    parts = urllib.parse.urlsplit(base)
    self.conn = http.client.HTTPConnection(parts.hostname, parts.port,
                                           timeout=60)

  def call(self, method, path, body=None, token=TOKEN, headers=None):
    headers = dict(headers or {})
    if token:
      headers["Authorization"] = f"Bearer {token}"
    if isinstance(body, dict):
      body = json.dumps(body).encode()
    self.conn.request(method, path, body=body, headers=headers)
    response = self.conn.getresponse()
    data = response.read()
    ctype = response.getheader("Content-Type", "")
    return response.status, (json.loads(data) if "json" in ctype else data)


def _score(base, request):
  status, out = Client(base).call("POST", "/v1/score", request)
  assert status == 200, out
  return out


def test_scores_equal_the_trainers_eval_logits_on_raw_ids(run, url):
  workdir, data = run["workdir"], run["data"]
  vocab = vocab_lib.load_vocabularies(data)
  raw = {name: dict(zip(v.lookup(v.ids), v.ids)) for name, v in vocab.items()}
  requests, expected = [], []
  for batch, logits, item, real in testutil.trainer_eval_slots(workdir, data):
    sparse = batch["sparse"]
    for user in np.unique(sparse[real, 0]):  # a request per user and batch
      rows = real[sparse[real, 0] == user]
      requests.append({
          "user": {"user_id": raw["user_id"][user]},
          "candidates": {
              "item_id": [f"item-{i}" for i in item[rows]],
              "category_id": [raw["category_id"][c] for c in sparse[rows, 2]],
              "position": [int(p) for p in sparse[rows, 3]]}})
      expected.append(logits[rows])
  # Item ids of cold items are not in the item_id vocabulary: OOV, as the
  # dataset has them (row 0); items >= 100 are not in the table.
  kept = [(r, e) for r, e in zip(requests, expected)
          if all(int(i[5:]) < 100 for i in r["candidates"]["item_id"])]
  requests, expected = [r for r, _ in kept], [e for _, e in kept]
  with concurrent.futures.ThreadPoolExecutor(8) as pool:  # merged batches
    responses = list(pool.map(lambda r: _score(url, r), requests))
  compared = 0
  for request, response, want in zip(requests, responses, expected):
    np.testing.assert_allclose(response["logits"], want, atol=ATOL)
    np.testing.assert_allclose(response["scores"],
                               1 / (1 + np.exp(-np.asarray(want))), atol=ATOL)
    assert response["misses"] == 0 and response["model_version"] == "6"
    compared += len(request["candidates"]["item_id"])
  assert compared > 300
  _, metrics = Client(url).call("GET", "/metrics")
  merged = _metric(metrics, "csctr_batch_requests_sum")
  assert merged > _metric(metrics, "csctr_batch_requests_count")


def _metric(text, name):
  for line in text.decode().splitlines():
    if line.startswith(name + " ") or line.startswith(name + "{"):
      return float(line.rsplit(" ", 1)[1])
  raise KeyError(name)


def _request(n=3, **candidates):
  return {"user": {"user_id": "user-3"},
          "candidates": {"item_id": [f"item-{i}" for i in range(n)],
                         "category_id": ["cat-1"] * n, "position": [1] * n,
                         **candidates}}


def _png(pixels):
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format="PNG")
  return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize("body, status, names", [
    (b"{not json", 400, "body: not valid JSON"),
    (b"[1, 2]", 400, "body: expected an object"),
    ({"user": {"user_id": "user-3"}, "colour": "red"}, 400, "colour: unknown"),
    (_request(colour=["red"] * 3), 400, "candidates.colour: unknown field"),
    ({"user": {"user_id": "user-3", "age": "9"}}, 400, "user.age: unknown"),
    (_request(category_id=["cat-1", 2.5, "cat-1"]), 400,
     "candidates.category_id[1]: expected a string or integer id, got float"),
    (_request(position=[1, True, 1]), 400, "candidates.position[1]"),
    (_request(category_id="cat-1"), 400,
     "candidates.category_id: expected a list"),
    (_request(position=[1, 2]), 400,
     "candidates.position: has 2 values, expected one per candidate (3)"),
    ({"user": {"user_id": "user-3"}, "candidates": {"item_id": ["item-1"],
                                                    "category_id": ["cat-1"]}},
     400, "candidates.position: missing"),
    ({"user": {"user_id": ["user-3"]}, "candidates": {}}, 400,
     "user.user_id: expected a string or integer id, got list"),
    ({"user": "user-3"}, 400, "user: expected an object"),
    (_request(dense=[[1.0]] * 3), 400, "candidates.dense: this model has no"),
    (_request(images={"item-9": _png(np.zeros((16, 16, 3), np.uint8))}), 400,
     "candidates.images['item-9']: not one of candidates.item_id"),
    (_request(images={"item-1": "%%%"}), 400,
     "candidates.images['item-1']: not base64"),
    (_request(images={"item-1": base64.b64encode(b"GIF89a-not").decode()}),
     400, "candidates.images['item-1']: not a decodable image"),
    (_request(n=MAX_CANDIDATES + 1), 413,
     f"candidates.item_id: {MAX_CANDIDATES + 1} candidates > the limit"),
    (b"x" * (MAX_BODY + 1), 413, f"body: {MAX_BODY + 1} bytes > the limit"),
])
def test_bad_requests_get_a_4xx_naming_the_field(url, body, status, names):
  got, out = Client(url).call("POST", "/v1/score", body)
  assert (got, out["error"]["code"]) == (status, status)
  assert names in out["error"]["message"]


def test_a_bad_request_in_a_merged_batch_fails_alone(url):
  # Ids are mapped once per feature for a whole merged batch; one request
  # whose ids cannot be mapped must get its 400 and leave the others scored
  # as if alone. "01" is not canonical: int() maps it (slow path) to row 1.
  good = [_request(n=3 + k, position=[1] * (3 + k)) for k in range(6)]
  bad = _request(position=[1, "p1", 1])
  alone = [_score(url, r)["logits"] for r in good]
  requests = good[:3] + [bad] + good[3:] + [_request(position=["01"] * 3)]
  with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
    answers = list(pool.map(
        lambda r: Client(url).call("POST", "/v1/score", r), requests))
  status, out = answers.pop(3)
  assert status == 400 and out["error"]["message"].startswith(
      "candidates.position: this model has no vocabulary")
  status, out = answers.pop()
  assert status == 200
  np.testing.assert_allclose(out["logits"], alone[0], atol=ATOL)
  for (status, out), want in zip(answers, alone):
    assert status == 200
    np.testing.assert_allclose(out["logits"], want, atol=ATOL)


def test_routes_auth_and_broken_http(url):
  c = Client(url)
  assert c.call("POST", "/v1/score", _request(), token=None)[0] == 401
  status, out = c.call("POST", "/v1/score", _request(), token="wrong")
  assert status == 401 and "authorization" in out["error"]["message"]
  assert c.call("GET", "/v1/score")[0] == 405
  assert c.call("GET", "/v2/nothing")[0] == 404
  status, health = c.call("GET", "/healthz", token=None)  # no token needed
  assert status == 200 and health["status"] == "ok"
  parts = urllib.parse.urlsplit(url)
  with socket.create_connection((parts.hostname, parts.port), 30) as s:
    s.sendall(b"GARBAGE / NOT-HTTP\r\n\r\n")
    assert s.recv(4096).startswith(b"HTTP/1.1 400 ")
  with socket.create_connection((parts.hostname, parts.port), 30) as s:
    s.sendall(b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Length: "
              + str(10 * MAX_BODY).encode() + b"\r\n\r\n")  # no body sent
    assert s.recv(4096).startswith(b"HTTP/1.1 413 ")
  # Two pipelined requests on one connection: answered in order.
  one = json.dumps(_request(2)).encode()
  head = (f"POST /v1/score HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
          f"{TOKEN}\r\nContent-Length: {len(one)}\r\n\r\n").encode()
  with socket.create_connection((parts.hostname, parts.port), 30) as s:
    s.sendall(head + one + b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
              b"Connection: close\r\n\r\n")
    data = b""
    while chunk := s.recv(65536):
      data += chunk
  first, second = data.split(b"HTTP/1.1 ")[1:]
  assert first.startswith(b"200") and b'"logits"' in first
  assert second.startswith(b"200") and b'"status":"ok"' in second
  _, metrics = c.call("GET", "/metrics")
  assert b'code="500"' not in metrics  # no bad request ever was a 500
  assert c.call("GET", "/healthz")[0] == 200  # and the server is still up


def test_items_missing_from_the_table_fall_back(run, url):
  images, cats = run["images"], run["categories"]
  k = run["cold"][0]  # in the table, its item_id OOV like a new item's
  cat = f"cat-{cats[k]}"
  hit = _score(url, _request(1, item_id=[f"item-{k}"], category_id=[cat]))
  # A new raw id, the same pixels: the CNN embeds them as the export did.
  oov = _score(url, {"user": {"user_id": "user-3"}, "candidates": {
      "item_id": ["brand-new"], "category_id": [cat], "position": [1],
      "images": {"brand-new": _png(images[k])}}})
  assert oov["misses"] == 1 and oov["fallbacks"] == {"cnn": 1,
                                                     "category_mean": 0}
  assert hit["misses"] == 0
  np.testing.assert_allclose(oov["logits"], hit["logits"], atol=ATOL)
  nopix = _score(url, {"user": {"user_id": "user-3"}, "candidates": {
      "item_id": ["brand-new", f"item-{k}"], "category_id": [cat, cat],
      "position": [1, 1]}})
  assert nopix["misses"] == 1 and nopix["fallbacks"] == {"cnn": 0,
                                                         "category_mean": 1}
  np.testing.assert_allclose(nopix["logits"][1], hit["logits"][0], atol=ATOL)


def test_swap_under_load_loses_no_request_and_mixes_no_version(run, url):
  """A new table (incremental export) and a new checkpoint, swapped in
  while 4 clients keep scoring; item-100 exists only in the new table."""
  workdir, images, cats = run["workdir"], run["images"], run["categories"]
  request = {"user": {"user_id": "user-3"}, "candidates": {
      "item_id": ["item-5", "item-100"], "position": [1, 2],
      "category_id": [f"cat-{cats[5]}", f"cat-{cats[100]}"]}}
  npz = str(run["root"] / "catalogue_day2.npz")
  np.savez(npz, images=images, categories=cats, ids=np.arange(len(images)),
           raw_ids=np.array([f"item-{k}" for k in range(len(images))]))
  stop, seen, failed = threading.Event(), [], []

  def load():
    client = Client(url)
    while not stop.is_set():
      status, out = client.call("POST", "/v1/score", request)
      (seen if status == 200 else failed).append(out)

  def count(model, table):
    return sum(o["model_version"] == model and o["table_version"] == table
               for o in list(seen))

  def wait_for(model, table, n=20):
    while count(model, table) < n and not failed:
      stop.wait(0.05)

  threads = [threading.Thread(target=load) for _ in range(4)]
  for t in threads:
    t.start()
  try:
    wait_for("6", "6")
    base = os.path.join(workdir, export.TABLES_DIR, "6")
    subprocess.run(  # the real command line, beside the serving process
        [sys.executable, "-m", "csctr.export", f"--workdir={workdir}",
         "--only_new", f"--base_table={base}", f"--images={npz}"],
        check=True, capture_output=True, env=server_env(), cwd=REPO)
    status, out = Client(url).call("POST", "/v1/reload")
    assert status == 200 and out["swapped"] and out["table_version"] == "6.1"
    wait_for("6", "6.1")
    ckpt = rundir.checkpoint_dir(workdir)  # a newer checkpoint appears
    shutil.copytree(os.path.join(ckpt, "6"), os.path.join(ckpt, "7"))
    status, out = Client(url).call("POST", "/v1/reload")
    assert status == 200 and out["swapped"] and out["model_version"] == "7"
    wait_for("7", "6.1")
  finally:
    stop.set()
    for t in threads:
      t.join()
  assert not failed
  by_version = {}
  for o in seen:  # one version per response: its misses and logits agree
    key = (o["model_version"], o["table_version"])
    by_version.setdefault(key, []).append(o)
    assert o["misses"] == (1 if key[1] == "6" else 0)
  assert set(by_version) == {("6", "6"), ("6", "6.1"), ("7", "6.1")}
  for outs in by_version.values():
    for o in outs:
      assert o["logits"] == outs[0]["logits"]
  old, new = by_version[("6", "6")][0], by_version[("6", "6.1")][0]
  assert old["logits"][0] == new["logits"][0]  # base rows copied as they were
  assert old["logits"][1] != new["logits"][1]  # item-100: mean -> its own
  _, metrics = Client(url).call("GET", "/metrics")
  assert _metric(metrics, "csctr_swaps_total") == 2
  assert b'model_version="7",table_version="6.1"' in metrics
