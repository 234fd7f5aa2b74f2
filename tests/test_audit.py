"""The audit log: an untouched log verifies; every way of altering it is caught at the right record."""

import base64
import json
import subprocess
import sys

import pytest

from crypto import signing
from crypto.digest import canonical_json, sha256_hex
from fedlearn import audit
from tests.helpers import REPO


@pytest.fixture
def log(tmp_path):
    """A complete 3-round log and its key files."""
    _, public, key = signing.write_keypair(tmp_path, "audit")
    writer = audit.AuditLog(tmp_path / "audit.jsonl", key, "run-1")
    writer.append("run_start", 0, {"audit_key": writer.key_fingerprint, "config": {"privacy": "plain"}})
    for r in (1, 2, 3):
        writer.append("round_start", r, {"sampled": [11, 12], "nonce": f"n{r}"}, sync=False)
        writer.append("update_accepted", r, {"node": "a", "kind": "train", "num_examples": 10, "payload": "p" * 64}, sync=False)
        writer.append("update_rejected", r, {"node": "b", "kind": "train", "reason": "bad signature"})
        writer.append("aggregate", r, {"digest": f"{r}" * 64})
        writer.append("round_end", r, {"accuracy": 0.5 + r / 10, "loss": float("nan")})
    writer.append("run_end", 3, {"status": "completed", "final_model": "cd" * 32})
    writer.close()
    return tmp_path / "audit.jsonl", public, key


def lines(path):
    return path.read_bytes().split(b"\n")[:-1]


def write(path, records_or_lines):
    out = [r if isinstance(r, bytes) else canonical_json(r) for r in records_or_lines]
    path.write_bytes(b"\n".join(out) + b"\n")


def resign(record, key):
    body = {k: v for k, v in record.items() if k != "sig"}
    return {**body, "sig": base64.b64encode(signing.sign(key, canonical_json(body))).decode()}


def rechain(records, key=None):
    """Recompute every prev (and, given a key, every signature) as an attacker would."""
    prev = "0" * 64
    out = []
    for record in records:
        record = {**record, "prev": prev}
        if key is not None:
            record = resign(record, key)
        out.append(record)
        prev = sha256_hex(canonical_json(record))
    return out


def test_untouched_log_verifies(log):
    path, public, _ = log
    verdict = audit.verify(path, signing.load_public(public))
    assert verdict.ok, verdict.reason
    assert verdict.records == 17 and verdict.run_id == "run-1"
    assert verdict.summary().startswith("OK: 17 records of run run-1, 3 rounds")
    assert json.loads(lines(path)[-2])["data"]["loss"] == "nan", "NaN metrics are recorded as text, not dropped"


def records_of(path):
    return [json.loads(line) for line in lines(path)]


ATTACKS = {
    "change a value": lambda rs, k: [*rs[:7], {**rs[7], "data": {**rs[7]["data"], "num_examples": 1000}}, *rs[8:]],
    "delete a record": lambda rs, k: rs[:7] + rs[8:],
    "insert a record": lambda rs, k: [*rs[:7], {**rs[7], "data": {"node": "mallory"}}, *rs[7:]],
    "reorder two records": lambda rs, k: [*rs[:7], rs[8], rs[7], *rs[9:]],
    "edit then recompute the chain without the key": lambda rs, k: rechain(
        [*rs[:7], {**rs[7], "data": {**rs[7]["data"], "num_examples": 1000}}, *rs[8:]]
    ),
    "delete then renumber and rechain without the key": lambda rs, k: rechain(
        [{**r, "seq": i} for i, r in enumerate(rs[:7] + rs[8:])]
    ),
}


@pytest.mark.parametrize("attack, reason", [
    ("change a value", "bad signature"),
    ("delete a record", "gap: seq 7 is missing"),
    ("insert a record", "bad signature"),
    ("reorder two records", "reorder: found seq 8 where seq 7 belongs"),
    ("edit then recompute the chain without the key", "bad signature"),
    ("delete then renumber and rechain without the key", "bad signature"),
])
def test_every_alteration_is_caught_at_the_altered_record(log, attack, reason):
    path, public, key = log
    write(path, ATTACKS[attack](records_of(path), key))
    verdict = audit.verify(path, signing.load_public(public))
    assert not verdict.ok
    assert verdict.seq == 7, verdict.summary()
    assert reason in verdict.reason


def test_resigning_with_another_key_is_caught_at_the_first_record(log, tmp_path):
    path, public, _ = log
    forger = signing.generate()
    write(path, rechain(records_of(path), forger))
    verdict = audit.verify(path, signing.load_public(public))
    assert (verdict.ok, verdict.seq) == (False, 0)
    assert verdict.reason.startswith("bad signature")
    # ...also when the forger names their own key in run_start.
    forged = records_of(path)
    forged[0]["data"]["audit_key"] = signing.fingerprint(forger)
    write(path, rechain(forged, forger))
    verdict = audit.verify(path, signing.load_public(public))
    assert (verdict.seq, verdict.reason[:9]) == (0, "wrong key")
    assert audit.verify(path, forger.public_key()).ok, "it is a valid log of the forger's key"


def test_verifying_with_the_wrong_key_says_so(log):
    path, _, _ = log
    verdict = audit.verify(path, signing.generate().public_key())
    assert (verdict.ok, verdict.seq) == (False, 0)
    assert verdict.reason.startswith("wrong key: the log says it is signed by audit key")


def test_truncation_at_a_record_boundary_is_reported_as_incomplete(log):
    path, public, _ = log
    write(path, lines(path)[:10])
    verdict = audit.verify(path, signing.load_public(public))
    assert (verdict.ok, verdict.seq) == (False, 10)
    assert verdict.reason.startswith("incomplete: the log ends after seq 9 without run_end")
    assert audit.verify(path, signing.load_public(public), allow_incomplete=True).ok


def test_torn_last_line_is_reported_not_dropped(log):
    path, public, _ = log
    data = path.read_bytes()
    path.write_bytes(data[: data.rindex(b"\n", 0, len(data) - 1) + 30])
    verdict = audit.verify(path, signing.load_public(public), allow_incomplete=True)
    assert (verdict.ok, verdict.seq) == (False, 16)
    assert verdict.reason.startswith("torn line")
    assert len(audit.read(path)) == 16, "readers skip only the torn line"


def test_whitespace_edits_and_garbage_are_caught(log):
    path, public, _ = log
    original = lines(path)
    write(path, [*original[:3], original[3].replace(b'","', b'", "', 1), *original[4:]])
    assert "not in canonical form" in audit.verify(path, signing.load_public(public)).reason
    write(path, [*original[:3], b"not json", *original[4:]])
    verdict = audit.verify(path, signing.load_public(public))
    assert (verdict.seq, verdict.reason) == (3, "unparseable record: the line is not valid JSON")
    path.write_bytes(b"")
    assert audit.verify(path, signing.load_public(public)).reason == "the log is empty"


def test_writer_never_overwrites_an_existing_log(log):
    path, _, key = log
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        audit.AuditLog(path, key, "run-2")
    assert path.read_bytes() == before


def test_rounds_view(log):
    path, _, _ = log
    views = audit.rounds(audit.read(path))
    assert [v.round for v in views] == [1, 2, 3]
    assert views[0].accepted == ["a"] and views[0].rejected == ["b: bad signature"] and views[0].examples == 10
    assert views[2].accuracy == pytest.approx(0.8)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "simulations.cli", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_cli_verify_exit_codes(log, tmp_path):
    path, public, key = log
    ok = cli("audit", "verify", path, "--key", public)
    assert ok.returncode == 0 and ok.stdout.startswith("OK: 17 records"), ok.stdout + ok.stderr
    shown = cli("audit", "show", path)
    assert shown.returncode == 0 and "bad signature" in shown.stdout and "not verified" in shown.stdout
    write(path, ATTACKS["delete a record"](records_of(path), key))
    bad = cli("audit", "verify", path, "--key", public)
    assert bad.returncode == 1 and bad.stdout.startswith("FAILED at seq 7: gap")
    for usage in (["audit", "verify", path], ["audit", "verify", tmp_path / "none.jsonl", "--key", public],
                  ["audit", "verify", path, "--key", tmp_path / "audit.key"]):
        result = cli(*usage)
        assert result.returncode == 2, (usage, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr


def test_audit_show_prints_what_records_say_as_text_and_survives_odd_shapes(tmp_path):
    """Issue 22: records are untrusted text (a node name or a reason can come from whoever wrote
    the log or the policy). Failed before: `audit show` rendered them as rich markup, so
    '[bold]x[/bold]' lost its brackets, '[/x]' stopped it with a MarkupError traceback, and a
    record whose data or round had another JSON type crashed it (exit 1, traceback)."""
    _, _, key = signing.write_keypair(tmp_path, "audit")
    writer = audit.AuditLog(tmp_path / "audit.jsonl", key, "run-1")
    writer.append("run_start", 0, {"operator": {"name": "[bold]op[/bold]"}, "config": {"privacy": "plain"}})
    writer.append("round_start", 1, {"sampled": [1, 2]})
    writer.append("update_rejected", 1, {"node": "[red]n1[/red]", "kind": "train", "reason": "closing [/x] tag"})
    writer.append("update_accepted", 1, {"node": "n2", "kind": "train", "num_examples": "ten"})
    writer.close()
    with open(tmp_path / "audit.jsonl", "a") as log:  # lines of other shapes, as an edited log may hold
        log.write(json.dumps({"seq": 9, "event": "round_end", "round": "one", "data": []}) + "\n")
        log.write(json.dumps({"seq": 10, "event": "aggregate", "round": 1, "data": {"digest": 7}}) + "\n")
    shown = cli("audit", "show", tmp_path / "audit.jsonl")
    assert shown.returncode == 0 and "Traceback" not in shown.stderr, shown.stderr
    for literal in ("[bold]op[/bold]", "[red]n1[/red]: closing [/x] tag"):
        assert literal in shown.stdout, shown.stdout


def test_a_log_cut_after_a_failed_run_end_or_past_its_published_head_does_not_verify(log, tmp_path):
    """Issue 22: failed before: a resumed run keeps a failed run_end in the middle of its chain,
    and a log cut just after it verified as complete; nor could a verifier pin the head it
    was given out of band, so cutting the last rounds off went unnoticed."""
    _, public, key = log
    writer = audit.AuditLog(tmp_path / "resumed.jsonl", key, "run-9")
    writer.append("run_start", 0, {"audit_key": writer.key_fingerprint})
    writer.append("round_end", 1, {"accuracy": 0.5})
    writer.append("run_end", 1, {"status": "failed", "reason": "server killed"})
    cut_here = writer.head
    writer.append("run_resumed", 1, {"from_round": 1})
    writer.append("round_end", 2, {"accuracy": 0.6})
    writer.append("run_end", 2, {"status": "completed", "final_model": "ab" * 32})
    published = writer.head
    writer.close()
    whole = (tmp_path / "resumed.jsonl").read_bytes()
    pub = signing.load_public(public)
    assert audit.verify(tmp_path / "resumed.jsonl", pub).ok
    assert audit.verify(tmp_path / "resumed.jsonl", pub, head=published[:16]).ok
    cut = tmp_path / "cut.jsonl"
    cut.write_bytes(b"".join(line + b"\n" for line in whole.split(b"\n")[:3]))
    verdict = audit.verify(cut, pub)
    assert not verdict.ok and "run_end of status 'failed' (server killed)" in verdict.reason
    assert audit.verify(cut, pub, allow_incomplete=True).ok  # what is there is intact
    assert audit.verify(cut, pub, allow_incomplete=True).head == cut_here
    pinned = audit.verify(cut, pub, allow_incomplete=True, head=published)
    assert not pinned.ok and "is not the published head" in pinned.reason
    shown = cli("audit", "verify", cut, "--key", public, "--head", published[:20])
    assert shown.returncode == 1 and "is not the published head" in shown.stdout
    assert cli("audit", "verify", cut, "--key", public, "--head", "xyz").returncode == 2
