"""A loopback stand-in for the Hugging Face hub: enough of its HTTP API for huggingface_hub to push to it.

It records every request (method, path with query, headers, body) and keeps what was committed per repo.
Files are answered "regular" in the preupload step (inlined in the commit), never LFS/Xet, so no storage
backend is needed. Anything it does not know is a 404 with a JSON error, and recorded too.
"""

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class HubServer:
    def __init__(self):
        self.requests = []   # dicts: method, path, headers (lower-case names), body
        self.repos = {}      # repo_id -> {"private": bool, "files": {path: bytes}, "commits": [message]}
        self.validated = []  # README.md texts sent to /api/validate-yaml
        self.lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, code, payload):
                body = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with hub.lock:
                    hub.requests.append({"method": "POST", "path": self.path,
                                         "headers": {k.lower(): v for k, v in self.headers.items()},
                                         "body": body})
                code, payload = hub.handle_post(self.path.split("?")[0], body)
                self._reply(code, payload)

            def do_GET(self):
                with hub.lock:
                    hub.requests.append({"method": "GET", "path": self.path,
                                         "headers": {k.lower(): v for k, v in self.headers.items()},
                                         "body": b""})
                self._reply(404, {"error": f"not found: {self.path}"})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def handle_post(self, path, body):
        if path == "/api/repos/create":
            request = json.loads(body)
            repo = f"{request['organization']}/{request['name']}" if request.get("organization") else request["name"]
            with self.lock:
                self.repos.setdefault(repo, {"private": request.get("visibility") == "private", "files": {},
                                             "commits": []})
            return 200, {"url": f"{self.url}/{repo}", "name": repo}
        if path == "/api/validate-yaml":  # the model card's metadata header
            self.validated.append(json.loads(body)["content"])
            return 200, {"errors": [], "warnings": []}
        parts = path.strip("/").split("/")  # api models NS NAME preupload|commit REVISION
        if len(parts) == 6 and parts[:2] == ["api", "models"] and parts[4] in ("preupload", "commit"):
            repo = f"{parts[2]}/{parts[3]}"
            if repo not in self.repos:
                return 404, {"error": f"repository {repo} not found"}
            if parts[4] == "preupload":
                files = json.loads(body)["files"]
                return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                       for f in files]}
            return self._commit(repo, body)
        return 404, {"error": f"not found: {path}"}

    def _commit(self, repo, body):
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        message = next(line["value"]["summary"] for line in lines if line["key"] == "header")
        with self.lock:
            for line in lines:
                if line["key"] == "file":
                    self.repos[repo]["files"][line["value"]["path"]] = base64.b64decode(line["value"]["content"])
            self.repos[repo]["commits"].append(message)
            oid = hashlib.sha1(f"{repo}{len(self.repos[repo]['commits'])}".encode()).hexdigest()
        return 200, {"commitUrl": f"{self.url}/{repo}/commit/{oid}", "commitOid": oid}

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
