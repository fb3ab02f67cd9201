"""Where judgements live: append-only JSONL files that training reads as they are.

Files, next to ``--out`` (say ``prefs.jsonl``):

- ``prefs.jsonl``: one preference record per line, in the format ``task: dpo`` and
  ``task: reward`` read (``prompt``, ``chosen``, ``rejected``), plus who judged (``judge``),
  when (``time``, UTC), which model wrote each side (``chosen_model``, ``rejected_model``,
  ``model_a``, ``model_b``; ``human`` for a written answer), the ``verdict`` (``a``, ``b``,
  ``tie``, ``both_bad``), the pair's id (``pair_id``) and the judgement's (``judgement``, with
  ``parts``: how many lines it wrote in all). With ``--mode rate`` it holds ``prompt``,
  ``response``, ``model`` and ``score`` (1-5) instead.
- ``prefs.ties.jsonl``: ties and both-bad verdicts (``response_a``, ``response_b``, ``reason``),
  kept apart so that nothing trains on them by accident.
- ``prefs.candidates.jsonl``: the generated pairs, so a restart shows the same responses (and a
  second judge of a pair sees what the first saw) without generating again.
- ``.prefs.jsonl.lock``: held while a server writes the files, so that two never do.

Each judgement's lines are written with one ``write`` per file, flushed and fsync'd before the
page hears back, so a crash loses at most the judgement being written: on start a torn last line
or a judgement with fewer lines than its ``parts`` is removed (atomically) and reported. Undo
rewrites a file without the judgement's lines into a temporary file and ``os.replace``-s it.

Queues: each judge holds at most one pair (a lease, renewed while their page polls); a pair is
offered to nobody else while it is held, never twice to one judge, and to at most
``per_pair`` judges in all (2 or more measures agreement).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from itertools import combinations
from pathlib import Path
from typing import Any

from tunesmith.errors import DataError, TunesmithError
from tunesmith.feedback.prompts import Prompt

PAIR_VERDICTS = ("a", "b", "tie", "both_bad")
RATE_SCORES = range(1, 6)
HUMAN = "human"  # the model name of a judge's own written answer


class Conflict(TunesmithError):
    """A judgement that cannot be taken as asked (the pair is someone else's, or done)."""


def item_id(mode: str, prompt: Prompt, models: list[str]) -> str:
    """A pair's identity: the same prompt and models (in the order given) give the same id."""
    text = json.dumps([mode, prompt.key, models], ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


@dataclass
class Item:
    """What one person judges: a prompt and two responses (pair mode) or one (rate mode),
    in the order shown, with the model that wrote each (never sent to the page)."""

    id: str
    prompt: Prompt
    responses: list[str]
    models: list[str]

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "conversation": self.prompt.shown(), "responses": self.responses}


@dataclass
class Judgement:
    id: str
    item: str
    judge: str
    verdict: str
    time: str
    models: list[str]
    files: set[Path] = field(default_factory=set)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform can open a folder
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def append_lines(path: Path, rows: list[dict[str, Any]]) -> None:
    """Append JSON lines with one write, then flush and fsync (durable before we answer)."""
    if not rows:
        return
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    with path.open("a", encoding="utf-8") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def rewrite_lines(path: Path, keep: Callable[[dict[str, Any]], bool]) -> None:
    """Rewrite a JSONL file with only the rows ``keep`` accepts, atomically (temp + replace)."""
    rows = [r for r in read_lines(path)[0] if keep(r)]
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def read_lines(path: Path) -> tuple[list[dict[str, Any]], bool]:
    """(rows, whether the file needs repair: a torn last line or no final newline)."""
    if not path.exists():
        return [], False
    text = path.read_text(encoding="utf-8")
    pieces = text.split("\n")
    rows, torn = [], bool(text) and not text.endswith("\n")
    for n, line in enumerate(pieces, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if n == len(pieces):  # the last write was cut short by a crash
                continue
            raise DataError(
                f"{path}:{n}: not valid JSON; fix or remove the line, then start again."
            ) from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{n}: expected a JSON object; fix or remove the line.")
        rows.append(row)
    return rows, torn


class FeedbackStore:
    """Items to judge, the queue of each judge, and the judgement files (thread-safe)."""

    def __init__(
        self,
        out: str | Path,
        mode: str = "pair",
        per_pair: int = 1,
        lease_s: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.out = Path(out)
        if self.out.suffix != ".jsonl":
            raise DataError(f"--out {out}: give a .jsonl file (training reads it as is).")
        if mode not in ("pair", "rate"):
            raise DataError(f"--mode {mode}: use pair or rate.")
        if per_pair < 1:
            raise DataError(f"--judges-per-pair {per_pair}: give 1 or more.")
        if not self.out.parent.is_dir():
            raise DataError(f"--out {out}: the folder {self.out.parent} does not exist.")
        self.side = self.out.with_name(self.out.stem + ".ties.jsonl")
        self.cache = self.out.with_name(self.out.stem + ".candidates.jsonl")
        self.mode, self.per_pair, self.lease_s, self.clock = mode, per_pair, lease_s, clock
        self.notes: list[str] = []
        self._planned: list[str] = []  # the items this session offers (set by ``plan``)
        self.generating = False
        self.error: str | None = None
        self._lock = threading.RLock()
        self._items: dict[str, Item] = {}
        self._order: list[str] = []
        self._skipped: dict[str, dict[str, Any]] = {}
        self._judgements: list[Judgement] = []
        self._leases: dict[str, tuple[str, float]] = {}  # judge -> (item, expiry)
        self._lockfile = self._take_lock()
        self._cached = self._load_cache()
        self._load_judgements()

    # -- files ---------------------------------------------------------------------------------

    def _take_lock(self) -> Any:
        handle = self.out.with_name(f".{self.out.name}.lock").open("w")
        try:
            import fcntl

            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # no advisory locks on this platform: one server per file is on you
            pass
        except OSError:
            handle.close()
            raise DataError(
                f"{self.out} is in use by another tunesmith feedback; stop it or choose another --out."
            ) from None
        return handle

    def close(self) -> None:
        """Release the file lock (the files are always complete on disk)."""
        self._lockfile.close()

    def _load_cache(self) -> dict[str, dict[str, Any]]:
        rows, torn = read_lines(self.cache)
        if torn:
            rewrite_lines(self.cache, lambda r: True)
        return {r["id"]: r for r in rows if isinstance(r.get("id"), str)}

    def _load_judgements(self) -> None:
        lines: dict[str, list[tuple[Path, dict[str, Any]]]] = defaultdict(list)
        repair: set[Path] = set()
        wrong = "score" if self.mode == "pair" else "chosen"
        for path in (self.out, self.side):
            rows, torn = read_lines(path)
            if torn:
                repair.add(path)
                self.notes.append(f"{path}: removed a line torn by a crash while it was written.")
            for row in rows:
                if not isinstance(row.get("judgement"), str):
                    continue  # a line of someone else's: kept, not ours to count
                if path == self.out and wrong in row:
                    other = "rate" if self.mode == "pair" else "pair"
                    raise DataError(
                        f"{path} holds --mode {other} judgements; judge with --mode {other}, or write to another --out."
                    )
                lines[row["judgement"]].append((path, row))
        broken = {j for j, ls in lines.items() if len(ls) != ls[0][1].get("parts")}
        for j in broken:
            repair.update(p for p, _ in lines[j])
            self.notes.append(f"removed judgement {j}: only part of it was written (a crash).")
        for path in repair:
            rewrite_lines(path, lambda r: r.get("judgement") not in broken)
        found = []
        for j, ls in lines.items():
            if j in broken:
                continue
            row = ls[0][1]
            models = (
                [row.get("model_a"), row.get("model_b")]
                if self.mode == "pair"
                else [row.get("model")]
            )
            verdict = str(row.get("verdict") if self.mode == "pair" else row.get("score"))
            found.append(
                Judgement(
                    j,
                    str(row.get("pair_id")),
                    str(row.get("judge")),
                    verdict,
                    str(row.get("time")),
                    [str(m) for m in models],
                    {p for p, _ in ls},
                )
            )
        self._judgements = sorted(found, key=lambda x: x.time)
        self._counts = Counter(j.item for j in self._judgements)  # judgements per item
        self._pairs = Counter((j.item, j.judge) for j in self._judgements)

    # -- filling -------------------------------------------------------------------------------

    def plan(self, items: list[str]) -> None:
        """Announce the items this session will offer (progress counts against them)."""
        with self._lock:
            self._planned = list(items)

    def cached(self, item: str) -> dict[str, Any] | None:
        """The generated candidates of an earlier run for this item id, if any."""
        return self._cached.get(item)

    def wanted(self, item: str) -> bool:
        """Whether the item still needs judgements (else there is no need to generate it)."""
        with self._lock:
            return self._count(item) < self.per_pair

    def add(self, item: Item, remember: bool = True) -> None:
        """Make an item available to judges (and remember its responses for restarts)."""
        with self._lock:
            if item.id in self._items:
                return
            if remember and item.id not in self._cached:
                row = {"id": item.id, "prompt": item.prompt.value, "responses": item.responses,
                       "models": item.models}  # fmt: skip
                append_lines(self.cache, [row])
                self._cached[item.id] = row
            self._items[item.id] = item
            self._order.append(item.id)

    def skip(self, item: str, reason: str, models: list[str], remember: bool = True) -> None:
        """Record that an item cannot be judged (e.g. both responses identical)."""
        with self._lock:
            row = {"id": item, "skipped": reason, "models": models}
            if remember and item not in self._cached:
                append_lines(self.cache, [row])
                self._cached[item] = row
            self._skipped[item] = row

    # -- queues --------------------------------------------------------------------------------

    def _count(self, item: str) -> int:
        return self._counts[item]

    def _judged_by(self, item: str, judge: str) -> bool:
        return self._pairs[item, judge] > 0

    def _holder(self, item: str) -> str | None:
        now = self.clock()
        for judge, (held, expiry) in self._leases.items():
            if held == item and expiry > now:
                return judge
        return None

    def _lease(self, judge: str, item: str) -> Item:
        self._leases[judge] = (item, self.clock() + self.lease_s)
        return self._items[item]

    def next_for(self, judge: str) -> Item | None:
        """The judge's current item (renewing its lease), or the next free one, or None."""
        with self._lock:
            held = self._leases.get(judge)
            if held and self._open_to(held[0], judge, mine=True):
                return self._lease(judge, held[0])
            self._leases.pop(judge, None)
            for item in self._order:
                if self._open_to(item, judge):
                    return self._lease(judge, item)
            return None

    def _open_to(self, item: str, judge: str, mine: bool = False) -> bool:
        """Whether the item may go to this judge: held by nobody else (or by them, ``mine``),
        not judged by them, and short of its judgements."""
        return (
            item in self._items
            and self._holder(item) in ((None, judge) if mine else (None,))
            and self._count(item) < self.per_pair
            and not self._judged_by(item, judge)
        )

    def judge(
        self,
        judge: str,
        item: str,
        verdict: str | int,
        better: str | None = None,
    ) -> Judgement:
        """Write one judgement (durably) and release the judge's lease on the item."""
        with self._lock:
            it = self._items.get(item)
            if it is None:
                raise Conflict("unknown pair; reload the page.")
            holder = self._holder(item)
            if holder not in (None, judge):
                raise Conflict("this pair was given to someone else after a long pause.")
            if self._judged_by(item, judge):
                raise Conflict("you have already judged this pair.")
            if self._count(item) >= self.per_pair:
                raise Conflict("this pair has all the judgements it needs.")
            j = Judgement(uuid.uuid4().hex, item, judge, str(verdict), _now(), list(it.models))
            rows = self._rows(it, j, better)
            for path in (self.out, self.side):
                mine = [r for p, r in rows if p == path]
                append_lines(path, mine)
                if mine:
                    j.files.add(path)
            self._judgements.append(j)
            self._counts[item] += 1
            self._pairs[item, judge] += 1
            if self._leases.get(judge, ("",))[0] == item:
                del self._leases[judge]
            return j

    def _rows(
        self, it: Item, j: Judgement, better: str | None
    ) -> list[tuple[Path, dict[str, Any]]]:
        meta = {"judge": j.judge, "time": j.time, "pair_id": it.id, "judgement": j.id}
        if self.mode == "rate":
            row = {"prompt": it.prompt.value, "response": it.responses[0], "score": int(j.verdict),
                   "model": it.models[0], **meta, "parts": 1}  # fmt: skip
            return [(self.out, row)]
        (a, b), (ma, mb) = it.responses, it.models
        sides = {"verdict": j.verdict, "model_a": ma, "model_b": mb}
        pairs = {"a": [(a, b, ma, mb)], "b": [(b, a, mb, ma)]}.get(j.verdict, [])
        better = (better or "").strip()
        if better:
            # A written answer is preferred to both responses (to the one it repeats, nothing).
            pairs += [(better, r, HUMAN, m) for r, m in ((a, ma), (b, mb)) if r.strip() != better]
        rows: list[tuple[Path, dict[str, Any]]] = [
            (self.out, {"prompt": it.prompt.value, "chosen": c, "rejected": r,
                        "chosen_model": cm, "rejected_model": rm, **sides, **meta})
            for c, r, cm, rm in pairs
        ]  # fmt: skip
        if j.verdict in ("tie", "both_bad"):
            rows.append((self.side, {"prompt": it.prompt.value, "response_a": a, "response_b": b,
                                     "reason": j.verdict, **sides, **meta}))  # fmt: skip
        for _, row in rows:
            row["parts"] = len(rows)
        return rows

    def undo(self, judge: str) -> Judgement | None:
        """Remove the judge's latest judgement from the files; the pair becomes theirs again."""
        with self._lock:
            mine = [j for j in self._judgements if j.judge == judge]
            if not mine:
                return None
            last = mine[-1]
            for path in sorted(last.files):
                rewrite_lines(path, lambda r: r.get("judgement") != last.id)
            self._judgements.remove(last)
            self._counts[last.item] -= 1
            self._pairs[last.item, judge] -= 1
            if last.item in self._items and self._holder(last.item) in (None, judge):
                self._lease(judge, last.item)
            return last

    # -- reports -------------------------------------------------------------------------------

    def progress(self, judge: str | None = None) -> dict[str, Any]:
        """Counts for the page: judged n of N, the judge's own count, generation progress."""
        with self._lock:
            planned = set(self._planned)
            wanted = (len(planned) - len(planned & set(self._skipped))) * self.per_pair
            return {
                "judged": sum(j.item in planned for j in self._judgements),
                "target": wanted,
                "mine": sum(j.judge == judge for j in self._judgements),
                "ready": len(self._items),
                "skipped": len(self._skipped),
                "total": len(planned),
                "generating": self.generating,
                "error": self.error,
                "can_undo": any(j.judge == judge for j in self._judgements),
            }

    def summary(self) -> dict[str, Any]:
        """Counts per judge, agreement on items judged by several people, and per-model results."""
        with self._lock:
            js = list(self._judgements)
            skipped = list(self._skipped.values())
        judges = defaultdict(Counter)
        for j in js:
            judges[j.judge][j.verdict] += 1
        by_item = defaultdict(list)
        for j in js:
            by_item[j.item].append(j)
        comparisons = [(x, y) for group in by_item.values() for x, y in combinations(group, 2)]
        agree = sum(x.verdict == y.verdict for x, y in comparisons)
        out: dict[str, Any] = {
            "mode": self.mode,
            "judgements": len(js),
            "judges": [
                {"judge": name, "judgements": sum(c.values()), "verdicts": dict(sorted(c.items()))}
                for name, c in sorted(judges.items())
            ],
            "agreement": {
                "items": sum(len(g) > 1 for g in by_item.values()),
                "comparisons": len(comparisons),
                "agree": agree,
                "rate": agree / len(comparisons) if comparisons else None,
            },
        }
        if self.mode == "rate":
            scores = defaultdict(list)
            for j in js:
                scores[j.models[0]].append(int(j.verdict))
            out["models"] = [
                {"model": m, "n": len(s), "mean_score": sum(s) / len(s)}
                for m, s in sorted(scores.items())
            ]
            return out
        matches: dict[tuple[str, str], Counter] = defaultdict(Counter)
        for j in js:
            ma, mb = j.models
            if ma == mb:
                continue  # two samples of one model: no contest between models
            key = tuple(sorted((ma, mb)))
            winner = {"a": ma, "b": mb}.get(j.verdict)
            matches[key][winner if winner else j.verdict] += 1
        for s in skipped:
            models = s.get("models") or []
            if len(models) == 2 and models[0] != models[1] and s.get("skipped") == "identical":
                matches[tuple(sorted(models))]["identical"] += 1
        rows = []
        for (m1, m2), c in sorted(matches.items()):
            n = c[m1] + c[m2] + c["tie"] + c["both_bad"]
            half = 0.5 * (c["tie"] + c["both_bad"])
            rows.append({
                "models": [m1, m2], "wins": [c[m1], c[m2]], "ties": c["tie"],
                "both_bad": c["both_bad"], "identical": c["identical"], "judged": n,
                "win_rate": [(c[m1] + half) / n, (c[m2] + half) / n] if n else [None, None],
            })  # fmt: skip
        out["matches"] = rows
        return out
