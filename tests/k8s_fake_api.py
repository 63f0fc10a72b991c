"""A fake Kubernetes API server on 127.0.0.1, for driving the real `kubernetes` client in tests.

    with FakeKubeApi() as api:
        launcher = KubernetesLauncher(settings, api_client=api.client())
        api.fail("POST", "jobs", 403, "forbidden")   # the next create of a Job is refused
        api.set_status("Job", name, {"failed": 1})    # what the job's "pods" did

Just the endpoints the launcher calls, in any namespace: create / get / get status / list with a
labelSelector (k=v and bare-key terms, comma-joined) / delete of batch/v1 Jobs, v1 Secrets and
trainer.kubeflow.org/v1alpha1 TrainJobs. Create assigns a uid and answers 409 AlreadyExists for
a taken name; delete answers 404 for an unknown one and, like the garbage collector, deletes the
objects whose ownerReferences name the deleted uid. Errors are metav1 Status bodies. `fail`
injects one-shot errors per (method, resource), `hold` holds such calls until released; `calls` records every request and its answer. The server is a
thread (http.server); `stop()` makes later calls meet a refused connection.
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

KINDS = {"jobs": "Job", "secrets": "Secret", "trainjobs": "TrainJob"}
PATH = re.compile(r"^/(?:api/v1|apis/batch/v1|apis/trainer\.kubeflow\.org/v1alpha1)/namespaces/"
                  r"(?P<ns>[^/]+)/(?P<res>jobs|secrets|trainjobs)(?:/(?P<name>[^/]+))?(?P<status>/status)?$")


class FakeKubeApi:
    def __init__(self):
        self.objects: dict[tuple[str, str, str], dict] = {}  # (resource, namespace, name) -> object
        self.calls: list[tuple[str, str, int]] = []          # (method, path, HTTP status answered)
        self._failures: dict[tuple[str, str], list[tuple[int, str]]] = {}
        self._delays: dict[tuple[str, str], threading.Event] = {}  # held until the event is set
        self._lock = threading.Lock()
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _do(self):
                url = urlparse(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}") if length else {}
                code, answer = api.handle(self.command, url.path, parse_qs(url.query), body)
                data = json.dumps(answer).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _do

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.host = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    # -- test controls ---------------------------------------------------------------------
    def client(self, host: str | None = None):
        """A real kubernetes ApiClient pointed at this server (or at `host`)."""
        from kubernetes import client

        cfg = client.Configuration(host=host or self.host)
        cfg.retries = False  # a refused connection fails at once (urllib3 would retry 3 times)
        return client.ApiClient(cfg)

    def fail(self, method: str, resource: str, code: int, message: str, times: int = 1) -> None:
        """The next `times` `method` calls on `resource` ("jobs", "secrets", "trainjobs") answer `code`."""
        with self._lock:
            self._failures.setdefault((method, resource), []).extend([(code, message)] * times)

    def hold(self, method: str, resource: str) -> threading.Event:
        """`method` calls on `resource` wait (server side) until the returned event is set."""
        self._delays[(method, resource)] = event = threading.Event()
        return event

    def set_status(self, kind: str, name: str, status: dict, namespace: str = "tunewire") -> None:
        res = next(r for r, k in KINDS.items() if k == kind)
        with self._lock:
            self.objects[(res, namespace, name)]["status"] = status

    def names(self, kind: str) -> list[str]:
        with self._lock:
            return sorted(n for (r, _, n) in self.objects if KINDS[r] == kind)

    def get(self, kind: str, name: str, namespace: str = "tunewire") -> dict | None:
        res = next(r for r, k in KINDS.items() if k == kind)
        with self._lock:
            return self.objects.get((res, namespace, name))

    def add(self, obj: dict) -> dict:
        """Puts an object there directly (what an earlier trainer left behind)."""
        res = next(r for r, k in KINDS.items() if k == obj["kind"])
        code, made = self._handle("POST", f"/x/namespaces/{obj['metadata']['namespace']}/{res}", {}, obj)
        assert code == 201, made
        return made

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    # -- the API ---------------------------------------------------------------------------
    def handle(self, method: str, path: str, query: dict, body: dict, record: bool = True):
        code, answer = self._handle(method, path, query, body)
        if record:
            with self._lock:
                self.calls.append((method, path, code))
        return code, answer

    def _handle(self, method: str, path: str, query: dict, body: dict):
        m = PATH.match(path) or re.match(r"^/x/namespaces/(?P<ns>[^/]+)/(?P<res>\w+)(?P<name>)(?P<status>)$", path)
        if not m:
            return 404, _status(404, "NotFound", f"no such path {path}")
        ns, res, name = m["ns"], m["res"], m["name"]
        if held := self._delays.get((method, res)):
            held.wait(30)
        with self._lock:
            queue = self._failures.get((method, res))
            if queue:
                code, message = queue.pop(0)
                return code, _status(code, {403: "Forbidden", 409: "AlreadyExists", 422: "Invalid"}
                                     .get(code, "InternalError"), message)
            if method == "POST" and not name:
                name = body["metadata"]["name"]
                if (res, ns, name) in self.objects:
                    return 409, _status(409, "AlreadyExists", f'{res} "{name}" already exists')
                obj = json.loads(json.dumps(body))
                obj["metadata"].update(uid=str(uuid.uuid4()), namespace=ns, resourceVersion="1",
                                       creationTimestamp="2026-12-05T00:00:00Z")
                self.objects[(res, ns, name)] = obj
                return 201, obj
            if method == "GET" and not name:
                items = [o for (r, n, _), o in self.objects.items() if r == res and n == ns
                         and _selects(query.get("labelSelector", [""])[0], o["metadata"].get("labels") or {})]
                return 200, {"apiVersion": "v1", "kind": KINDS[res] + "List", "metadata": {}, "items": items}
            obj = self.objects.get((res, ns, name))
            if obj is None:
                return 404, _status(404, "NotFound", f'{res} "{name}" not found')
            if method == "GET":
                return 200, obj
            if method == "DELETE":
                self._delete(res, ns, name)
                return 200, obj
        return 405, _status(405, "MethodNotAllowed", method)

    def _delete(self, res: str, ns: str, name: str) -> None:
        """Deletes, then (the garbage collector) every dependent of the deleted uid."""
        obj = self.objects.pop((res, ns, name))
        uid = obj["metadata"]["uid"]
        for key, dep in list(self.objects.items()):
            if key in self.objects and any(o.get("uid") == uid for o in dep["metadata"].get("ownerReferences", [])):
                self._delete(*key)


def _status(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


def _selects(selector: str, labels: dict) -> bool:
    for term in filter(None, selector.split(",")):
        key, eq, value = term.partition("=")
        if (eq and labels.get(key) != value) or (not eq and key not in labels):
            return False
    return True
