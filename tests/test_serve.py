"""The local OpenAI-compatible server, driven by the real openai client and OpenAIBackend, with injected faults."""

import contextlib
import json
import threading
import urllib.error
import urllib.request

import openai
import pytest

from evaluation import serve
from evaluation.serve import Faults, main, make_server
from llm.base import BackendError
from llm.local import LocalBackend
from llm.openai_api import OpenAIBackend

KEY = "sk-test-do-not-leak-7c1d9e"
MESSAGES = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Query: my card is lost"}]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def local(tiny_model_dir):
    return LocalBackend("tiny-gpt2", batch_size=4)


@contextlib.contextmanager
def serving(backend, faults=None):
    server = make_server(backend, "127.0.0.1", 0, served_name="tiny", faults=faults)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def post(url: str, data: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


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
    faults = Faults(rate_429=0.25, rate_500=0.25, delay_s=0.005, seed=1)
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
        status, body = post(chat, json.dumps({"model": "tiny", "messages": MESSAGES, "n": 2}).encode())
        assert status == 400 and "n=1" in body["error"]["message"]
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
