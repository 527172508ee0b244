"""`deltatune serve`: a real uvicorn server on loopback, talked to over HTTP with httpx.

Two servers per module, one per base: tiny BERT (classification: two LoRA runs, a full run) and the tiny
chat LLaMA (sft: two LoRA runs, IA3, prompt tuning, a bottleneck adapter). Answers must equal
`api.predict` / `api.generate` for the same run, batched or not; every limit and bad request gets its
status and message, and the server keeps serving afterwards.
"""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from deltatune import api, config
from deltatune.serve import weights
from deltatune.serve.app import Settings
from deltatune.serve.command import build, parse_adapters
from deltatune.serve.errors import ServeError
from tests.conftest import sft_rows, write_jsonl

TOKEN = "s3cret"
PROMPTS = ["classify : the film was superb", "classify : dull and boring", "classify : a warm story with actors"]


def train(out, **kw):
    base = {"data.max_length": 16, "train.max_steps": 8, "train.batch_size": 16, "train.lr": 1e-2,
            "train.precision": "fp32", "train.threads": 2, "eval.every": 100, "output.dir": str(out), **kw}
    api.train(config.load(None, [f"{k}={v}" for k, v in base.items()]))
    return out


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("served")


@pytest.fixture(scope="module")
def bert_runs(root, tiny_bert, toy_data):
    common = {"model.name": tiny_bert, "data.train": toy_data["train"], "data.validation": toy_data["validation"]}
    return {"a": train(root / "a", **common, **{"method.name": "lora", "method.r": 4, "train.seed": 1}),
            "b": train(root / "b", **common, **{"method.name": "lora", "method.r": 8, "train.seed": 2,
                                                "train.lr": 3e-2}),
            "full": train(root / "full", **common, **{"method.name": "full"})}


@pytest.fixture(scope="module")
def llama_runs(root, tiny_chat_llama):
    data = root / "sft-data"
    data.mkdir()
    common = {"model.name": tiny_chat_llama, "task": "sft", "data.max_length": 64, "train.batch_size": 8,
              "data.train": write_jsonl(data / "train.jsonl", sft_rows(64, seed=1, fmt="messages")),
              "data.validation": write_jsonl(data / "val.jsonl", sft_rows(8, seed=2, fmt="messages")),
              "eval.max_new_tokens": 4, "eval.forgetting": "false", "train.lr": 3e-2}
    methods = {"la": {"method.name": "lora", "method.target_modules": "all-linear", "train.seed": 1},
               "lb": {"method.name": "lora", "method.r": 4, "train.seed": 2, "train.lr": 5e-2},
               "ia3": {"method.name": "ia3"},
               "prompt": {"method.name": "prompt_tuning", "method.num_virtual_tokens": 4},
               "bottleneck": {"method.name": "adapter"}}
    return {name: train(root / name, **{**common, **kw}) for name, kw in methods.items()}


class Server:
    """A real uvicorn server on 127.0.0.1 (a port the OS chose), in a background thread."""

    def __init__(self, app):
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=20))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.01)
        self.http = httpx.Client(base_url=self.url, timeout=60)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.http.close()

    def block_model(self) -> threading.Event:
        """Keep the model thread busy until the returned event is set (requests then queue up)."""
        release = threading.Event()
        self.app.state.batcher.executor.submit(release.wait, 30)
        return release


@pytest.fixture(scope="module")
def bert(bert_runs, tiny_bert, root):
    settings = Settings(max_input_tokens=64, max_batch=8, max_queue=16, max_body_bytes=64_000, admin_token=TOKEN,
                        batch_window_ms=20)
    adapters = {n: str(bert_runs[n]) for n in ("a", "b")}
    app = build(str(tiny_bert), adapters, runs=[str(bert_runs["full"])], allowed_root=root, settings=settings)
    server = Server(app)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def llama(llama_runs, tiny_chat_llama, root):
    settings = Settings(max_new_tokens=32, batch_window_ms=20, admin_token=TOKEN)
    adapters = {n: str(r) for n, r in llama_runs.items()}
    server = Server(build(str(tiny_chat_llama), adapters, allowed_root=root, settings=settings))
    yield server
    server.stop()


def error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    return response.json()["error"]["message"]


def same_rows(served: list[dict], own: list[dict]) -> None:
    assert len(served) == len(own)
    for s, o in zip(served, own):
        assert {k: v for k, v in s.items() if k not in ("score", "scores")} == \
               {k: v for k, v in o.items() if k not in ("score", "scores")}
        assert s["score"] == pytest.approx(o["score"], abs=1e-5) if o["score"] is not None else s["score"] is None


TEXTS = ["a good film", "", "the plot was dull and the actors weak", "superb warm story " * 3]


# -- classification ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["a", "b", "full"])
def test_classify_equals_predict(bert, bert_runs, name):
    r = bert.http.post("/v1/classify", json={"adapter": name, "texts": TEXTS})
    assert r.status_code == 200, r.text
    same_rows(r.json()["results"], api.predict(bert_runs[name], TEXTS))


def test_adapters_answer_differently_and_concurrent_requests_batch_without_changing_answers(bert, bert_runs):
    alone = {n: bert.http.post("/v1/classify", json={"adapter": n, "texts": TEXTS}).json()["results"]
             for n in ("a", "b")}
    assert [x["score"] for x in alone["a"] if x["score"]] != pytest.approx(
        [x["score"] for x in alone["b"] if x["score"]], abs=1e-3)
    batches_before = _metric(bert, "deltatune_batch_rows_count", 'kind="classify"')
    names = ["a", "b"] * 6
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda n: bert.http.post("/v1/classify", json={"adapter": n, "texts": TEXTS}), names))
    for n, r in zip(names, answers):
        assert r.status_code == 200, r.text
        same_rows(r.json()["results"], alone[n])
    # 12 requests in fewer batches: some batches mixed rows of both adapters (max_batch 8 rows = 2 requests)
    assert _metric(bert, "deltatune_batch_rows_count", 'kind="classify"') - batches_before < len(names)


def test_mixed_batch_in_one_forward_equals_each_alone(bert):
    engine = bert.app.state.engine
    works = [engine.prepare_classify(engine.get(n), TEXTS, 64) for n in ("a", "b", "a", "full")]
    mixed = engine.classify_many(works)
    for n, rows in zip(("a", "b", "a", "full"), mixed):
        same_rows(rows, engine.classify_many([engine.prepare_classify(engine.get(n), TEXTS, 64)])[0])


def test_models_healthz_and_metrics(bert):
    models = {m["id"]: m for m in bert.http.get("/v1/models").json()["data"]}
    assert {n: (m["method"], m["task"], m["mixed_batches"], m["shared_base"]) for n, m in models.items()} == {
        "a": ("lora", "classification", True, True), "b": ("lora", "classification", True, True),
        "full": ("full", "classification", False, False)}  # full fine-tuning changed every weight
    assert models["a"]["size_bytes"] < models["full"]["size_bytes"]
    assert models["a"]["labels"] == ["negative", "positive"]
    assert bert.http.get("/healthz").json()["status"] == "ok"
    bert.http.post("/v1/classify", json={"adapter": "a", "texts": ["fine"]})
    bert.http.get("/v1/no-such-route-7")
    text = bert.http.get("/metrics").text
    assert "no-such-route-7" not in text and 'endpoint="other",status="404"' in text  # labels stay bounded
    assert 'deltatune_requests_total{adapter="a",endpoint="/v1/classify",status="200"}' in text
    for name in ("deltatune_request_seconds_bucket", "deltatune_batch_rows_bucket", "deltatune_queue_depth",
                 "deltatune_adapters_loaded 3.0"):
        assert name in text


def _metric(server: Server, name: str, labels: str = "") -> float:
    for line in server.http.get("/metrics").text.splitlines():
        if line.startswith(name) and labels in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# -- bad requests and limits ----------------------------------------------------------------------------

BAD = [  # (method, path, body, status, words the message must hold)
    ("post", "/v1/classify", {"adapter": "nope", "texts": ["x"]}, 404, "unknown adapter `nope`; loaded: a, b, full"),
    ("post", "/v1/completions", {"model": "a", "prompt": "hi"}, 400, "classification run"),
    ("post", "/v1/classify", b'{"adapter": "a", "texts": [', 400, "not valid JSON"),
    ("post", "/v1/classify", {"adapter": "a"}, 400, "`texts`: Field required"),
    ("post", "/v1/classify", {"adapter": "a", "texts": ["x"] * 9}, 413, "9 texts in one request, over"),
    ("post", "/v1/classify", {"adapter": "a", "texts": ["ok", "great " * 100]}, 413, "texts[1] has 102 tokens"),
    ("post", "/v1/classify", {"adapter": "a", "texts": ["x" * 70_000]}, 413, "over this server's limit of 64000"),
    ("get", "/v1/nothing", None, 404, "GET /v1/nothing"),
]


@pytest.mark.parametrize("method, path, body, status, words", BAD, ids=[f"{b[3]}-{i}" for i, b in enumerate(BAD)])
def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(bert, method, path, body, status, words):
    kw = {"json": body} if body is not None else {}
    if isinstance(body, bytes):  # as a client sends broken JSON
        kw = {"content": body, "headers": {"content-type": "application/json"}}
    assert words in error(bert.http.request(method.upper(), path, **kw), status)
    assert bert.http.post("/v1/classify", json={"adapter": "a", "texts": ["fine"]}).status_code == 200


def test_full_queue_answers_429_and_slow_requests_504(bert):
    release = bert.block_model()
    try:
        with ThreadPoolExecutor(20) as pool:
            first = pool.submit(bert.http.post, "/v1/classify", json={"adapter": "a", "texts": ["fine"]})
            _wait(lambda: bert.app.state.batcher.queue.qsize() == 0)
            time.sleep(0.1)  # the worker holds the first request, waiting on the blocked model thread
            waiting = [pool.submit(bert.http.post, "/v1/classify", json={"adapter": "b", "texts": ["fine"]})
                       for _ in range(16)]
            _wait(lambda: bert.app.state.batcher.queue.qsize() == 16)
            r = bert.http.post("/v1/classify", json={"adapter": "a", "texts": ["fine"]})
            assert "16 requests are already waiting" in error(r, 429)
            release.set()
            assert first.result().status_code == 200 and all(w.result().status_code == 200 for w in waiting)
        settings = bert.app.state.settings
        release, settings.timeout_s = bert.block_model(), 0.3
        try:
            assert "longer than 0.3 s" in error(bert.http.post("/v1/classify", json={"adapter": "a", "texts": ["x"]}),
                                                504)
        finally:
            settings.timeout_s = 60
            release.set()
    finally:
        release.set()
    assert bert.http.post("/v1/classify", json={"adapter": "a", "texts": ["fine"]}).status_code == 200


def _wait(condition, seconds: float = 10) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, "timed out waiting"
        time.sleep(0.01)


# -- admin: load and unload at runtime; what is refused ----------------------------------------------------

def admin(server: Server, method: str, name: str, run_dir: str | None = None, token: str | None = TOKEN,
          merge: bool = False):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    body = {"json": {"run_dir": run_dir, **({"merge": True} if merge else {})}} if run_dir is not None else {}
    return server.http.request(method, f"/v1/adapters/{name}", headers=headers, **body)


def test_hot_load_and_unload(bert, bert_runs):
    assert "Bearer" in error(admin(bert, "POST", "b2", "b", token=None), 401)
    assert "Bearer" in error(admin(bert, "POST", "b2", "b", token="wrong"), 401)
    r = admin(bert, "POST", "b2", "b")
    assert r.status_code == 201 and r.json()["shared_base"] is True, r.text
    rows = bert.http.post("/v1/classify", json={"adapter": "b2", "texts": TEXTS}).json()["results"]
    same_rows(rows, api.predict(bert_runs["b"], TEXTS))
    assert "already loaded" in error(admin(bert, "POST", "b2", "b"), 409)
    assert admin(bert, "DELETE", "b2").json() == {"id": "b2", "deleted": True}
    assert "unknown adapter `b2`" in error(bert.http.post("/v1/classify", json={"adapter": "b2", "texts": ["x"]}), 404)
    # the adapters that shared the base with it answer as before
    same_rows(bert.http.post("/v1/classify", json={"adapter": "b", "texts": TEXTS}).json()["results"],
              api.predict(bert_runs["b"], TEXTS))
    bert.app.state.settings.admin_token = None
    try:
        assert "--admin-token" in error(admin(bert, "POST", "b3", "b"), 403)
    finally:
        bert.app.state.settings.admin_token = TOKEN


def _copy(run, to):
    shutil.copytree(run, to, symlinks=True)
    return to


def test_refused_adapters(bert, bert_runs, llama_runs, root, tmp_path):
    outside = _copy(bert_runs["a"], tmp_path / "outside")
    (root / "link").symlink_to(outside)
    linked_file = _copy(bert_runs["a"], root / "linked-file")
    (linked_file / "adapter" / "adapter_model.safetensors").unlink()
    weights = "adapter/adapter_model.safetensors"
    (linked_file / weights).symlink_to(outside / weights)
    pickled = _copy(bert_runs["a"], root / "pickled")
    (pickled / "adapter" / "adapter_model.bin").write_bytes(b"\x80\x04")
    no_target = _copy(bert_runs["a"], root / "no-target")
    meta = json.loads((no_target / "adapter" / "adapter_config.json").read_text())
    (no_target / "adapter" / "adapter_config.json").write_text(json.dumps({**meta, "target_modules": ["nothing"]}))
    renamed = _copy(bert_runs["a"], root / "renamed")
    _rename_keys(renamed / "adapter" / "adapter_model.safetensors", "query", "qquery")
    cases = [("../outside", 400, "`..` is not allowed"), (str(outside), 403, "outside the allowed root"),
             ("link", 403, "outside the allowed root"), ("linked-file", 403, "is a link to"),
             ("pickled", 400, "pickle weights are refused"), ("sft-data", 400, "not a finished deltatune run"),
             ("missing", 404, "no such directory"), ("la", 409, "the server's base is"),
             ("no-target", 409, "does not fit the base"), ("renamed", 409, "have no place of that shape")]
    for run_dir, status, words in cases:
        assert words in error(admin(bert, "POST", "x", run_dir), status), run_dir
    assert "use 1-64 letters" in error(admin(bert, "POST", "bad name!", "a"), 400)
    assert "x" not in {m["id"] for m in bert.http.get("/v1/models").json()["data"]}
    same_rows(bert.http.post("/v1/classify", json={"adapter": "a", "texts": TEXTS}).json()["results"],
              api.predict(bert_runs["a"], TEXTS))


def _rename_keys(path, old: str, new: str) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    save_file({k.replace(old, new): v for k, v in tensors.items()}, path, metadata={"format": "pt"})


def test_startup_refuses_what_it_cannot_serve(bert_runs, llama_runs, tiny_bert, root):
    with pytest.raises(ServeError, match="the server's base is"):
        build(str(tiny_bert), {"x": str(llama_runs["la"])}, allowed_root=root)
    with pytest.raises(ServeError, match="start the server with --base"):
        build(None, {"x": str(bert_runs["a"])}, allowed_root=root)
    with pytest.raises(ServeError, match="outside the allowed root"):
        build(str(tiny_bert), {"x": str(bert_runs["a"])}, allowed_root=root / "sft-data")
    with pytest.raises(ServeError, match="given twice"):
        parse_adapters(["a=x", "a=y"])
    settings = Settings()
    with pytest.raises(ServeError, match="--merge nope: no adapter or run of that name"):
        build(str(tiny_bert), {"x": str(bert_runs["a"])}, allowed_root=root, settings=settings, merge=["nope"])
    assert settings.allowed_root == Settings().allowed_root  # the caller's settings are not changed
    assert parse_adapters(["a=runs/x", "b=y"]) == {"a": "runs/x", "b": "y"}


def test_graceful_shutdown_answers_requests_in_flight(bert_runs, root):
    server = Server(build(None, {}, runs=[str(bert_runs["full"])], allowed_root=root))
    release = server.block_model()
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(server.http.post, "/v1/classify", json={"adapter": "full", "texts": ["fine"]})
        _wait(lambda: server.app.state.batcher.queue.qsize() == 0)
        time.sleep(0.1)
        server.server.should_exit = True  # what SIGTERM does
        time.sleep(0.3)
        release.set()
        assert pending.result().status_code == 200
    server.thread.join(30)
    assert not server.thread.is_alive()


# -- generation --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["la", "lb", "ia3", "prompt", "bottleneck"])
def test_completions_equal_generate(llama, llama_runs, name):
    gen = api.load_generator(llama_runs[name])
    for prompt in PROMPTS:
        expected = api.generate(gen, [prompt], max_new_tokens=12)[0]  # one at a time, as the requests come
        body = {"model": name, "prompt": prompt, "max_tokens": 12, "temperature": 0}
        r = llama.http.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["text"] == expected["text"]
        assert choice["finish_reason"] == ("stop" if expected["stopped_at_eos"] else "length")
        assert r.json()["usage"]["completion_tokens"] == expected["new_tokens"]
        chat = llama.http.post("/v1/chat/completions", json={"model": name, "max_tokens": 12, "temperature": 0,
                                                             "messages": [{"role": "user", "content": prompt}]})
        assert chat.json()["choices"][0]["message"]["content"] == expected["text"]


def test_adapters_differ_and_a_mixed_generation_batch_equals_each_alone(llama):
    engine = llama.app.state.engine
    rows = {}
    for name in ("la", "lb", "ia3"):
        served = engine.get(name)
        rows[name] = [engine.row(served, engine.prepare_prompt(served, 64, prompt=p), 10, seed=3) for p in PROMPTS]
    alone = {n: [engine.complete_many([(engine.get(n), r)])[0].new for r in rs] for n, rs in rows.items()}
    assert alone["la"] != alone["lb"] != alone["ia3"]
    mixed = [(engine.get(n), engine.row(engine.get(n), r.ids, 10, seed=3)) for n in ("la", "lb", "ia3", "lb")
             for r in rows[n][:2]]
    answers = engine.complete_many(mixed)
    expected_all = [x for n in ("la", "lb", "ia3", "lb") for x in alone[n][:2]]
    for (served, _), answer, expected in zip(mixed, answers, expected_all):
        assert answer.new == expected, served.name
    # sampled rows: each row's own seeded generator, so batching cannot change them either
    sampled = [(engine.get(n), engine.row(engine.get(n), rows[n][0].ids, 10, 1.0, 0.9, seed=7)) for n in ("la", "lb")]
    together = [r.new for r in engine.complete_many(sampled)]
    each = [engine.complete_many([(s, engine.row(s, r.ids, 10, 1.0, 0.9, seed=7))])[0].new for s, r in sampled]
    assert together == each


def test_streaming_equals_the_whole_answer(llama):
    body = {"model": "ia3", "prompt": PROMPTS[0], "max_tokens": 20, "temperature": 0}  # an answer of many words
    whole = llama.http.post("/v1/completions", json=body).json()["choices"][0]
    with llama.http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
    assert "".join(c["text"] for c in chunks) == whole["text"] and chunks[-1]["finish_reason"] == whole["finish_reason"]
    assert len(chunks) > 3, chunks  # streamed in pieces, not in one
    chat = {"model": "ia3", "max_tokens": 20, "temperature": 0, "stream": True,
            "messages": [{"role": "user", "content": PROMPTS[0]}]}
    with llama.http.stream("POST", "/v1/chat/completions", json=chat) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert events[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == whole["text"]


def test_stop_strings_seed_and_limits(llama):
    body = {"model": "ia3", "prompt": PROMPTS[1], "max_tokens": 20, "temperature": 0}
    text = llama.http.post("/v1/completions", json=body).json()["choices"][0]["text"]
    word = text.split()[1]
    cut = llama.http.post("/v1/completions", json={**body, "stop": ["zzz", word]}).json()["choices"][0]
    assert cut["text"] == text[:text.find(word)] and cut["finish_reason"] == "stop"
    sampled = {**body, "temperature": 1.0, "seed": 5}
    once, again = (llama.http.post("/v1/completions", json=sampled).json()["choices"][0]["text"] for _ in range(2))
    assert once == again
    too_many = llama.http.post("/v1/completions", json={**body, "max_tokens": 33})
    assert "over this server's limit of 32" in error(too_many, 400)
    assert "`n`" in error(llama.http.post("/v1/completions", json={**body, "n": 2}), 400)
    assert "/v1/completions" in error(llama.http.post("/v1/classify", json={"adapter": "la", "texts": ["x"]}), 400)
    assert llama.http.post("/v1/completions", json=body).json()["choices"][0]["text"] == text


def test_every_family_shares_one_copy_of_the_base_weights(llama):
    """IA3, prompt tuning and the bottleneck adapter each have their own model, yet every base weight they hold is
    the pooled LoRA model's tensor: one base in memory. (Fails if loading skips the weight store.)"""
    engine = llama.app.state.engine
    inner = {n: weights.inner_model(engine.get(n).unit.model) for n in ("la", "ia3", "prompt", "bottleneck")}
    assert len({id(m) for m in inner.values()}) == 4  # la's model, and one per other family
    for name in ("ia3", "prompt", "bottleneck"):
        assert inner[name].get_input_embeddings().weight is inner["la"].get_input_embeddings().weight
        layer = inner[name].model.layers[0].mlp.down_proj
        assert getattr(layer, "base_layer", layer).weight is inner["la"].model.layers[0].mlp.down_proj.base_layer.weight
    cards = {m["id"]: m for m in llama.http.get("/v1/models").json()["data"]}
    base_mb = sum(p.numel() * p.element_size() for n, p in inner["ia3"].named_parameters() if "ia3_" not in n) / 2**20
    for name in ("la", "lb", "ia3", "prompt", "bottleneck"):  # each holds the whole base in common with the others
        memory = cards[name]["memory_mb"]
        assert cards[name]["shared_base"] and memory["shared"] >= base_mb - 0.002, (name, memory, base_mb)
    assert cards["ia3"]["memory_mb"]["own"] < 0.05 * base_mb  # its scaling vectors only
    total = llama.http.get("/v1/models").json()["weights_mb"]  # all served weights, each tensor counted once
    assert base_mb <= total < base_mb + sum(c["memory_mb"]["own"] for c in cards.values()) + 0.01


def test_merged_models_and_hot_merged_adapters_are_served(llama, llama_runs, bert, bert_runs, root):
    from deltatune.export.merge import merge

    merge(llama_runs["la"], root / "merged-la")
    r = admin(llama, "POST", "merged", "merged-la")
    assert r.status_code == 201 and r.json()["method"] == "merged", r.text
    own = api.generate(root / "merged-la", PROMPTS[:1], max_new_tokens=12)[0]
    body = {"model": "merged", "prompt": PROMPTS[0], "max_tokens": 12, "temperature": 0}
    assert llama.http.post("/v1/completions", json=body).json()["choices"][0]["text"] == own["text"]
    # The hot-adapter fast path: the same run merged in memory answers as its `deltatune merge` output, and
    # holds only the weights the merge changed (all-linear LoRA: the linear layers; embeddings stay shared).
    r = admin(llama, "POST", "hot", str(llama_runs["la"]), merge=True)
    assert r.status_code == 201 and r.json()["merged"] and not r.json()["mixed_batches"], r.text
    assert 0 < r.json()["memory_mb"]["own"] and r.json()["memory_mb"]["shared"] > 0
    assert llama.http.post("/v1/completions", json={**body, "model": "hot"}).json()["choices"][0]["text"] == own["text"]
    assert "cannot be served merged" in error(admin(llama, "POST", "hot2", str(llama_runs["prompt"]), merge=True), 400)
    assert admin(llama, "DELETE", "hot").status_code == 200 and admin(llama, "DELETE", "merged").status_code == 200
    merge(bert_runs["a"], root / "merged-a")
    assert "a merged classifier" in error(admin(bert, "POST", "merged", "merged-a"), 400)
    r = admin(bert, "POST", "a-hot", str(bert_runs["a"]), merge=True)
    assert r.status_code == 201, r.text
    hot = bert.http.post("/v1/classify", json={"adapter": "a-hot", "texts": TEXTS}).json()["results"]
    same_rows(hot, api.predict(bert_runs["a"], TEXTS))
    assert admin(bert, "DELETE", "a-hot").status_code == 200


def test_serve_command_starts_uvicorn_and_stops_on_sigterm(bert_runs, root):
    """The library call behind `deltatune serve`, in its own process, stopped as a service manager would."""
    import os
    import signal
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = (f"from deltatune.serve.command import serve; serve(None, {{}}, [{str(bert_runs['full'])!r}], "
            f"port={port}, allowed_root={str(root)!r}, log_level='warning')")
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(lambda: proc.poll() is not None or _answers(url + "/healthz"), 120)
        assert proc.poll() is None, proc.stderr.read()
        r = httpx.post(url + "/v1/classify", json={"adapter": "full", "texts": ["a superb film"]})
        assert r.status_code == 200 and r.json()["results"][0]["label"] in ("positive", "negative")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has shut down
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_concurrent_completions_for_mixed_adapters_batch_without_changing_answers(llama):
    bodies = [{"model": n, "prompt": p, "max_tokens": 8, "temperature": 0}
              for n in ("la", "lb", "ia3") for p in PROMPTS]
    alone = [llama.http.post("/v1/completions", json=b).json()["choices"][0]["text"] for b in bodies]
    before = _metric(llama, "deltatune_batch_rows_count", 'kind="complete"')
    with ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(lambda b: llama.http.post("/v1/completions", json=b), bodies))
    assert [r.json()["choices"][0]["text"] for r in together] == alone
    assert _metric(llama, "deltatune_batch_rows_count", 'kind="complete"') - before < len(bodies)  # some batched


def test_the_models_generation_config_applies_as_in_generate(llama, llama_runs, root):
    """A model whose generation_config.json asks for a repetition penalty, an n-gram ban and a minimum length:
    `generate` applies them even when greedy, so the server must too (fails if decode skips the processors)."""
    from deltatune.export.merge import merge

    merge(llama_runs["lb"], root / "penalised")
    config = json.loads((root / "penalised" / "generation_config.json").read_text())
    plain = api.generate(root / "penalised", PROMPTS, max_new_tokens=16)
    config.update(repetition_penalty=5.0, no_repeat_ngram_size=2, min_new_tokens=3)
    (root / "penalised" / "generation_config.json").write_text(json.dumps(config))
    own = api.generate(root / "penalised", PROMPTS, max_new_tokens=16)
    assert [o["text"] for o in own] != [p["text"] for p in plain]  # the settings change the answers
    assert admin(llama, "POST", "penalised", "penalised").status_code == 201
    try:
        for prompt, expected in zip(PROMPTS, own):
            body = {"model": "penalised", "prompt": prompt, "max_tokens": 16, "temperature": 0}
            assert llama.http.post("/v1/completions", json=body).json()["choices"][0]["text"] == expected["text"]
    finally:
        admin(llama, "DELETE", "penalised")


def test_the_openai_client_and_curl_talk_to_it_as_the_readme_shows(llama, llama_runs, bert, bert_runs):
    """README's two examples against a real server: the official `openai` client (chat, completions, streaming)
    and curl; answers equal `deltatune generate` / `deltatune predict` for the same run."""
    import subprocess

    from openai import OpenAI

    client = OpenAI(base_url=f"{llama.url}/v1", api_key="unused", max_retries=0)
    expected = api.generate(api.load_generator(llama_runs["lb"]), PROMPTS[:1], max_new_tokens=12)[0]["text"]
    reply = client.chat.completions.create(model="lb", temperature=0, max_tokens=12,
                                           messages=[{"role": "user", "content": PROMPTS[0]}])
    assert reply.choices[0].message.content == expected and reply.model == "lb"
    assert client.completions.create(model="lb", prompt=PROMPTS[0], temperature=0, max_tokens=12).choices[0].text \
        == expected
    stream = client.chat.completions.create(model="lb", temperature=0, max_tokens=12, stream=True,
                                            messages=[{"role": "user", "content": PROMPTS[0]}])
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected
    assert {m.id for m in client.models.list()} >= {"la", "lb", "ia3", "prompt", "bottleneck"}
    import openai

    with pytest.raises(openai.NotFoundError, match="unknown adapter `nope`"):
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed here; the OpenAI-client half of this test passed")
    out = subprocess.run(["curl", "-s", f"{bert.url}/v1/classify", "-H", "content-type: application/json", "-d",
                          json.dumps({"adapter": "a", "texts": ["a warm, funny film", "a dull mess"]})],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    same_rows(json.loads(out)["results"], api.predict(bert_runs["a"], ["a warm, funny film", "a dull mess"]))


def test_the_base_fingerprint_recorded_at_training_is_what_is_checked(bert, tiny_bert, toy_data, root):
    """summary.json records the base's fingerprint; the server checks that, so a run whose base directory is gone
    from this machine still loads over the same weights, and a run whose recorded base differs is refused."""
    copy = shutil.copytree(tiny_bert, root / "bert-copy")
    run = train(root / "on-copy", **{"model.name": copy, "data.train": toy_data["train"], "method.name": "lora",
                                     "data.validation": toy_data["validation"]})
    assert json.loads((run / "summary.json").read_text())["base"]["fingerprint"] == \
        bert.app.state.engine.base.fingerprint
    shutil.rmtree(copy)
    assert admin(bert, "POST", "on-copy", "on-copy").status_code == 201
    assert admin(bert, "DELETE", "on-copy").status_code == 200
    summary = json.loads((run / "summary.json").read_text())
    summary["base"]["fingerprint"] = "0" * 16
    (run / "summary.json").write_text(json.dumps(summary))
    assert "fingerprint 0000000000000000" in error(admin(bert, "POST", "on-copy", "on-copy"), 409)
