"""An OpenAI-compatible chat server on the KV-cache engine, and the web chat page it serves.

    app = create_app(model, tokenizer, "d12-sft")       # then uvicorn.run(app, ...); see scripts/chat_serve.py

One worker thread owns the model: requests wait in a bounded queue and are generated one at a time, each
with its own output channel, so replies never mix; a full queue answers 503 at once. Streaming replies are
server-sent events in OpenAI's chat.completion.chunk format. A client that disconnects cancels its
generation at the next token. The calculator runs inside the engine, and its calls show in the text as the
CLI shows them (⟦calc: expression → result⟧); the structured reply (text / python / python_output parts, the
form the chat template and render_conversation take back as history) is the message's `nanopipe_parts`.
"""

import asyncio
import contextlib
import json
import queue
import threading
import time
import uuid
from pathlib import Path

import torch

from nanopipe.common import autocast
from nanopipe.engine import Engine, ReplyDecoder

PAGE = Path(__file__).with_name("chat_ui.html")


class RequestError(ValueError):
    """A request the client must fix: answered 400 with the message."""


def _content_text(content, index: int) -> str | list:
    """A message's content as nanopipe takes it: a string, or (assistant) a list of text/python parts.
    OpenAI's [{"type": "text", "text": ...}] lists are accepted."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in content):
        return content
    raise RequestError(f"messages[{index}].content must be a string or a list of {{type, text}} parts")


def parse_request(body: bytes, tokenizer, limit: int, defaults: dict) -> dict:
    """The generation job a /v1/chat/completions body asks for; RequestError for anything malformed."""
    try:
        request = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(f"the body is not valid JSON ({e})") from None
    if not isinstance(request, dict):
        raise RequestError("the body must be a JSON object")
    messages = request.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of {role, content}")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise RequestError(f"messages[{i}].role must be system, user or assistant")
        content = _content_text(m.get("content"), i)
        if m["role"] != "assistant" and isinstance(content, list):
            content = "".join(p["text"] for p in content)
        clean.append({"role": m["role"], "content": content})
    if clean[-1]["role"] != "user":
        raise RequestError("the last message must be from the user")
    try:
        prompt = tokenizer.render_for_completion({"messages": clean})
    except ValueError as e:
        raise RequestError(str(e)) from None
    options = {}
    for name, kind, low, high in (("max_tokens", int, 1, None), ("max_completion_tokens", int, 1, None),
                                  ("temperature", (int, float), 0, 2), ("top_k", int, 1, None),
                                  ("seed", int, None, None)):
        value = request.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, kind) or (low is not None and value < low) \
                or (high is not None and value > high):
            bounds = f" in [{low}, {high}]" if high is not None else (f" >= {low}" if low is not None else "")
            raise RequestError(f"'{name}' must be a number{bounds}, got {value!r:.40}")
        options[name] = value
    if not isinstance(request.get("stream", False), bool):
        raise RequestError("'stream' must be true or false")
    asked = options.get("max_completion_tokens", options.get("max_tokens", limit))
    room = defaults["context"] - len(prompt)
    if room < 1:
        raise RequestError(f"the conversation is {len(prompt)} tokens and the model's context {defaults['context']}: "
                           "send fewer or shorter messages")
    return {
        "prompt": prompt,
        "stream": request.get("stream", False),
        "max_tokens": min(asked, limit, room),
        "temperature": float(options.get("temperature", defaults["temperature"])),
        "top_k": options.get("top_k", defaults["top_k"]),
        "seed": options.get("seed"),
    }


class Job:
    def __init__(self, spec: dict, loop: asyncio.AbstractEventLoop):
        self.spec = spec
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()

    def send(self, event: tuple):
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Worker:
    """The one thread that runs the model: takes jobs from a bounded queue, streams events back."""

    def __init__(self, model, tokenizer, device: str, dtype, max_queue: int):
        self.engine = Engine(model, tokenizer)
        self.tokenizer = tokenizer
        self.device, self.dtype = device, dtype
        self.jobs: queue.Queue = queue.Queue(maxsize=max_queue)
        self.stats = {"served": 0, "cancelled": 0, "rejected": 0, "running": 0}
        self.seed = 0
        self.thread = threading.Thread(target=self._run, name="nanopipe-generate", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> bool:
        try:
            self.jobs.put_nowait(job)
            return True
        except queue.Full:
            self.stats["rejected"] += 1
            return False

    def _run(self):
        torch.set_grad_enabled(False)
        while True:
            job = self.jobs.get()
            if job is None:
                return
            self.stats["running"] = 1
            try:
                with autocast(self.device, self.dtype):
                    self._generate(job)
            except Exception as e:  # a bug must not kill the worker: the client gets a 500, the next job runs
                job.send(("error", f"{type(e).__name__}: {e}"))
            finally:
                self.stats["running"] = 0

    def _generate(self, job: Job):
        spec = job.spec
        self.seed += 1
        decoder = ReplyDecoder(self.tokenizer)
        finish, count = "length", 0
        for step in self.engine.generate(spec["prompt"], max_tokens=spec["max_tokens"], temperature=spec["temperature"],
                                         top_k=spec["top_k"],
                                         seed=spec["seed"] if spec["seed"] is not None else self.seed):
            if job.cancelled.is_set():
                self.stats["cancelled"] += 1
                return
            token, _ = step[0]
            if token is None or token in self.engine.stop_tokens:
                finish = "stop"
                break
            count += 1
            text = decoder.feed(token)
            if text:
                job.send(("delta", text))
        if text := decoder.flush():
            job.send(("delta", text))
        self.stats["served"] += 1
        job.send(("done", finish, decoder.finish(), {"prompt_tokens": len(spec["prompt"]), "completion_tokens": count,
                                                     "total_tokens": len(spec["prompt"]) + count}))

    def stop(self):
        self.jobs.put(None)


def _error(status: int, message: str, kind: str = "invalid_request_error"):
    from fastapi.responses import JSONResponse
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


def create_app(model, tokenizer, model_name: str, device: str = "cpu", dtype=torch.float32, max_queue: int = 16,
               max_new_tokens: int = 512, temperature: float = 0.6, top_k: int = 50):
    """The FastAPI app: /v1/chat/completions, /v1/models, /health and the web chat at /."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    worker = Worker(model, tokenizer, device, dtype, max_queue)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        worker.stop()

    app = FastAPI(title="nanopipe chat", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.worker = worker
    defaults = {"context": model.config.sequence_len, "temperature": temperature, "top_k": top_k}
    created = int(time.time())

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):
        return _error(exc.status_code, str(exc.detail), "not_found" if exc.status_code == 404 else "http_error")

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc):
        return _error(400, str(exc))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "queued": worker.jobs.qsize(), "max_queue": max_queue,
                **worker.stats}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "nanopipe", "context_length": defaults["context"]}]}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            spec = parse_request(await request.body(), tokenizer, max_new_tokens, defaults)
        except RequestError as e:
            return _error(400, str(e))
        job = Job(spec, asyncio.get_running_loop())
        if not worker.submit(job):
            return _error(503, f"the server is busy ({max_queue} requests waiting): retry later", "server_busy")
        reply_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        head = {"id": reply_id, "created": int(time.time()), "model": model_name}
        if not spec["stream"]:
            text = []
            try:
                while True:
                    event = await job.events.get()
                    if event[0] == "delta":
                        text.append(event[1])
                    elif event[0] == "error":
                        return _error(500, event[1], "server_error")
                    else:
                        _, finish, parts, usage = event
                        message = {"role": "assistant", "content": "".join(text), "nanopipe_parts": parts}
                        return JSONResponse({**head, "object": "chat.completion", "usage": usage,
                                             "choices": [{"index": 0, "message": message, "finish_reason": finish}]})
            finally:
                job.cancelled.set()  # a no-op once done; stops the generation if the client went away

        async def events():
            def chunk(delta, finish=None, **extra):
                data = {**head, "object": "chat.completion.chunk",
                        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
                return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"
            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:
                    event = await job.events.get()
                    if event[0] == "delta":
                        yield chunk({"content": event[1]})
                    elif event[0] == "error":
                        yield f"data: {json.dumps({'error': {'message': event[1], 'type': 'server_error'}})}\n\n"
                        return
                    else:
                        _, finish, parts, usage = event
                        yield chunk({}, finish, usage=usage, nanopipe_parts=parts)
                        yield "data: [DONE]\n\n"
                        return
            finally:  # also when the client disconnects mid-stream: the worker stops at the next token
                job.cancelled.set()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app
