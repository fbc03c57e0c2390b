"""The downloader against a real loopback HTTP server that misbehaves on purpose.

The server speaks enough of the Hugging Face hub's protocol for huggingface_hub's hf_hub_download (HEAD
with X-Repo-Commit / ETag = sha256 / Content-Length, GET with Range, /api/<type>s/<repo>/revision/<rev>) and
injects one fault per request from a per-path queue: 500s, 429 with Retry-After, connection resets
mid-body, truncated bodies (Content-Length larger than what is sent), corrupt bytes, servers that ignore
Range; anything it does not have is a 404. A HEAD takes only a status fault (500, 429) from the queue.
"""

import hashlib
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanopipe import shards, sources
from nanopipe.common import UserError
from nanopipe.download import DownloadError, DownloadJob, HubFile, download_file, download_hub_file, download_many
from scripts import dataset
from tasks import chat_data
from tasks.profile import data_profile
from tests.conftest import subprocess_env

FAST = dict(backoff=0.0, timeout=5.0)  # no sleeping between retries in tests


REPO_SHA = "0123456789abcdef0123456789abcdef01234567"  # the commit every repo's main points at


class FaultServer:
    def __init__(self):
        self.files = {}    # url path -> bytes
        self.faults = {}   # url path -> list of faults, one consumed per request
        self.log = []      # GETs of files: (path, Range header or None, fault, monotonic time)
        self.requests = []  # every request: (method, path with query, headers with lower-case names)
        self.first_get = threading.Event()  # set when the first GET of a file has arrived
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def handle(self):
                try:
                    super().handle()
                except (OSError, ValueError):  # the socket we reset on purpose
                    pass

            def do_HEAD(self):
                path = self.path.split("?")[0]
                with server.lock:
                    server.requests.append(("HEAD", self.path, {k.lower(): v for k, v in self.headers.items()}))
                    queue = server.faults.get(path) or []
                    fault = queue.pop(0) if queue and (queue[0] == "500" or queue[0].startswith("429")) else None
                if fault == "500":
                    return self.reply(500)
                if fault:
                    return self.reply(429, {"Retry-After": fault.partition(":")[2] or "0"})
                data = server.files.get(path)
                if data is None:
                    return self.reply(404, {"X-Error-Code": "EntryNotFound"})
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("X-Repo-Commit", path.split("/resolve/")[1].split("/")[0] if "/resolve/" in path
                                 else REPO_SHA)
                self.end_headers()

            def api(self, path):
                """GET /api/datasets/<ns>/<name>/revision/<rev>: every repo's main is REPO_SHA."""
                parts = path.split("/")
                if len(parts) == 7 and parts[5] == "revision" and parts[6] in ("main", REPO_SHA):
                    body = json.dumps({"id": f"{parts[3]}/{parts[4]}", "sha": REPO_SHA, "siblings": []}).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    return self.wfile.write(body)
                return self.reply(404, {"X-Error-Code": "RevisionNotFound"})

            def do_GET(self):
                path = self.path.split("?")[0]
                with server.lock:
                    server.requests.append(("GET", self.path, {k.lower(): v for k, v in self.headers.items()}))
                if path.startswith("/api/"):
                    return self.api(path)
                with server.lock:
                    queue = server.faults.get(path) or []
                    fault = queue.pop(0) if queue else None
                    server.log.append((path, self.headers.get("Range"), fault, time.monotonic()))
                server.first_get.set()
                if fault == "500":
                    return self.reply(500)
                if fault and fault.startswith("429"):
                    return self.reply(429, {"Retry-After": fault.partition(":")[2] or "0"})
                data = server.files.get(path)
                if data is None:
                    return self.reply(404)
                if fault == "corrupt":
                    data = b"\x00not parquet" * (len(data) // 12) + b"\x00" * (len(data) % 12)
                start = 0
                byte_range = self.headers.get("Range")
                if byte_range and fault != "ignore_range":
                    start = int(byte_range.removeprefix("bytes=").rstrip("-"))
                    if start >= len(data):
                        return self.reply(416, {"Content-Range": f"bytes */{len(data)}"})
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if fault == "slow":  # a crawling transfer, for interrupting
                    for i in range(0, len(body), 256):
                        self.wfile.write(body[i:i + 256])
                        self.wfile.flush()
                        time.sleep(0.1)  # ~7 s for SHARD: far longer than a Ctrl-C may take to land
                    return
                if fault in ("reset", "truncate"):
                    self.wfile.write(body[: len(body) // 2])
                    if fault == "reset":  # abortive close: the client sees ECONNRESET mid-body
                        time.sleep(0.2)  # let the first half reach the client before the RST discards it
                        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        self.rfile.close()
                        self.wfile.close()
                        self.connection.close()
                    return
                self.wfile.write(body)

            def reply(self, status, headers=None):
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def endpoint(self):
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def url(self, path):
        return self.endpoint + path

    def requests_for(self, path):
        return [entry for entry in self.log if entry[0] == path]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def hub_requests(server):
    """The requests downloads made: huggingface_hub also fetches its registry of AI agents once a day
    (/api/agent-harnesses, for its user agent), which is no download."""
    return [r for r in server.requests if r[1] != "/api/agent-harnesses"]


@pytest.fixture
def server():
    s = FaultServer()
    yield s
    s.close()


def parquet_bytes(texts, row_group_size=50):
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": texts}), buf, row_group_size=row_group_size)
    return buf.getvalue()


SHARD = parquet_bytes([f"document {i} " + "lorem ipsum " * (i % 40) for i in range(400)])


def test_retries_5xx_and_honours_retry_after(server, tmp_path):
    server.files["/f.parquet"] = SHARD
    server.faults["/f.parquet"] = ["500", "429:1", "500"]
    dest = tmp_path / "f.parquet"
    download_file(server.url("/f.parquet"), dest, verify=shards.verify_parquet, **FAST)
    assert dest.read_bytes() == SHARD
    log = server.requests_for("/f.parquet")
    assert [fault for _, _, fault, _ in log] == ["500", "429:1", "500", None]
    assert log[2][3] - log[1][3] >= 0.9  # waited the server's Retry-After, though our backoff is 0
    assert not (tmp_path / "f.parquet.partial").exists()


def test_resumes_after_reset_and_truncation(server, tmp_path):
    server.files["/f.parquet"] = SHARD
    server.faults["/f.parquet"] = ["reset", "truncate"]
    dest = tmp_path / "f.parquet"
    received = download_file(server.url("/f.parquet"), dest, verify=shards.verify_parquet, **FAST)
    assert dest.read_bytes() == SHARD
    ranges = [r for _, r, _, _ in server.requests_for("/f.parquet")]
    assert ranges[0] is None and all(r and int(r[6:-1]) > 0 for r in ranges[1:])  # later tries resumed
    assert received == len(SHARD)  # nothing was fetched twice
    assert int(ranges[2][6:-1]) > int(ranges[1][6:-1])


def test_restarts_when_server_ignores_range(server, tmp_path):
    server.files["/f.parquet"] = SHARD
    server.faults["/f.parquet"] = ["truncate", "ignore_range"]
    dest = tmp_path / "f.parquet"
    download_file(server.url("/f.parquet"), dest, verify=shards.verify_parquet, **FAST)
    assert dest.read_bytes() == SHARD
    assert server.requests_for("/f.parquet")[1][1] is not None  # a Range was asked, a 200 came back


def test_corrupt_download_is_refetched_then_given_up(server, tmp_path):
    server.files["/f.parquet"] = SHARD
    server.faults["/f.parquet"] = ["corrupt"]
    dest = tmp_path / "f.parquet"
    download_file(server.url("/f.parquet"), dest, verify=shards.verify_parquet, **FAST)
    assert dest.read_bytes() == SHARD
    assert len(server.requests_for("/f.parquet")) == 2

    server.faults["/g.parquet"] = ["corrupt"] * 10
    server.files["/g.parquet"] = SHARD
    with pytest.raises(DownloadError, match="verification failed") as e:
        download_file(server.url("/g.parquet"), tmp_path / "g.parquet", verify=shards.verify_parquet,
                      max_corrupt=2, **FAST)
    assert e.value.url == server.url("/g.parquet")
    assert len(server.requests_for("/g.parquet")) == 3
    assert list(tmp_path.glob("g.parquet*")) == []  # neither the bad file nor its partial is kept


def test_404_is_not_retried_and_retries_are_bounded(server, tmp_path):
    with pytest.raises(DownloadError, match="404") as e:
        download_file(server.url("/missing.parquet"), tmp_path / "m.parquet", **FAST)
    assert server.url("/missing.parquet") in str(e.value)
    assert len(server.requests_for("/missing.parquet")) == 1

    server.files["/busy"] = b"x"
    server.faults["/busy"] = ["500"] * 10
    with pytest.raises(DownloadError, match="gave up after 4 attempts, last: HTTP 500"):
        download_file(server.url("/busy"), tmp_path / "busy", retries=3, **FAST)
    assert len(server.requests_for("/busy")) == 4


def test_existing_file_is_kept_only_if_it_verifies(server, tmp_path):
    server.files["/f.parquet"] = SHARD
    dest = tmp_path / "f.parquet"
    dest.write_bytes(SHARD)
    assert download_file(server.url("/f.parquet"), dest, verify=shards.verify_parquet, **FAST) == 0
    assert server.log == []
    dest.write_bytes(SHARD[:100])  # e.g. copied in by hand, cut short
    download_file(server.url("/f.parquet"), dest, verify=shards.verify_parquet, **FAST)
    assert dest.read_bytes() == SHARD


def test_download_many_reports_failures_with_url(server, tmp_path):
    for i in range(6):
        server.files[f"/f{i}"] = bytes([i]) * (1000 + i)
    server.faults["/f1"] = ["reset"]
    server.faults["/f2"] = ["500", "500"]
    jobs = [DownloadJob(server.url(f"/f{i}"), tmp_path / f"f{i}") for i in range(7)]
    summary = download_many(jobs, workers=3, show_progress=False, **FAST)
    assert len(summary.ok) == 6 and [r.job.url for r in summary.failed] == [server.url("/f6")]
    assert all((tmp_path / f"f{i}").read_bytes() == server.files[f"/f{i}"] for i in range(6))
    text = summary.format()
    assert "6 ok" in text and f"FAILED {server.url('/f6')}: HTTP 404" in text


@pytest.fixture
def base(tmp_path, monkeypatch, server):
    monkeypatch.setenv("NANOPIPE_BASE_DIR", str(tmp_path / "base"))
    monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
    return tmp_path / "base"


def test_download_pretrain_hf_layout(server, base, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    prefix = f"/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/{REPO_SHA}"
    served = {i: parquet_bytes([f"shard {i} doc {j}" for j in range(120 + i)]) for i in (0, 1, 2, 1822)}
    for i, data in served.items():
        server.files[f"{prefix}/shard_{i:05d}.parquet"] = data
    server.faults[f"{prefix}/shard_00000.parquet"] = ["500", "reset"]
    server.faults[f"{prefix}/shard_00001.parquet"] = ["429:0", "truncate", "corrupt"]
    server.faults[f"{prefix}/shard_01822.parquet"] = ["reset", "ignore_range"]

    # 5 shards = 4 train + val; the source has no shard 3, so that one fails with its reason
    summary = sources.download_pretrain("fineweb-edu", 5, workers=3, show_progress=False, **FAST)
    assert [r.job.url for r in summary.failed] == [server.url(f"{prefix}/shard_00003.parquet")]
    assert "HTTP 404" in summary.failed[0].reason
    out = base / "data" / "fineweb-edu"
    for i, data in served.items():
        assert (out / f"shard_{i:05d}.parquet").read_bytes() == data
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"] + [f"shard_{i:05d}.parquet"
                                                                          for i in (0, 1, 2, 1822)]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_shards"] == 4 and manifest["num_docs"] == sum(120 + i for i in served)
    assert [s["split"] for s in manifest["shards"]] == ["train"] * 3 + ["val"]
    assert all(s["sha256"] == hashlib.sha256(served[int(s["file"][6:11])]).hexdigest() for s in manifest["shards"])
    assert manifest["source"]["revision"] == REPO_SHA and REPO_SHA in manifest["source"]["url"]
    train, val = shards.list_shards("fineweb-edu")
    assert val.name == "shard_01822.parquet" and len(train) == 3
    # main was resolved once to its commit; every other request named that commit; all carried the token
    requests = hub_requests(server)
    paths = [path for _, path, _ in requests]
    revision = "/api/datasets/karpathy/fineweb-edu-100b-shuffle/revision/main"
    assert [p for p in paths if p.startswith("/api/")] == [revision]
    assert all(f"/resolve/{REPO_SHA}/" in p for p in paths if not p.startswith("/api/"))
    assert all(headers.get("authorization") == "Bearer hf_secret" for _, _, headers in requests)
    assert not list(out.glob(".*"))  # no staging folder is left behind

    # a rerun over the shards that exist downloads nothing and asks nothing
    n = len(hub_requests(server))
    assert dataset.main(["download", "fineweb-edu", "--num-shards", "4"]) == 0
    assert len(hub_requests(server)) == n
    # adding shards later keeps the recorded commit; another --revision is refused
    assert dataset.main(["download", "fineweb-edu", "--num-shards", "4", "--revision", "v2"]) == 2


def test_chat_data_and_eval_bundle(server, base, monkeypatch):
    for name, (repo, files) in chat_data.CHAT_PARQUETS.items():
        for f in files:
            server.files[f"/datasets/{repo}/resolve/{REPO_SHA}/{f}"] = parquet_bytes([f"{name} {f}"])
    server.files["/identity.jsonl"] = b'{"messages": [{"role": "user", "content": "hi"}]}\n'
    server.files["/words.txt"] = b"aardvark\nbee\n"
    monkeypatch.setenv("NANOPIPE_IDENTITY_URL", server.url("/identity.jsonl"))
    monkeypatch.setenv("NANOPIPE_WORDS_URL", server.url("/words.txt"))
    server.faults[f"/datasets/openai/gsm8k/resolve/{REPO_SHA}/main/test-00000-of-00001.parquet"] = ["corrupt", "500"]

    assert dataset.main(["chat-data", "--only", "gsm8k,identity,words"]) == 0
    test_file = chat_data.chat_data_file("gsm8k", "main/test-00000-of-00001.parquet")
    assert pq.read_table(test_file).column(0).to_pylist() == ["gsm8k main/test-00000-of-00001.parquet"]
    assert chat_data.chat_data_file("words", "words_alpha.txt").read_text() == "aardvark\nbee\n"
    with pytest.raises(UserError, match="chat-data --only mmlu"):
        chat_data.chat_data_file("mmlu", "all/test-00000-of-00001.parquet")
    assert json.loads((base / "chat_data" / "gsm8k" / "source.json").read_text()) == {
        "repo": "openai/gsm8k", "revision": REPO_SHA}
    summary = chat_data.download_chat_data(None, show_progress=False, **FAST)
    assert len(summary.ok) == sum(len(f) for _, f in chat_data.CHAT_PARQUETS.values()) + 2 and not summary.failed
    hub_paths = [path for _, path, _ in hub_requests(server) if path.startswith(("/api/", "/datasets/"))]
    assert all(f"/resolve/{REPO_SHA}/" in p or p.endswith("/revision/main") for p in hub_paths)

    with pytest.raises(UserError, match="scripts.dataset eval-bundle"):
        data_profile("fineweb-edu").eval_bundle_dir()
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w") as z:
        z.writestr("eval_bundle/core.yaml", "icl_tasks: []\n")
        z.writestr("eval_bundle/eval_meta_data.csv", "Eval Task,Random baseline\n")
        z.writestr("eval_bundle/eval_data/world/x.jsonl", "{}\n")
    server.files["/eval_bundle.zip"] = zbuf.getvalue()
    server.faults["/eval_bundle.zip"] = ["corrupt"]
    monkeypatch.setenv("NANOPIPE_EVAL_BUNDLE_URL", server.url("/eval_bundle.zip"))
    assert dataset.main(["eval-bundle"]) == 0
    bundle = data_profile("fineweb-edu").eval_bundle_dir()
    assert bundle == base / "eval_bundle" and (bundle / "eval_data/world/x.jsonl").read_text() == "{}\n"
    assert sorted(p.name for p in base.iterdir()) == ["chat_data", "eval_bundle"]  # no zip or temp dir left
    n = len(server.log)
    assert dataset.main(["eval-bundle"]) == 0 and len(server.log) == n
    monkeypatch.setenv("NANOPIPE_EVAL_BUNDLE", str(base / "elsewhere"))
    with pytest.raises(UserError, match="NANOPIPE_EVAL_BUNDLE"):
        data_profile("fineweb-edu").eval_bundle_dir()


def test_ctrl_c_stops_download_many_promptly(server, tmp_path):
    for i in range(3):
        server.files[f"/f{i}"] = SHARD
        server.faults[f"/f{i}"] = ["slow"]
    jobs = [DownloadJob(server.url(f"/f{i}"), tmp_path / f"f{i}") for i in range(3)]
    sent = []

    main = threading.main_thread().ident

    def ctrl_c():  # a real Ctrl-C, once the first transfer is under way (however slowly this machine got there)
        if server.first_get.wait(60):
            sent.append(time.monotonic())
            # to the main thread, where Python runs signal handlers (it waits in download_many)
            signal.pthread_kill(main, signal.SIGINT)

    # Python's own Ctrl-C handler, whatever an earlier test or library in this process left installed
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    threads_before = set(threading.enumerate())
    threading.Thread(target=ctrl_c, daemon=True).start()
    try:
        with pytest.raises(KeyboardInterrupt):
            download_many(jobs, workers=1, show_progress=False, **FAST)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert sent and time.monotonic() - sent[0] < 3  # the slow transfer alone takes ~7 s
    for thread in set(threading.enumerate()) - threads_before:  # the running transfer unwinds at its next chunk
        if thread.name.startswith("ThreadPoolExecutor"):
            thread.join(30)
            assert not thread.is_alive()
    assert [entry[0] for entry in server.log] == ["/f0"]   # queued files never started
    assert not (tmp_path / "f0").exists()                  # nothing half-done was renamed into place


# ---------------------------------------------------------------------------------------------
# the same faults through the hub path (huggingface_hub's hf_hub_download)

HUB_PATH = f"/datasets/someone/shards/resolve/{REPO_SHA}/f.parquet"


def hub_file(name="f.parquet"):
    return HubFile("someone/shards", name, REPO_SHA)


def gets(server, path=HUB_PATH):
    return server.requests_for(path)


def test_hub_retries_5xx_and_honours_retry_after(server, base):
    server.files[HUB_PATH] = SHARD
    server.faults[HUB_PATH] = ["500", "429:1", "500"]
    dest = base / "f.parquet"
    t0 = time.monotonic()
    assert download_hub_file(hub_file(), dest, verify=shards.verify_parquet, **FAST) == len(SHARD)
    assert dest.read_bytes() == SHARD and server.faults[HUB_PATH] == []
    assert time.monotonic() - t0 >= 0.9  # waited the server's Retry-After, though our backoff is 0
    assert [p.name for p in base.iterdir()] == ["f.parquet"]  # no staging folder left


def test_hub_retries_a_reset_and_resumes_a_truncation(server, base):
    """huggingface_hub resumes a body cut short from its last whole 10 MB chunk (so the file is large here); a
    reset connection is retried by us from the start."""
    data = os.urandom(24 << 20)
    server.files[HUB_PATH] = data
    server.faults[HUB_PATH] = ["reset", "truncate"]
    download_hub_file(hub_file(), base / "f.parquet", **FAST)
    assert (base / "f.parquet").read_bytes() == data
    ranges = [r for _, r, _, _ in gets(server)]
    assert ranges[:2] == [None, None] and len(ranges) == 3 and int(ranges[2][6:-1]) >= 10 << 20


def test_hub_restarts_when_server_ignores_range(server, base):
    data = os.urandom(24 << 20)
    server.files[HUB_PATH] = data
    server.faults[HUB_PATH] = ["truncate", "ignore_range"]
    download_hub_file(hub_file(), base / "f.parquet", **FAST)
    assert (base / "f.parquet").read_bytes() == data
    assert gets(server)[1][1] is not None  # a Range was asked, a 200 came back


def test_hub_corrupt_download_fails_its_hash_and_is_refetched_then_given_up(server, base):
    server.files[HUB_PATH] = SHARD
    server.faults[HUB_PATH] = ["corrupt"]
    download_hub_file(hub_file(), base / "f.parquet", **FAST)  # no verify callback: the sha256 alone catches it
    assert (base / "f.parquet").read_bytes() == SHARD and len(gets(server)) == 2

    bad = HUB_PATH.replace("f.parquet", "g.parquet")
    server.files[bad] = SHARD
    server.faults[bad] = ["corrupt"] * 10
    with pytest.raises(DownloadError, match="sha256 mismatch") as e:
        download_hub_file(hub_file("g.parquet"), base / "g.parquet", max_corrupt=2, **FAST)
    assert e.value.url == server.url(bad) and len(gets(server, bad)) == 3
    assert sorted(p.name for p in base.iterdir()) == ["f.parquet"]  # neither the bad file nor its staging is kept


def test_hub_404_is_not_retried_and_retries_are_bounded(server, base):
    with pytest.raises(DownloadError, match="HTTP 404"):
        download_hub_file(hub_file("missing.parquet"), base / "m.parquet", **FAST)
    assert len(hub_requests(server)) == 1  # one HEAD, no retry, no GET
    busy = HUB_PATH.replace("f.parquet", "busy")
    server.files[busy] = b"x"
    server.faults[busy] = ["500"] * 10
    with pytest.raises(DownloadError, match="gave up after 4 attempts, last: HTTP 500"):
        download_hub_file(hub_file("busy"), base / "busy", retries=3, **FAST)
    assert len([r for r in server.requests if r[1] == busy]) == 4


def test_hub_existing_file_is_kept_only_if_it_verifies(server, base):
    server.files[HUB_PATH] = SHARD
    base.mkdir(parents=True)
    dest = base / "f.parquet"
    dest.write_bytes(SHARD)
    assert download_hub_file(hub_file(), dest, verify=shards.verify_parquet, **FAST) == 0
    assert hub_requests(server) == []
    dest.write_bytes(SHARD[:100])
    download_hub_file(hub_file(), dest, verify=shards.verify_parquet, **FAST)
    assert dest.read_bytes() == SHARD


def test_hub_offline_makes_no_request(server, base):
    """HF_HUB_OFFLINE=1 (read when huggingface_hub is imported, hence a child process): shards on disk are used
    without a request; a missing one fails with the reason, still without a request."""
    prefix = f"/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/{REPO_SHA}"
    for i in (0, 1, 1822):
        server.files[f"{prefix}/shard_{i:05d}.parquet"] = parquet_bytes([f"shard {i} doc {j}" for j in range(50)])
    assert dataset.main(["download", "fineweb-edu", "--num-shards", "3"]) == 0
    n = len(hub_requests(server))
    env = subprocess_env(NANOPIPE_BASE_DIR=base, HF_ENDPOINT=server.endpoint, HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "scripts.dataset", "download", "fineweb-edu", "--num-shards", "3"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    (base / "data" / "fineweb-edu" / "shard_00001.parquet").unlink()
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "HF_HUB_OFFLINE=1 is set and the file is not on disk" in result.stdout
    assert len(server.requests) - len([r for r in server.requests if r[1] == "/api/agent-harnesses"]) == n


def test_pinned_revision_is_used_as_given(server, base):
    """--revision with a commit sha: nothing is resolved, every request names it."""
    other = "fedcba9876543210fedcba9876543210fedcba98"
    prefix = f"/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/{other}"
    for i in (0, 1822):
        server.files[f"{prefix}/shard_{i:05d}.parquet"] = parquet_bytes([f"shard {i}"])
    assert dataset.main(["download", "fineweb-edu", "--num-shards", "2", "--revision", other]) == 0
    paths = [path for _, path, _ in hub_requests(server)]
    assert paths and all(f"/resolve/{other}/" in p for p in paths)
    assert json.loads((base / "data" / "fineweb-edu" / "manifest.json").read_text())["source"]["revision"] == other
