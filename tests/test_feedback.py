"""Human feedback: prompts, generation, the judgement files (resume, undo, crash repair), the
queues of several judges, the web API's guards, and training on the file it writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import write_jsonl
from starlette.testclient import TestClient

import tunesmith
from tunesmith.builtin.tokenizer import build_tokenizer
from tunesmith.cli import main
from tunesmith.data.io import Record
from tunesmith.errors import DataError
from tunesmith.feedback.candidates import CandidateWorker, Sampling, load_generator
from tunesmith.feedback.prompts import Prompt, load_prompts, prompt_of
from tunesmith.feedback.server import MAX_BODY, create_app
from tunesmith.feedback.store import Conflict, FeedbackStore, Item, item_id


def make_items(n: int, models=("m1", "m2"), mode="pair") -> list[Item]:
    items = []
    for i in range(n):
        p = Prompt([{"role": "user", "content": f"What is {i} plus 1?"}])
        responses = [str(i + 1), str(i + 2)][: len(models)]
        items.append(Item(item_id(mode, p, list(models)), p, responses, list(models)))
    return items


def open_store(out: Path, items: list[Item], **kw) -> FeedbackStore:
    store = FeedbackStore(out, **kw)
    store.plan([it.id for it in items])
    for it in items:
        store.add(it)
    return store


def rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def client_for():
    made = []

    def make(store, **kw):
        kw.setdefault("allowed_hosts", None)
        c = TestClient(create_app(store, **kw))
        made.append((c, store))
        return c

    yield make
    for c, store in made:
        c.close()
        store.close()


# -- prompts ------------------------------------------------------------------------------------


def test_prompts_from_every_format():
    tok = build_tokenizer()
    tpl = tok.chat_template

    def of(fields, raw=False):
        return prompt_of(Record(fields, "f:1"), tok, tpl, raw).value

    chat = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "times 3?"},
        {"role": "assistant", "content": "12"},
    ]
    assert of({"messages": chat}) == chat[:3]  # the whole conversation up to the answer
    assert of({"messages": chat[:3]}) == chat[:3]  # ends on the user: all of it
    sharegpt = [
        {"from": {"user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]}
        for m in chat
    ]
    assert of({"conversations": sharegpt}) == chat[:3]  # ShareGPT prompts as the chat it loads as
    assert of({"prompt": "Hi?"}) == [{"role": "user", "content": "Hi?"}]
    assert of({"prompt": "Hi?"}, raw=True) == "Hi?"
    assert of({"prompt": "Q: 1+1=", "completion": " 2"}) == "Q: 1+1="
    assert "### Instruction:\nAdd" in of({"instruction": "Add", "output": "x"})
    assert of({"prompt": "P", "chosen": "a", "rejected": "b"}) == [{"role": "user", "content": "P"}]
    with pytest.raises(DataError, match="f:1: no prompt"):
        of({"text": "just text"})
    rendered = Prompt(chat[:3]).render(tok, tpl)
    assert rendered.endswith("User: times 3?\nAssistant: ")
    ps = load_prompts("builtin:arith:eval", tok, tpl, limit=3)
    assert len(ps) == 3 and ps[0].value[0]["content"].startswith("What is ")


# -- generation ---------------------------------------------------------------------------------


def test_generation_runs_ahead_and_a_restart_reuses_it(tmp_path, llama):
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"What is {i} plus 2?"} for i in range(6)])
    gen = load_generator(str(llama))
    prompts = load_prompts(str(data), gen.tokenizer, gen.template)
    store = FeedbackStore(tmp_path / "prefs.jsonl")
    worker = CandidateWorker(store, [gen], prompts, Sampling(max_new_tokens=8, batch_size=2), False)
    worker.start()
    first = None
    deadline = time.monotonic() + 30
    while first is None and time.monotonic() < deadline:
        first = store.next_for("ana")
        time.sleep(0.02)
    assert first is not None and len(first.responses) == 2
    worker.thread.join(60)
    p = store.progress("ana")
    assert not p["generating"] and p["ready"] + p["skipped"] == p["total"] == 6
    assert first.responses[0].strip() != first.responses[1].strip()
    store.judge("ana", first.id, "b")
    store.close()

    # A restart reads the candidates back (no generation): same responses, judged pair gone.
    again = FeedbackStore(tmp_path / "prefs.jsonl")
    w2 = CandidateWorker(again, [gen], prompts, Sampling(), False)
    w2.run()
    assert not again.generating
    seen = set()
    while (it := again.next_for("ana")) is not None:
        assert it.id != first.id and it.id not in seen
        seen.add(it.id)
        assert (
            it.responses
            == json.loads(next(x for x in again.cache.read_text().splitlines() if it.id in x))[
                "responses"
            ]
        )
        again.judge("ana", it.id, "a")
    assert len(seen) == p["ready"] - 1
    again.close()


def test_against_puts_each_model_on_both_sides(tmp_path, tiny_models):
    a, b = load_generator(str(tiny_models["llama"])), load_generator(str(tiny_models["qwen2"]))
    prompts = [Prompt(f"Q: {i}+1=") for i in range(12)]
    store = FeedbackStore(tmp_path / "prefs.jsonl")
    CandidateWorker(store, [a, b], prompts, Sampling(max_new_tokens=6), False).run()
    items = [store.next_for(f"j{i}") for i in range(12)]
    sides = {tuple(it.models) for it in items if it}
    assert sides == {(a.label, b.label), (b.label, a.label)}  # random left/right order
    with pytest.raises(tunesmith.TunesmithError, match="temperature 0"):
        CandidateWorker(store, [a], prompts, Sampling(temperature=0), False)
    store.close()


# -- files: records, resume, undo, crash repair -----------------------------------------------


def test_records_resume_and_never_ask_a_pair_twice(tmp_path, client_for):
    out = tmp_path / "prefs.jsonl"
    items = make_items(4)
    first = open_store(out, items)
    c = client_for(first)
    r = c.post("/api/next", json={"judge": "ana"}).json()
    assert r["item"]["id"] == items[0].id and r["progress"]["target"] == 4
    assert "models" not in r["item"]  # judging is blind
    r = c.post("/api/judge", json={"judge": "ana", "item": items[0].id, "verdict": "b"}).json()
    assert r["item"]["id"] == items[1].id and r["progress"]["judged"] == 1
    c.post("/api/judge", json={"judge": "ana", "item": items[1].id, "verdict": "tie"})
    (rec,) = rows(out)
    assert (rec["prompt"], rec["chosen"], rec["rejected"]) == (items[0].prompt.value, "2", "1")
    assert (rec["chosen_model"], rec["rejected_model"], rec["judge"]) == ("m2", "m1", "ana")
    assert rec["time"].endswith("+00:00") and rec["pair_id"] == items[0].id
    (tie,) = rows(tmp_path / "prefs.ties.jsonl")
    assert (tie["reason"], tie["response_a"], tie["response_b"]) == ("tie", "2", "3")
    assert "chosen" not in tie  # nothing trains on a tie by accident
    first.close()

    # Restart: the two judged pairs are never offered again, to anyone.
    store = open_store(out, items)
    assert store.progress("ana")["judged"] == 2
    offered = []
    for judge in ("ana", "bob", "ana"):
        it = store.next_for(judge)
        if it:
            offered.append(it.id)
            store.judge(judge, it.id, "a")
    assert offered == [items[2].id, items[3].id] and store.next_for("cy") is None
    store.close()


def test_undo_rewrites_the_files_without_the_judgement(tmp_path, client_for):
    out = tmp_path / "prefs.jsonl"
    out.write_text('{"prompt": "kept", "chosen": "x", "rejected": "y"}\n')  # someone else's line
    items = make_items(3)
    c = client_for(open_store(out, items))
    c.post("/api/next", json={"judge": "ana"})
    c.post("/api/judge", json={"judge": "ana", "item": items[0].id, "verdict": "a"})
    before = out.read_text()
    r = c.post(
        "/api/judge",
        json={"judge": "ana", "item": items[1].id, "verdict": "both_bad", "better": " 3 \n"},
    )
    assert r.status_code == 200
    better = [x for x in rows(out) if x.get("chosen_model") == "human"]
    assert [(x["chosen"], x["rejected"]) for x in better] == [("3", "2")]  # "3" repeats B
    assert rows(tmp_path / "prefs.ties.jsonl")[0]["reason"] == "both_bad"
    r = c.post("/api/undo", json={"judge": "ana"}).json()
    assert r["undone"] and r["item"]["id"] == items[1].id  # the undone pair is shown again
    assert out.read_text() == before and rows(tmp_path / "prefs.ties.jsonl") == []
    r = c.post("/api/undo", json={"judge": "ana"}).json()
    assert r["undone"] and rows(out) == [{"prompt": "kept", "chosen": "x", "rejected": "y"}]
    assert not c.post("/api/undo", json={"judge": "ana"}).json()["undone"]
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_crash_loses_at_most_the_judgement_being_written(tmp_path):
    out = tmp_path / "prefs.jsonl"
    items = make_items(3)
    store = open_store(out, items)
    for judge, it in zip(("ana", "bob"), items):
        store.next_for(judge)
        store.judge(judge, it.id, "a", better="an answer")
    store.close()
    good = out.read_text().splitlines()
    assert len(good) == 6
    # Crash 1: the second judgement wrote 2 of its 3 lines. Crash 2: a torn line.
    out.write_text("\n".join(good[:5]) + "\n" + good[5][:40])
    store = open_store(out, items)
    assert len(store.notes) == 2 and store.progress()["judged"] == 1
    assert out.read_text().splitlines() == good[:3]
    assert store.next_for("bob").id == items[1].id  # bob's lost judgement can be made again
    store.close()
    out.write_text('{"ok": 1}\nnot json\n{"ok": 2}\n')
    with pytest.raises(DataError, match=r"prefs.jsonl:2: not valid JSON"):
        FeedbackStore(out)


def test_one_server_per_file_and_modes_do_not_mix(tmp_path):
    out = tmp_path / "prefs.jsonl"
    store = open_store(out, make_items(1))
    with pytest.raises(DataError, match="in use by another tunesmith feedback"):
        FeedbackStore(out)
    store.next_for("ana")
    store.judge("ana", make_items(1)[0].id, "a")
    store.close()
    with pytest.raises(DataError, match="--mode pair judgements; judge with --mode pair"):
        FeedbackStore(out, mode="rate")
    with pytest.raises(DataError, match="give a .jsonl file"):
        FeedbackStore(tmp_path / "prefs.txt")


# -- several judges -----------------------------------------------------------------------------


def test_two_judges_never_hold_the_same_pair(tmp_path):
    now = [0.0]
    items = make_items(5)
    store = open_store(
        tmp_path / "prefs.jsonl", items, per_pair=2, lease_s=60, clock=lambda: now[0]
    )
    judged: dict[str, list[str]] = {"ana": [], "bob": []}
    for step in range(40):
        held = {j: store.next_for(j) for j in ("ana", "bob")}
        ids = [it.id for it in held.values() if it]
        assert len(ids) == len(set(ids)), "two judges hold the same pair"
        if not ids:
            break
        judge = ("ana", "bob")[step % 2]
        if held[judge]:
            verdict = "a" if held[judge].id != items[4].id or judge == "ana" else "b"
            store.judge(judge, held[judge].id, verdict)
            judged[judge].append(held[judge].id)
    for j in judged.values():
        assert sorted(j) == sorted(it.id for it in items)  # each pair once per judge
    s = store.summary()
    assert [(x["judge"], x["judgements"]) for x in s["judges"]] == [("ana", 5), ("bob", 5)]
    assert s["agreement"] == {"items": 5, "comparisons": 5, "agree": 4, "rate": 0.8}

    # A pair held past its lease goes to someone else; the late verdict is refused.
    more = make_items(7)[5:]
    for it in more:
        store.add(it)
    late = store.next_for("ana")
    now[0] += 61
    taken = store.next_for("bob")
    assert taken.id == late.id
    with pytest.raises(Conflict, match="given to someone else"):
        store.judge("ana", late.id, "a")
    assert store.next_for("ana").id != late.id
    store.close()


def test_win_rate_of_two_models(tmp_path, client_for):
    items = make_items(4, models=("runs/sft", "runs/dpo"))
    store = open_store(tmp_path / "prefs.jsonl", items)
    store.skip("x", "identical", ["runs/dpo", "runs/sft"])
    c = client_for(store)
    for it, verdict in zip(items, ["b", "b", "a", "tie"]):
        c.post("/api/next", json={"judge": "ana"})
        assert (
            c.post(
                "/api/judge", json={"judge": "ana", "item": it.id, "verdict": verdict}
            ).status_code
            == 200
        )
    (m,) = c.get("/api/summary").json()["matches"]
    assert m["models"] == ["runs/dpo", "runs/sft"] and m["wins"] == [2, 1]
    assert (m["ties"], m["identical"], m["judged"]) == (1, 1, 4)
    assert m["win_rate"] == [pytest.approx(2.5 / 4), pytest.approx(1.5 / 4)]


def test_rate_mode_saves_scores(tmp_path, client_for):
    items = make_items(2, models=("m1",), mode="rate")
    c = client_for(open_store(tmp_path / "prefs.jsonl", items, mode="rate"))
    item = c.post("/api/next", json={"judge": "ana"}).json()["item"]
    assert len(item["responses"]) == 1
    assert (
        c.post("/api/judge", json={"judge": "ana", "item": item["id"], "verdict": "a"}).status_code
        == 400
    )
    assert (
        c.post("/api/judge", json={"judge": "ana", "item": item["id"], "score": 6}).status_code
        == 400
    )
    assert (
        c.post("/api/judge", json={"judge": "ana", "item": item["id"], "score": 4}).status_code
        == 200
    )
    (rec,) = rows(tmp_path / "prefs.jsonl")
    assert (rec["response"], rec["score"], rec["model"]) == ("1", 4, "m1")
    assert c.get("/api/summary").json()["models"] == [{"model": "m1", "n": 1, "mean_score": 4.0}]


# -- the web API's guards -----------------------------------------------------------------------


def test_token_is_required_off_loopback(tmp_path, client_for):
    c = client_for(open_store(tmp_path / "prefs.jsonl", make_items(1)), token="s3cret")
    assert c.get("/").status_code == 403
    assert c.get("/static/app.js").status_code == 403
    assert c.post("/api/next", json={"judge": "ana"}).status_code == 403
    assert (
        c.post(
            "/api/next", json={"judge": "ana"}, headers={"X-Tunesmith-Token": "nope"}
        ).status_code
        == 403
    )
    assert (
        c.post(
            "/api/next", json={"judge": "ana"}, headers={"X-Tunesmith-Token": "s3cret"}
        ).status_code
        == 200
    )
    page = c.get("/?token=s3cret")
    assert (
        page.status_code == 200 and "script-src 'self'" in page.headers["content-security-policy"]
    )
    assert c.get("/static/app.js").status_code == 200  # the cookie the page set


def test_loopback_serves_only_loopback_host_names(tmp_path, client_for):
    c = client_for(
        open_store(tmp_path / "prefs.jsonl", make_items(1)),
        allowed_hosts=["127.0.0.1", "localhost"],
    )
    assert c.get("/", headers={"host": "evil.example"}).status_code == 400  # DNS rebinding
    assert c.get("/", headers={"host": "127.0.0.1:8765"}).status_code == 200


def test_bad_bodies_get_4xx(tmp_path, client_for):
    items = make_items(1)
    c = client_for(open_store(tmp_path / "prefs.jsonl", items))
    h = {"content-type": "application/json"}
    big = json.dumps(
        {"judge": "ana", "item": items[0].id, "verdict": "a", "better": "x" * MAX_BODY}
    )
    cases = [
        (c.post("/api/judge", content=big, headers=h), 413),
        (c.post("/api/next", content=b"{not json", headers=h), 400),
        (c.post("/api/next", content=b"[1, 2]", headers=h), 400),
        # valid JSON to the grammar, but past what Python's parser takes (within MAX_BODY)
        (
            c.post(
                "/api/next", content=b'{"judge": ' + b"[" * 30000 + b"]" * 30000 + b"}", headers=h
            ),
            400,
        ),
        (
            c.post("/api/next", content=b'{"judge": "ana", "n": ' + b"9" * 5000 + b"}", headers=h),
            400,
        ),
        (
            c.post(
                "/api/next", content=b'{"judge": "ana"}', headers={"content-type": "text/plain"}
            ),
            415,
        ),
        (c.post("/api/next", json={"judge": "ana", "extra": 1}), 400),
        (c.post("/api/next", json={}), 400),
        (c.post("/api/next", json={"judge": "a\u0000b"}), 400),
        (c.post("/api/next", json={"judge": "x" * 65}), 400),
        (c.post("/api/judge", json={"judge": "ana", "item": items[0].id, "verdict": "c"}), 400),
        (c.post("/api/judge", json={"judge": "ana", "item": 5, "verdict": "a"}), 400),
        (
            c.post(
                "/api/judge",
                json={"judge": "ana", "item": items[0].id, "verdict": "a", "better": 3},
            ),
            400,
        ),
        (c.post("/api/judge", json={"judge": "ana", "item": "nope", "verdict": "a"}), 409),
        (c.get("/api/next"), 405),
    ]
    for response, status in cases:
        assert response.status_code == status, response.text
    assert rows(tmp_path / "prefs.jsonl") == []
    ok = c.post("/api/judge", json={"judge": "ana", "item": items[0].id, "verdict": "a"})
    assert ok.status_code == 200
    again = c.post("/api/judge", json={"judge": "ana", "item": items[0].id, "verdict": "a"})
    assert again.status_code == 409 and len(rows(tmp_path / "prefs.jsonl")) == 1


# -- the file trains ----------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["dpo", "reward"])
def test_the_written_file_trains(tmp_path, llama, client_for, task):
    data = write_jsonl(
        tmp_path / "chat.jsonl",
        [{"messages": [{"role": "user", "content": f"What is {i} plus 3?"}]} for i in range(8)],
    )
    gen = load_generator(str(llama))
    store = FeedbackStore(tmp_path / "prefs.jsonl")
    CandidateWorker(store, [gen], load_prompts(str(data), gen.tokenizer, gen.template),
                    Sampling(max_new_tokens=8), False).run()  # fmt: skip
    c = client_for(store)
    item = c.post("/api/next", json={"judge": "ana"}).json()["item"]
    verdicts = iter(["a", "b", "tie", "a", "both_bad", "b", "a", "b"])
    while item:
        body = {"judge": "ana", "item": item["id"], "verdict": next(verdicts)}
        if item["conversation"][0]["content"].startswith("What is 1 "):
            body["better"] = "4"
        item = c.post("/api/judge", json=body).json()["item"]
    pairs = rows(tmp_path / "prefs.jsonl")
    assert len(pairs) >= 4 and all(isinstance(p["prompt"], list) for p in pairs)
    out = tmp_path / "run"
    result = tunesmith.train(
        {
            "model": str(llama),
            "task": task,
            "method": {"name": "lora", "rank": 4, "alpha": 8},
            "data": {"train": str(tmp_path / "prefs.jsonl"), "eval": None, "max_length": 96},
            "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-3, "progress": False},
            "output_dir": str(out),
        }
    )
    assert result.metrics["train_pairs"] == len(pairs)
    history = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in h for h in history)


# -- the command --------------------------------------------------------------------------------


def test_command_errors_are_one_line(tmp_path, llama, capsys):
    bad = write_jsonl(tmp_path / "t.jsonl", [{"text": "no prompt here"}])
    args = ["feedback", str(llama), "--prompts", str(bad), "--port", "0"]
    assert main([*args, "--out", str(tmp_path / "p.txt")]) == 2
    assert main([*args, "--out", str(tmp_path / "p.jsonl")]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert err[0].startswith("error: --out") and "no prompt in fields" in err[1] and len(err) == 2


def test_command_serves_with_a_token_and_stops_on_ctrl_c(tmp_path, llama):
    """The real command in its own process: prints the address and token, serves the first pair
    within seconds, refuses requests without the token, and stops cleanly on SIGINT."""
    prompts = write_jsonl(
        tmp_path / "p.jsonl", [{"prompt": f"What is {i} plus 1?"} for i in range(3)]
    )
    cmd = [sys.executable, "-m", "tunesmith.cli", "feedback", str(llama), "--prompts", str(prompts),
           "--out", str(tmp_path / "prefs.jsonl"), "--host", "127.0.0.2", "--port", "0",
           "--max-new-tokens", "6"]  # fmt: skip
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = None
        deadline = time.monotonic() + 60
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if line.startswith("judge at"):
                url = line.split()[-1]
            assert line or proc.poll() is None, proc.stderr.read()
        assert url and "?token=" in url
        base, token = url.split("?token=")
        assert httpx.get(base, timeout=5).status_code == 403
        first = None
        while first is None and time.monotonic() < deadline:
            r = httpx.post(
                base + "api/next",
                json={"judge": "ana"},
                headers={"X-Tunesmith-Token": token},
                timeout=5,
            )
            assert r.status_code == 200
            first = r.json()["item"]
            time.sleep(0.05)
        assert first is not None and len(first["responses"]) == 2
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "stopped; 0 judgements" in out
