"""scripts.chat_serve over real HTTP on loopback, against the engine's own greedy output; the web chat in Chromium."""

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest
import requests

from nanopipe.checkpoint import load_model
from nanopipe.engine import Engine
from nanopipe.engine import TOOL_MARKS
from tests.conftest import subprocess_env

pytest.importorskip("fastapi", reason="the server tests need the serve extra: pip install -e '.[serve]'")
pytest.importorskip("uvicorn", reason="the server tests need the serve extra: pip install -e '.[serve]'")

QUESTIONS = ["What is 3 plus 4?", "Who is the king of Varnel?", "Spell the word apple."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m scripts.chat_serve` in a child process on a free loopback port."""

    def __init__(self, base, *flags):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "scripts.chat_serve", "--port", str(self.port), *flags],
                                     env=subprocess_env(NANOPIPE_BASE_DIR=base), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chat_serve exited: {self.proc.stdout.read()[-3000:]}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except requests.ConnectionError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("chat_serve did not come up in 180 s")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def server(chat_world):
    s = Server(chat_world, "--max-new-tokens", "40", "--max-queue", "32")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def oracle(chat_world):
    """question -> (text, parts, tokens) of the engine's greedy reply in this process."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOPIPE_BASE_DIR", str(chat_world))
        model, tokenizer, _ = load_model("sft", "d2")
    engine = Engine(model, tokenizer)
    marks = {tokenizer.encode_special(name): text for name, text in TOOL_MARKS.items()}
    cache = {}

    def reply(question, max_tokens=24):
        if (question, max_tokens) not in cache:
            prompt = tokenizer.render_for_completion({"messages": [{"role": "user", "content": question}]})
            tokens, stopped = [], False
            for step in engine.generate(prompt, max_tokens=max_tokens, temperature=0.0):
                token = step[0][0]
                if token in engine.stop_tokens:
                    stopped = True
                    break
                tokens.append(token)
            # each run of ordinary tokens decoded whole; tool tokens marked as the CLI shows them, and starting parts
            text, run, parts, kind = "", [], [], "text"
            kinds = {tokenizer.encode_special("<|python_start|>"): "python",
                     tokenizer.encode_special("<|output_start|>"): "python_output"}
            for token in tokens + [None]:
                if token is None or token in marks:
                    text += tokenizer.decode(run) + (marks[token] if token is not None else "")
                    if run:
                        parts.append({"type": kind, "text": tokenizer.decode(run)})
                    run, kind = [], kinds.get(token, "text")
                else:
                    run.append(token)
            cache[question, max_tokens] = text, parts, tokens, stopped
        return cache[question, max_tokens]
    return reply


def ask(server, question, stream=False, **options):
    body = {"model": "x", "messages": [{"role": "user", "content": question}], "stream": stream,
            "temperature": 0, **options}
    return requests.post(server.url + "/v1/chat/completions", json=body, stream=stream, timeout=120)


def read_stream(response):
    """(concatenated delta text, the final chunk) of an SSE reply; asserts the [DONE] terminator."""
    text, final, done = "", None, False
    for line in response.iter_lines(decode_unicode=True):
        if not line:
            continue
        assert line.startswith("data: ")
        if line == "data: [DONE]":
            done = True
            break
        chunk = json.loads(line[6:])
        assert chunk["object"] == "chat.completion.chunk"
        text += chunk["choices"][0]["delta"].get("content", "")
        if chunk["choices"][0]["finish_reason"]:
            final = chunk
    assert done and final is not None
    return text, final


def test_models_and_health(server):
    models = requests.get(server.url + "/v1/models", timeout=30).json()
    assert models["object"] == "list" and models["data"][0]["id"] == "nanopipe-d2-sft"
    health = requests.get(server.url + "/health", timeout=30).json()
    assert health["status"] == "ok" and health["max_queue"] == 32


def test_streaming_and_plain_replies_equal_the_engine(server, oracle):
    for question in QUESTIONS:
        text, parts, tokens, stopped = oracle(question)
        assert tokens  # a reply that is not empty, so the comparison means something
        plain = ask(server, question, max_tokens=24)
        assert plain.status_code == 200
        reply = plain.json()
        assert reply["object"] == "chat.completion"
        choice = reply["choices"][0]
        assert choice["message"]["content"] == text
        assert choice["message"]["nanopipe_parts"] == parts
        assert choice["finish_reason"] == ("stop" if stopped else "length")
        assert reply["usage"]["completion_tokens"] == len(tokens)
        streamed = ask(server, question, stream=True, max_tokens=24)
        assert streamed.status_code == 200 and streamed.headers["content-type"].startswith("text/event-stream")
        stream_text, final = read_stream(streamed)
        assert stream_text == text
        assert final["nanopipe_parts"] == parts and final["usage"] == reply["usage"]


def test_the_server_limits_reply_length(server, oracle):
    reply = ask(server, QUESTIONS[0], max_tokens=100_000).json()
    assert reply["usage"]["completion_tokens"] <= 40  # --max-new-tokens 40
    assert reply["choices"][0]["message"]["content"] == oracle(QUESTIONS[0], 40)[0]
    short = ask(server, QUESTIONS[0], max_tokens=3).json()
    assert short["usage"]["completion_tokens"] == 3 and short["choices"][0]["finish_reason"] == "length"


def test_twenty_concurrent_requests_all_answered_correctly(server, oracle):
    questions = [f"What is {i} plus {i + 1}?" for i in range(20)]
    results = {}
    barrier = threading.Barrier(len(questions))

    def client(i, question):
        barrier.wait()
        response = ask(server, question, stream=i % 2 == 0, max_tokens=16)
        if response.status_code != 200:
            results[i] = (response.status_code, None)
        elif i % 2 == 0:
            results[i] = (200, read_stream(response)[0])
        else:
            results[i] = (200, response.json()["choices"][0]["message"]["content"])

    threads = [threading.Thread(target=client, args=(i, q)) for i, q in enumerate(questions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert len(results) == 20
    for i, question in enumerate(questions):
        assert results[i] == (200, oracle(question, 16)[0]), question


def test_malformed_requests_get_a_json_error(server):
    url = server.url + "/v1/chat/completions"
    cases = [
        b"{not json",
        b"[]",
        json.dumps({"messages": []}).encode(),
        json.dumps({"messages": [{"role": "robot", "content": "hi"}]}).encode(),
        json.dumps({"messages": [{"role": "user", "content": 5}]}).encode(),
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]}).encode(),
        json.dumps({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}).encode(),
        json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}).encode(),
        json.dumps({"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}).encode(),
        json.dumps({"messages": [{"role": "user", "content": "word " * 400}]}).encode(),  # over the context
    ]
    for body in cases:
        response = requests.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=30)
        assert response.status_code == 400, body
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and error["message"], body
    missing = requests.get(server.url + "/v1/nothing", timeout=30)
    assert missing.status_code == 404 and "error" in missing.json()
    wrong_method = requests.get(url, timeout=30)
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()


def test_server_keeps_serving_after_a_client_disconnects_mid_stream(server, oracle):
    before = requests.get(server.url + "/health", timeout=30).json()
    body = json.dumps({"messages": [{"role": "user", "content": QUESTIONS[1]}], "stream": True, "max_tokens": 40,
                       "temperature": 0})
    for _ in range(3):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200
        assert response.readline().startswith(b"data: ")  # the stream has begun
        conn.sock.shutdown(socket.SHUT_RDWR)  # hang up mid-stream
        conn.close()
    reply = ask(server, QUESTIONS[0], max_tokens=24).json()
    assert reply["choices"][0]["message"]["content"] == oracle(QUESTIONS[0])[0]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the worker finishes (or cancels) the hung-up streams, then idles
        health = requests.get(server.url + "/health", timeout=30).json()
        if health["served"] + health["cancelled"] >= before["served"] + before["cancelled"] + 4 \
                and health["running"] == 0 and health["queued"] == 0:
            break
        time.sleep(0.2)
    assert health["served"] + health["cancelled"] >= before["served"] + before["cancelled"] + 4
    assert health["running"] == 0 and health["queued"] == 0


def test_a_full_queue_answers_503(chat_world, oracle):
    server = Server(chat_world, "--max-queue", "1", "--max-new-tokens", "64")
    try:
        statuses, errors = [], []
        barrier = threading.Barrier(16)

        def client():
            barrier.wait()
            response = ask(server, QUESTIONS[2], max_tokens=64)
            statuses.append(response.status_code)
            if response.status_code == 200:
                assert response.json()["choices"][0]["message"]["content"] == oracle(QUESTIONS[2], 64)[0]
            else:
                errors.append(response.json()["error"])

        threads = [threading.Thread(target=client) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert len(statuses) == 16 and set(statuses) <= {200, 503}
        assert statuses.count(200) >= 1 and statuses.count(503) >= 1
        assert all(e["type"] == "server_busy" for e in errors)
        health = requests.get(server.url + "/health", timeout=30).json()
        assert health["rejected"] == statuses.count(503) and health["served"] == statuses.count(200)
    finally:
        server.stop()


def test_the_command_checks_its_flags(chat_world):
    result = subprocess.run([sys.executable, "-m", "scripts.chat_serve", "--max-queue", "0"], timeout=120,
                            env=subprocess_env(NANOPIPE_BASE_DIR=chat_world), capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.startswith("error: argument --max-queue: 0 is too small")


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def test_web_chat_in_a_real_browser(server, oracle):
    """Chromium opens the page, a question is typed and sent; the answer streams in and equals the engine's."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="the web chat test needs playwright (dev extra)")
    if not os.path.exists(CHROMIUM):
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/run does)")
    text = oracle(QUESTIONS[0], 24)[0]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page()
            page.goto(server.url + "/")
            page.wait_for_function("document.getElementById('model').textContent.length > 0")
            assert page.text_content("#model") == "nanopipe-d2-sft"
            page.fill("#temperature", "0")
            page.fill("#max-tokens", "24")
            # record every text the reply shows while it streams (render() is the page's one way to show it)
            page.evaluate("""() => { const show = window.render; window.shown = [];
                window.render = (div, text) => { window.shown.push(text); show(div, text); }; }""")
            page.fill("#input", QUESTIONS[0])
            page.press("#input", "Enter")
            page.wait_for_selector(".msg.assistant[data-done='1']", timeout=60_000)
            assert page.text_content(".msg.user") == QUESTIONS[0]
            assert page.text_content(".msg.assistant") == text
            shown = page.evaluate("window.shown")
            assert len(shown) > 3 and shown[-1] == text  # it arrived in pieces, each extending the last
            assert all(b.startswith(a) for a, b in zip(shown, shown[1:]))
            if "⟦calc: " in text:  # tool calls are set apart as the CLI marks them
                assert page.text_content(".msg.assistant .calc").startswith("⟦calc: ")
            # Stop while a reply is pending: the request is held in the browser, so the click surely lands first
            held = []
            page.route("**/v1/chat/completions", lambda route: held.append(route))
            page.fill("#input", QUESTIONS[1])
            page.press("#input", "Enter")
            page.wait_for_function("!document.getElementById('stop').disabled")
            page.click("#stop")
            stopped = page.locator(".msg.assistant").nth(1)
            stopped.wait_for(state="attached")
            page.wait_for_selector(".msg.assistant[data-done='1'] >> nth=1", timeout=60_000)
            assert stopped.text_content().endswith("[stopped]")
            assert page.is_enabled("#send") and page.is_disabled("#stop")
            page.unroute("**/v1/chat/completions")
            # the page stays usable: a third question, with the whole history, gets its answer
            page.fill("#input", QUESTIONS[2])
            page.press("#input", "Enter")
            page.wait_for_selector(".msg.assistant[data-done='1'] >> nth=2", timeout=60_000)
            assert page.locator(".msg.assistant").nth(2).text_content()
            assert page.locator(".msg.error").count() == 0
        finally:
            browser.close()
