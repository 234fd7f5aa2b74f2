"""The audit log: one signed, hash-chained JSON record per event of a run.

Record fields: ``seq`` (0, 1, 2, ...), ``ts`` (UTC, ISO 8601), ``run_id``, ``round``, ``event``,
``data``, ``prev`` (SHA-256 of the previous record's line; 64 zeros for the first) and ``sig``
(Ed25519 by the server's audit key over the canonical JSON of the record without ``sig``).
Each line is the record's canonical JSON (sorted keys, no whitespace, UTF-8).

What this proves, given the audit public key obtained out of band: every record was written by
the holder of the audit key, in this order, and nothing was changed, inserted, removed or
reordered since; a log that does not end with ``run_end`` is reported as incomplete. It does not
prove that the server told the truth when it wrote a record, and whoever holds the audit
private key can write a whole new log.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crypto import signing
from crypto.digest import ZERO_DIGEST, canonical_json, sha256_hex
from fedlearn.errors import FedlearnError

EVENTS = (
    "run_start",
    "run_refused",
    "round_start",
    "update_accepted",
    "update_rejected",
    "node_failed",
    "aggregate",
    "round_end",
    "run_end",
    "run_resumed",
    "key_ceremony",
)
FIELDS = frozenset({"seq", "ts", "run_id", "round", "event", "data", "prev", "sig"})


def jsonable(value: Any) -> Any:
    """Plain JSON for audit data: non-finite floats become strings (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "item"):  # numpy scalars
        return jsonable(value.item())
    return value


class AuditError(FedlearnError):
    """An audit log cannot be continued (missing, damaged, another run's)."""


class AuditLog:
    """Appends records to a new log file, flushed to disk before ``append`` returns.

    ``append(..., sync=False)`` defers the flush to the next ``sync()`` (one fsync for the
    replies of a whole round instead of one per reply); callers sync before acting on them.
    """

    def __init__(self, path: Path, key, run_id: str):
        self.path = Path(path)
        self.run_id = run_id
        self._key = key
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        self.seq = 0
        self.head = ZERO_DIGEST  # SHA-256 of the last record written
        self.seconds = 0.0  # time spent signing and writing, for the overhead benchmark

    @classmethod
    def reopen(cls, path: Path, key, run_id: str) -> AuditLog:
        """Continue an existing log (a resumed run): it must verify with ``key`` first, so a
        damaged or foreign log is never extended; the new records chain onto its last one."""
        path = Path(path)
        if not path.is_file():
            raise AuditError(f"{path} not found: a resumed run continues its audit log, and this run has none")
        verdict = verify(path, key.public_key(), allow_incomplete=True)
        if not verdict.ok:
            raise AuditError(
                f"{path} does not verify ({verdict.summary()}); resume refused so nothing is appended to a "
                "damaged log. Keep the log as evidence and start a new run"
            )
        if verdict.run_id != run_id:
            raise AuditError(f"{path} is the log of run {verdict.run_id}, not of run {run_id}")
        log = cls.__new__(cls)
        log.path, log.run_id, log._key = path, run_id, key
        log._fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        log.seq, log.head, log.seconds = verdict.records, verdict.head, 0.0
        return log

    @property
    def key_fingerprint(self) -> str:
        return signing.fingerprint(self._key)

    def append(self, event: str, server_round: int, data: dict[str, Any], *, sync: bool = True) -> dict[str, Any]:
        if event not in EVENTS:
            raise ValueError(f"unknown audit event {event!r}")
        started = time.perf_counter()
        record = {
            "seq": self.seq,
            "ts": dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds"),
            "run_id": self.run_id,
            "round": int(server_round),
            "event": event,
            "data": jsonable(data),
            "prev": self.head,
        }
        record["sig"] = base64.b64encode(signing.sign(self._key, canonical_json(record))).decode()
        line = canonical_json(record)
        os.write(self._fd, line + b"\n")
        self.head = sha256_hex(line)
        self.seq += 1
        self.seconds += time.perf_counter() - started
        if sync:
            self.sync()
        return record

    def sync(self) -> None:
        started = time.perf_counter()
        os.fsync(self._fd)
        self.seconds += time.perf_counter() - started

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


@dataclass
class Verdict:
    ok: bool
    records: int  # records that verified
    reason: str = ""
    seq: int | None = None  # the first bad record
    run_id: str = ""
    head: str = ZERO_DIGEST
    events: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> str:
        if not self.ok:
            return f"FAILED at seq {self.seq}: {self.reason}"
        rounds = {r["round"] for r in self.events if r["event"] == "round_end"}
        return (
            f"OK: {self.records} records of run {self.run_id}, {len(rounds)} rounds, chain and signatures "
            f"verify; head {self.head[:16]}"
        )


def verify(path: Path, public_key, *, allow_incomplete: bool = False, head: str = "") -> Verdict:
    """Check every record of the log at ``path`` against ``public_key``; stop at the first bad one.
    ``head``: the SHA-256 of the last record (or a prefix of it) as published out of band."""
    raw = Path(path).read_bytes()
    lines = raw.split(b"\n")
    torn = lines[-1] != b""  # a complete log ends with a newline
    if not torn:
        lines.pop()
    verdict = Verdict(ok=False, records=0)
    if not lines:
        verdict.seq, verdict.reason = 0, "the log is empty"
        return verdict
    key_fingerprint = signing.fingerprint(public_key)
    expected = 0

    def fail(reason: str, seq: int | None = None) -> Verdict:
        verdict.seq, verdict.reason = (expected if seq is None else seq), reason
        return verdict

    for index, line in enumerate(lines):
        if torn and index == len(lines) - 1:
            return fail("torn line: the last record is incomplete (the writer stopped mid-append); the records before it verify")
        try:
            record = json.loads(line)
            canonical = canonical_json(record)
        except ValueError:
            return fail("unparseable record: the line is not valid JSON")
        if not isinstance(record, dict) or set(record) != FIELDS:
            return fail(f"malformed record: expected fields {', '.join(sorted(FIELDS))}")
        if canonical != line:
            return fail("record is not in canonical form (edited by hand?)")
        seq = record["seq"]
        if seq != expected:
            later = any(_seq_of(other) == expected for other in lines[index + 1 :])
            if later:
                return fail(f"reorder: found seq {seq} where seq {expected} belongs")
            if isinstance(seq, int) and seq > expected:
                return fail(f"gap: seq {expected} is missing (found seq {seq} next)")
            return fail(f"reorder or duplicate: found seq {seq} after seq {expected - 1}")
        if record["prev"] != verdict.head:
            return fail(f"broken chain: prev does not match the SHA-256 of record {expected - 1}")
        body = {k: v for k, v in record.items() if k != "sig"}
        try:
            signature = base64.b64decode(record["sig"], validate=True)
        except (ValueError, TypeError):
            signature = b""
        if not signing.verify(public_key, signature, canonical_json(body)):
            claimed = record["data"].get("audit_key") if expected == 0 and isinstance(record["data"], dict) else None
            if claimed and claimed != key_fingerprint:
                return fail(f"wrong key: the log says it is signed by audit key {claimed[:16]}, --key is {key_fingerprint[:16]}")
            return fail("bad signature: the record was altered, or signed by another key")
        if expected == 0:
            if record["event"] != "run_start" and record["event"] != "run_refused":
                return fail(f"the first record is {record['event']}, not run_start")
            verdict.run_id = record["run_id"]
        elif record["run_id"] != verdict.run_id:
            return fail(f"run_id changes from {verdict.run_id} to {record['run_id']}")
        verdict.head = sha256_hex(line)
        verdict.events.append(record)
        verdict.records += 1
        expected += 1
    if head and not verdict.head.startswith(head.lower()):
        return fail(f"head {verdict.head[:16]} is not the published head {head[:16]}: records were cut off or added "
                    "after it was published")
    why = "" if allow_incomplete else _unfinished(verdict.events[-1], expected - 1)
    if why:
        return fail(why + "; --allow-incomplete accepts a log that does not end the run")
    verdict.ok = True
    return verdict


def _unfinished(last: dict[str, Any], seq: int) -> str:
    """Why a log whose records verify does not end its run ('' if it does). Only a completed
    run_end naming the final model, or a refusal, ends one: a failed run_end stays in the middle
    of a resumed run's chain, so a log cut just after it would otherwise pass as whole."""
    data = last["data"] if isinstance(last.get("data"), dict) else {}
    if last["event"] == "run_refused":
        return ""
    if last["event"] != "run_end":
        return (f"incomplete: the log ends after seq {seq} without run_end (truncated, or the run is still "
                "going or crashed)")
    if data.get("status") != "completed" or not data.get("final_model"):
        return (f"incomplete: the log ends after seq {seq} with a run_end of status {data.get('status')!r} "
                f"({str(data.get('reason', 'no final model'))[:200]}); the run did not finish, or was resumed and "
                "the log is cut here")
    return ""


def _seq_of(line: bytes) -> Any:
    try:
        return json.loads(line).get("seq")
    except (ValueError, AttributeError):
        return None


def read(path: Path) -> list[dict[str, Any]]:
    """Every complete record, unverified (for display); a torn last line is skipped."""
    records = []
    for line in Path(path).read_bytes().split(b"\n"):
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return [r for r in records if isinstance(r, dict)]


@dataclass
class RoundView:
    round: int
    sampled: int = 0
    accepted: list[str] = field(default_factory=list)  # node names
    rejected: list[str] = field(default_factory=list)  # "name: reason"
    failed: int = 0
    examples: int = 0
    aggregate: str = ""
    accuracy: float | None = None
    loss: float | None = None


def rounds(records: list[dict[str, Any]]) -> list[RoundView]:
    """Per-round view of a log's records: who was asked, who was accepted or rejected, results."""
    views: dict[int, RoundView] = {}
    for record in records:
        r, data, event = record.get("round", 0), record.get("data", {}), record.get("event")
        if event not in ("round_start", "update_accepted", "update_rejected", "node_failed", "aggregate", "round_end"):
            continue
        view = views.setdefault(r, RoundView(round=r))
        if event == "round_start":
            sampled = data.get("sampled", [])
            view.sampled = len(sampled) if isinstance(sampled, list) else 0
        elif event == "update_accepted" and data.get("kind") == "train":
            view.accepted.append(str(data.get("node", "?")))
            count = data.get("num_examples", 0)
            view.examples += count if isinstance(count, int) else 0
        elif event == "update_rejected":
            view.rejected.append(f"{data.get('node') or str(data.get('fingerprint', '?'))[:12]}: {data.get('reason', '?')}")
        elif event == "node_failed":
            view.failed += 1
        elif event == "aggregate":
            view.aggregate = str(data.get("digest", ""))
        elif event == "round_end":
            view.accuracy, view.loss = data.get("accuracy"), data.get("loss")
    return [views[r] for r in sorted(views)]
