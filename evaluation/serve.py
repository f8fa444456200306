"""A local OpenAI-compatible HTTP server over a local HF model, standard library only.

    python -m evaluation.serve --model smollm2-135m --port 8000
    python -m evaluation.serve --model tiny-gpt2 --adapter runs/sft_reflector --served_name reflector

Any OpenAI client (``openai``, our :class:`llm.openai_api.OpenAIBackend`, the data generator's API
reflector) then talks to ``http://127.0.0.1:8000/v1``. Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions``,
``POST /v1/completions`` (fields ``model``, ``messages`` or ``prompt`` (a str or a list of str), ``max_tokens``,
``temperature``, ``top_p``, ``stop``, ``seed``; ``n`` must be 1). Requests run one at a time through a
:class:`LocalBackend` (one model, one lock); errors come back as OpenAI-style ``{"error": {...}}`` bodies.
The server does not check keys, so it binds to loopback unless ``--host`` says otherwise.

Fault injection, to test clients' retries against a real server: every request first sleeps
``--fault_delay_s``, then is answered 429 with probability ``--fault_rate_429`` or 500 with probability
``--fault_rate_500`` (drawn from ``--fault_seed``), before any work is done.
"""

from __future__ import annotations

import ipaddress
import json
import random
import socket
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

from experiment_args import UsageError, cli, parse_args
from llm.base import Backend, Generation


@dataclass
class Faults:
    """Injected failures: each request sleeps ``delay_s``, then fails 429 / 500 with these probabilities."""

    rate_429: float = 0.0
    rate_500: float = 0.0
    delay_s: float = 0.0
    seed: int = 0


@dataclass
class ServeArguments:
    """Flags of ``python -m evaluation.serve``."""

    model: str = field(
        default="tiny-gpt2", metadata={"help": "A built-in name (tiny-gpt2, smollm2-135m) or an HF model folder."}
    )
    adapter: str = field(default="", metadata={"help": "A LoRA adapter folder (or a whole fine-tuned model folder)."})
    host: str = field(
        default="127.0.0.1",
        metadata={"help": "Interface to bind; the server has no authentication, so keep loopback unless needed."},
    )
    port: int = field(default=8000, metadata={"help": "TCP port (0 picks a free one)."})
    served_name: str = field(default="", metadata={"help": "Model name clients must send; default the --model value."})
    dtype: str = field(default="float32", metadata={"help": "float32, bfloat16, float16 or auto."})
    device: str = field(default="auto", metadata={"help": "auto (cuda if available), cpu, cuda..."})
    batch_size: int = field(default=16, metadata={"help": "Prompts decoded together (a completions list)."})
    fault_rate_429: float = field(default=0.0, metadata={"help": "Testing: answer 429 with this probability."})
    fault_rate_500: float = field(default=0.0, metadata={"help": "Testing: answer 500 with this probability."})
    fault_delay_s: float = field(default=0.0, metadata={"help": "Testing: sleep this long before each answer."})
    fault_seed: int = field(default=0, metadata={"help": "Testing: seed of the injected faults."})
    verbose: bool = field(default=True, metadata={"help": "Print one line per request (never its headers)."})

    def __post_init__(self):
        if not 0 <= self.port <= 65535:
            raise UsageError(f"--port {self.port} is not in 0..65535")
        for flag, rate in (("--fault_rate_429", self.fault_rate_429), ("--fault_rate_500", self.fault_rate_500)):
            if not 0.0 <= rate <= 1.0:
                raise UsageError(f"{flag} must be a probability in [0, 1], got {rate}")
        if self.fault_rate_429 + self.fault_rate_500 > 1.0:
            raise UsageError("--fault_rate_429 + --fault_rate_500 must be <= 1")
        if self.fault_delay_s < 0:
            raise UsageError("--fault_delay_s must be >= 0")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise UsageError(f"--dtype {self.dtype!r} is not one of auto, float32, bfloat16, float16")
        if self.batch_size < 1:
            raise UsageError("--batch_size must be >= 1")


class HTTPError(Exception):
    """An error answer: status, message and OpenAI error type."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


# ---------------------------------------------------------------------------------------------------
# 1. request bodies -> generate() arguments
# ---------------------------------------------------------------------------------------------------


def _number(body: dict, name: str, default, low: float, high: float, integer: bool = False):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise HTTPError(400, f"'{name}' must be {'an integer' if integer else 'a number'}")
    if not low <= value <= high:
        raise HTTPError(400, f"'{name}' must be in [{low}, {high}], got {value}")
    return value


def sampling_args(body: dict, default_max_tokens: int) -> dict:
    """The generate() keyword arguments of a request body; HTTPError 400 for anything unsupported."""
    if body.get("n", 1) != 1:
        raise HTTPError(400, "only n=1 is supported; send one request per sample")
    if body.get("stream"):
        raise HTTPError(400, "streaming is not supported; send stream=false")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise HTTPError(400, "'stop' must be a string or a list of strings")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise HTTPError(400, "'seed' must be an integer")
    return {
        "max_tokens": _number({"max_tokens": max_tokens}, "max_tokens", default_max_tokens, 1, 1 << 20, True),
        "temperature": float(_number(body, "temperature", 1.0, 0.0, 2.0)),
        "top_p": float(_number(body, "top_p", 1.0, 1e-9, 1.0)),
        "stop": stop or None,
        "seed": seed,
    }


def chat_messages(body: dict) -> list[dict]:
    """``messages`` as ``[{"role", "content": str}]``; text parts of a content list are joined."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise HTTPError(400, "'messages' must be a non-empty list of {role, content}")
    out = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise HTTPError(400, "each message needs a string 'role' and a 'content'")
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise HTTPError(400, "only text content parts are supported")
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str):
            raise HTTPError(400, "each message needs a string 'role' and a 'content'")
        out.append({"role": m["role"], "content": content})
    return out


def completion_prompts(body: dict) -> list[str]:
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise HTTPError(400, "'prompt' must be a non-empty string or a list of them (token ids are not supported)")
    return prompts


def _usage(gens: list[Generation]) -> dict:
    prompt = sum(g.prompt_tokens for g in gens)
    completion = sum(g.completion_tokens for g in gens)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


# ---------------------------------------------------------------------------------------------------
# 2. the server
# ---------------------------------------------------------------------------------------------------


class OpenAIServer(ThreadingHTTPServer):
    """One thread per connection; model calls are serialised by ``model_lock``."""

    daemon_threads = True
    # server_close() joins the handler threads, after shutting down the sockets of connections still open (a
    # keep-alive client that never closes must not hold it up). A handler thread left running in torch at
    # interpreter exit aborted the process ("terminate called without an active exception").
    block_on_close = True

    def __init__(self, address, backend: Backend, served_name: str, faults: Faults, verbose: bool = False):
        self.backend = backend
        self.served_name = served_name
        self.faults = faults
        self.verbose = verbose
        self.model_lock = threading.Lock()
        self.created = int(time.time())
        self.requests = 0  # every HTTP request received, failed and faulted ones included
        self._rng = random.Random(faults.seed)
        self._rng_lock = threading.Lock()
        self._connections: set = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request, client_address):
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def server_close(self):
        with self._connections_lock:
            open_now = list(self._connections)
        for connection in open_now:  # wakes handlers waiting on a keep-alive read; they then return
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        super().server_close()  # joins the handler threads

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}/v1"

    def count_and_draw(self) -> float:
        with self._rng_lock:
            self.requests += 1
            return self._rng.random()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the openai client expects
    timeout = 60  # an idle keep-alive connection frees its thread after this long
    server: OpenAIServer

    def log_message(self, format, *args):  # the request line only; headers (and keys) are never printed
        if self.server.verbose:
            sys.stderr.write(f"{self.address_string()} - {format % args}\n")

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self, work) -> None:
        # The body is read before any fault, so a faulted connection stays in sync for the next request.
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        raw = self.rfile.read(length) if length > 0 else b""
        faults = self.server.faults
        draw = self.server.count_and_draw()
        if faults.delay_s:
            time.sleep(faults.delay_s)
        try:
            if length < 0:
                self.close_connection = True  # the body's end is unknown: do not read another request from it
                raise HTTPError(400, "the Content-Length header is not a number")
            if draw < faults.rate_429:
                raise HTTPError(429, "injected rate limit (--fault_rate_429)", "rate_limit_error")
            if draw < faults.rate_429 + faults.rate_500:
                raise HTTPError(500, "injected server error (--fault_rate_500)", "server_error")
            status, payload = 200, work(raw)
        except HTTPError as err:
            status, payload = err.status, {"error": {"message": err.message, "type": err.kind, "code": err.status}}
        except Exception as err:  # a bug or a model failure: answer 500, keep serving
            traceback.print_exc()
            status, payload = 500, {"error": {"message": f"{type(err).__name__}: {err}", "type": "server_error"}}
        try:
            self._send(status, payload)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (its timeout): nobody to tell
            self.close_connection = True

    def do_GET(self):
        path = urlparse(self.path).path.rstrip("/")
        model = {"id": self.server.served_name, "object": "model", "created": self.server.created, "owned_by": "local"}
        if path == "/v1/models":
            self._handle(lambda raw: {"object": "list", "data": [model]})
        elif path == f"/v1/models/{self.server.served_name}":
            self._handle(lambda raw: model)
        else:
            self._handle(self._not_found)

    def do_POST(self):
        routes = {"/v1/chat/completions": self._chat, "/v1/completions": self._completions}
        self._handle(routes.get(urlparse(self.path).path.rstrip("/"), self._not_found))

    def _not_found(self, raw: bytes) -> dict:
        raise HTTPError(404, f"no endpoint {self.command} {urlparse(self.path).path}", "not_found_error")

    def _body(self, raw: bytes) -> dict:
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise HTTPError(400, f"the request body is not valid JSON ({err})") from None
        if not isinstance(body, dict):
            raise HTTPError(400, "the request body must be a JSON object")
        if not isinstance(body.get("model"), str):
            raise HTTPError(400, "'model' is required")
        if body["model"] != self.server.served_name:
            raise HTTPError(
                404,
                f"model {body['model']!r} does not exist; this server serves {self.server.served_name!r}",
                "not_found_error",
            )
        return body

    def _run(self, prompts: list, args: dict) -> list[Generation]:
        try:
            with self.server.model_lock:
                return self.server.backend.generate(prompts, **args)
        except ValueError as err:  # too long a prompt, bad sampling values
            raise HTTPError(400, str(err)) from None

    def _chat(self, raw: bytes) -> dict:
        body = self._body(raw)
        args = sampling_args(body, default_max_tokens=256)
        messages = chat_messages(body)
        (gen,) = self._run([messages], args)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.server.served_name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": gen.text},
                    "finish_reason": gen.finish_reason,
                    "logprobs": None,
                }
            ],
            "usage": _usage([gen]),
        }

    def _completions(self, raw: bytes) -> dict:
        body = self._body(raw)
        args = sampling_args(body, default_max_tokens=16)  # OpenAI's default for completions
        gens = self._run(completion_prompts(body), args)
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.server.served_name,
            "choices": [
                {"index": i, "text": g.text, "finish_reason": g.finish_reason, "logprobs": None}
                for i, g in enumerate(gens)
            ],
            "usage": _usage(gens),
        }


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def make_server(
    backend: Backend,
    host: str = "127.0.0.1",
    port: int = 0,
    served_name: str = "local",
    faults: Faults | None = None,
    verbose: bool = False,
) -> OpenAIServer:
    """A bound server (not yet serving): run ``serve_forever()`` (e.g. in a thread), then ``shutdown()``
    and ``server_close()``. Port 0 picks a free port; ``server.url`` is the base URL for clients."""
    if not is_loopback(host):
        print(f"warning: --host {host} exposes the model to the network without authentication", file=sys.stderr)
    return OpenAIServer((host, port), backend, served_name, faults or Faults(), verbose)


@cli
def main(argv: list[str] | None = None) -> None:
    from llm.local import LocalBackend

    (args,) = parse_args((ServeArguments,), argv)
    backend = LocalBackend(
        args.model, adapter=args.adapter or None, dtype=args.dtype, batch_size=args.batch_size, device=args.device
    )
    served_name = args.served_name or args.model
    faults = Faults(args.fault_rate_429, args.fault_rate_500, args.fault_delay_s, args.fault_seed)
    try:
        server = make_server(backend, args.host, args.port, served_name, faults, verbose=args.verbose)
    except OSError as err:
        raise UsageError(f"cannot bind {args.host}:{args.port} ({err.strerror}); pick another --port") from None
    print(f"serving {served_name!r} at {server.url} (OpenAI-compatible; Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
