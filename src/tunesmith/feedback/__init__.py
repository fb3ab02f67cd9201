"""``tunesmith feedback``: people compare (or rate) a model's responses in a local web page, and
every judgement becomes a preference record that ``task: dpo`` and ``task: reward`` train on.

The loop: generate two candidates per prompt (two samples of one model, or one each from two
runs with ``against``) in the background; serve a page that shows the prompt and both responses
side by side; append each verdict to ``out`` at once (see :mod:`tunesmith.feedback.store` for the
files and their guarantees). Pieces: :mod:`.prompts` (what a prompt is, read from any data source
tunesmith reads), :mod:`.candidates` (generation), :mod:`.store` (files, queues, summary),
:mod:`.server` (the web app).
"""

from __future__ import annotations

import contextlib
import secrets
import socket
import sys
from pathlib import Path

from tunesmith.errors import TunesmithError
from tunesmith.feedback.candidates import CandidateWorker, Sampling, load_generator
from tunesmith.feedback.prompts import load_prompts
from tunesmith.feedback.server import create_app
from tunesmith.feedback.store import FeedbackStore

__all__ = ["Sampling", "listen", "serve_feedback"]

LOOPBACK = ("127.0.0.1", "localhost")


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: any free one), or a one-line error."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(64)
    except OSError as e:
        raise TunesmithError(
            f"--host {host} --port {port}: cannot listen there ({e.strerror or e}); "
            "pick another --port (0 takes any free one)."
        ) from None
    return sock


def serve_feedback(
    model: str,
    prompts: str,
    out: str | Path,
    against: str | None = None,
    mode: str = "pair",
    host: str = "127.0.0.1",
    port: int = 8765,
    judges_per_pair: int = 1,
    limit: int | None = None,
    raw: bool = False,
    sampling: Sampling | None = None,
) -> None:
    """Generate candidates, serve the judging page until Ctrl+C, and write judgements to ``out``."""
    import uvicorn

    store = FeedbackStore(out, mode, judges_per_pair)
    try:
        for note in store.notes:
            print(f"note: {note}")
        generators = [load_generator(model)]
        if against is not None:
            generators.append(load_generator(against))
            if generators[0].label == generators[1].label:
                raise TunesmithError(
                    f"--against {against}: the same model as {model}; give another run."
                )
        first = generators[0]
        items = load_prompts(prompts, first.tokenizer, first.template, raw, limit)
        worker = CandidateWorker(store, generators, items, sampling or Sampling())
        token = None if host in LOOPBACK else secrets.token_urlsafe(24)
        app = create_app(store, token, list(LOOPBACK) if token is None else None)
        sock = listen(host, port)
        port = sock.getsockname()[1]
        query = f"?token={token}" if token else ""
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"  # IPv6 in brackets
        print(f"judge at     http://{where}/{query}")
        print(f"summary at   http://{where}/summary{query}")
        if token:
            print(
                "anyone with the address and its token can judge; requests without it get 403"
                + (
                    " (use this machine's address for 0.0.0.0)."
                    if host in ("0.0.0.0", "::")
                    else "."
                )
            )
        print(f"judgements go to {store.out} (ties and both-bad: {store.side}); stop with Ctrl+C.")
        sys.stdout.flush()
        worker.start()
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        with contextlib.suppress(KeyboardInterrupt):  # uvicorn stops on Ctrl+C, then re-raises it
            server.run(sockets=[sock])
        summary = store.summary()
        side = f" (ties and both-bad verdicts in {store.side})" if store.side.exists() else ""
        print(f"stopped; {summary['judgements']} judgements saved in {store.out}{side}.")
    finally:
        store.close()
