"""Many cases (lincheck/batch.py): cost and order from headers, fingerprints, JSON lines as
cases finish, --resume, Ctrl-C, and the same records from the local pool and a Dask cluster."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from conftest import case, mean_bias
from rich.console import Console
from typer.testing import CliRunner

from lincheck import batch, output
from lincheck.checks import memory_needed
from lincheck.cli import app

runner = CliRunner()

OPTIONS = dict(
    precision=None,
    certain_only=False,
    layout="out_in",
    method="central",
    mode="auto",
    samples=64,
    directions=40,
    seed=0,
    budget=10.0,
    atol=None,
    rtol=None,
)


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _case(folder, rng, N=5, D_in=4, D_out=3, bug=None):
    """A case folder of .npy files: correct float64 gradients, or dB a mean (bug="mean")."""
    case(folder, rng, N, D_in, D_out, **({"fn": mean_bias} if bug == "mean" else {}))


def _model(root, rng):
    """Four cases: two correct, one with dB a mean (must fail), one with a junk W (bad input)."""
    _case(root / "a", rng, 6, 4, 3)
    _case(root / "b", rng, 9, 5, 2)
    _case(root / "planted", rng, 5, 4, 3, bug="mean")
    _case(root / "junk", rng)
    (root / "junk" / "W.npy").write_bytes(b"junk")
    return root


def _records(path, cut=0):
    """The last record per case; ``cut``: how many lines are expected to be cut short."""
    records, bad = {}, 0
    for line in path.read_text().splitlines():
        try:
            item = json.loads(line)
        except ValueError:
            bad += 1
            continue
        records[item["case"]] = item
    assert bad == cut
    return records


def _comparable(records):
    """Records without what may differ from run to run: the timing and the worker."""
    return {
        k: {f: v for f, v in r.items() if f not in ("seconds", "worker")}
        for k, r in records.items()
    }


def _check_verdicts(records, root, but=None):
    """The verdicts _model planted, for every case (``but`` one, whose worker was killed)."""
    expected = {
        "a": "pass",
        "b": "pass",
        "planted": "fail",
        "junk": "bad input",
    }
    expected = {str(root / k): v for k, v in expected.items() if str(root / k) != but}
    assert {name: r["verdict"] for name, r in records.items()} == expected
    planted = records[str(root / "planted")]
    assert [h["code"] for h in planted["report"]["hints"]] == ["mean_instead_of_sum"]
    if str(root / "junk") != but:
        assert "not a .npy file" in records[str(root / "junk")]["error"]


# --- the plan: pure functions of headers and metadata ----------------------------------


def test_cost_and_order_come_from_headers_without_reading_data(tmp_path, rng):
    _case(tmp_path / "small", rng, 3, 2, 2)
    np.savez(tmp_path / "mid.npz", X=np.ones((10, 4)), W=np.ones((3, 4)), dY=np.ones((10, 3)))
    # A case whose X declares (1000, 6) but holds one row: the header alone gives its cost.
    big = tmp_path / "big"
    big.mkdir()
    np.save(big / "W.npy", np.ones((5, 6)))
    np.save(big / "dY.npy", np.ones((1000, 5)))
    whole = tmp_path / "whole.npy"
    np.save(whole, np.ones((1000, 6)))
    (big / "X.npy").write_bytes(whole.read_bytes()[:200])
    whole.unlink()
    tasks = batch.plan(sorted(tmp_path.iterdir()), OPTIONS)
    assert [(t.name, t.work) for t in tasks] == [
        (str(big), 1000 * 6 * 5),
        (str(tmp_path / "mid.npz"), 10 * 4 * 3),
        (str(tmp_path / "small"), 3 * 2 * 2),
    ]
    # bytes: the data the headers declare (X 1000×6, W 5×6, dY 1000×5, float64)
    assert tasks[0].nbytes == 8 * (6000 + 30 + 5000)
    # in_out: W is (D_in, D_out); equal work first ordered by bytes, then by name
    assert batch.estimate({"X": ((2, 7, 4), 0), "W": ((4, 3), 0)}, "in_out") == (14 * 4 * 3, 0)
    same = [batch.Task("b", "", 10, 5), batch.Task("a", "", 10, 5), batch.Task("c", "", 10, 9)]
    assert [t.name for t in batch.order(same)] == ["c", "a", "b"]


def test_fingerprint_follows_files_and_the_options_that_change_verdicts(tmp_path, rng):
    _case(tmp_path / "c", rng)
    first = batch.plan([tmp_path / "c"], OPTIONS)[0].fingerprint
    assert first is not None and first == batch.plan([tmp_path / "c"], OPTIONS)[0].fingerprint
    for option, value in (("samples", 65), ("precision", "fp32"), ("mode", "full")):
        assert batch.plan([tmp_path / "c"], {**OPTIONS, option: value})[0].fingerprint != first
    assert batch.plan([tmp_path / "c"], {**OPTIONS, "jobs": 3})[0].fingerprint == first
    dB = tmp_path / "c" / "dB.npy"
    os.utime(dB, ns=(dB.stat().st_atime_ns, dB.stat().st_mtime_ns + 1))  # only touched
    assert batch.plan([tmp_path / "c"], OPTIONS)[0].fingerprint != first


def test_a_case_too_large_for_its_worker_runs_along_directions_and_says_so():
    shapes = {"X": (65536, 1024), "W": (1024, 1024), "dY": (65536, 1024)}
    options = {**OPTIONS, "budget": 1e9}  # auto would check every entry
    full = memory_needed(shapes, "full", "central", 1e9)
    partial = memory_needed(shapes, "directions", "central", 1e9)
    assert partial < full
    chosen, note = batch.partial_mode(shapes, options, (full + partial) // 2)
    assert chosen["mode"] == "directions" and "checked along directions" in note
    assert batch.partial_mode(shapes, options, full) == (options, None)  # fits: unchanged
    assert batch.partial_mode(shapes, options, partial - 1) == (options, None)  # guard refuses
    fixed = {**options, "mode": "full"}  # a mode the user chose is never changed
    assert batch.partial_mode(shapes, fixed, partial) == (fixed, None)


def test_max_memory_is_per_worker_and_refuses_only_the_cases_over_it(tmp_path, rng):
    _case(tmp_path / "m" / "a", rng)
    _case(tmp_path / "m" / "b", rng)
    (tmp_path / "m" / "b" / "W.npy").write_bytes(b"junk")
    log = tmp_path / "run.jsonl"
    result = invoke("verify", tmp_path / "m", "--max-memory", "1M", "--jobs", 1, "--jsonl", log)
    assert result.exit_code == 2, result.output
    records = _records(log)
    a, b = records[str(tmp_path / "m" / "a")], records[str(tmp_path / "m" / "b")]
    # a full check holds two blocks of BLOCK_BYTES at least: over 1 MiB, and no partial
    # mode fits either (a row block alone is ROW_BLOCK_BYTES)
    assert a["verdict"] == "bad input" and a["error"].startswith("this check needs about")
    assert "over 1 MiB (--max-memory)" in a["error"]
    assert b["verdict"] == "bad input" and "not a .npy file" in b["error"]  # unchanged


# --- the local engine: JSON lines, resume, Ctrl-C -------------------------------------


@pytest.fixture
def model(tmp_path, rng):
    return _model(tmp_path / "model", rng)


def test_jsonl_has_one_record_per_case_and_jobs_give_the_same_records(tmp_path, model):
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    result = invoke("verify", model, "--jobs", 1, "--jsonl", one, "--json", "-")
    assert result.exit_code == 1, result.output
    _check_verdicts(_records(one), model)
    report = json.loads(result.stdout)  # the summary covers every case, failures first
    names = [c["case"] for c in report["cases"]]
    assert names == [str(model / n) for n in ("junk", "planted", "a", "b")]
    by_case = {c["case"]: c for c in report["cases"]}
    for name, item in _records(one).items():  # the per-case report, as the JSON report has it
        assert {k: item[k] for k in by_case[name]} == by_case[name]
    assert invoke("verify", model, "--jobs", 2, "--jsonl", two).exit_code == 1
    assert _comparable(_records(two)) == _comparable(_records(one))
    again = invoke("verify", model, "--jsonl", one)
    assert again.exit_code == 2 and "already exists; not replaced (use --force)" in again.stderr
    assert invoke("verify", model, "--jsonl", one, "--force").exit_code == 1
    assert len(one.read_text().splitlines()) == 4  # replaced, not appended to


def test_bad_input_names_the_file_by_the_path_the_user_gave(tmp_path, model, monkeypatch):
    """The workers open a case by its absolute path; a bad file is named as the user named
    the case (the table, the record), relative paths included, in the pool's workers too.
    The cases' table, under the header that counts them, does not count them again."""
    monkeypatch.chdir(model.parent)
    log = tmp_path / "rel.jsonl"
    result = invoke("verify", "model", "--jobs", 2, "--jsonl", log)
    assert result.exit_code == 1
    junk = os.path.join("model", "junk")
    error = _records(log)[junk]["error"]
    assert error.startswith(f"W ({os.path.join(junk, 'W.npy')}): not a .npy file"), error
    assert str(model) not in result.output
    lines = [line.strip() for line in result.output.splitlines()]
    assert lines[0] == "lincheck verify 4 cases" and "4 cases" not in lines  # no second count
    assert f"bad input: W ({os.path.join(junk, 'W.npy')}): " in result.output
    task = batch.Task(name="b", where="/data/b")  # only the case's own path is renamed
    said = "W (/data/b/W.npy), X (/data/b2/X.npy), at /data/b: /data/b"
    assert batch.as_named(said, task) == "W (b/W.npy), X (/data/b2/X.npy), at b: b"


def test_a_resume_file_s_path_is_text_in_the_header(tmp_path, model):
    """A --resume file whose path reads as Rich markup (a folder "a[" holding "x].jsonl")
    is named as it is in the header, not a MarkupError traceback."""
    (tmp_path / "a[").mkdir()
    log = tmp_path / "a[" / "x].jsonl"
    assert invoke("verify", model, "--jsonl", log, "--jobs", 1).exit_code == 1
    result = invoke("verify", model, "--resume", log, "--jobs", 1)
    assert result.exit_code == 1, result.output
    words = "".join(result.output.split())  # the header, however the terminal wrapped it
    assert words.startswith("lincheckverify4cases(3decidedby")
    assert "a[/x].jsonl,notcheckedagain)" in words


def test_resume_skips_exactly_the_decided_unchanged_cases(tmp_path, model, monkeypatch):
    monkeypatch.chdir(tmp_path)
    log = tmp_path / "run.jsonl"
    missing = invoke("verify", model, "--resume", tmp_path / "none.jsonl")
    assert missing.exit_code == 2
    assert missing.stderr.startswith(f"lincheck: error: --resume {tmp_path / 'none.jsonl'}: cannot")
    # the same file for both before it exists: a first run (a script that always resumes)
    assert invoke("verify", model, "--jobs", 1, "--resume", log, "--jsonl", log).exit_code == 1
    lines = log.read_text().splitlines()
    # A run killed mid-write leaves its last line cut short: that case is checked again.
    cut = str(model / "a")
    last = next(line for line in lines if json.loads(line)["case"] == cut)
    log.write_text("".join(f"{line}\n" for line in lines if line != last) + last[:40])
    changed = model / "b" / "dY.npy"
    np.save(changed, np.load(changed))  # the same values, rewritten: b is checked again
    checked = []
    real = batch.check_case

    def counting(task, *args):
        checked.append(task.name)
        return real(task, *args)

    monkeypatch.setattr(batch, "check_case", counting)
    result = invoke("verify", model, "--resume", log, "--jsonl", log, "--jobs", 1, "--json", "-")
    assert result.exit_code == 1, result.output
    # bad input is never a decided verdict: junk is checked again too
    assert sorted(checked) == sorted({cut, str(model / "b"), str(model / "junk")})
    assert json.loads(result.stdout)["counts"] == {
        "cases": 4,
        "failed": 1,
        "bad_input": 1,
        "skipped": 0,
        "unsupported": 0,
    }
    records = _records(log, cut=1)  # appended to: every case has a whole record again
    assert len(records) == 4
    _check_verdicts(records, model)
    assert log.read_text().count("\n") == len(lines) + 3  # one line each, after the cut one
    checked.clear()
    elsewhere = tmp_path / "next.jsonl"
    args = ["verify", model, "--resume", log, "--jsonl", elsewhere, "--jobs", 1]
    assert invoke(*args).exit_code == 1
    assert checked == [str(model / "junk")]
    assert _comparable(_records(elsewhere)) == _comparable(records)  # kept cases copied over
    checked.clear()
    monkeypatch.chdir(model.parent)  # the same cases named by relative paths are the same cases
    assert invoke("verify", "model", "--resume", log, "--jobs", 1).exit_code == 1
    assert checked == [os.path.join("model", "junk")]
    checked.clear()
    assert invoke("verify", model, "--resume", log, "--samples", 8, "--jobs", 1).exit_code == 1
    assert len(checked) == 4  # an option that changes verdicts: nothing is reused
    # A run with other options appended to the file: the default run's records still count.
    assert invoke("verify", model, "--resume", log, "--jsonl", log, "--samples", 8).exit_code == 1
    checked.clear()
    assert invoke("verify", model, "--resume", log, "--jobs", 1).exit_code == 1
    assert checked == [str(model / "junk")]
    checked.clear()
    text = tmp_path / "notes.txt"  # not a --jsonl file: said so, nothing checked
    text.write_text("verify: 1 of 4 cases failed\n")
    wrong = invoke("verify", model, "--resume", text)
    assert wrong.exit_code == 2 and checked == []
    said = "not a --jsonl file of lincheck verify (no record in it)"
    assert wrong.stderr == f"lincheck: error: --resume {text}: {said}\n"
    # Another folder's file decides none of these cases: the header says so.
    other = tmp_path / "other"
    shutil.copytree(model / "b", other / "b")
    first = invoke("verify", other, "--jsonl", tmp_path / "other.jsonl")
    assert first.exit_code == 0 and first.output.splitlines()[0] == "lincheck verify 1 case"
    checked.clear()
    result = invoke("verify", model, "--resume", "other.jsonl", "--jobs", 1)  # in tmp_path
    assert len(checked) == 4 and result.exit_code == 1
    header = "lincheck verify 4 cases (none decided by other.jsonl: all checked)"
    assert result.output.splitlines()[0] == header
    checked.clear()
    empty = tmp_path / "empty.jsonl"  # what a run stopped before any case finished leaves
    empty.write_text("")
    assert invoke("verify", model, "--resume", empty, "--jobs", 1).exit_code == 1
    assert len(checked) == 4


def test_ctrl_c_keeps_the_finished_records_and_shows_them(tmp_path, model, monkeypatch):
    log = tmp_path / f"{'run' * 50} [b].jsonl"  # its last line is wider than the terminal
    real, calls = batch.check_case, []

    def interrupted_at_the_third(task, *args):
        calls.append(task.name)
        if len(calls) == 3:
            raise output.Interrupted
        return real(task, *args)

    monkeypatch.setattr(batch, "check_case", interrupted_at_the_third)
    shown = io.StringIO()
    monkeypatch.setattr(output, "stdout", Console(file=shown, width=300, color_system=None))
    with pytest.raises(output.Interrupted):  # main() turns it into one line and exit 130
        runner.invoke(app, ["verify", str(model), "--jobs", "1", "--jsonl", str(log)])
    assert sorted(_records(log)) == sorted(calls[:2])
    text = shown.getvalue()
    assert all(name in text for name in calls[:2]) and calls[2] not in text
    last = text.splitlines()[-1]  # one line however narrow the terminal (tail -1)
    # What it suggests records the rest in the same file (--resume F alone would not).
    said = f"'{log}'"  # quoted, to paste into a shell: the name has a space and brackets
    assert (
        last
        == f"Interrupted: 2 of 4 cases done, kept in {log}: --resume {said} --jsonl {said} goes on"
    )
    assert "2 of 4 cases" in text.splitlines()[1]  # the table's title, under "4 cases"
    monkeypatch.setattr(batch, "check_case", real)
    result = invoke("verify", model, "--resume", log, "--jsonl", log, "--jobs", 1, "--json", "-")
    assert result.exit_code == 1 and len(json.loads(result.stdout)["cases"]) == 4


# --- Dask distributed ------------------------------------------------------------------

try:
    import distributed
except ImportError:  # lincheck[dask] is optional; the test extra installs it
    distributed = None

needs_dask = pytest.mark.skipif(distributed is None, reason="Dask's distributed is not installed")


@pytest.fixture(scope="module")
def cluster():
    import dask

    assert distributed is not None

    # allowed-failures 0: the test that kills a worker sees its case reported at once,
    # instead of retried on the restarted worker (Dask's default retries it 3 times).
    # worker-saturation 1: a worker holds only the case it runs, so the killed one takes no
    # queued case down with it. The dashboard on any free port: 8787 may be taken.
    settings = {
        "distributed.scheduler.allowed-failures": 0,
        "distributed.scheduler.worker-saturation": 1.0,
    }
    saved = dict(os.environ)
    with dask.config.set(settings):
        with distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as local:
            # A Nanny sets its workers' variables (MALLOC_TRIM_THRESHOLD_, OMP_NUM_THREADS...)
            # in the process that starts them: the other tests' subprocesses must not get them.
            os.environ.clear()
            os.environ.update(saved)
            yield local


@needs_dask
def test_a_dask_cluster_gives_the_records_the_local_pool_gives(tmp_path, model, cluster):
    local, dask = tmp_path / "local.jsonl", tmp_path / "dask.jsonl"
    assert invoke("verify", model, "--jobs", 1, "--jsonl", local).exit_code == 1
    address = cluster.scheduler_address
    result = invoke("verify", model, "--scheduler", address, "--jsonl", dask, "--json", "-")
    assert result.exit_code == 1, result.output
    records = _records(dask)
    _check_verdicts(records, model)
    assert _comparable(records) == _comparable(_records(local))
    workers = cluster.scheduler_info["workers"]
    assert {r["worker"] for r in records.values()} <= set(workers)
    # each worker's memory budget for a case: half its own limit, not the machine's memory
    with distributed.Client(cluster) as client:
        limit, why = client.submit(batch.worker_limit, None, 1, pure=False).result()
    assert limit in {w["memory_limit"] // 2 for w in workers.values()}
    assert why == "half this Dask worker's memory limit"


@needs_dask
def test_a_dask_worker_killed_mid_case_fails_that_case_only(tmp_path, model, cluster):
    marker = tmp_path / "slow.pid"
    # The slow case is the one planned last (the cheapest: junk's W has no header), so its
    # worker runs it with no other case waiting there: Dask hands a few cases to each
    # worker at once, and a worker that dies takes those down too (retried by the
    # scheduler up to allowed-failures, which is 0 here).
    tasks = batch.plan(sorted(model.iterdir()), OPTIONS)
    slow = tasks[-1].name
    assert slow == str(model / "junk")

    def check(task, *args):  # pickled by value: the workers run it
        if task.name == slow:
            marker.write_text(str(os.getpid()))
            time.sleep(60)
        return batch.check_case(task, *args)

    def kill_when_started():
        for _ in range(600):
            if marker.exists() and marker.read_text():
                os.kill(int(marker.read_text()), signal.SIGKILL)  # as the OOM killer would
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_when_started)
    killer.start()
    done = {
        d.task.name: d
        for d in batch.run_dask(tasks, OPTIONS, None, cluster.scheduler_address, check)
    }
    killer.join()
    assert sorted(done) == sorted(str(p) for p in model.iterdir())
    assert "its worker died while checking it" in done[slow].result.error
    others = {name: batch.record(d) for name, d in done.items() if name != slow}
    _check_verdicts(others, model, but=slow)


@needs_dask
def test_a_lost_scheduler_keeps_the_finished_cases_and_reports_the_rest(tmp_path, model):
    """The scheduler goes away after two cases finished: those keep their records, every
    other case is reported as lost (never a pass), and the run ends instead of waiting."""
    tasks = batch.plan(sorted(model.iterdir()), OPTIONS)
    quick = {t.name for t in tasks[:2]}  # the first two by priority run first
    release = tmp_path / "release"

    def check(task, *args):  # pickled by value: a path, not a lock
        for _ in range(1200):
            if task.name in quick or release.exists():
                break
            time.sleep(0.05)
        return batch.check_case(task, *args)

    import dask

    # With its scheduler gone, the worker tries to reconnect for Dask's connect timeout
    # (30 s) before the cluster can close: 1 s here.
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        with distributed.LocalCluster(
            n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0"
        ) as local:
            with distributed.Client(local.scheduler_address, timeout=1) as client:
                try:
                    run = batch.run_dask(tasks, OPTIONS, None, client, check)
                    first = [next(run), next(run)]
                    local.sync(local.scheduler.close)
                    start = time.monotonic()
                    rest = list(run)
                    waited = time.monotonic() - start
                finally:
                    release.touch()
    assert {d.task.name for d in first} == quick
    assert all(d.result.report is not None for d in first)
    assert sorted(d.task.name for d in rest) == sorted(t.name for t in tasks if t.name not in quick)
    assert all(d.result.error.startswith("lost: ") and not d.result.passed for d in rest)
    assert all("connection" in d.result.error for d in rest), rest[0].result.error
    assert all(batch.record(d)["verdict"] == "error" for d in rest)
    assert waited < 30


@needs_dask
def test_no_scheduler_at_the_address_is_one_line_and_nothing_written(tmp_path, model, monkeypatch):
    monkeypatch.setattr(batch, "CONNECT_TIMEOUT", 0.5)
    log = tmp_path / "run.jsonl"
    result = invoke("verify", model, "--scheduler", "tcp://127.0.0.1:9", "--jsonl", log)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(
        "lincheck: error: --scheduler tcp://127.0.0.1:9: cannot connect"
    )
    assert len(result.stderr.splitlines()) == 1 and not log.exists()


# --- glibc's malloc in the workers (lincheck/allocator.py) -------------------------------

MiB = 1 << 20


class FakeLibc:
    """mallopt and malloc_trim that record their calls; ``answer`` is what mallopt returns
    (1 done, 0 refused) or an exception it raises."""

    def __init__(self, answer=1):
        self.calls, self.answer = [], answer

    def mallopt(self, param, value):
        self.calls.append(("mallopt", param, value))
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer

    def malloc_trim(self, pad):
        self.calls.append(("malloc_trim", pad))
        return 1


@pytest.mark.skipif(np.dtype(np.intp).itemsize != 8, reason="the 64-bit thresholds")
def test_malloc_thresholds_change_only_where_the_trim_variable_fixed_them():
    from lincheck.allocator import Settings, settings

    # mallopt(3): the dynamic mmap threshold tops out at 4*1024*1024*sizeof(long) = 32 MiB,
    # the trim threshold at twice it; glibc's fixed default mmap threshold is 128 KiB
    dask = Settings(during=(32 * MiB, 64 * MiB), after=(128 * 1024, 65536))
    assert settings({"MALLOC_TRIM_THRESHOLD_": "65536"}) == dask
    assert settings({"MALLOC_TRIM_THRESHOLD_": "0x10000", "MALLOC_TOP_PAD_": "0"}) == dask
    # a user's own larger trim threshold is kept while the case runs
    assert settings({"MALLOC_TRIM_THRESHOLD_": str(100 * MiB)}).during == (32 * MiB, 100 * MiB)
    for environ in (
        {},  # glibc's dynamic threshold is on: nothing to do
        {"MALLOC_TOP_PAD_": "0"},  # fixed by another variable: not ours to undo
        {"MALLOC_TRIM_THRESHOLD_": "65536", "MALLOC_MMAP_THRESHOLD_": "131072"},  # a choice
        {"MALLOC_TRIM_THRESHOLD_": "65536", "GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1"},
        {"MALLOC_TRIM_THRESHOLD_": "65536", "GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"},
        {"MALLOC_TRIM_THRESHOLD_": "lots"},
        {"MALLOC_TRIM_THRESHOLD_": "0100"},  # octal to glibc: left alone
        {"MALLOC_TRIM_THRESHOLD_": "-1"},
        {"MALLOC_TRIM_THRESHOLD_": str(2**31)},  # mallopt takes an int: cannot be put back
    ):
        assert settings(environ) is None, environ

    # lincheck's own process with glibc's dynamic thresholds: set, and nothing to put back
    own = Settings(during=(32 * MiB, 64 * MiB), after=None)
    assert settings({}, own=True) == own
    assert settings({"GLIBC_TUNABLES": "glibc.rtld.optional_static_tls=512"}, own=True) == own
    assert settings({"MALLOC_TRIM_THRESHOLD_": "65536"}, own=True) == dask  # put back
    for environ in (
        {"MALLOC_TOP_PAD_": "0"},
        {"MALLOC_MMAP_MAX_": "0"},
        {"MALLOC_MMAP_THRESHOLD_": "131072"},
        {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"},
    ):
        assert settings(environ, own=True) is None, environ


def _put_back(allocator) -> None:
    """Wait for the put-back that follows a process's last case (IDLE_SECONDS later)."""
    timer = allocator._timer
    if timer is not None:
        timer.join(10)


def test_malloc_setup_is_set_once_put_back_when_idle_and_never_fails_one(
    tmp_path, rng, monkeypatch
):
    from lincheck import allocator

    monkeypatch.setattr(allocator, "IDLE_SECONDS", 0.05)
    _case(tmp_path / "c", rng, bug="mean")
    task = batch.plan([tmp_path / "c"], OPTIONS)[0]
    expected = batch.record(batch.Done(task, *batch.check_case(task, OPTIONS)))
    plan = allocator.Settings(during=(32 * MiB, 64 * MiB), after=(128 * 1024, 65536))
    dask = {"MALLOC_TRIM_THRESHOLD_": "65536"}

    # not glibc, or glibc's own dynamic threshold: nothing is called, nothing applied
    fake = FakeLibc()
    monkeypatch.setattr(allocator, "startup_environment", lambda: dask)
    monkeypatch.setattr(allocator, "glibc", lambda: None)
    with allocator.arrays_reused():
        assert not allocator.applied()
    monkeypatch.setattr(allocator, "glibc", lambda: fake)
    monkeypatch.setattr(allocator, "startup_environment", lambda: {})
    with allocator.arrays_reused():
        assert not allocator.applied()
    assert fake.calls == []

    # set by the first of two cases running at once; after the second, kept while a next
    # case comes within IDLE_SECONDS; put back, then trimmed, once none has for that long
    monkeypatch.setattr(allocator, "startup_environment", lambda: dask)
    set_ = [("mallopt", -3, 32 * MiB), ("mallopt", -1, 64 * MiB)]
    with allocator.arrays_reused():
        with allocator.arrays_reused():
            assert allocator.applied()
        assert allocator.applied()
        assert fake.calls == set_
    assert allocator.applied()  # for IDLE_SECONDS
    with allocator.arrays_reused():  # the next case: nothing called, nothing put back
        time.sleep(0.2)
        assert allocator.applied() and fake.calls == set_
    _put_back(allocator)
    assert not allocator.applied()
    assert fake.calls[2:] == [("mallopt", -3, 128 * 1024), ("mallopt", -1, 65536)] + [
        ("malloc_trim", 0)
    ]
    assert plan == allocator.settings(dask)

    # lincheck's own process: set by its first case and kept, with no trim, for the next
    monkeypatch.setattr(allocator, "_undo", None)  # put back as None when the test ends
    monkeypatch.setattr(allocator, "_own", True)
    monkeypatch.setattr(allocator, "startup_environment", lambda: {})
    fake = FakeLibc()
    monkeypatch.setattr(allocator, "glibc", lambda: fake)
    for _ in range(2):
        with allocator.arrays_reused():
            assert allocator.applied()
        assert allocator.applied()
    assert fake.calls == [("mallopt", -3, 32 * MiB), ("mallopt", -1, 64 * MiB)]
    monkeypatch.setattr(allocator, "_undo", None)
    monkeypatch.setattr(allocator, "_own", False)
    monkeypatch.setattr(allocator, "startup_environment", lambda: dask)

    # glibc refusing a value, or the call failing, changes nothing about the case
    for answer in (0, OSError("no mallopt")):
        fake = FakeLibc(answer)
        monkeypatch.setattr(allocator, "glibc", lambda fake=fake: fake)
        got = batch.record(batch.Done(task, *batch.check_case(task, OPTIONS)))
        _put_back(allocator)
        assert not allocator.applied() and fake.calls[0] == ("mallopt", -3, 32 * MiB)
        assert ("malloc_trim", 0) not in fake.calls
        assert _comparable({0: got}) == _comparable({0: expected})


def test_a_put_back_that_fired_as_a_case_started_waits_for_the_next_idle_period(monkeypatch):
    """A timer that fires as a case starts waits for the lock the case holds; the case
    cancels it then (too late) and, once ended, starts another. The first then finds the
    process idle, but only since that case ended: it leaves the put-back to the second."""
    from lincheck import allocator

    monkeypatch.setattr(allocator, "IDLE_SECONDS", 3600.0)  # fired by hand below
    monkeypatch.setattr(allocator, "_undo", None)
    monkeypatch.setattr(allocator, "_own", False)
    monkeypatch.setattr(allocator, "startup_environment", lambda: {"MALLOC_TRIM_THRESHOLD_": "1"})
    fake = FakeLibc()
    monkeypatch.setattr(allocator, "glibc", lambda: fake)
    set_ = [("mallopt", -3, 32 * MiB), ("mallopt", -1, 64 * MiB)]
    timers = []
    try:
        for _ in range(2):
            with allocator.arrays_reused():
                pass
            timers.append(allocator._timer)
        first, second = timers
        assert first is not second and first.finished.is_set()  # cancelled by the second case
        first.function(*first.args, **first.kwargs)  # as if it had fired before the cancel
        assert allocator.applied() and fake.calls == set_ and allocator._timer is second
        second.function(*second.args, **second.kwargs)
        assert not allocator.applied() and allocator._timer is None
        assert fake.calls == set_ + [("mallopt", -3, 128 * 1024), ("mallopt", -1, 1)] + [
            ("malloc_trim", 0)
        ]
    finally:
        for timer in timers:
            timer.cancel()


def test_a_program_s_checks_leave_malloc_alone_even_started_as_dask_starts_workers(
    rng, monkeypatch
):
    """A program calling lincheck's API is left as it is, even in a process started with
    MALLOC_TRIM_THRESHOLD_ (a Dask worker running the program's own tasks, or anything
    started in such an environment): no mallopt, no malloc_trim. lincheck's own process
    started so sets the thresholds for the check and puts them back once idle."""
    import lincheck
    from lincheck import allocator

    monkeypatch.setattr(allocator, "IDLE_SECONDS", 0.05)

    X, W, G = rng.standard_normal((5, 4)), rng.standard_normal((3, 4)), rng.standard_normal((5, 3))
    fake, dask = FakeLibc(), {"MALLOC_TRIM_THRESHOLD_": "65536"}
    monkeypatch.setattr(allocator, "_undo", None)
    monkeypatch.setattr(allocator, "glibc", lambda: fake)
    monkeypatch.setattr(allocator, "startup_environment", lambda: dask)
    monkeypatch.setattr(allocator, "_own", False)
    assert lincheck.check(X, W, None, G, G @ W, G.T @ X).passed
    assert fake.calls == []

    monkeypatch.setattr(allocator, "_own", True)
    assert lincheck.check(X, W, None, G, G @ W, G.T @ X).passed
    _put_back(allocator)
    assert fake.calls[0] == ("mallopt", -3, 32 * MiB) and fake.calls[-1] == ("malloc_trim", 0)
    assert not allocator.applied()


OWN_PROCESS = """
import json, sys

import lincheck
from lincheck import allocator

libc, calls = allocator.glibc(), []


class Recorded:  # glibc's calls, made and recorded
    def mallopt(self, param, value):
        calls.append([param, value])
        return libc.mallopt(param, value)

    def malloc_trim(self, pad):
        calls.append(["trim", pad])
        return libc.malloc_trim(pad)


allocator.glibc = lambda: Recorded()
if sys.argv[1] == "command":
    from lincheck.__main__ import main

    sys.argv = ["lincheck", "verify", sys.argv[2], sys.argv[2], "--quiet"]  # two cases
    try:
        main()
    except SystemExit:
        pass
else:
    import pathlib

    import numpy as np

    a = {p.stem: np.load(p) for p in pathlib.Path(sys.argv[2]).glob("*.npy")}
    lincheck.check(a.pop("X"), a.pop("W"), a.pop("B"), a.pop("dY"), **a)
print(json.dumps([calls, allocator.applied()]))
"""


def test_the_lincheck_command_sets_malloc_thresholds_a_program_s_own_process_not(tmp_path, rng):
    """The ``lincheck`` command's process, started with glibc's dynamic thresholds, sets
    them (mmap 32 MiB, trim 64 MiB) for its first case and keeps them, untrimmed, for the
    next; a program that calls lincheck's API in its own process is left as it is. A
    worker of the local pool is lincheck's own too."""
    from lincheck import allocator

    if allocator.glibc() is None:
        pytest.skip("glibc's malloc only")
    _case(tmp_path / "c", rng)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.pop("GLIBC_TUNABLES", None)
    got = {}
    for how in ("command", "api"):
        done = subprocess.run(
            [sys.executable, "-c", OWN_PROCESS, how, str(tmp_path / "c")],
            capture_output=True, text=True, env=env, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        got[how] = json.loads(done.stdout.splitlines()[-1])
    assert got["command"] == [[[-3, 32 * MiB], [-1, 64 * MiB]], True]
    assert got["api"] == [[], False]

    calls = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(allocator, "_own", False)
        patch.setattr(signal, "signal", lambda *args: calls.append(args))
        batch.start_worker()
        assert allocator._own
    assert calls == [(signal.SIGINT, signal.SIG_IGN)]


@needs_dask
def test_a_dask_worker_reuses_a_case_s_large_arrays_and_is_put_back_after(model, cluster):
    """Dask starts its workers with MALLOC_TRIM_THRESHOLD_=65536, which fixes glibc's mmap
    threshold at 128 KiB: a block of 8 MiB is mapped afresh (glibc's IS_MMAPPED bit, in
    the size word before the block). While a case is checked, one of 1 MiB comes from the
    heap; right after it, for a next case, so does one of 4 MiB; once the worker has been
    idle for IDLE_SECONDS, 16 MiB (more than the case and these blocks left free in the
    heap, which glibc would reuse first) is mapped again. The case's record is the one
    this process gives."""
    from lincheck import allocator

    if allocator.glibc() is None:
        pytest.skip("glibc's malloc only")
    planted = str(model / "planted")
    task = next(t for t in batch.plan(sorted(model.iterdir()), OPTIONS) if t.name == planted)

    def probe(task, options):  # pickled by value: a worker runs it
        import ctypes

        from lincheck import allocator, checks

        libc = ctypes.CDLL(None)
        libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
        libc.free.argtypes = [ctypes.c_void_p]

        def mapped(size):
            block = libc.malloc(size)
            size = ctypes.c_size_t.from_address(block - ctypes.sizeof(ctypes.c_size_t)).value
            libc.free(block)
            return bool(size & 2)

        seen, real = [], checks.check

        def spy(*args, **kwargs):
            seen.append((allocator.applied(), mapped(MiB)))
            return real(*args, **kwargs)

        timer = allocator._timer  # a case of an earlier test, on this worker
        if timer is not None:
            timer.join(10)
        before = mapped(8 * MiB)
        checks.check = spy
        try:
            outcome = batch.check_case(task, options)
        finally:
            checks.check = real
        right_after = (allocator.applied(), mapped(4 * MiB))
        timer = allocator._timer
        if timer is not None:
            timer.join(10)
        return before, seen, [right_after, (allocator.applied(), mapped(16 * MiB))], outcome

    with distributed.Client(cluster) as client:
        before, seen, after, outcome = client.submit(probe, task, OPTIONS, pure=False).result()
    assert before, "Dask's workers no longer fix glibc's mmap threshold at 128 KiB"
    assert seen == [(True, False)]
    assert after == [(True, False), (False, True)]
    mine = batch.record(batch.Done(task, *batch.check_case(task, OPTIONS)))
    theirs = batch.record(batch.Done(task, *outcome))
    assert theirs["verdict"] == "fail" and _comparable({0: theirs}) == _comparable({0: mine})


# --- dumps at a URL (fsspec) -------------------------------------------------------------

try:
    import fsspec
except ImportError:  # fsspec is optional (Dask brings it)
    fsspec = None


@pytest.mark.skipif(fsspec is None, reason="fsspec is not installed")
def test_dumps_at_a_url_are_read_through_fsspec_like_files(tmp_path, model):
    """The model's cases copied to fsspec's in-memory filesystem (this process's own, so
    --jobs 1) give the records the files give; a truncated file there is bad input too."""
    assert fsspec is not None
    fs = fsspec.filesystem("memory")
    root = f"/lincheck-{tmp_path.name}"
    for path in model.rglob("*.npy"):
        fs.pipe(f"{root}/{path.relative_to(model).as_posix()}", path.read_bytes())
    url = f"memory://{root}"
    local, remote = tmp_path / "local.jsonl", tmp_path / "remote.jsonl"
    assert invoke("verify", model, "--jobs", 1, "--jsonl", local).exit_code == 1
    result = invoke("verify", url, "--jobs", 1, "--jsonl", remote)
    assert result.exit_code == 1, result.output
    records = _records(remote)
    assert sorted(records) == [f"memory://{root}/{n}" for n in ("a", "b", "junk", "planted")]
    mine = {k.rsplit("/", 1)[-1]: r for k, r in _comparable(_records(local)).items()}
    theirs = {k.rsplit("/", 1)[-1]: r for k, r in _comparable(records).items()}
    for name in mine:  # the same verdicts and reports (the sources name the URL)
        for r in (mine[name], theirs[name]):
            r.pop("case"), r.pop("fingerprint")
        assert theirs[name]["verdict"] == mine[name]["verdict"]
        assert theirs[name].get("report") == mine[name].get("report"), name
    assert all(r["fingerprint"] for r in records.values() if r["verdict"] != "bad input")
    tasks = batch.plan([f"{url}/{n}" for n in ("a", "b", "planted")], OPTIONS)
    assert [t.work for t in tasks] == [9 * 5 * 2, 6 * 4 * 3, 5 * 4 * 3]  # from the headers
    fs.pipe(f"{root}/a/X.npy", (model / "a" / "X.npy").read_bytes()[:150])
    cut = invoke("verify", f"{url}/a")
    assert cut.exit_code == 2 and "truncated" in cut.stderr and "Traceback" not in cut.output
    fs.rm(root, recursive=True)


def test_progress_shows_done_running_and_failed_on_a_terminal_only(monkeypatch):
    terminal = Console(file=io.StringIO(), force_terminal=True, width=120)
    monkeypatch.setattr(output, "stderr", terminal)
    bar = output.CaseProgress(total=5, done=1, workers=2)  # one case resumed
    try:
        bar.update(passed=False)
        bar.update(passed=True)
        bar.update(passed=True)  # 4 of 5 done: one left, so one running
        shown = io.StringIO()
        Console(file=shown, width=120, color_system=None).print(bar.bar.get_renderable())
        bar.update(passed=False, bad_input=True)  # counted apart, as the summary counts it
        last = io.StringIO()
        Console(file=last, width=120, color_system=None).print(bar.bar.get_renderable())
    finally:
        bar.close()
    assert "4/5" in shown.getvalue() and "running 1, failed 1" in shown.getvalue()
    assert "bad input" not in shown.getvalue()
    assert "running 0, failed 1, bad input 1" in last.getvalue()
    monkeypatch.setattr(output, "stderr", Console(file=io.StringIO()))  # not a terminal
    assert output.CaseProgress(total=5).bar is None
    assert output.CaseProgress(total=5, enabled=False).bar is None  # --quiet


@needs_dask
def test_the_readme_commands_run_as_written(tmp_path, rng, monkeypatch, cluster):
    """README's "Many cases" commands: local with --jsonl, --resume after it, a cluster
    (its address for tcp://scheduler:8786); the resumed run checks nothing again."""
    import re
    import shlex
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    text = readme[readme.index("### Many cases") :]
    block = re.search(r"```\n(.*?)```", text, re.S)
    assert block is not None
    commands = [shlex.split(line, comments=True) for line in block[1].splitlines()]
    assert [c[:2] for c in commands] == [["lincheck", "verify"]] * 3
    monkeypatch.chdir(tmp_path)
    _case(tmp_path / "dumps" / "a", rng)
    _case(tmp_path / "dumps" / "b", rng, bug="mean")
    first = runner.invoke(app, commands[0][1:])
    assert first.exit_code == 1, first.output
    checked, real = [], batch.check_case
    monkeypatch.setattr(batch, "check_case", lambda t, *a: checked.append(t) or real(t, *a))
    again = runner.invoke(app, commands[1][1:])
    assert again.exit_code == 1 and checked == [], again.output
    (tmp_path / "results.jsonl").unlink()
    address = [cluster.scheduler_address if a.startswith("tcp://") else a for a in commands[2]]
    on_cluster = runner.invoke(app, address[1:])
    assert on_cluster.exit_code == 1, on_cluster.output
    assert len(_records(tmp_path / "results.jsonl")) == 2


def test_the_terminal_shows_the_first_failure_in_full_and_the_others_briefly(tmp_path, rng):
    """Two failed cases: one set of worst entries (the first failure's, in full), both cases'
    failed rows and hints, and the summary naming both."""
    for name in ("a", "b", "c"):
        _case(tmp_path / name, rng, 6, 4, 3, bug=None if name == "a" else "mean")
    result = invoke("verify", tmp_path, "--jobs", 1)
    assert result.exit_code == 1
    out = result.stdout
    assert out.count("Worst entries") == 1
    first, second = out.index(f"{tmp_path / 'b'} ─"), out.index(f"{tmp_path / 'c'} ─")
    assert first < out.index("Worst entries") < second
    assert out.count("hint [") == 2 and out.index("hint [", second) > second
    assert f"2 of 3 cases failed: {tmp_path / 'b'}, {tmp_path / 'c'}" in out


def test_without_jobs_too_little_work_runs_in_the_command_s_own_process(tmp_path, rng):
    """Starting workers costs WORKER_START each: a folder of tiny cases runs in the command's
    process (every record's worker is its pid); workers start only when the nominal time
    saved, T·(1 − 1/c), exceeds that, and never more workers than cases."""
    for name in ("a", "b", "c"):
        _case(tmp_path / "cases" / name, rng)
    log = tmp_path / "run.jsonl"
    assert invoke("verify", tmp_path / "cases", "--jsonl", log).exit_code == 0
    assert {r["worker"] for r in _records(log).values()} == {f"pid {os.getpid()}"}

    def tasks(*seconds):
        return [batch.Task(str(i), "", seconds=s) for i, s in enumerate(seconds)]

    start = batch.WORKER_START
    assert batch.default_workers(tasks(0.25, 0.25), 2) == 1  # saves 0.25 at most: less
    assert batch.default_workers(tasks(0.35, 0.35), 2) == 2  # 0.35 > 0.3
    assert batch.default_workers(tasks(start * 0.76, start * 0.76), 4) == 1  # 1.52·(1 − ½)
    assert batch.default_workers(tasks(*[start] * 3), 8) == 3  # 0.9·(1 − ⅓) = 0.6 > 0.3
    assert batch.default_workers(tasks(100.0), 8) == 1  # one case: one process
    # A task's nominal seconds: its check's at the nominal rate, plus the case's own cost
    small, large = (batch.nominal_seconds(d, OPTIONS) for d in [(8, 5, 3), (4096, 1024, 1024)])
    assert batch.CASE_SECONDS < small < 1.01 * batch.CASE_SECONDS < batch.WORKER_START < large
    assert batch.nominal_seconds(None, OPTIONS) == batch.CASE_SECONDS


def test_a_mistyped_path_is_one_line_and_nothing_written(tmp_path, model):
    """A PATH that does not exist is the command's bad usage, with --jsonl or among other
    PATHs too: one line naming it, exit 2, no case run and no --jsonl file made."""
    log = tmp_path / "run.jsonl"
    for args in (["nosuch", "--jsonl", log], [model, "nosuch", "--jsonl", log], ["nosuch"]):
        result = invoke("verify", *[tmp_path / a if a == "nosuch" else a for a in args])
        assert result.exit_code == 2
        assert result.stderr == f"lincheck: error: {tmp_path / 'nosuch'}: no such file or folder\n"
        assert result.stdout == "" and not log.exists()
    # A PATH that is no case (one array's file) likewise, as it is said for one case alone.
    alone = invoke("verify", model / "b" / "X.npy")
    assert alone.exit_code == 2 and "expected a folder of .npy files" in alone.stderr
    for args in ([model / "b" / "X.npy", "--jsonl", log], [model, model / "b" / "X.npy"]):
        result = invoke("verify", *args)
        assert (result.exit_code, result.stderr, result.stdout) == (2, alone.stderr, "")
        assert not log.exists()
