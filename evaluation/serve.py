"""A local OpenAI-compatible HTTP server over a local HF model, on FastAPI + uvicorn.

    python -m evaluation.serve --model smollm2-135m --port 8000
    python -m evaluation.serve --model tiny-gpt2 --adapter runs/sft_reflector --served_name reflector

Any OpenAI client (``openai``, our :class:`llm.openai_api.OpenAIBackend`, the data generator's API
reflector) then talks to ``http://127.0.0.1:8000/v1``. Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions``,
``POST /v1/completions``. Request fields: ``model``, ``messages`` or ``prompt`` (a str or a list of str),
``max_tokens`` (or ``max_completion_tokens``), ``temperature``, ``top_p``, ``stop``, ``seed``, ``n``,
``stream`` (+ ``stream_options.include_usage``), and log-probs: chat ``logprobs: true`` + ``top_logprobs: k``,
completions ``logprobs: k``. Log-probs are the model's own (log-softmax at temperature 1, from the decode that
picked the tokens) for the tokens of the returned text; the end token and tokens a stop string cut are left out.
Errors are OpenAI-style ``{"error": {"message", "type", "param", "code"}}`` bodies.

One worker thread runs the model (torch generation on one model is not thread-safe): requests queue to it,
at most ``--max_queue`` waiting (more are answered 429), and queued requests with the same sampling settings
are decoded together, up to ``--batch_size`` prompts (``--batch_requests false``: one at a time). Seeded
sampling is never batched with others, so its answer depends only on its request. Streaming sends text as
it is decoded, whole tokens at a time, holding back text a stop string could still cut. On shutdown
(Ctrl-C, or ``shutdown()``) the server stops accepting, finishes the requests in flight (up to
``--shutdown_timeout_s``), then stops the worker. With ``--api_key`` clients must send
``Authorization: Bearer KEY`` (401 otherwise); without it any key is accepted, so it binds to loopback unless
``--host`` says otherwise (and warns then).

Fault injection, to test clients' retries against a real server: every request first sleeps
``--fault_delay_s``, then is answered 429 with probability ``--fault_rate_429`` or 500 with probability
``--fault_rate_500``, or its connection is closed mid-answer with probability ``--fault_rate_drop`` (one draw
a request from ``--fault_seed``, in order of arrival), before any work is done.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import random
import socket
import sys
import threading
import time
import traceback
import uuid
from collections import deque
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from experiment_args import LocalModelArguments, UsageError
from llm.base import Backend, Generation
from run_utils import cli, parse_args

# ---------------------------------------------------------------------------------------------------
# 1. flags
# ---------------------------------------------------------------------------------------------------


@dataclass
class Faults:
    """Injected failures: each request sleeps ``delay_s``, then fails 429 / 500 / dropped with these probabilities."""

    rate_429: float = 0.0
    rate_500: float = 0.0
    delay_s: float = 0.0
    seed: int = 0
    rate_drop: float = 0.0


@dataclass
class ServeArguments(LocalModelArguments):
    """Flags of ``python -m evaluation.serve``: the model's (``--model``, ``--adapter``, ``--dtype``, ``--device``,
    ``--batch_size``, shared with the in-context methods' local backend), then the server's."""

    host: str = field(
        default="127.0.0.1",
        metadata={"help": "Interface to bind; keep loopback unless needed, and then set --api_key."},
    )
    port: int = field(default=8000, metadata={"help": "TCP port (0 picks a free one)."})
    served_name: str = field(default="", metadata={"help": "Model name clients must send; default the --model value."})
    api_key: str = field(
        default="", metadata={"help": "Clients must send 'Authorization: Bearer KEY' (401 otherwise); empty: any."}
    )
    batch_requests: bool = field(
        default=True, metadata={"help": "Decode queued requests with the same sampling settings together."}
    )
    max_queue: int = field(default=128, metadata={"help": "Requests waiting for the model at most; more get 429."})
    shutdown_timeout_s: float = field(
        default=30.0, metadata={"help": "On shutdown, wait this long for requests in flight to finish."}
    )
    fault_rate_429: float = field(default=0.0, metadata={"help": "Testing: answer 429 with this probability."})
    fault_rate_500: float = field(default=0.0, metadata={"help": "Testing: answer 500 with this probability."})
    fault_rate_drop: float = field(
        default=0.0, metadata={"help": "Testing: close the connection mid-answer with this probability."}
    )
    fault_delay_s: float = field(default=0.0, metadata={"help": "Testing: sleep this long before each answer."})
    fault_seed: int = field(default=0, metadata={"help": "Testing: seed of the injected faults."})
    verbose: bool = field(default=True, metadata={"help": "Print one line per request (never its headers)."})

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.port <= 65535:
            raise UsageError(f"--port {self.port} is not in 0..65535")
        rates = (
            ("--fault_rate_429", self.fault_rate_429),
            ("--fault_rate_500", self.fault_rate_500),
            ("--fault_rate_drop", self.fault_rate_drop),
        )
        for flag, rate in rates:
            if not 0.0 <= rate <= 1.0:
                raise UsageError(f"{flag} must be a probability in [0, 1], got {rate}")
        if self.fault_rate_429 + self.fault_rate_500 + self.fault_rate_drop > 1.0:
            raise UsageError("--fault_rate_429 + --fault_rate_500 + --fault_rate_drop must be <= 1")
        if self.fault_delay_s < 0:
            raise UsageError("--fault_delay_s must be >= 0")
        if self.max_queue < 0:
            raise UsageError("--max_queue must be >= 0")
        if self.shutdown_timeout_s < 0:
            raise UsageError("--shutdown_timeout_s must be >= 0")


# ---------------------------------------------------------------------------------------------------
# 2. request bodies -> generate() arguments
# ---------------------------------------------------------------------------------------------------


class HTTPError(Exception):
    """An error answer: status, message, OpenAI error type, the request field at fault and a code."""

    def __init__(
        self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None, code=None
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _number(body: dict, name: str, default, low: float, high: float, integer: bool = False):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise HTTPError(400, f"'{name}' must be {'an integer' if integer else 'a number'}", param=name)
    if not low <= value <= high:
        raise HTTPError(400, f"'{name}' must be in [{low}, {high}], got {value}", param=name)
    return value


def _flag(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise HTTPError(400, f"'{name}' must be true or false", param=name)
    return bool(value)


def sampling_args(body: dict, default_max_tokens: int) -> dict:
    """The generate() keyword arguments of a request body; HTTPError 400 for anything unsupported."""
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
        raise HTTPError(400, "'stop' must be a string or a list of non-empty strings", param="stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise HTTPError(400, "'seed' must be an integer", param="seed")
    return {
        "max_tokens": _number({"max_tokens": max_tokens}, "max_tokens", default_max_tokens, 1, 1 << 20, True),
        "temperature": float(_number(body, "temperature", 1.0, 0.0, 2.0)),
        "top_p": float(_number(body, "top_p", 1.0, 1e-9, 1.0)),
        "stop": stop or None,
        "seed": seed,
    }


def top_logprobs(body: dict, chat: bool) -> int | None:
    """How many alternatives to list per token, None when log-probs are not asked for.

    Chat: ``logprobs: true`` and ``top_logprobs: k``; completions: ``logprobs: k``. Both allow k in 0..20."""
    if chat:
        if not _flag(body, "logprobs"):
            if body.get("top_logprobs") is not None:
                raise HTTPError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
            return None
        return _number(body, "top_logprobs", 0, 0, 20, True)
    return _number(body, "logprobs", None, 0, 20, True)


def chat_messages(body: dict) -> list[dict]:
    """``messages`` as ``[{"role", "content": str}]``; text parts of a content list are joined."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise HTTPError(400, "'messages' must be a non-empty list of {role, content}", param="messages")
    out = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise HTTPError(400, "each message needs a string 'role' and a 'content'", param="messages")
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise HTTPError(400, "only text content parts are supported", param="messages")
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str):
            raise HTTPError(400, "each message needs a string 'role' and a 'content'", param="messages")
        out.append({"role": m["role"], "content": content})
    return out


def completion_prompts(body: dict) -> list[str]:
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise HTTPError(
            400, "'prompt' must be a non-empty string or a list of them (token ids are not supported)", param="prompt"
        )
    if _flag(body, "echo"):
        raise HTTPError(400, "'echo' is not supported", param="echo")
    return prompts


# ---------------------------------------------------------------------------------------------------
# 3. the model worker: one thread, a bounded queue, compatible requests decoded together
# ---------------------------------------------------------------------------------------------------


def _stop_may_start(text: str, stops: list[str]) -> int:
    """The first index at which a stop string starts in ``text``, or could start once more text comes."""
    cut = len(text)
    for s in stops:
        found = text.find(s)
        if found >= 0:
            cut = min(cut, found)
        for p in range(max(0, len(text) - len(s) + 1), cut):
            if s.startswith(text[p:]):
                cut = p
                break
    return cut


class _Tokens:
    """One choice's tokens as they are decoded, and how much of their text is final: whole tokens whose text no
    stop string can still cut (the answer ends before a stop string), ending in no half of a UTF-8 character."""

    def __init__(self, tokenizer, stop: list[str] | None):
        self.tokenizer, self.stop = tokenizer, stop or []
        self.ids: list[int] = []
        self.logprobs: list[float] = []
        self.tops: list[list[tuple[int, float]]] = []
        self.texts = [""]  # texts[k]: the text of the first k tokens
        self.sent = 0  # tokens already released

    def add(self, token: int, logprob: float, top: list[tuple[int, float]] | None) -> None:
        self.ids.append(token)
        self.logprobs.append(logprob)
        self.tops.append(top or [])
        self.texts.append(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def release(self) -> tuple[int, int]:
        """The range of tokens now final, after those released before."""
        cut = _stop_may_start(self.texts[-1], self.stop)
        k = len(self.ids)
        while k > self.sent and (len(self.texts[k]) > cut or self.texts[k].endswith("\ufffd")):
            k -= 1
        first, self.sent = self.sent, k
        return first, k

    def finish(self, text: str) -> tuple[int, int]:
        """The range of tokens not released yet that the final ``text`` holds (the end token and tokens a stop
        string cut are left out)."""
        k = next((k for k, t in enumerate(self.texts) if len(t) >= len(text)), len(self.ids))
        first, self.sent = self.sent, max(self.sent, k)
        return first, self.sent

    def entries(self, first: int, last: int) -> list[dict]:
        """Tokens ``first..last`` as text: the token, its log-prob, the alternatives, its offset in the answer."""
        decode = self.tokenizer.decode
        return [
            {
                "token": decode([self.ids[k]]),
                "logprob": self.logprobs[k],
                "top": [(decode([i]), lp) for i, lp in self.tops[k]],
                "offset": len(self.texts[k]),
            }
            for k in range(first, last)
        ]


@dataclass
class Choice:
    """One answer of a request, as the worker hands it to the endpoint."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    entries: list[dict] | None = None  # per-token log-probs, when asked for (not streamed)


class _Abandoned(Exception):
    """Every request of a batch went away (clients disconnected): stop decoding it."""


@dataclass(eq=False)
class _Job:
    """One request: its prompts (a prompt repeated n times for n choices), generate() arguments, and the queue of
    events the worker posts to the endpoint: ("delta", choice, text, entries), ("done", choices), ("error", err)."""

    prompts: list
    args: dict
    stream: bool
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False

    def post(self, *event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: the server stopped, nobody is waiting
            pass

    def batch_key(self) -> str | None:
        """Jobs with equal keys can be decoded together; None: alone (seeded sampling draws from its own seed)."""
        if self.args["seed"] is not None and self.args["temperature"] > 0:
            return None
        return json.dumps({k: v for k, v in self.args.items() if k != "seed"}, sort_keys=True)

    async def next_event(self) -> tuple:
        return await self.events.get()

    async def result(self) -> list[Choice]:
        try:
            while True:
                event = await self.events.get()
                if event[0] == "done":
                    return event[1]
                if event[0] == "error":
                    raise event[1]
        finally:
            self.cancelled = True  # answered, failed or abandoned: the worker can skip it


class ModelWorker:
    """The one thread that calls ``backend.generate``: a bounded queue of jobs, compatible ones batched."""

    def __init__(self, backend: Backend, max_queue: int, batch_requests: bool):
        self.backend = backend
        self.max_queue = max_queue
        self.batch_requests = batch_requests
        self.max_batch = getattr(backend, "batch_size", 1)
        self.tokenizer = getattr(backend, "tokenizer", None)
        self._jobs: deque[_Job] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.busy = False  # inside backend.generate
        self.batches = 0  # generate() calls made
        self.batched_jobs = 0  # jobs those calls answered

    @property
    def stopping(self) -> bool:
        return self._stopping

    @property
    def queued(self) -> int:
        return len(self._jobs)

    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="model-worker", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Finish the batch being decoded, fail what still waits, join the thread (torch must not be running
        in a thread at interpreter exit: that aborts the process)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def submit(self, job: _Job) -> bool:
        """Queue a job; False when ``max_queue`` jobs already wait (an idle worker takes one more: its next)."""
        with self._cond:
            idle = not self.busy and not self._jobs
            if self._stopping or (len(self._jobs) >= self.max_queue and not idle):
                return False
            self._jobs.append(job)
            self._cond.notify()
            return True

    def _take(self) -> list[_Job]:
        """The first live job, and queued jobs that can share its generate() call, up to ``max_batch`` prompts."""
        while self._jobs and self._jobs[0].cancelled:
            self._jobs.popleft()
        if not self._jobs:
            return []
        batch = [self._jobs.popleft()]
        key = batch[0].batch_key()
        if key is None or not self.batch_requests:
            return batch
        size = len(batch[0].prompts)
        for job in list(self._jobs):
            if job.cancelled:
                self._jobs.remove(job)
            elif job.batch_key() == key and size + len(job.prompts) <= self.max_batch:
                self._jobs.remove(job)
                batch.append(job)
                size += len(job.prompts)
        return batch

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    left, self._jobs = list(self._jobs), deque()
                    for job in left:
                        job.post("error", HTTPError(503, "the server is shutting down", "server_error"))
                    return
                batch = self._take()
                self.busy = bool(batch)
            try:
                if batch:
                    self._process(batch)
            finally:
                with self._cond:
                    self.busy = False

    def _process(self, batch: list[_Job]) -> None:
        prompts = [p for job in batch for p in job.prompts]
        owners = [(job, i) for job in batch for i in range(len(job.prompts))]
        streams = {n: _Tokens(self.tokenizer, job.args["stop"]) for n, (job, _) in enumerate(owners) if job.stream}
        logprobs = batch[0].args.get("top_logprobs")

        def on_token(index: int, token: int, logprob: float, top) -> None:
            if all(job.cancelled for job in batch):
                raise _Abandoned
            tokens = streams.get(index)
            if tokens is None:
                return
            tokens.add(token, logprob, top)
            first, last = tokens.release()
            if last > first:
                job, i = owners[index]
                text = tokens.texts[last][len(tokens.texts[first]) :]
                job.post("delta", i, text, tokens.entries(first, last) if logprobs is not None else None)

        args = dict(batch[0].args)
        if streams:
            args["on_token"] = on_token
        try:
            gens = self.backend.generate(prompts, **args)
        except _Abandoned:
            return
        except ValueError as err:  # too long a prompt...: find whose, if several requests shared the call
            if len(batch) > 1:
                for job in batch:
                    self._process([job])
                return
            batch[0].post("error", HTTPError(400, str(err)))
            return
        except Exception as err:  # a model failure: answer 500, keep serving
            traceback.print_exc()
            for job in batch:
                job.post("error", HTTPError(500, f"{type(err).__name__}: {err}", "server_error"))
            return
        self.batches += 1
        self.batched_jobs += len(batch)
        for job in batch:
            start = next(n for n, (owner, _) in enumerate(owners) if owner is job)
            choices = []
            for i in range(len(job.prompts)):
                gen = gens[start + i]
                choices.append(self._choice(gen, streams.get(start + i), job, i, logprobs))
            job.post("done", choices)

    def _choice(self, gen: Generation, tokens: _Tokens | None, job: _Job, i: int, logprobs: int | None) -> Choice:
        choice = Choice(gen.text, gen.finish_reason, gen.prompt_tokens, gen.completion_tokens)
        if tokens is not None:  # streamed: send what was held back
            first, last = tokens.finish(gen.text)
            text = gen.text[len(tokens.texts[first]) :]
            entries = tokens.entries(first, last) if logprobs is not None else None
            if text or entries:
                job.post("delta", i, text, entries)
        elif logprobs is not None:
            tokens = _Tokens(self.tokenizer, job.args["stop"])
            for token, logprob, top in zip(gen.token_ids, gen.token_logprobs, gen.top_logprobs):
                tokens.add(token, logprob, top)
            choice.entries = tokens.entries(*tokens.finish(gen.text))
        return choice


# ---------------------------------------------------------------------------------------------------
# 4. OpenAI response bodies
# ---------------------------------------------------------------------------------------------------


def _chat_logprobs(entries: list[dict] | None) -> dict | None:
    if entries is None:
        return None

    def item(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    content = [item(e["token"], e["logprob"]) | {"top_logprobs": [item(*t) for t in e["top"]]} for e in entries]
    return {"content": content, "refusal": None}


def _completion_logprobs(entries: list[dict] | None) -> dict | None:
    if entries is None:
        return None
    return {
        "tokens": [e["token"] for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [dict(e["top"]) for e in entries],
        "text_offset": [e["offset"] for e in entries],  # in the choice's text
    }


def _usage(choices: list[Choice], n: int) -> dict:
    prompt = sum(c.prompt_tokens for c in choices[::n])  # each prompt once, however many choices it has
    completion = sum(c.completion_tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def response_body(chat: bool, model: str, choices: list[Choice], n: int) -> dict:
    if chat:
        out = [
            {
                "index": i,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": _chat_logprobs(c.entries),
                "finish_reason": c.finish_reason,
            }
            for i, c in enumerate(choices)
        ]
    else:
        out = [
            {"index": i, "text": c.text, "logprobs": _completion_logprobs(c.entries), "finish_reason": c.finish_reason}
            for i, c in enumerate(choices)
        ]
    return {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": out,
        "usage": _usage(choices, n),
    }


async def stream_events(chat: bool, model: str, job: _Job, first: tuple, n: int, include_usage: bool):
    """Server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``."""
    rid, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())

    def chunk(choices: list[dict], usage: dict | None = None) -> str:
        payload = {
            "id": rid,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created,
            "model": model,
            "choices": choices,
        }
        if include_usage:
            payload["usage"] = usage
        return f"data: {json.dumps(payload)}\n\n"

    def choice(i: int, text: str | None, entries: list[dict] | None, finish_reason: str | None) -> dict:
        if chat:
            delta = {} if text is None else {"content": text}
            logprobs = _chat_logprobs(entries)
            return {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        logprobs = _completion_logprobs(entries)
        return {"index": i, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}

    try:
        if chat:  # the assistant role first, as OpenAI does
            yield chunk(
                [choice(i, "", None, None) | {"delta": {"role": "assistant", "content": ""}} for i in range(n)]
            )
        event = first
        while True:
            if event[0] == "delta":
                _, i, text, entries = event
                yield chunk([choice(i, text, entries, None)])
            elif event[0] == "done":
                choices = event[1]
                yield chunk([choice(i, None, None, c.finish_reason) for i, c in enumerate(choices)])
                if include_usage:
                    yield chunk([], _usage(choices, n))
                break
            else:  # the status line is sent already: the error goes in the stream, as OpenAI's servers do
                yield f"data: {json.dumps(event[1].body())}\n\n"
                break
            event = await job.next_event()
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled = True


# ---------------------------------------------------------------------------------------------------
# 5. the app: routes, and a gate in front of them (count, log, delay, key, faults)
# ---------------------------------------------------------------------------------------------------


def build_app(server: OpenAIServer) -> FastAPI:
    app = FastAPI(title="evaluation.serve", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(HTTPError)
    async def http_error(request: Request, err: HTTPError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def no_route(request: Request, err: StarletteHTTPException):
        message = f"no endpoint {request.method} {request.url.path}"
        error = HTTPError(err.status_code, message if err.status_code in (404, 405) else str(err.detail))
        return JSONResponse(error.body(), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def bug(request: Request, err: Exception):  # a bug: answer 500, keep serving
        traceback.print_exception(err)
        error = HTTPError(500, f"{type(err).__name__}: {err}", "server_error")
        return JSONResponse(error.body(), status_code=500)

    def model_card() -> dict:
        return {"id": server.served_name, "object": "model", "created": server.created, "owned_by": "local"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        if name != server.served_name:
            raise HTTPError(404, f"model {name!r} does not exist", param="model", code="model_not_found")
        return model_card()

    async def read_body(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise HTTPError(400, f"the request body is not valid JSON ({err})") from None
        if not isinstance(body, dict):
            raise HTTPError(400, "the request body must be a JSON object")
        if not isinstance(body.get("model"), str):
            raise HTTPError(400, "'model' is required", param="model")
        if body["model"] != server.served_name:
            message = f"model {body['model']!r} does not exist; this server serves {server.served_name!r}"
            raise HTTPError(404, message, param="model", code="model_not_found")
        return body

    async def complete(chat: bool, body: dict, prompts: list):
        args = sampling_args(body, default_max_tokens=256 if chat else 16)  # 16: OpenAI's completions default
        k = top_logprobs(body, chat)
        if k is not None:
            args["top_logprobs"] = k
        n = _number(body, "n", 1, 1, 128, True)
        stream = _flag(body, "stream")
        options = body.get("stream_options")
        if options is not None and (not stream or not isinstance(options, dict)):
            raise HTTPError(400, "'stream_options' needs 'stream': true and must be an object", param="stream_options")
        token_level = getattr(server.backend, "token_level", False)
        if (stream or k is not None) and not token_level:
            raise HTTPError(400, f"the {server.backend.name} backend cannot stream or give log-probs")
        job = _Job([p for p in prompts for _ in range(n)], args, stream, asyncio.get_running_loop())
        if server.worker.stopping:
            raise HTTPError(503, "the server is shutting down", "server_error")
        if not server.worker.submit(job):
            message = f"the server's queue is full ({server.worker.max_queue} requests waiting); retry later"
            raise HTTPError(429, message, "rate_limit_error", code="queue_full")
        if not stream:
            return response_body(chat, server.served_name, await job.result(), n)
        first = await job.next_event()
        if first[0] == "error":  # before any text: a plain error answer, with its status (400 for too long a prompt)
            job.cancelled = True
            raise first[1]
        include_usage = bool((options or {}).get("include_usage"))
        events = stream_events(chat, server.served_name, job, first, n, include_usage)
        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_body(request)
        return await complete(True, body, [chat_messages(body)])

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request)
        return await complete(False, body, completion_prompts(body))

    return app


async def _send_json(send, status: int, payload: dict) -> None:
    data = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


class _Gate:
    """ASGI middleware before every route, unknown paths included: counts the request and draws its fault (in
    order of arrival), logs one line (never the headers), sleeps the fault delay, checks the key, then answers
    the injected 429 / 500, drops the connection, or passes the request on."""

    def __init__(self, app, server: OpenAIServer):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        server, faults = self.server, self.server.faults
        draw = server.count_and_draw()
        status = []

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            if faults.delay_s:
                await asyncio.sleep(faults.delay_s)
            if server.api_key and not self._authorized(scope):
                message = "invalid API key: send 'Authorization: Bearer KEY' with the server's --api_key"
                await _send_json(send_and_note, 401, HTTPError(401, message, code="invalid_api_key").body())
            elif draw < faults.rate_429:
                error = HTTPError(429, "injected rate limit (--fault_rate_429)", "rate_limit_error")
                await _send_json(send_and_note, 429, error.body())
            elif draw < faults.rate_429 + faults.rate_500:
                error = HTTPError(500, "injected server error (--fault_rate_500)", "server_error")
                await _send_json(send_and_note, 500, error.body())
            elif draw < faults.rate_429 + faults.rate_500 + faults.rate_drop:
                # Headers and half a body, then return: uvicorn closes a connection whose answer is unfinished.
                headers = [(b"content-type", b"application/json"), (b"content-length", b"4096")]
                await send_and_note({"type": "http.response.start", "status": 200, "headers": headers})
                await send({"type": "http.response.body", "body": b'{"id": "dropped', "more_body": True})
            else:
                await self.app(scope, receive, send_and_note)
        finally:
            if server.verbose:
                host, port = scope.get("client") or ("-", 0)
                line = f'{host}:{port} - "{scope["method"]} {scope["path"]}" {status[0] if status else "-"}'
                print(line, file=sys.stderr, flush=True)

    def _authorized(self, scope) -> bool:
        headers = dict(scope["headers"])
        given = headers.get(b"authorization", b"")
        expected = b"Bearer " + self.server.api_key.encode()
        return hmac.compare_digest(given, expected)


# ---------------------------------------------------------------------------------------------------
# 6. the server
# ---------------------------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket (connections wait in its backlog until the server runs); OSError if it cannot."""
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT; not one in use
        sock.bind(address)
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


class OpenAIServer:
    """The model worker and uvicorn on one bound socket. ``serve_forever()`` runs until ``shutdown()`` (from
    another thread) or Ctrl-C; ``server_close()`` frees the socket."""

    def __init__(
        self,
        sock: socket.socket,
        backend: Backend,
        served_name: str,
        faults: Faults,
        verbose: bool = False,
        api_key: str = "",
        max_queue: int = 128,
        batch_requests: bool = True,
        shutdown_timeout_s: float = 30.0,
    ):
        import uvicorn

        self.socket = sock
        self.server_address = sock.getsockname()
        self.backend = backend
        self.served_name = served_name
        self.faults = faults
        self.verbose = verbose
        self.api_key = api_key
        self.created = int(time.time())
        self.requests = 0  # every HTTP request received, failed and faulted ones included
        self._rng = random.Random(faults.seed)
        self.worker = ModelWorker(backend, max_queue, batch_requests)
        config = uvicorn.Config(
            _Gate(build_app(self), self),
            log_config=None,  # leave the process's logging alone; _Gate prints the request lines
            log_level="warning" if verbose else "critical",
            access_log=False,
            lifespan="off",
            proxy_headers=False,
            timeout_graceful_shutdown=shutdown_timeout_s,
        )
        self._uvicorn = uvicorn.Server(config)
        self._started = threading.Event()
        self._stopped = threading.Event()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}/v1"

    def count_and_draw(self) -> float:
        self.requests += 1  # on the event loop's thread only
        return self._rng.random()

    def serve_forever(self, poll_interval: float | None = None) -> None:
        """Serve until shut down (``poll_interval`` is accepted for socketserver's signature; unused)."""
        self._started.set()
        self.worker.start()
        try:
            self._uvicorn.run(sockets=[self.socket])
        finally:
            self.worker.stop()  # after uvicorn has finished the requests in flight
            self._stopped.set()

    def shutdown(self) -> None:
        """Stop accepting, finish the requests in flight, stop the worker; returns when serve_forever has."""
        self._uvicorn.should_exit = True
        if self._started.is_set():
            self._stopped.wait()

    def server_close(self) -> None:
        self.worker.stop()
        self.socket.close()


def make_server(
    backend: Backend,
    host: str = "127.0.0.1",
    port: int = 0,
    served_name: str = "local",
    faults: Faults | None = None,
    verbose: bool = False,
    *,
    api_key: str = "",
    max_queue: int = 128,
    batch_requests: bool = True,
    shutdown_timeout_s: float = 30.0,
    sock: socket.socket | None = None,
) -> OpenAIServer:
    """A bound server (not yet serving): run ``serve_forever()`` (e.g. in a thread), then ``shutdown()``
    and ``server_close()``. Port 0 picks a free port; ``server.url`` is the base URL for clients. ``sock``: a
    socket from :func:`bind` to use instead of binding ``host:port``."""
    if not is_loopback(host) and not api_key:
        print(
            f"warning: --host {host} exposes the model to the network without authentication; set --api_key",
            file=sys.stderr,
        )
    sock = sock if sock is not None else bind(host, port)
    return OpenAIServer(
        sock, backend, served_name, faults or Faults(), verbose, api_key, max_queue, batch_requests, shutdown_timeout_s
    )


@cli
def main(argv: list[str] | None = None) -> None:
    (args,) = parse_args((ServeArguments,), argv)
    try:  # before loading the model, so a taken port fails at once
        sock = bind(args.host, args.port)
    except OSError as err:
        reason = err.strerror or str(err)
        raise UsageError(f"cannot listen on {args.host}:{args.port} ({reason}); pick another --port") from None

    from llm.local import LocalBackend

    try:
        backend = LocalBackend(
            args.model, adapter=args.adapter or None, dtype=args.dtype, batch_size=args.batch_size, device=args.device
        )
        served_name = args.served_name or args.model
        faults = Faults(
            rate_429=args.fault_rate_429,
            rate_500=args.fault_rate_500,
            delay_s=args.fault_delay_s,
            seed=args.fault_seed,
            rate_drop=args.fault_rate_drop,
        )
        server = make_server(
            backend,
            args.host,
            args.port,
            served_name,
            faults,
            verbose=args.verbose,
            api_key=args.api_key,
            max_queue=args.max_queue,
            batch_requests=args.batch_requests,
            shutdown_timeout_s=args.shutdown_timeout_s,
            sock=sock,
        )
    except BaseException:
        sock.close()
        raise
    print(f"serving {served_name!r} at {server.url} (OpenAI-compatible; Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
