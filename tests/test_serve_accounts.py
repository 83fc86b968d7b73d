"""Accounts of the HTTP service: API keys, owners, Host names, quotas; the ledger, forget and chat that remembers.

One real server process (a tiny model whose generator has the next-token memory) serves the keyed tests; the keys are
made in its database before it starts, and by the CLI while it runs.
"""

import hashlib
import io
import json
import random
import sqlite3
import tempfile
import zipfile

import pytest
import torch
from conftest import MEMORY, TEXT_A, TEXT_B, save_tiny_dirs
from safetensors.torch import load as load_safetensors
from typer.testing import CliRunner

from genadapter import GenerativeAdapter
from genadapter.errors import GenAdapterError

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from starlette.testclient import TestClient  # noqa: E402
from test_serve import assert_error, checked_server, create, fetch_state, http, make_key  # noqa: E402

from genadapter.cli import app as cli  # noqa: E402
from genadapter.serve import ServeConfig  # noqa: E402
from genadapter.serve.__main__ import main as serve_main  # noqa: E402
from genadapter.serve.app import create_app  # noqa: E402
from genadapter.serve.auth import allowed_hosts_for  # noqa: E402
from genadapter.serve.store import ANONYMOUS, SCHEMA_VERSION, LedgerItem, SQLiteStore, Usage  # noqa: E402

CONFIG = {
    "half_states": False,  # states compare with local fp32 ones (half: test_half_states_read_back_as_cached)
    "max_context_tokens": 2000,
    "max_prompt_tokens": 400,
    "max_new_tokens": 16,
    "default_new_tokens": 4,
    "batch_wait_ms": 0,
    "max_contexts": 2,  # the default quota: carol's (alice and bob have their own)
}
UNKNOWN = "0" * 32
FACTS = ["My name is Ada.", "I live in Lyon by the river.", "My cat is called Pixel."]
runner = CliRunner()


@pytest.fixture(scope="module")
def module_dirs(tmp_path_factory):
    return save_tiny_dirs(tmp_path_factory.mktemp("tiny-memory"), **MEMORY)


@pytest.fixture(scope="module")
def local(module_dirs) -> GenerativeAdapter:
    base, gen = module_dirs
    return GenerativeAdapter.from_pretrained(base=str(base), generator=gen)


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    return tmp_path_factory.mktemp("accounts") / "contexts.db"


@pytest.fixture(scope="module")
def keys(db, local) -> dict[str, str]:
    """alice and bob with room to spare, carol on the server's defaults, dave with room for about one small context."""
    blob = len(local.absorb(FACTS[0]).to_bytes())
    return {
        "alice": make_key(db, "alice", max_contexts=100),
        "bob": make_key(db, "bob", max_contexts=100),
        "carol": make_key(db, "carol"),
        "dave": make_key(db, "dave", max_bytes=blob + 200),
    }


@pytest.fixture(scope="module")
def server(module_dirs, db, keys):
    with checked_server(db, module_dirs, CONFIG) as process:
        yield process


@pytest.fixture
def alice(server, keys):
    with http(server.url, keys["alice"]) as c:
        yield c


@pytest.fixture
def bob(server, keys):
    with http(server.url, keys["bob"]) as c:
        yield c


def ledger(client, context_id: str) -> list[dict]:
    response = client.get(f"/v1/contexts/{context_id}/ledger")
    assert response.status_code == 200, response.text
    return response.json()["items"]


def forget(client, context_id: str, **body):
    return client.post(f"/v1/contexts/{context_id}/forget", json=body)


def chat(client, model: str, messages: list[dict], max_tokens: int = 4, **options):
    return client.post("/v1/chat/completions", json={"model": model, "messages": messages, "max_tokens": max_tokens,
                                                     **options})  # fmt: skip


def answer(client, model: str, messages: list[dict], max_tokens: int = 4, **options) -> dict:
    response = chat(client, model, messages, max_tokens, **options)
    assert response.status_code == 200, response.text
    return response.json()


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def empty_context(client) -> str:
    """A context of the caller's that holds nothing (exact zeros): created with a text, which is then forgotten."""
    created = create(client, "seed")
    assert forget(client, created["id"], item=created["item"]).json()["num_tokens"] == 0
    return created["id"]


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# ---- keys -------------------------------------------------------------------------------------


def test_every_v1_route_needs_a_valid_key(server, keys):
    with http(server.url, None) as anyone:
        assert anyone.get("/healthz").status_code == 200  # open: liveness probes carry no key
        paths = anyone.get("/openapi.json").json()["paths"]
        routes = [(m.upper(), p.replace("{context_id}", UNKNOWN)) for p, ms in paths.items() for m in ms]
        routes = [r for r in routes if r[1].startswith("/v1/")] + [("GET", "/v1/nothing-here"), ("GET", "/v1")]
        assert len(routes) >= 12
        for header in [None, "Bearer ga-wrong", "Basic abc", "Bearer", keys["alice"]]:
            headers = {"Authorization": header} if header else {}
            for method, path in routes:
                assert_error(anyone.request(method, path, headers=headers), 401)


def test_revoked_key_gets_401_and_its_contexts_stay(server, db):
    made = runner.invoke(cli, ["keys", "create", "--db", str(db), "--name", "eve"])
    assert made.exit_code == 0, made.output
    key = made.stdout.splitlines()[-1]
    with http(server.url, key) as eve:
        context_id = create(eve, TEXT_B)["id"]
        assert runner.invoke(cli, ["keys", "revoke", "--db", str(db), "eve"]).exit_code == 0
        assert_error(eve.get("/v1/contexts"), 401, "revoked")
        assert_error(eve.get(f"/v1/contexts/{context_id}"), 401)
    listing = runner.invoke(cli, ["keys", "list", "--db", str(db)])
    assert listing.exit_code == 0 and key not in listing.output
    header, *rows = listing.stdout.splitlines()
    assert header.split() == ["NAME", "CREATED", "REVOKED", "CONTEXTS", "BYTES", "MAX_CONTEXTS", "MAX_BYTES"]
    eve_row = next(row.split() for row in rows if row.startswith("eve "))
    assert eve_row[2] != "-" and eve_row[3] == "1"  # revoked, and its one context kept
    store = SQLiteStore(db)
    try:
        assert store.get_meta(context_id).owner == "eve"
    finally:
        store.close()


def test_keys_cli_errors(tmp_path):
    db = tmp_path / "keys.db"
    made = runner.invoke(cli, ["keys", "create", "--db", str(db), "--name", "ann"])
    key = made.stdout.splitlines()[-1]
    assert made.exit_code == 0 and made.stdout == key + "\n" and key.startswith("ga-") and len(key) > 40
    failures = [
        (["create", "--db", str(db), "--name", "ann"], "already exists"),
        (["create", "--db", str(db), "--name", ANONYMOUS], "reserved"),
        (["create", "--db", str(db), "--name", "two words"], "bad key name"),
        (["create", "--db", str(tmp_path / "no" / "x.db"), "--name", "x"], "does not exist"),
        (["create", "--db", str(tmp_path), "--name", "x"], "is a directory"),
        (["revoke", "--db", str(db), "nobody"], "no key named 'nobody'"),
        (["list", "--db", str(tmp_path / "missing.db")], "does not exist"),
        (["revoke", "--db", str(tmp_path / "missing.db"), "ann"], "does not exist"),
    ]
    for args, message in failures:
        result = runner.invoke(cli, ["keys", *args])
        assert result.exit_code == 1 and message in result.stderr, (args, result.output)
    assert not (tmp_path / "missing.db").exists()
    assert runner.invoke(cli, ["keys", "revoke", "--db", str(db), "ann"]).exit_code == 0
    assert "already revoked" in runner.invoke(cli, ["keys", "revoke", "--db", str(db), "ann"]).stderr


# ---- owners -----------------------------------------------------------------------------------


def test_another_keys_context_is_answered_like_an_unknown_one(alice, bob):
    mine = create(alice, TEXT_A)
    context_id = mine["id"]
    theirs = create(bob, TEXT_B)["id"]
    requests = [
        ("GET", "", None),
        ("DELETE", "", None),
        ("POST", "/absorb", {"text": "x"}),
        ("POST", "/forget", {"item": mine["item"]}),
        ("POST", "/forget", {"text": TEXT_A}),
        ("GET", "/ledger", None),
        ("GET", "/peft", None),
        ("GET", "/state", None),
    ]
    sends = [lambda i, m=m, p=p, b=b: bob.request(m, f"/v1/contexts/{i}{p}", json=b) for m, p, b in requests]
    sends += [
        lambda i: bob.post("/v1/chat/completions", json={"model": i, "messages": user("hi")}),
        lambda i: bob.post("/v1/generate", json={"items": [{"prompt": "hi", "context_id": i}]}),
    ]
    for send in sends:
        other, unknown = send(context_id), send(UNKNOWN)
        assert_error(other, 404, context_id)
        assert other.json() == json.loads(unknown.text.replace(UNKNOWN, context_id))
    assert context_id not in [c["id"] for c in bob.get("/v1/contexts").json()["contexts"]]
    assert theirs in [c["id"] for c in bob.get("/v1/contexts").json()["contexts"]]
    assert theirs not in [c["id"] for c in alice.get("/v1/contexts").json()["contexts"]]
    assert alice.get(f"/v1/contexts/{context_id}").json() == {k: v for k, v in mine.items() if k != "item"}


def test_host_header_must_be_allowed(server, keys):
    auth = {"Authorization": f"Bearer {keys['alice']}"}
    with http(server.url, None) as c:
        for path in ["/healthz", "/v1/contexts", "/docs"]:
            assert_error(c.get(path, headers={**auth, "Host": "evil.example"}), 400, "evil.example")
        assert_error(c.get("/healthz", headers={"Host": f"evil.example:{server.port}"}), 400)
        for host in ["localhost", f"LOCALHOST:{server.port}", f"127.0.0.1:{server.port}", f"[::1]:{server.port}"]:
            assert c.get("/v1/contexts", headers={**auth, "Host": host}).status_code == 200


def test_allowed_hosts_and_no_auth_depend_on_the_bound_host():
    assert allowed_hosts_for("127.0.0.1") == ("127.0.0.1", "localhost", "::1")
    assert allowed_hosts_for("::1", no_auth=True) == ("::1", "localhost", "127.0.0.1")
    assert allowed_hosts_for("0.0.0.0") == ("*",)  # keys required; they may be created after the start
    assert allowed_hosts_for("10.1.2.3") == ("10.1.2.3",)
    assert allowed_hosts_for("0.0.0.0", allowed_hosts="API.example.com, [fe80::1]") == ("api.example.com", "fe80::1")
    for host, hosts in [("0.0.0.0", None), ("10.1.2.3", None), ("example.com", None), ("127.0.0.1", "*")]:
        with pytest.raises(GenAdapterError):
            allowed_hosts_for(host, no_auth=True, allowed_hosts=hosts)
    with pytest.raises(GenAdapterError, match="names no host"):
        allowed_hosts_for("127.0.0.1", allowed_hosts=" , ")


def test_no_auth_off_loopback_is_refused_before_anything_loads(tmp_path, capsys):
    db = tmp_path / "x.db"
    result = runner.invoke(cli, ["serve", "--no-auth", "--host", "0.0.0.0", "--db", str(db)])
    assert result.exit_code == 1 and "loopback" in result.stderr, result.output
    with pytest.raises(SystemExit) as exit_:
        serve_main(["--no-auth", "--host", "192.168.1.7", "--db", str(db)])
    assert exit_.value.code == 1 and "loopback" in capsys.readouterr().err
    assert not db.exists()


# ---- quotas -----------------------------------------------------------------------------------


def test_quotas_on_contexts_and_bytes(server, keys):
    with http(server.url, keys["carol"]) as carol:  # the server's default: 2 contexts
        first, _ = create(carol, "one")["id"], create(carol, "two")
        assert_error(carol.post("/v1/contexts", json={"text": "three"}), 429, "'carol' has 2 contexts", "at most 2")
        assert carol.delete(f"/v1/contexts/{first}").status_code == 200
        create(carol, "three")
    with http(server.url, keys["dave"]) as dave:  # room for one small context and a little text
        context_id = create(dave, FACTS[0])["id"]
        response = dave.post(f"/v1/contexts/{context_id}/absorb", json={"text": "x" * 400})
        assert_error(response, 429, "this request adds 400", "limit of")  # refused before the model works
        assert_error(dave.post("/v1/contexts", json={"text": "tiny"}), 429, "limit of")  # refused as it is written
        assert len(dave.get("/v1/contexts").json()["contexts"]) == 1 and len(ledger(dave, context_id)) == 1


# ---- ledger and forget ------------------------------------------------------------------------


def test_forget_removes_exactly_one_ledger_item(alice, local):
    a, b = local.absorb(TEXT_A), local.absorb(TEXT_B)
    created = create(alice, TEXT_A)
    context_id = created["id"]
    added = [alice.post(f"/v1/contexts/{context_id}/absorb", json={"text": TEXT_B}).json() for _ in range(2)]
    items = ledger(alice, context_id)
    assert [i["id"] for i in items] == [created["item"], added[0]["item"], added[1]["item"]]
    assert [(i["source"], i["sha256"], i["num_tokens"], i["text"]) for i in items] == [
        ("create", sha(TEXT_A), a.num_tokens, TEXT_A),
        ("absorb", sha(TEXT_B), b.num_tokens, TEXT_B),
        ("absorb", sha(TEXT_B), b.num_tokens, TEXT_B),
    ]
    assert forget(alice, context_id, text=TEXT_B).json()["num_tokens"] == a.num_tokens + b.num_tokens
    assert [i["id"] for i in ledger(alice, context_id)] == [created["item"], added[0]["item"]]  # the newest went
    assert fetch_state(alice, context_id).allclose(a + b, atol=1e-4)
    assert forget(alice, context_id, item=added[0]["item"]).status_code == 200
    assert fetch_state(alice, context_id).allclose(a, atol=1e-4)
    assert forget(alice, context_id, item=created["item"]).json()["num_tokens"] == 0
    assert ledger(alice, context_id) == []
    assert all(torch.count_nonzero(s) == 0 for s in fetch_state(alice, context_id).sums.values())
    answer(alice, context_id, user("Where is the tower?"))


def test_forgetting_what_was_never_absorbed_is_refused_and_changes_nothing(alice):
    before = create(alice, TEXT_B)
    context_id = before["id"]
    for body in [{"text": "zebra"}, {"text": TEXT_B + " "}, {"item": UNKNOWN}, {"item": "not an id"}]:
        assert_error(forget(alice, context_id, **body), 409, "no ledger item")
    for body in [{}, {"item": before["item"], "text": TEXT_B}, {"text": ""}]:
        assert_error(forget(alice, context_id, **body), 400)
    assert alice.get(f"/v1/contexts/{context_id}").json() == {k: v for k, v in before.items() if k != "item"}
    assert ledger(alice, context_id)[0]["id"] == before["item"]
    answer(alice, context_id, user("Who won?"))


def test_random_absorbs_and_forgets_never_leave_an_unusable_state(alice, local):
    rng = random.Random(0)
    texts = [TEXT_B, "Paris is the capital of France.", "zebra " * 6, "A B C", TEXT_A]
    context_id = create(alice, texts[1])["id"]
    for _ in range(16):
        items = ledger(alice, context_id)
        if items and rng.random() < 0.5:
            item = rng.choice(items)
            by = {"item": item["id"]} if rng.random() < 0.5 else {"text": item["text"]}
            response = forget(alice, context_id, **by)
        else:
            response = alice.post(f"/v1/contexts/{context_id}/absorb", json={"text": rng.choice(texts)})
        assert response.status_code == 200, response.text
        items = ledger(alice, context_id)
        assert response.json()["num_tokens"] == sum(i["num_tokens"] for i in items)
        answer(alice, context_id, user("Tell me."), max_tokens=3)  # 200, whatever the state went through
    expected = local.empty_state()
    for item in items:
        expected = expected + local.absorb(item["text"])
    assert fetch_state(alice, context_id).allclose(expected, atol=1e-4)
    for item in items:
        assert forget(alice, context_id, item=item["id"]).status_code == 200
    assert all(torch.count_nonzero(s) == 0 for s in fetch_state(alice, context_id).sums.values())
    answer(alice, context_id, user("Tell me."))


def test_deleting_a_context_deletes_its_ledger(alice, db):
    context_id = create(alice, TEXT_B)["id"]
    alice.post(f"/v1/contexts/{context_id}/absorb", json={"text": TEXT_A})
    assert alice.delete(f"/v1/contexts/{context_id}").status_code == 200
    store = SQLiteStore(db)
    try:
        assert store.ledger(context_id) == [] and store.get_meta(context_id) is None
    finally:
        store.close()


# ---- chat that remembers ----------------------------------------------------------------------


def test_chat_remembers_facts_across_conversations(alice, local):
    context_id = empty_context(alice)
    remembered = []
    for fact in FACTS:  # three conversations, each telling one fact
        reply = answer(alice, context_id, user(fact), genadapter={"remember": True})
        remembered.append(reply["genadapter"]["remembered"])
    items = ledger(alice, context_id)
    assert [(i["id"], i["source"], i["text"]) for i in items] == [
        (r, "remember", f) for r, f in zip(remembered, FACTS, strict=True)
    ]

    states = [local.absorb(fact) for fact in FACTS]
    question = user("What do you know about me?")  # a fourth conversation: no history in the prompt
    reply = answer(alice, context_id, question, max_tokens=8)
    prompt = local.tokenizer.apply_chat_template(question, add_generation_prompt=True, tokenize=False)
    expected = local.generate(prompt, state=states[0] + states[1] + states[2], max_new_tokens=8, chat=False)
    assert reply["choices"][0]["message"]["content"] == expected
    others = [None, states[0], states[0] + states[2]]  # the answer tells these states apart
    assert expected not in local.generate([prompt] * 3, state=others, max_new_tokens=8, chat=False)
    assert reply["genadapter"] is None

    assert forget(alice, context_id, item=remembered[1]).status_code == 200
    assert fetch_state(alice, context_id).allclose(states[0] + states[2], atol=1e-4)
    assert [i["id"] for i in ledger(alice, context_id)] == [remembered[0], remembered[2]]


def test_remember_exchange_and_its_refusals(alice, bob):
    context_id = empty_context(alice)
    messages = [*user("I like tea."), {"role": "assistant", "content": "Noted."}, *user("And you?")]
    reply = answer(alice, context_id, messages, genadapter={"remember": "exchange"})
    said = reply["choices"][0]["message"]["content"]
    (item,) = ledger(alice, context_id)
    assert item["id"] == reply["genadapter"]["remembered"]
    assert item["text"] == "\n".join(p for p in ["I like tea.", "And you?", said] if p.strip())
    assert_error(chat(alice, "base", user("hi"), genadapter={"remember": True}), 400, "remember")
    assert_error(chat(alice, context_id, user("  "), genadapter={"remember": "user"}), 400, "remember")
    assert_error(chat(bob, context_id, user("hi"), genadapter={"remember": True}), 404)
    assert len(ledger(alice, context_id)) == 1


def test_remember_checks_the_quota_before_answering_and_never_loses_an_answer(server, keys, db, local):
    limit = len(local.absorb(FACTS[0]).to_bytes()) + 200  # dave's max_bytes (the keys fixture)
    with http(server.url, keys["dave"]) as dave:
        contexts = dave.get("/v1/contexts").json()["contexts"]
        context_id = contexts[0]["id"] if contexts else create(dave, FACTS[0])["id"]
        items = ledger(dave, context_id)
        store = SQLiteStore(db)
        try:
            room = limit - store.usage("dave").nbytes
        finally:
            store.close()
        over = chat(dave, context_id, user("y" * (room + 1)), genadapter={"remember": True})
        assert_error(over, 429, f"this request adds {room + 1}", "limit of")
        # the user turns fit, so it answers; the answer after them does not, so nothing is remembered
        reply = answer(dave, context_id, user("z" * (room - 1)), genadapter={"remember": "exchange"})
        assert reply["choices"][0]["message"]["content"]
        assert reply["genadapter"]["remembered"] is None and "limit of" in reply["genadapter"]["not_remembered"]
        assert ledger(dave, context_id) == items


# ---- schema 1 ---------------------------------------------------------------------------------

SCHEMA_1 = """CREATE TABLE contexts (id TEXT PRIMARY KEY, version INTEGER NOT NULL, created REAL NOT NULL,
    updated REAL NOT NULL, num_tokens INTEGER NOT NULL, nbytes INTEGER NOT NULL, generator_fingerprint TEXT NOT NULL,
    base_model TEXT NOT NULL, sha256 TEXT NOT NULL, state BLOB NOT NULL)"""


def test_a_schema_1_database_migrates_and_its_contexts_serve_without_keys(tmp_path, local):
    path, old_id = tmp_path / "old.db", "a" * 32
    state = local.absorb(TEXT_B)
    data = state.to_bytes()
    old = sqlite3.connect(path)
    with old:
        old.execute(SCHEMA_1)
        old.execute(
            "INSERT INTO contexts VALUES (?, 3, 1.0, 2.0, ?, ?, ?, ?, ?, ?)",
            (old_id, state.num_tokens, state.nbytes, local.fingerprint, local.base_name, sha(""), data),
        )
    old.execute("PRAGMA user_version=1")
    old.close()

    store = SQLiteStore(path)
    try:
        record = store.get_meta(old_id)
        assert (record.owner, record.version, record.num_tokens) == (ANONYMOUS, 3, state.num_tokens)
        assert store.list(ANONYMOUS) == [record] and store.ledger(old_id) == []
        assert store.usage(ANONYMOUS) == Usage(1, len(data))
        assert store.find_key(store.create_key("later")).name == "later"
        a = local.absorb(TEXT_A)
        item = LedgerItem.new(old_id, "absorb", TEXT_A, a.num_tokens)
        assert store.update(old_id, state + a, 3, add=item).version == 4 and store.ledger(old_id) == [item]
    finally:
        store.close()
    reopened = SQLiteStore(path)  # a second open finds schema 2 and changes nothing
    reopened.close()
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION

    store = SQLiteStore(path)
    app = create_app(local, store, ServeConfig(**CONFIG), no_auth=True)
    try:
        with TestClient(app, base_url="http://127.0.0.1") as anonymous:
            assert [c["id"] for c in anonymous.get("/v1/contexts").json()["contexts"]] == [old_id]
            answer(anonymous, old_id, user("hi"))
            assert_error(forget(anonymous, old_id, text=TEXT_B), 409)  # absorbed before the ledger existed
            assert forget(anonymous, old_id, text=TEXT_A).json()["num_tokens"] == state.num_tokens
    finally:
        store.close()


def test_half_states_read_back_as_cached(tmp_path, local):
    """A half-precision store returns exactly the state the service cached (`as_stored`): answers do not change
    when the cache lets a context go, and a restart changes nothing."""
    state = local.absorb(TEXT_A) + local.absorb(TEXT_B)
    for half in (False, True):
        store = SQLiteStore(tmp_path / f"half-{half}.db", half=half)
        try:
            cached = store.as_stored(state)
            record = store.create("b" * 32, "carol", cached)
            stored = store.get(record.id)
            assert stored.state().allclose(cached, rtol=0, atol=0)
            dtypes = {t.dtype for t in load_safetensors(stored.data).values()}
            assert dtypes == {torch.float16 if half else torch.float32}  # test_core checks half's error bound
        finally:
            store.close()


def test_peft_zip_is_made_without_staging_it_on_disk(tmp_path, local, monkeypatch):
    def no_temporary_directory(*args, **kwargs):
        raise AssertionError("the PEFT zip must not be staged in a temporary directory")

    store = SQLiteStore(tmp_path / "peft.db")
    app = create_app(local, store, ServeConfig(**CONFIG), no_auth=True)
    try:
        with TestClient(app, base_url="http://127.0.0.1") as anonymous:
            context_id = create(anonymous, TEXT_A)["id"]
            monkeypatch.setattr(tempfile, "mkdtemp", no_temporary_directory)
            response = anonymous.get(f"/v1/contexts/{context_id}/peft")
            assert response.status_code == 200, response.text
            names = zipfile.ZipFile(io.BytesIO(response.content)).namelist()
            assert sorted(names) == ["adapter_config.json", "adapter_model.safetensors"]
    finally:
        store.close()
