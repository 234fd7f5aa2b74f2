"""The whole command line as a careless or hostile user drives it.

Argument lists are generated from the real parser (every command, option, choice and kind of
value), the real config keys for ``--run-config``, and real files: a finished run, a crashed
run that can be resumed, HE keys, and hostile ones (binary, empty, huge, not UTF-8, the wrong
kind of file, a directory where a file belongs and a file where a directory belongs, a path
that cannot be written, a run directory with one file damaged). Each case runs ``main`` in
a sandbox and must end with an exit code in {0, 1, 2, 130}, print no traceback, write nothing
outside the output locations it was given, and change no existing file when it fails.

What a command does once its input is accepted is other tests' subject: the Flower simulation
runtime, a local cluster's processes and the network are where this test stops (the first
raises ``WorkStarted``, dataset URLs point at a closed port), so a case takes milliseconds.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from clients.app import app as client_app
from crypto.he import generate_pair
from fedlearn import data
from fedlearn.config import key_reference
from server.app import make_server_app
from simulations import cli, cluster, engine, simulate
from simulations.argtypes import new_file, out_directory
from tests.helpers import REPO

EXAMPLES = int(os.environ.get("FEDLEARN_CLI_EXAMPLES", "400"))
UNWRITABLE = "/proc/fedlearn-cannot-write-here/out"  # nobody, root included, creates files under /proc


class WorkStarted(BaseException):
    """The command passed every check and started its real work (not an Exception: main's
    bug handler must not catch it)."""


# -- real material, made once ---------------------------------------------------------------

def _crash_in_round_2(record) -> None:
    if record.round == 2:
        raise RuntimeError("injected crash")


@pytest.fixture(scope="module")
def material(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("cli-material")
    job = "num-rounds=2 num-clients=3 privacy=plain"
    simulate.run(cli.config_from_args(None, job, str(base / "done-parent")))
    (done,) = (base / "done-parent").iterdir()
    done.rename(base / "done")
    config = cli.config_from_args(None, job, str(base / "crashed-parent"))
    with pytest.raises(RuntimeError, match="injected crash"):
        engine.simulate(make_server_app(config, on_round=_crash_in_round_2), client_app, config.num_clients)
    (crashed,) = (base / "crashed-parent").iterdir()
    shutil.move(crashed, base / crashed.name)  # a run directory must keep its run id as its name
    (base / "crashed").symlink_to(crashed.name)
    generate_pair(base / "he", "bfv", 10)
    hostile = base / "hostile"
    hostile.mkdir()
    (hostile / "binary.bin").write_bytes(bytes(range(256)) * 16)
    (hostile / "empty.toml").write_bytes(b"")
    (hostile / "latin1.toml").write_bytes("num-rounds = 3 # caf\xe9\n".encode("latin-1"))
    (hostile / "wrong-kind.toml").write_text('node = 3\nprivacy = ["plain"]\n')
    (hostile / "wrong.pub").write_text("ssh-ed25519 AAAA not a key\n")
    (hostile / "dir.toml").mkdir()
    (hostile / "a-file").write_text("a file where a directory belongs\n")
    with open(hostile / "huge.toml", "wb") as huge:
        huge.truncate(9 << 20)  # sparse: over the 8 MiB a config or policy may be
    (hostile / "metrics.json").write_text("[1, 2, 3]")
    return base


# -- argument generation ------------------------------------------------------------------

def _paths(material: Path) -> list[str]:
    """Relative to the sandbox: the real files, the hostile ones, and places to write."""
    real = [
        "in/done", "in/crashed", "in/done/audit.jsonl", "in/done/audit.pub", "in/done/audit.key",
        "in/done/model.safetensors", "in/done/policy.toml", "in/done/config.toml", "in/done/metrics.json",
        "in/crashed/checkpoint.safetensors", "in/he/he.secret", "in/he/he.public",
        *sorted(f"in/done/keys/{p.name}" for p in (material / "done" / "keys").iterdir()),
    ]
    hostile = [f"in/hostile/{p.name}" for p in sorted((material / "hostile").iterdir())]
    places = ["out", "out/new/deep", "out/x.safetensors", "in/hostile/a-file/sub", "missing/file.toml",
              UNWRITABLE, "", "-", "~/x", "~no-such-user-of-fedlearn/x"]
    return real + hostile + places


CONFIG_KEYS = key_reference()
# Typed text, never an absolute or ~user path: a case must not write outside its sandbox
# (we may run as root). "~" alone is the sandbox: HOME points there.
WORDS = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12).map(lambda w: w.lstrip("/~"))


def _key_value(info, paths: list[str]) -> st.SearchStrategy[str]:
    by_type = {
        "int": st.one_of(st.integers(-3, 12), st.integers(-(2**70), 2**70)).map(str),
        "float": st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(["0", "1e-3", "-1"])).map(str),
        "str": st.one_of(WORDS, st.just(str(info.default))),
    }
    options = [by_type[info.type], st.just(str(info.default)), WORDS]
    if info.type == "str" and ("dir" in info.key or "policy" in info.key or "key" in info.key or "he-" in info.key):
        options.append(st.sampled_from(paths))
    return st.one_of(options).map(lambda v: f"'{v}'" if info.type == "str" and " " in v else v)


def _run_config(paths: list[str]) -> st.SearchStrategy[str]:
    small_job = st.just("num-rounds=1 num-clients=2")
    pair = st.sampled_from(CONFIG_KEYS).flatmap(lambda info: _key_value(info, paths).map(lambda v: f"{info.key}={v}"))
    generated = st.lists(pair, max_size=4).map(" ".join)
    return st.one_of(
        st.tuples(small_job, generated).map(" ".join),  # mostly a cheap job plus a few keys
        generated,
        WORDS,  # whatever a user types: quotes, '=', no '='
    )


def _value(action: argparse.Action, paths: list[str]) -> st.SearchStrategy[str]:
    if action.choices:
        return st.one_of(st.sampled_from(sorted(action.choices)), WORDS)
    if action.dest == "run_config":
        return _run_config(paths)
    if action.dest == "preset":
        return st.one_of(st.sampled_from(cli.preset_names()), st.sampled_from(paths), WORDS)
    if action.type in (Path, out_directory, new_file) or action.dest in ("out", "data_dir", "policy", "key", "pub"):
        return st.one_of(st.sampled_from(paths), WORDS)
    if action.type is int or getattr(action.type, "__name__", "") == "number":
        return st.one_of(st.integers(-2, 40), st.integers(-(2**64), 2**64)).map(str)
    return st.one_of(WORDS, st.sampled_from(["node-0", "operator", "127.0.0.1", "a b", "--x"]))


def _leaves(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    """(command words, its parser) for every runnable command."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _leaves(sub, (*prefix, name))
            return
    yield prefix, parser


def _command(words: tuple[str, ...], parser: argparse.ArgumentParser, paths: list[str]) -> st.SearchStrategy[list[str]]:
    parts = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            parts.append(st.sampled_from([[], [], [], [], ["--help"]]))
        elif not action.option_strings:  # positional
            if action.dest == "bench_args":
                continue
            parts.append(_value(action, paths).map(lambda v: [v]) if action.nargs != "*" else st.lists(_value(action, paths), max_size=2))
        elif isinstance(action, argparse._StoreTrueAction):
            parts.append(st.sampled_from([[], [action.option_strings[0]]]))
        else:
            flag = action.option_strings[0]
            present = st.lists(_value(action, paths), min_size=1, max_size=2 if action.nargs or "append" in type(action).__name__.lower() else 1)
            chance = [present] * (8 if action.required else 2) + [st.just([])]
            parts.append(st.one_of(chance).map(lambda values, flag=flag: [x for v in values for x in (flag, v)]))
    return st.tuples(*parts).map(lambda chunks: [*words, *(x for chunk in chunks for x in chunk)])


def _bench(paths: list[str]) -> st.SearchStrategy[list[str]]:
    """Benchmarks run for minutes: only their arguments' refusals, help and report."""
    return st.one_of(
        st.lists(st.sampled_from(["--help", "report", "nope", "--docs", "--commit", "x"]), max_size=3),
        st.sampled_from(["throughput", "secagg-round", "fedavg-scale"]).map(lambda name: [name, "--help"]),
        st.tuples(st.sampled_from(paths), WORDS).map(lambda t: ["report", "--docs", t[0], "--commit", t[1]]),
        st.sampled_from(paths).map(lambda p: ["report", "--docs", p]),
    ).map(lambda rest: ["bench", *rest])


def _typical(material: Path) -> st.SearchStrategy[list[str]]:
    """Command lines as the docs write them, on the real files (which DAMAGES may have hit)."""
    key = next(p.name for p in sorted((material / "done" / "keys").iterdir()) if p.suffix == ".pub")
    return st.sampled_from([
        ["audit", "verify", "in/done", "--key", "in/done/audit.pub", "--model", "in/done/model.safetensors"],
        ["audit", "verify", "in/crashed/audit.jsonl", "--key", "in/crashed/audit.pub", "--allow-incomplete"],
        ["audit", "show", "in/done"],
        ["audit", "digest", "in/done/model.safetensors"],
        ["resume", "in/crashed"],
        ["resume", "in/done"],
        ["keys", "list", "--policy", "in/done/policy.toml"],
        ["keys", "enroll", "--policy", "in/done/policy.toml", "--name", "newcomer", "--pub", f"in/done/keys/{key}"],
        ["keys", "revoke", "--policy", "in/done/policy.toml", "node-0"],
        ["simulate", "--out", "out", "--run-config", "num-rounds=1 num-clients=2"],
        ["simulate", "--preset", "in/done/config.toml", "--out", "out"],
    ])


def arguments(material: Path) -> st.SearchStrategy[list[str]]:
    paths = _paths(material)
    commands = [_command(words, parser, paths) for words, parser in _leaves(cli.build_parser()) if words != ("bench",)]
    noise = st.lists(st.one_of(WORDS, st.sampled_from(["--help", "-h", "simulate", "keys", "--out"])), max_size=4)
    return st.one_of(_typical(material), st.one_of(*commands), _bench(paths), noise)


DAMAGES = st.one_of(
    st.none(),
    st.tuples(st.sampled_from(["checkpoint.safetensors", "metrics.json", "config.toml", "audit.jsonl", "audit.pub",
                               "policy.toml", "audit.key"]),
              st.sampled_from(["empty", "binary", "truncate", "delete"])),
)


# -- running one case -----------------------------------------------------------------------

def _damage(run_dir: Path, damage) -> None:
    if damage is None:
        return
    name, how = damage
    path = run_dir / name
    if not path.exists():
        return
    raw = path.read_bytes()
    if how == "delete":
        path.unlink()
    else:
        path.write_bytes({"empty": b"", "binary": bytes(range(256)), "truncate": raw[: len(raw) // 2]}[how])


def _snapshot(root: Path) -> dict[str, str]:
    found = {}
    for directory, _, files in os.walk(root):  # does not follow the in/crashed link
        for name in files:
            path = Path(directory, name)
            if not path.is_symlink():
                found[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def _outputs(argv: list[str], root: Path) -> list[str]:
    """Where a command may write: out/ and runs/ (defaults), what it was given as --out,
    --data-dir or out-dir, the policy it edits, the run directory it resumes or decrypts into."""
    places = ["out", "runs"]
    for i, word in enumerate(argv[:-1]):
        if word in ("--out", "--data-dir", "--docs") or (word == "--policy" and argv[1:2] in (["enroll"], ["revoke"])):
            places.append(argv[i + 1])
        if word == "--run-config":
            places += [part.split("=", 1)[1].strip("'\"") for part in argv[i + 1].split() if part.startswith("out-dir=")]
    if argv[:1] in (["resume"], ["decrypt-model"]) and len(argv) > 1:
        places += [w for w in argv[1:] if not w.startswith("-")][:1]
    return [os.path.relpath(os.path.realpath(os.path.expanduser(p)), root) for p in places if p.strip()]


def _under(relative: str, places: list[str]) -> bool:
    return any(relative == p or relative.startswith(p.rstrip("/") + "/") for p in places)


def _run(argv: list[str]) -> tuple[int | None, str]:
    """(exit code, or None if the command started its real work; stdout and stderr)."""
    out, err = io.StringIO(), io.StringIO()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(argv)
    except WorkStarted:
        code = None
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)
    return code, out.getvalue() + err.getvalue()


@pytest.fixture
def sandbox_factory(material, tmp_path, monkeypatch):
    def started(*args, **kwargs):
        raise WorkStarted

    monkeypatch.setattr(engine, "simulate", started)
    monkeypatch.setattr(cluster.LocalCluster, "start", started)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    monkeypatch.setattr(data, "DOWNLOAD_URLS", {k: f"http://127.0.0.1:{port}/" for k in data.DOWNLOAD_URLS})
    monkeypatch.setenv("COLUMNS", "120")
    counter = iter(range(10**9))

    @contextlib.contextmanager
    def sandbox():
        root = tmp_path / f"case{next(counter)}"
        shutil.copytree(material, root / "in", symlinks=True)
        previous = os.getcwd()
        os.chdir(root)
        monkeypatch.setenv("HOME", str(root))
        try:
            yield root
        finally:
            os.chdir(previous)
            shutil.rmtree(root, ignore_errors=True)

    return sandbox


def _repo_status() -> str:
    return subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=REPO,
                          capture_output=True, text=True).stdout


@pytest.mark.slow
def test_no_argument_list_gets_a_traceback_an_odd_exit_code_or_a_damaged_file(material, sandbox_factory, request):
    repo_before = _repo_status()
    seen: dict[str, int] = {}

    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(arguments(material), DAMAGES)
    def case(argv, damage):
        with sandbox_factory() as root:
            for run in ("done", "crashed"):
                _damage((root / "in" / run).resolve(), damage)
            before = _snapshot(root)
            code, printed = _run(argv)
            after = _snapshot(root)
            places = _outputs(argv, root)
        outcome = "work started" if code is None else f"exit {code}"
        seen[outcome] = seen.get(outcome, 0) + 1
        event(outcome)
        command = " ".join(w for w in argv[:2] if not w.startswith("-"))
        assert code in (None, 0, 1, 2, 130), f"{argv}: exit {code}\n{printed[-3000:]}"
        assert "Traceback" not in printed, f"{argv}:\n{printed[-3000:]}"
        changed = {p for p in before if after.get(p) != before[p]}
        new = set(after) - set(before)
        stray = sorted(p for p in changed | new if not _under(p, places))
        assert not stray, f"{command}: wrote outside its outputs {places}: {stray}"
        if code not in (0, None):
            assert not changed, f"{argv}: exit {code} but changed {sorted(changed)}\n{printed[-1500:]}"
            assert not new, f"{argv}: exit {code} but wrote {sorted(new)}\n{printed[-1500:]}"

    case()
    assert _repo_status() == repo_before, "a command wrote into the repository"
    total = sum(seen.values())
    print(f"\n{total} generated command lines: " + ", ".join(f"{k}: {v}" for k, v in sorted(seen.items())))
    assert total >= EXAMPLES * 0.9 and seen.get("exit 2", 0) and seen.get("work started", 0) + seen.get("exit 0", 0)
