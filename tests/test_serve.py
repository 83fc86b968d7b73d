"""The HTTP service in a real uvicorn process on 127.0.0.1: contexts, batching, OpenAI chat, errors, durability."""

import hashlib
import io
import json
import threading
import zipfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest
import torch
from conftest import TEXT_A, TEXT_B, save_tiny_dirs
from safetensors.torch import load as load_safetensors

from genadapter import ContextState, GenerativeAdapter

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from genadapter.serve.launch import ServerProcess  # noqa: E402
from genadapter.serve.store import SQLiteStore  # noqa: E402

CONFIG = {
    "max_body_bytes": 64 * 1024,
    "max_context_tokens": 4000,
    "max_prompt_tokens": 400,
    "max_new_tokens": 32,
    "default_new_tokens": 6,
    "max_batch": 8,
    "batch_wait_ms": 200,  # long enough that two concurrent requests reliably share a batch
    "half_states": False,  # states stored as made, so that they compare with local ones at fp32 tolerance
}
QUESTION = "Where is the tower?"
KEY_NAME = "tester"  # the key this module's requests carry


def make_key(db, name: str = KEY_NAME, **quotas) -> str:
    """A key of the database `db`, as `genadapter keys create` makes it (the server may run or not)."""
    store = SQLiteStore(db)
    try:
        return store.create_key(name, **quotas)
    finally:
        store.close()


def http(url: str, key: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=url, headers=headers, trust_env=False, timeout=60)


@pytest.fixture(scope="module")
def module_dirs(tmp_path_factory):
    """conftest's tiny_dirs, module-scoped so that one server process serves the whole module."""
    return save_tiny_dirs(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    return tmp_path_factory.mktemp("serve") / "contexts.db"


@pytest.fixture(scope="module")
def api_key(db) -> str:
    return make_key(db)


@contextmanager
def checked_server(db, dirs, config: dict):
    """A server for a test module; once it stops, its log must show that no request ever hit a bug."""
    base, gen = dirs
    with ServerProcess(db, base, gen, config, log_path=db.parent / "server.log") as process:
        yield process
    log = process.log_tail(100_000)
    assert "Traceback" not in log and " 500 " not in log, log


@pytest.fixture(scope="module")
def server(module_dirs, db, api_key):
    with checked_server(db, module_dirs, CONFIG) as process:
        yield process


@pytest.fixture(scope="module")
def local(module_dirs) -> GenerativeAdapter:
    """The same model and generator in the test process, for expected answers."""
    base, gen = module_dirs
    return GenerativeAdapter.from_pretrained(base=str(base), generator=gen)


@pytest.fixture
def client(server, api_key):
    with http(server.url, api_key) as c:
        yield c


def create(client, text: str) -> dict:
    response = client.post("/v1/contexts", json={"text": text})
    assert response.status_code == 200, response.text
    return response.json()


def fetch_state(client, context_id: str) -> ContextState:
    response = client.get(f"/v1/contexts/{context_id}/state")
    assert response.status_code == 200, response.text
    return ContextState.from_bytes(response.content)


@pytest.fixture(scope="module")
def contexts(server, api_key):
    """Two contexts (TEXT_A, TEXT_B) and their stored states."""
    with http(server.url, api_key) as c:
        ids = [create(c, TEXT_A)["id"], create(c, TEXT_B)["id"]]
        return ids, [fetch_state(c, i) for i in ids]


def assert_error(response, status: int, *fragments: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert isinstance(error["code"], str) and error["code"] and error["message"] and error["type"]
    assert "param" in error
    for fragment in fragments:
        assert fragment in error["message"]


def test_create_absorb_forget_get(client, local):
    a, b = local.absorb(TEXT_A), local.absorb(TEXT_B)
    info = create(client, TEXT_A)
    assert (info["num_tokens"], info["nbytes"], info["version"]) == (a.num_tokens, a.nbytes, 1)
    assert info["compatible"] and info["generator_fingerprint"] == local.fingerprint
    assert fetch_state(client, info["id"]).allclose(a)

    absorbed = client.post(f"/v1/contexts/{info['id']}/absorb", json={"text": TEXT_B}).json()
    assert (absorbed["num_tokens"], absorbed["version"]) == (a.num_tokens + b.num_tokens, 2)
    assert fetch_state(client, info["id"]).allclose(a + b)

    forgot = client.post(f"/v1/contexts/{info['id']}/forget", json={"text": TEXT_B}).json()
    assert (forgot["num_tokens"], forgot["version"]) == (a.num_tokens, 3)
    assert fetch_state(client, info["id"]).allclose(a, atol=1e-4)

    assert client.get(f"/v1/contexts/{info['id']}").json() == forgot
    assert info["id"] in [c["id"] for c in client.get("/v1/contexts").json()["contexts"]]

    everything = client.post(f"/v1/contexts/{info['id']}/forget", json={"text": TEXT_A}).json()
    assert everything["num_tokens"] == 0
    assert all(torch.count_nonzero(s) == 0 for s in fetch_state(client, info["id"]).sums.values())


def test_concurrent_absorbs_of_one_context_lose_no_update(server, api_key, client, local):
    a, b = local.absorb(TEXT_A), local.absorb(TEXT_B)
    context_id = create(client, TEXT_A)["id"]

    def absorb(_: int) -> int:
        with http(server.url, api_key) as own:
            return own.post(f"/v1/contexts/{context_id}/absorb", json={"text": TEXT_B}).status_code

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(absorb, range(4))) == [200] * 4
    info = client.get(f"/v1/contexts/{context_id}").json()
    assert (info["num_tokens"], info["version"]) == (a.num_tokens + 4 * b.num_tokens, 5)
    assert fetch_state(client, context_id).allclose(a + b + b + b + b, atol=1e-4)


def test_concurrent_requests_with_different_contexts_share_one_batch(server, api_key, client, local, contexts):
    ids, states = contexts
    before = client.get("/v1/stats").json()["batch_sizes"].get("2", 0)
    barrier = threading.Barrier(2)

    def ask(context_id: str) -> str:
        with http(server.url, api_key) as own:
            barrier.wait(timeout=30)
            body = {"items": [{"prompt": QUESTION, "context_id": context_id}], "max_new_tokens": 6}
            response = own.post("/v1/generate", json=body)
        assert response.status_code == 200, response.text
        return response.json()["answers"][0]["text"]

    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(ask, ids))
    assert answers == [local.generate(QUESTION, state=s, max_new_tokens=6) for s in states]
    assert client.get("/v1/stats").json()["batch_sizes"].get("2", 0) > before

    prompts = [QUESTION, "Who won?", "Hi"]
    body = {
        "items": [{"prompt": p, "context_id": i} for p, i in zip(prompts, [*ids, None], strict=True)],
        "max_new_tokens": 5,
    }
    response = client.post("/v1/generate", json=body).json()
    expected = local.generate(prompts, state=[*states, None], max_new_tokens=5)
    assert [a["text"] for a in response["answers"]] == expected
    assert [a["context_id"] for a in response["answers"]] == [*ids, None]
    assert all(a["finish_reason"] in ("stop", "length") for a in response["answers"])


def test_chat_completions_with_the_openai_client(server, api_key, local, contexts, monkeypatch):
    ids, states = contexts
    chat = openai_client(server, api_key, monkeypatch)
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": QUESTION},
    ]
    prompt = local.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    for model, state in [(ids[0], states[0]), ("base", None)]:
        completion = chat.chat.completions.create(model=model, messages=messages, max_tokens=6)
        assert completion.object == "chat.completion" and completion.model == model
        choice = completion.choices[0]
        assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
        assert choice.message.content == local.generate(prompt, state=state, max_new_tokens=6, chat=False)
        prompt_tokens = len(local.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        assert completion.usage.prompt_tokens == prompt_tokens
        assert completion.usage.total_tokens == prompt_tokens + completion.usage.completion_tokens
    with pytest.raises(openai.NotFoundError):
        chat.chat.completions.create(model="0" * 32, messages=messages)
    with pytest.raises(openai.BadRequestError) as refused:
        chat.chat.completions.create(model="base", messages=messages, max_tokens=CONFIG["max_new_tokens"] + 1)
    assert refused.value.body["param"] == "max_tokens" and refused.value.body["code"] == "invalid_request"


def openai_client(server, api_key, monkeypatch) -> openai.OpenAI:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=api_key, max_retries=0, timeout=60)


def test_streamed_chat_is_the_answer_in_pieces(server, api_key, local, contexts, monkeypatch):
    chat = openai_client(server, api_key, monkeypatch)
    ids, states = contexts
    messages = [{"role": "user", "content": QUESTION}]
    prompt = local.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    chunks = list(
        chat.chat.completions.create(
            model=ids[0], messages=messages, max_tokens=12, stream=True, stream_options={"include_usage": True}
        )
    )
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert chunks[0].choices[0].delta.role == "assistant" and len([p for p in pieces if p]) > 1
    assert "".join(pieces) == local.generate(prompt, state=states[0], max_new_tokens=12, chat=False)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    with pytest.raises(openai.BadRequestError):  # refused before the stream starts: an HTTP error, not a 200
        chat.chat.completions.create(model="base", messages=[{"role": "user", "content": "q" * 500}], stream=True)


def test_sampling_is_reproducible_by_seed_and_stops_at_stop_strings(server, api_key, contexts, monkeypatch):
    chat = openai_client(server, api_key, monkeypatch)
    ids, _ = contexts
    messages = [{"role": "user", "content": QUESTION}]

    def answer(**options) -> tuple[str, str]:
        choice = chat.chat.completions.create(model=ids[0], messages=messages, max_tokens=16, **options).choices[0]
        return choice.message.content, choice.finish_reason

    sampled = {seed: answer(temperature=1.5, seed=seed)[0] for seed in range(4)}
    assert answer(temperature=1.5, seed=2)[0] == sampled[2]
    assert len(set(sampled.values())) > 1  # the tiny random model spreads its probability: seeds differ
    greedy, _ = answer()
    stop = greedy[len(greedy) // 2 : len(greedy) // 2 + 2]
    assert stop.strip(), greedy
    stopped, reason = answer(stop=[stop])
    assert reason == "stop" and stop not in stopped and greedy.startswith(stopped.rstrip())


def test_models_lists_base_and_the_callers_contexts(server, api_key, contexts, db, monkeypatch):
    ids, _ = contexts
    listed = [m.id for m in openai_client(server, api_key, monkeypatch).models.list()]
    assert listed[0] == "base" and set(ids) <= set(listed[1:])
    other = openai_client(server, make_key(db, "models-other"), monkeypatch)
    assert [m.id for m in other.models.list()] == ["base"]


def test_peft_zip_holds_the_exported_adapter(client, local, contexts, tmp_path):
    ids, states = contexts
    response = client.get(f"/v1/contexts/{ids[0]}/peft")
    assert response.status_code == 200 and response.headers["content-type"] == "application/zip"
    archive = zipfile.ZipFile(io.BytesIO(response.content))
    assert sorted(archive.namelist()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads(archive.read("adapter_config.json"))["r"] == local.generator.export_rank()
    local.export_peft(states[0], tmp_path / "expected")
    expected = load_safetensors((tmp_path / "expected" / "adapter_model.safetensors").read_bytes())
    served = load_safetensors(archive.read("adapter_model.safetensors"))
    assert served.keys() == expected.keys()
    assert all(torch.allclose(served[k], expected[k], atol=1e-5) for k in expected)


def test_deleted_context_is_gone(client):
    context_id = create(client, TEXT_B)["id"]
    assert client.delete(f"/v1/contexts/{context_id}").json() == {"id": context_id, "deleted": True}
    for method, path, body in [
        ("GET", "", None),
        ("DELETE", "", None),
        ("POST", "/absorb", {"text": "x"}),
        ("POST", "/forget", {"text": "x"}),
        ("GET", "/peft", None),
        ("GET", "/state", None),
    ]:
        assert_error(client.request(method, f"/v1/contexts/{context_id}{path}", json=body), 404, context_id)
    generate = {"items": [{"prompt": "hi", "context_id": context_id}]}
    assert_error(client.post("/v1/generate", json=generate), 404)
    chat = {"model": context_id, "messages": [{"role": "user", "content": "hi"}]}
    assert_error(client.post("/v1/chat/completions", json=chat), 404)


def _chunks(data: bytes, size: int = 8192):
    for i in range(0, len(data), size):
        yield data[i : i + size]


BIG = json.dumps({"text": "x" * (CONFIG["max_body_bytes"] + 10)}).encode()
USER = [{"role": "user", "content": "hi"}]
JSON = {"content-type": "application/json"}
BAD_REQUESTS = [
    # (method, path, json body or raw bytes, status)
    ("POST", "/v1/contexts", BIG, 413),
    ("POST", "/v1/contexts", lambda: _chunks(BIG), 413),  # streamed, no content-length
    ("POST", "/v1/contexts", {"text": "abc " * 1200}, 400),  # under the byte limit, over the token limit
    ("POST", "/v1/generate", {"items": [{"prompt": "q" * 500}]}, 400),
    ("POST", "/v1/generate", {"items": [{"prompt": "hi"}], "max_new_tokens": 33}, 400),
    ("POST", "/v1/generate", {"items": [{"prompt": "hi"}], "max_new_tokens": 0}, 400),
    ("POST", "/v1/generate", {"items": []}, 400),
    ("POST", "/v1/generate", {"items": [{"prompt": "hi"}] * 65}, 400),
    ("POST", "/v1/generate", {"items": [{"prompt": "hi", "context_id": 5}]}, 400),
    ("POST", "/v1/generate", {"items": [{"prompt": "hi", "context_id": "0" * 32}]}, 404),
    ("POST", "/v1/contexts", b"{not json", 400),
    ("POST", "/v1/contexts", b"\xff\xfe\x00", 400),
    ("POST", "/v1/contexts", b'{"text": "\\ud800"}', 400),
    ("POST", "/v1/contexts", b"[1, 2]", 400),
    ("POST", "/v1/contexts", {}, 400),
    ("POST", "/v1/contexts", {"text": 5}, 400),
    ("POST", "/v1/contexts", {"text": ""}, 400),
    ("POST", "/v1/contexts", {"text": "  \n "}, 400),
    ("POST", "/v1/contexts", {"text": "hi", "extra": 1}, 400),
    ("GET", "/v1/contexts/not-an-id", None, 404),
    ("GET", "/v1/contexts/..%2F..%2Fetc%2Fpasswd", None, 404),
    ("POST", f"/v1/contexts/{'0' * 32}/absorb", {"text": "x"}, 404),
    ("GET", "/v1/contexts?limit=0", None, 400),
    ("GET", "/v1/contexts?offset=100000000000000000000000", None, 400),
    ("POST", "/v1/chat/completions", {"model": "base", "messages": USER, "temperature": -1}, 400),
    ("POST", "/v1/chat/completions", {"model": "base", "messages": USER, "temperature": 2.5}, 400),
    ("POST", "/v1/chat/completions", {"model": "base", "messages": USER, "top_p": 0}, 400),
    ("POST", "/v1/chat/completions", {"model": "base", "messages": USER, "seed": -1}, 400),
    ("POST", "/v1/chat/completions", {"model": "base", "messages": USER, "stop": ["a", "b", "c", "d", "e"]}, 400),
    ("POST", "/v1/chat/completions", {"model": "base", "messages": USER, "logprobs": True}, 400),
    ("POST", "/v1/chat/completions", {"model": "base", "messages": USER, "n": 2}, 400),
    ("POST", "/v1/chat/completions", {"model": "base", "messages": []}, 400),
    ("POST", "/v1/chat/completions", {"model": "base", "messages": [{"role": "system", "content": "x"}]}, 400),
    ("POST", "/v1/chat/completions", {"model": "base", "messages": [{"role": "wizard", "content": "x"}]}, 400),
    ("POST", "/v1/chat/completions", {"model": "base", "messages": USER, "max_completion_tokens": 99}, 400),
    ("POST", "/v1/chat/completions", {"model": "nope", "messages": USER}, 404),
    ("POST", "/v1/chat/completions", {"messages": USER}, 400),
    ("GET", "/v1/nothing-here", None, 404),
    ("PUT", "/v1/generate", None, 405),
]


@pytest.mark.parametrize(
    ("method", "path", "body", "status"), BAD_REQUESTS, ids=[f"{i}-{r[3]}" for i, r in enumerate(BAD_REQUESTS)]
)
def test_bad_requests_get_clear_errors(client, method, path, body, status):
    if callable(body):
        body = body()
    if isinstance(body, dict | list) or body is None:
        response = client.request(method, path, json=body)
    else:  # raw bytes or a stream of them
        response = client.request(method, path, content=body, headers=JSON)
    assert_error(response, status)


def test_forgetting_a_text_never_absorbed_is_a_conflict(client):
    context_id = create(client, TEXT_B)["id"]
    response = client.post(f"/v1/contexts/{context_id}/forget", json={"text": TEXT_A})
    assert_error(response, 409, "no ledger item")


def test_state_of_another_generator_is_a_conflict(server, client, local):
    other = local.absorb(TEXT_A)
    other.generator_fingerprint = "0123456789abcdef"
    store = SQLiteStore(server.db)  # a second writer, in another process, on the live database
    try:
        context_id = "f" * 32
        store.create(context_id, KEY_NAME, other)
    finally:
        store.close()
    assert client.get(f"/v1/contexts/{context_id}").json()["compatible"] is False
    for path, body in [("/absorb", {"text": "x"}), ("/forget", {"text": "x"})]:
        assert_error(client.post(f"/v1/contexts/{context_id}{path}", json=body), 409, "0123456789abcdef")
    assert_error(client.get(f"/v1/contexts/{context_id}/peft"), 409)
    generate = {"items": [{"prompt": "hi", "context_id": context_id}]}
    assert_error(client.post("/v1/generate", json=generate), 409)
    chat = {"model": context_id, "messages": USER}
    assert_error(client.post("/v1/chat/completions", json=chat), 409)


def test_acknowledged_writes_survive_sigkill(tiny_dirs, tmp_path):
    """(Both servers run with --no-auth: keyless requests act as its one anonymous owner.)"""
    base, gen = tiny_dirs
    db = tmp_path / "contexts.db"
    first = ServerProcess(db, base, gen, log_path=tmp_path / "first.log", no_auth=True).start()
    try:
        with http(first.url, None) as c:
            created = create(c, TEXT_A)
            updated = c.post(f"/v1/contexts/{created['id']}/absorb", json={"text": TEXT_B})
            assert updated.status_code == 200
            first.kill()  # right after the acknowledgement: no shutdown, no flush
    finally:
        first.stop()
    with ServerProcess(db, base, gen, log_path=tmp_path / "second.log", no_auth=True) as second:
        with http(second.url, None) as c:
            stored = c.get(f"/v1/contexts/{created['id']}").json()
            assert stored == {k: v for k, v in updated.json().items() if k != "item"}  # item: what the absorb added
            data = c.get(f"/v1/contexts/{created['id']}/state").content
    assert hashlib.sha256(data).hexdigest() == updated.json()["sha256"]


def test_openapi_documents_every_endpoint(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/contexts", "/v1/contexts/{context_id}", "/v1/contexts/{context_id}/absorb",
            "/v1/contexts/{context_id}/forget", "/v1/contexts/{context_id}/peft", "/v1/generate",
            "/v1/chat/completions"} <= set(paths)  # fmt: skip
    assert "409" in paths["/v1/contexts/{context_id}/forget"]["post"]["responses"]


def test_state_cache_is_a_byte_bounded_lru(local):
    from genadapter.serve.cache import StateCache

    state = local.absorb(TEXT_B)
    cache = StateCache(max_bytes=2 * state.nbytes)
    cache.put("a", 1, state)
    cache.put("b", 1, state)
    assert cache.get("a", 1) is state  # "a" is now the most recent
    cache.put("c", 1, state)  # evicts "b"
    assert cache.get("b", 1) is None and cache.get("c", 1) is state
    assert cache.get("a", 2) is None  # an older version is a miss
    cache.put("a", 0, state)  # never replaces a newer version
    assert cache.get("a", 1) is state
