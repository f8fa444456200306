"""The local OpenAI-compatible server, driven by the real openai client and OpenAIBackend, with injected faults;
streaming, n, log-probs against the model itself, the queue, the key, the port, and a graceful shutdown."""

import contextlib
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest
import torch

from evaluation import serve
from evaluation.serve import Faults, main, make_server
from llm.base import Backend, BackendError
from llm.local import LocalBackend
from llm.openai_api import OpenAIBackend

KEY = "sk-test-do-not-leak-7c1d9e"
MESSAGES = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Query: my card is lost"}]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def local(tiny_model_dir):
    return LocalBackend("tiny-gpt2", batch_size=4)


@pytest.fixture(autouse=True)
def no_thread_left():
    """The model worker is joined when a server stops: a thread left inside torch at exit aborts the process."""
    yield
    assert not [t for t in threading.enumerate() if t.name == "model-worker"]


@contextlib.contextmanager
def serving(backend, faults=None, **kwargs):
    server = make_server(backend, "127.0.0.1", 0, served_name="tiny", faults=faults, **kwargs)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def post(url: str, data: bytes, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


class Gated(Backend):
    """A backend that holds every generate() call until ``release`` is set, to have a request in the model."""

    name = "gated"

    def __init__(self, inner: Backend):
        super().__init__()
        self.inner = inner
        self.batch_size = inner.batch_size  # how many prompts the server may batch into one call
        self.entered = threading.Event()
        self.release = threading.Event()

    def generate(self, prompts, **kwargs):
        self.entered.set()
        assert self.release.wait(timeout=30)
        return self.inner.generate(prompts, **kwargs)


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_openai_client_lists_models_and_completes(local):
    with serving(local) as server:
        client = openai.OpenAI(base_url=server.url, api_key="anything", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny"]
        chat = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, temperature=0)
        (expected,) = local.generate([MESSAGES], max_tokens=8)
        assert chat.choices[0].message.content == expected.text and chat.object == "chat.completion"
        assert chat.usage.completion_tokens == expected.completion_tokens
        assert chat.usage.total_tokens == expected.prompt_tokens + expected.completion_tokens
        prompts = ["The bank said", "My card"]
        text = client.completions.create(model="tiny", prompt=prompts, max_tokens=5, temperature=0, stop=["\n"])
        expected = local.generate(prompts, max_tokens=5, stop=["\n"])
        assert [c.text for c in sorted(text.choices, key=lambda c: c.index)] == [g.text for g in expected]


def test_retries_through_faults_lose_nothing_and_the_cache_serves_reruns(local, tmp_path, monkeypatch):
    monkeypatch.setenv("SERVE_TEST_KEY", KEY)
    prompts = [f"Query {i}: where is my money?\nIntent:" for i in range(10)]
    prompts += [[{"role": "user", "content": f"Query {i}: card declined"}] for i in range(10)]
    sampling = {"max_tokens": 6, "temperature": 0.0, "stop": ["\n"]}

    def client(url, cache_dir, **kwargs):
        return OpenAIBackend(
            "tiny", base_url=url, api_key_env="SERVE_TEST_KEY", cache_dir=cache_dir, backoff_base=0.001, **kwargs
        )

    with serving(local) as server:
        reference = client(server.url, None, concurrency=4).generate(prompts, **sampling)
    faults = Faults(rate_429=0.2, rate_500=0.2, rate_drop=0.1, delay_s=0.005, seed=1)
    with serving(local, faults) as server:
        api = client(server.url, tmp_path / "cache", concurrency=4, max_retries=30, price_per_1k_prompt=1.0)
        gens = api.generate(prompts, **sampling)
        assert [g.text for g in gens] == [g.text for g in reference]
        assert api.usage.retries > 0 and api.usage.failures == 0
        assert api.usage.requests == server.requests == len(prompts) + api.usage.retries
        assert api.usage.cost_usd == pytest.approx(api.usage.prompt_tokens / 1000)
        # a re-run is served from the disk cache: same answers, no HTTP request at all
        seen = server.requests
        rerun = client(server.url, tmp_path / "cache", concurrency=4)
        again = rerun.generate(prompts, **sampling)
        assert [g.text for g in again] == [g.text for g in gens] and all(g.cached for g in again)
        assert rerun.usage.cache_hits == len(prompts) and rerun.usage.requests == 0 and server.requests == seen
    # the key is never written: not in the cache files, the repr or the usage summary
    files = list((tmp_path / "cache").rglob("*.json"))
    assert len(files) == len(prompts)
    assert not any(KEY in f.read_text() for f in files)
    assert KEY not in repr(api) and KEY not in json.dumps(api.usage.to_dict())


def test_choices_are_parsed_from_api_answers(local):
    with serving(local) as server:
        api = OpenAIBackend("tiny", base_url=server.url, max_retries=0)
        # tiny-gpt2 writes noise: whatever it says, choice is an index or None, and None is counted
        gens = api.generate(["Intent:"] * 2, max_tokens=4, choices=["card arrival", "cash"])
        assert all(g.choice in (None, 0, 1) for g in gens)
        assert api.usage.unparsed_choices == sum(g.choice is None for g in gens)


def test_client_errors_fail_fast_and_timeouts_are_retried(local):
    with serving(local) as server:
        wrong_model = OpenAIBackend("gpt-4o", base_url=server.url, max_retries=5, backoff_base=1.0)
        with pytest.raises(BackendError, match="404.*does not exist") as failure:
            wrong_model.generate(["hi"])
        assert failure.value.__context__ is None  # the openai error, whose request carries the key, is dropped
        too_long = OpenAIBackend("tiny", base_url=server.url, max_retries=5, backoff_base=1.0)
        with pytest.raises(BackendError, match="400.*positions"):
            too_long.generate(["hi"], max_tokens=5000)
        assert wrong_model.usage.retries == too_long.usage.retries == 0
        assert wrong_model.usage.failures == too_long.usage.failures == 1
    with serving(local, Faults(delay_s=0.5)) as server:
        slow = OpenAIBackend("tiny", base_url=server.url, timeout=0.1, max_retries=1, backoff_base=0.001)
        with pytest.raises(BackendError, match="2 times.*APITimeoutError"):
            slow.generate(["hi"], max_tokens=2)
        assert slow.usage.retries == 1


def test_bad_requests_get_openai_style_errors(local):
    with serving(local) as server:
        chat = server.url + "/chat/completions"
        status, body = post(chat, b"{not json")
        assert status == 400 and body["error"]["type"] == "invalid_request_error"
        assert set(body["error"]) == {"message", "type", "param", "code"}
        status, body = post(chat, json.dumps({"model": "tiny", "messages": MESSAGES, "n": 0}).encode())
        assert status == 400 and body["error"]["param"] == "n"
        for bad, param in [
            ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
            ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
            ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream: true
            ({"stop": [""]}, "stop"),
        ]:
            status, body = post(chat, json.dumps({"model": "tiny", "messages": MESSAGES, **bad}).encode())
            assert status == 400 and body["error"]["param"] == param, bad
        status, body = post(chat, json.dumps({"model": "gpt-4o", "messages": MESSAGES}).encode())
        assert status == 404 and body["error"]["code"] == "model_not_found"
        status, body = post(chat, json.dumps({"model": "tiny"}).encode())
        assert status == 400 and "messages" in body["error"]["message"]
        status, body = post(chat, json.dumps({"model": "tiny", "messages": MESSAGES, "temperature": 9}).encode())
        assert status == 400 and "temperature" in body["error"]["message"]
        status, body = post(server.url + "/embeddings", b"{}")
        assert status == 404 and "error" in body
        status, body = post(server.url + "/completions", json.dumps({"model": "tiny", "prompt": [1, 2]}).encode())
        assert status == 400 and "prompt" in body["error"]["message"]
        # the server still answers after all that
        status, body = post(chat, json.dumps({"model": "tiny", "messages": MESSAGES, "max_tokens": 2}).encode())
        assert status == 200 and body["choices"][0]["message"]["role"] == "assistant"


def test_cli_flags_are_checked(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--fault_rate_429", "1.5"])
    assert exit_info.value.code == 2 and "--fault_rate_429" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--fault_rate_429", "0.6", "--fault_rate_500", "0.6"])


def test_cli_serves_until_stopped(tiny_model_dir, monkeypatch, capsys):
    # the real entry point, in a thread; the wrapped factory hands the test its server to stop
    servers = []

    def recording_make_server(*args, **kwargs):
        servers.append(make_server(*args, **kwargs))  # the original, imported above
        return servers[-1]

    monkeypatch.setattr(serve, "make_server", recording_make_server)
    argv = ["--model", "tiny-gpt2", "--port", "0", "--verbose", "false", "--fault_rate_500", "0"]
    thread = threading.Thread(target=main, args=(argv,), daemon=True)
    thread.start()
    try:
        for _ in range(600):
            if servers or not thread.is_alive():
                break
            thread.join(timeout=0.1)
        assert servers, "the server did not start"
        with urllib.request.urlopen(servers[0].url + "/models", timeout=30) as response:
            assert json.loads(response.read())["data"][0]["id"] == "tiny-gpt2"
    finally:
        for server in servers:
            server.shutdown()
        thread.join(timeout=10)
    assert not thread.is_alive()
    assert f"serving 'tiny-gpt2' at {servers[0].url}" in capsys.readouterr().out


def test_streaming_reassembles_to_the_greedy_text(local):
    with serving(local) as server:
        client = openai.OpenAI(base_url=server.url, api_key="anything", max_retries=0)
        (expected,) = local.generate([MESSAGES], max_tokens=12)
        chunks = list(
            client.chat.completions.create(
                model="tiny", messages=MESSAGES, max_tokens=12, temperature=0, stream=True,
                stream_options={"include_usage": True},
            )
        )  # fmt: skip
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == expected.finish_reason
        assert chunks[-1].usage.completion_tokens == expected.completion_tokens and not chunks[-1].choices
        # a stop string: text that might begin it is held back, and the answer ends before it
        (full,) = local.generate(["The bank said"], max_tokens=10)
        stop = full.text[4:7]
        pieces = client.completions.create(
            model="tiny", prompt="The bank said", max_tokens=10, temperature=0, stop=[stop], stream=True
        )
        assert "".join(p.choices[0].text for p in pieces) == full.text[: full.text.find(stop)]
        # on the wire: server-sent events, the last one [DONE]
        body = {"model": "tiny", "prompt": "The bank said", "max_tokens": 3, "temperature": 0, "stream": True}
        request = urllib.request.Request(server.url + "/completions", data=json.dumps(body).encode())
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.headers["Content-Type"].startswith("text/event-stream")
            events = response.read().decode().split("\n\n")
        assert events[-2:] == ["data: [DONE]", ""] and all(e.startswith("data: ") for e in events[:-1])


def test_n_choices(local):
    with serving(local) as server:
        client = openai.OpenAI(base_url=server.url, api_key="anything", max_retries=0)
        chat = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6, n=3, seed=0)
        assert sorted(c.index for c in chat.choices) == [0, 1, 2]
        assert len({c.message.content for c in chat.choices}) > 1  # sampled at T=1, one seed, three draws
        again = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6, n=3, seed=0)
        assert [c.message.content for c in again.choices] == [c.message.content for c in chat.choices]
        text = client.completions.create(model="tiny", prompt=["A", "B"], max_tokens=4, n=2, temperature=0)
        assert sorted(c.index for c in text.choices) == [0, 1, 2, 3]
        greedy = [g.text for g in local.generate(["A", "B"], max_tokens=4)]
        assert [c.text for c in sorted(text.choices, key=lambda c: c.index)] == [greedy[0]] * 2 + [greedy[1]] * 2
        stream = client.completions.create(model="tiny", prompt="A", max_tokens=4, n=2, temperature=0, stream=True)
        texts = ["", ""]
        for piece in stream:
            for c in piece.choices:
                texts[c.index] += c.text
        assert texts == [greedy[0]] * 2


def test_logprobs_are_the_models_own(local):
    prompt = "The bank said that my card"
    with serving(local) as server:
        client = openai.OpenAI(base_url=server.url, api_key="anything", max_retries=0)
        chat = client.chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3
        )
        content = chat.choices[0].logprobs.content
        assert "".join(t.token for t in content) == chat.choices[0].message.content
        for t in content:
            tops = [alt.logprob for alt in t.top_logprobs]
            assert t.logprob <= 0 and len(tops) == 3 and tops == sorted(tops, reverse=True)
            assert t.top_logprobs[0].token == t.token and t.top_logprobs[0].logprob == pytest.approx(t.logprob)
        text = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0, logprobs=2)
        logprobs = text.choices[0].logprobs
        streamed = client.completions.create(
            model="tiny", prompt=prompt, max_tokens=8, temperature=0, logprobs=2, stream=True
        )
        streamed_logprobs = [
            lp for piece in streamed if piece.choices[0].logprobs for lp in piece.choices[0].logprobs.token_logprobs
        ]
    # the chosen tokens' log-probs equal a plain forward pass over prompt + answer
    (gen,) = local.generate([prompt], max_tokens=8, top_logprobs=0)
    ids = local.encode(prompt)
    with torch.no_grad():
        logp = torch.log_softmax(local.model(input_ids=torch.tensor([ids + gen.token_ids])).logits[0], dim=-1)
    direct = [logp[len(ids) - 1 + k, token].item() for k, token in enumerate(gen.token_ids)]
    assert len(logprobs.tokens) == len(direct) == 8 and text.choices[0].text == gen.text
    assert logprobs.token_logprobs == pytest.approx(direct, abs=1e-4)
    assert streamed_logprobs == pytest.approx(direct, abs=1e-4)
    assert logprobs.text_offset[0] == 0 and logprobs.text_offset == sorted(logprobs.text_offset)
    assert all(len(top) <= 2 and max(top.values()) >= lp - 1e-6 for top, lp in zip(logprobs.top_logprobs, direct))


def test_a_full_queue_answers_429(local):
    gated = Gated(local)
    with serving(gated, max_queue=1) as server:
        body = json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": 2}).encode()
        answers = []
        first = threading.Thread(target=lambda: answers.append(post(server.url + "/completions", body)))
        first.start()
        assert gated.entered.wait(timeout=10)  # the first request is in the model
        second = threading.Thread(target=lambda: answers.append(post(server.url + "/completions", body)))
        second.start()
        wait_for(lambda: server.worker.queued == 1)  # the second waits
        status, error = post(server.url + "/completions", body)
        assert status == 429 and error["error"]["code"] == "queue_full"
        gated.release.set()
        first.join(timeout=30)
        second.join(timeout=30)
        assert [status for status, _ in answers] == [200, 200]


def test_api_key(local):
    with serving(local, api_key="s3cret") as server:
        for key in ("wrong", None):
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            status, body = post(server.url + "/completions", b"{}", headers)
            assert status == 401 and body["error"]["code"] == "invalid_api_key" and "s3cret" not in json.dumps(body)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.url, api_key="wrong", max_retries=0).models.list()
        client = openai.OpenAI(base_url=server.url, api_key="s3cret", max_retries=0)
        assert client.completions.create(model="tiny", prompt="hi", max_tokens=2).choices[0].finish_reason


def test_a_taken_port_is_one_line_naming_the_flag(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        start = time.monotonic()
        with pytest.raises(SystemExit) as exit_info:
            main(["--port", str(taken.getsockname()[1]), "--model", "no-such-model"])  # fails before loading
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--port" in err and "in use" in err and len(err.strip().splitlines()) == 1
    assert time.monotonic() - start < 5


def test_shutdown_finishes_the_request_in_flight(local):
    gated = Gated(local)
    server = make_server(gated, served_name="tiny")
    serving_thread = threading.Thread(target=server.serve_forever, daemon=True)
    serving_thread.start()
    body = json.dumps({"model": "tiny", "prompt": "The bank said", "max_tokens": 4, "temperature": 0}).encode()
    answers = []
    request = threading.Thread(target=lambda: answers.append(post(server.url + "/completions", body)))
    request.start()
    try:
        assert gated.entered.wait(timeout=10)
        stopping = threading.Thread(target=server.shutdown)
        stopping.start()

        def refused() -> bool:  # shutdown has begun: no new connection is accepted
            try:
                socket.create_connection(server.server_address[:2], timeout=1).close()
                return False
            except OSError:
                return True

        wait_for(refused)
        assert stopping.is_alive()  # still waiting for the request in flight
        gated.release.set()
        request.join(timeout=30)
        stopping.join(timeout=30)
    finally:
        gated.release.set()
        server.shutdown()
        server.server_close()
        serving_thread.join(timeout=10)
    ((status, answer),) = answers
    (expected,) = local.generate(["The bank said"], max_tokens=4)
    assert status == 200 and answer["choices"][0]["text"] == expected.text
    assert not stopping.is_alive() and not serving_thread.is_alive()


def test_the_load_test_matches_every_answer_to_its_request(local):
    from benchmarks.serve_load import distinct, measure, prompts_for, reference_answers

    prompts = prompts_for(10)
    references = reference_answers("tiny-gpt2", prompts, max_tokens=3)
    assert distinct(references) == len(prompts)  # the same text, told apart by its log-probs
    with serving(local) as server:
        level = measure(server.url, "tiny", prompts, references, clients=4, max_tokens=3)
        swapped = measure(server.url, "tiny", prompts, references[1:] + references[:1], clients=4, max_tokens=3)
    assert level["answered"] == 10 and level["lost"] == level["duplicated"] == level["wrong"] == 0
    assert level["requests_per_s"] > 0 and level["p99_latency_s"] >= level["p50_latency_s"] > 0
    assert swapped["wrong"] == 10  # answers matched to the wrong requests are caught


def test_queued_requests_with_the_same_settings_are_decoded_together(local):
    gated = Gated(local)
    prompts = ["The bank said", "My card", "Where is", "Seeded"]
    with serving(gated) as server:
        answers = {}

        def ask(prompt: str, **extra) -> threading.Thread:
            body = {"model": "tiny", "prompt": prompt, "max_tokens": 4, "temperature": 0, **extra}
            thread = threading.Thread(
                target=lambda: answers.__setitem__(
                    prompt, post(server.url + "/completions", json.dumps(body).encode())
                )
            )
            thread.start()
            return thread

        threads = [ask(prompts[0])]
        assert gated.entered.wait(timeout=10)  # the worker holds the first request
        threads += [ask(prompts[1]), ask(prompts[2]), ask(prompts[3], temperature=1.0, seed=7)]
        wait_for(lambda: server.worker.queued == 3)
        gated.release.set()
        for thread in threads:
            thread.join(timeout=30)
        # the first alone, the two greedy ones in one generate() call, the seeded sample alone
        assert (server.worker.batches, server.worker.batched_jobs) == (3, 4)
    greedy = local.generate(prompts[:3], max_tokens=4)
    assert [answers[p][1]["choices"][0]["text"] for p in prompts[:3]] == [g.text for g in greedy]
    (sampled,) = local.generate(prompts[3:], max_tokens=4, temperature=1.0, seed=7)
    assert answers[prompts[3]][1]["choices"][0]["text"] == sampled.text
