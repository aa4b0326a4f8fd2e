"""Output targets: what lincheck refuses to write over, and writes that are all or nothing.

Device nodes, FIFOs and symlinks are made inside tmp_path; nothing under /dev is written.
"""

import errno
import os
import stat

import numpy as np
import pytest

from lincheck import InputError, arrays, writing


def _device(path):
    """A /dev/null-like character device made in the test's folder."""
    try:
        os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("making a device node needs CAP_MKNOD")
    return path


@pytest.fixture
def dump(tmp_path):
    folder = tmp_path / "dump"
    folder.mkdir()
    for name, shape in (("X", (4, 3)), ("W", (2, 3)), ("dY", (4, 2))):
        np.save(folder / f"{name}.npy", np.ones(shape))
    return folder


def _make(tmp_path, dump, kind):
    """The target for each case of test_check_output_refuses (a path in tmp_path)."""
    p = tmp_path / "out.json"
    if kind == "device":
        _device(p)
    elif kind == "link to device":
        p.symlink_to(_device(tmp_path / "null"))
    elif kind == "fifo":
        os.mkfifo(p)
    elif kind == "stdout link":
        p.symlink_to("/proc/self/fd/1")
    elif kind == "input":
        return dump / "X.npy"
    elif kind == "link to input":
        p.symlink_to(dump / "W.npy")
    elif kind == "folder":
        p.mkdir()
    elif kind == "loop":
        p.symlink_to(p.name)
    elif kind == "broken link":
        p.symlink_to("gone.json")
    elif kind == "no parent":
        return tmp_path / "nowhere" / "out.json"
    elif kind == "exists":
        p.write_text("old")
    return p


@pytest.mark.parametrize(
    "kind, message",
    [
        ("device", "not a regular file (a character device); not replaced; use - for stdout"),
        (
            "link to device",
            "not a regular file (a symlink to a character device); not replaced; use - for stdout",
        ),
        ("fifo", "not a regular file (a FIFO); not replaced; use - for stdout"),
        (
            "stdout link",
            "leads to /proc/self/fd/1, a stream of this process, not a file lincheck can "
            "replace; use - for stdout",
        ),
        ("input", "is the input file {dump}/X.npy; not replaced"),
        ("link to input", "is the input file {dump}/W.npy; not replaced"),
        ("folder", "is a folder; give a file name"),
        ("loop", "a symlink loop"),
        ("broken link", "a symlink to a missing file (gone.json); give the file itself"),
        ("no parent", "the folder {tmp}/nowhere does not exist"),
        ("exists", "already exists; not replaced (use --force)"),
    ],
)
def test_check_output_refuses(tmp_path, dump, kind, message):
    path = _make(tmp_path, dump, kind)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(InputError) as caught:
        writing.check_output(path, inputs=[dump], what="--json", dash_for_stdout=True)
    assert str(caught.value) == f"--json {path}: " + message.format(dump=dump, tmp=tmp_path)
    assert sorted(os.listdir(tmp_path)) == before


def test_check_output_on_dev_stdout_itself():
    """Only looked at (stat, readlink): /dev/stdout is a stream, whatever fd 1 is."""
    with pytest.raises(InputError, match=r"^--json /dev/stdout: leads to /proc/self/fd/1, a "):
        writing.check_output("/dev/stdout", what="--json", force=True, dash_for_stdout=True)
    writing.check_output("-", what="--json", dash_for_stdout=True)  # stdout itself: fine


def test_check_output_accepts(tmp_path, dump):
    target = tmp_path / "real.json"
    target.write_text("old")
    (tmp_path / "link.json").symlink_to(target)
    for path in (tmp_path / "new.json", target, tmp_path / "link.json"):
        writing.check_output(path, inputs=[dump], what="--json", force=True)
    writing.check_output(tmp_path / "a" / "b", inputs=[dump], what="--plot", folder=True)
    writing.check_output(dump, inputs=[dump], what="--plot", folder=True)  # next to the arrays


def test_check_output_plot_folders(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match=r"^--plot .*/file: exists and is not a folder$"):
        writing.check_output(tmp_path / "file", what="--plot", folder=True)
    with pytest.raises(InputError, match=r"^--plot .*/file/sub: cannot be used: Not a directory$"):
        writing.check_output(tmp_path / "file" / "sub", what="--plot", folder=True)


def test_check_output_unwritable_folder(tmp_path, monkeypatch):
    """As root every folder is writable; a denied access() stands in for chmod 555."""
    monkeypatch.setattr(writing.os, "access", lambda path, mode: False)
    with pytest.raises(InputError) as caught:
        writing.check_output(tmp_path / "r.json", what="--junit", force=True)
    assert str(caught.value) == (
        f"--junit {tmp_path}/r.json: cannot write in {tmp_path} (permission denied)"
    )


# --- the writers refuse the same things themselves ---------------------------------------


def test_write_text_never_replaces_a_device_a_fifo_or_an_input(tmp_path, dump):
    device = _device(tmp_path / "null")
    (tmp_path / "to-device.json").symlink_to(device)
    os.mkfifo(tmp_path / "pipe.json")
    for path, what in (
        (device, "a character device"),
        (tmp_path / "to-device.json", "a symlink to a character device"),
        (tmp_path / "pipe.json", "a FIFO"),
    ):
        with pytest.raises(InputError) as caught:
            writing.write_text(path, "{}")
        assert str(caught.value) == f"{path}: not a regular file ({what}); not replaced"
    assert stat.S_ISCHR(os.lstat(device).st_mode)
    assert stat.S_ISFIFO(os.lstat(tmp_path / "pipe.json").st_mode)
    arrays.load(dump)
    with pytest.raises(InputError, match=r"X\.npy: a file lincheck has read as an input; not "):
        writing.write_text(dump / "X.npy", "{}")
    assert np.array_equal(np.load(dump / "X.npy"), np.ones((4, 3)))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "dump",
        "null",
        "pipe.json",
        "to-device.json",
    ]


def test_write_text_through_a_symlink_replaces_the_file_it_points_to(tmp_path):
    (tmp_path / "runs").mkdir()
    real = tmp_path / "runs" / "report.json"
    real.write_text("old")
    (tmp_path / "latest.json").symlink_to(real)
    writing.write_text(tmp_path / "latest.json", "new")
    assert (tmp_path / "latest.json").is_symlink() and real.read_text() == "new"
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["report.json"]


def test_save_and_save_files_refuse_what_is_not_a_regular_file(tmp_path, dump):
    out = tmp_path / "out"
    out.mkdir()
    os.mkfifo(out / "X.npy")
    with pytest.raises(InputError) as caught:
        writing.save(out, {"W": np.ones(2), "X": np.ones(2)}, force=True)
    assert str(caught.value) == f"{out}/X.npy: not a regular file (a FIFO); not replaced"
    assert [p.name for p in out.iterdir()] == ["X.npy"] and stat.S_ISFIFO(
        os.lstat(out / "X.npy").st_mode
    )
    _device(out / "plot.png")
    with pytest.raises(InputError, match=r"plot\.png: not a regular file \(a character device\)"):
        writing.save_files(out, {"other.png": b"1", "plot.png": b"2"}, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["X.npy", "plot.png"]
    arrays.load(dump)
    with pytest.raises(InputError, match=r"X\.npy: a file lincheck has read as an input"):
        writing.save_files(dump, {"X.npy": b"plot"}, force=True)


# --- all or nothing -------------------------------------------------------------------------


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _fail_on_call(n, exc):
    """A stand-in for npy_format.write_array that writes, and fails on the n-th call."""
    calls = []
    real = np.lib.format.write_array

    def write(fp, array, allow_pickle=False):
        calls.append(1)
        if len(calls) == n:
            fp.write(b"\x93NUMPY partial")
            raise exc
        real(fp, array, allow_pickle=allow_pickle)

    return write


ARRAYS = {name: np.full(3, float(i)) for i, name in enumerate(["X", "W", "B", "dY", "dX"])}


@pytest.mark.parametrize("force", [False, True])
def test_a_full_disk_leaves_the_folder_as_it_was(tmp_path, monkeypatch, force):
    folder = tmp_path / "out"
    folder.mkdir()
    if force:
        writing.save(folder, {name: np.arange(2.0) for name in ARRAYS})
    before = _snapshot(folder)
    full = OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(writing.npy_format, "write_array", _fail_on_call(4, full))
    with pytest.raises(InputError) as caught:
        writing.save(folder, ARRAYS, force=force)
    assert str(caught.value) == (
        f"{folder}/dY.npy: cannot write: No space left on device; nothing was written"
    )
    assert _snapshot(folder) == before  # no new file, every old one whole


@pytest.mark.parametrize("force", [False, True])
def test_a_failure_while_naming_takes_every_name_back(tmp_path, monkeypatch, force):
    folder = tmp_path / "out"
    folder.mkdir()
    if force:
        writing.save(folder, {name: np.arange(2.0) for name in ARRAYS})
    before = _snapshot(folder)
    calls = []
    real_link, real_replace = writing._link_open_file, os.replace

    def flaky(real):
        def name(*args, **kwargs):
            calls.append(args)
            if len(calls) == 3:
                raise OSError(errno.EIO, "Input/output error")
            return real(*args, **kwargs)

        return name

    if force:
        monkeypatch.setattr(writing.os, "replace", flaky(real_replace))
    else:
        monkeypatch.setattr(writing, "_link_open_file", flaky(real_link))
    with pytest.raises(InputError, match=r"B\.npy: cannot write: Input/output error; nothing"):
        writing.save(folder, ARRAYS, force=force)
    monkeypatch.undo()
    assert _snapshot(folder) == before


def test_force_removes_a_differently_cased_twin_only_when_all_is_written(tmp_path, monkeypatch):
    folder = tmp_path / "out"
    folder.mkdir()
    np.save(folder / "x.npy", np.ones(2))
    full = OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(writing.npy_format, "write_array", _fail_on_call(2, full))
    with pytest.raises(InputError):
        writing.save(folder, {"X": np.zeros(2), "W": np.zeros(2)}, force=True)
    assert [p.name for p in folder.iterdir()] == ["x.npy"]
    monkeypatch.undo()
    writing.save(folder, {"X": np.zeros(2), "W": np.zeros(2)}, force=True)
    assert sorted(p.name for p in folder.iterdir()) == ["W.npy", "X.npy"]


# --- through the command line: every target is checked before any work ----------

from typer.testing import CliRunner  # noqa: E402

from lincheck.cli import app  # noqa: E402

runner = CliRunner()


def _tree(folder):
    return {
        p: (p.is_symlink(), p.lstat().st_mode, p.read_bytes() if p.is_file() else None)
        for p in sorted(folder.rglob("*"))
    }


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--json", "{t}/ok.json", "--junit", "{t}/afolder"],
            "--junit {t}/afolder: is a folder; give a file name",
        ),
        (["--json", "{t}/afolder"], "--json {t}/afolder: is a folder; give a file name"),
        (
            ["--json", "{t}/dump/X.npy"],
            "--json {t}/dump/X.npy: is the input file {t}/dump/X.npy; not replaced",
        ),
        (
            ["--junit", "{t}/null"],
            "--junit {t}/null: not a regular file (a character device); not replaced",
        ),
        (
            ["--json", "{t}/to-null"],
            "--json {t}/to-null: not a regular file (a symlink to a character device); "
            "not replaced; use - for stdout",
        ),
        (
            ["--json", "{t}/to-stdout"],
            "--json {t}/to-stdout: leads to /proc/self/fd/1, a stream of this process, "
            "not a file lincheck can replace; use - for stdout",
        ),
        (["--plot", "{t}/ok.json.txt"], "--plot {t}/ok.json.txt: exists and is not a folder"),
    ],
)
def test_verify_refuses_a_bad_target_before_any_work_and_writes_nothing(
    tmp_path, dump, args, message
):
    (tmp_path / "afolder").mkdir()
    (tmp_path / "ok.json.txt").write_text("keep")
    _device(tmp_path / "null")
    (tmp_path / "to-null").symlink_to(tmp_path / "null")
    (tmp_path / "to-stdout").symlink_to("/proc/self/fd/1")
    before = _tree(tmp_path)
    argv = ["verify", str(dump), *(a.format(t=tmp_path) for a in args)]
    result = runner.invoke(app, argv)
    assert result.exit_code == 2, result.output
    assert result.stdout == ""  # no tables, no PASS: nothing ran
    assert result.stderr == f"lincheck: error: {message.format(t=tmp_path)}\n"
    assert _tree(tmp_path) == before


def test_run_refuses_a_bad_save_or_plot_target_before_any_work(tmp_path):
    (tmp_path / "file").write_text("keep")
    for option in ("--save", "--plot"):
        result = runner.invoke(
            app, ["run", "--n", "4", "--din", "3", "--dout", "2", option, str(tmp_path / "file")]
        )
        assert result.exit_code == 2 and result.stdout == ""
        assert (
            result.stderr
            == f"lincheck: error: {option} {tmp_path / 'file'}: exists and is not a folder\n"
        )
    assert (tmp_path / "file").read_text() == "keep"


def test_one_file_for_two_reports_is_refused(tmp_path, dump):
    same = tmp_path / "same.out"
    result = runner.invoke(app, ["verify", str(dump), "--json", str(same), "--junit", str(same)])
    assert result.exit_code == 2 and result.stdout == "" and not same.exists()
    assert result.stderr == f"lincheck: error: --json and --junit name one file, {same}; give two\n"


@pytest.mark.parametrize("name", ["x.npy", "Y.npy", "dw.npy"])
def test_a_report_named_like_an_array_beside_a_dump_is_refused(tmp_path, dump, name):
    """verify would read it as that array next time (or refuse two sources for one)."""
    target = dump / name
    result = runner.invoke(app, ["verify", str(dump), "--json", str(target)])
    assert result.exit_code == 2 and not target.exists(), result.output
    assert result.stderr == (
        f"lincheck: error: --json {target}: would be read as an array of the dump in {dump}; "
        "name the report otherwise\n"
    )
    saved = tmp_path / "saved"
    result = runner.invoke(
        app,
        [
            "run",
            "--n",
            "4",
            "--din",
            "3",
            "--dout",
            "2",
            "--save",
            str(saved),
            "--junit",
            str(saved / "X.npy"),
        ],
    )
    assert result.exit_code == 2 and not saved.exists(), result.output


def test_every_path_into_proc_is_a_stream_not_a_file():
    import threading

    for path in (
        f"/proc/self/task/{threading.get_native_id()}/fd/1",
        f"/proc/{os.getpid()}/fd/1",
    ):
        with pytest.raises(InputError, match="is a stream, not a file lincheck can replace"):
            writing.check_output(path, what="--json", force=True, dash_for_stdout=True)


def test_save_failures_into_a_folder_of_saved_cases_is_refused_before_work(tmp_path):
    module = tmp_path / "wrongmod.py"
    module.write_text(
        "def f(X, W, B, dY):\n"
        "    X2 = X.reshape(-1, X.shape[-1]); G = dY.reshape(-1, dY.shape[-1])\n"
        "    return dY @ W, 2 * G.T @ X2, None if B is None else G.sum(0)\n"
    )
    saved = tmp_path / "failures"
    args = ["run", "--impl", "wrongmod:f", "--n", "4", "--din", "3", "--dout", "2"]
    args += ["--dtype", "float64", "--save-failures", str(saved)]
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        first = runner.invoke(app, args)
        assert first.exit_code == 1, first.output
        before = _tree(saved)
        again = runner.invoke(app, [*args, "--json", str(tmp_path / "r.json")])
    finally:
        os.chdir(cwd)
    assert again.exit_code == 2 and again.stdout == "", again.output
    assert again.stderr.startswith(f"lincheck: error: --save-failures {saved}: already holds")
    assert _tree(saved) == before and not (tmp_path / "r.json").exists()


def test_cases_whose_names_clean_to_one_folder_get_a_plot_folder_each(tmp_path, rng):
    model = tmp_path / "model"
    for name in ("a b", "a_b"):
        folder = model / name
        folder.mkdir(parents=True)
        X, W, G = (
            rng.standard_normal((5, 3)),
            rng.standard_normal((2, 3)),
            rng.standard_normal((5, 2)),
        )
        for key, a in {"X": X, "W": W, "dY": G, "dW": 2 * G.T @ X}.items():
            np.save(folder / f"{key}.npy", a)
    plots = tmp_path / "plots"
    result = runner.invoke(app, ["verify", str(model), "--jobs", "1", "--plot", str(plots)])
    assert result.exit_code == 1, result.output
    folders = sorted(p.name for p in plots.iterdir())
    assert len(folders) == 2 and len(set(folders)) == 2
    for f in folders:
        assert (plots / f / "dW-reference-heatmap.png").exists()
