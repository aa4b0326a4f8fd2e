"""The README's terminal sessions, run for real: checked against the program, or rewritten.

A session is a code block preceded by a marker comment::

    <!-- output keep=1:17,-3:
    $ a hidden setup command (run first, not shown)
    -->
    ```
    $ lincheck run --n 32 --din 64 --dout 16 --dtype float32
    ...the output...
    ```

Its ``$`` lines are run in order by bash in a fresh folder (stdout and stderr
together, as a terminal shows them; 80 columns, no colour, not a terminal),
each followed by what it printed. ``keep`` chooses the lines of that
transcript the README shows (default all; see :func:`_ranges`: ``1:17`` is
lines 1 to 17, ``-3:`` the last three, ``/^hint/:+1`` the first line
starting "hint" and the next); a ``...`` line stands for each gap. Anchor
ranges on text (``/regex/``, no spaces) where the lines before may grow.

``python -m tests.readme`` (from the repository's root) says which sessions
differ from the program, with a diff; ``python -m tests.readme --update``
rewrites them in README.md. ``tests/test_readme.py`` runs the check.

Numbers: the figures of a check are rounding noise that moves with the BLAS
library and its thread count, so the comparison is of words and structure,
integers exactly, values printed with 4 or more significant digits to within
1e-4 relative (they are inputs and gradients, stable to far better than
that), and numbers of fewer digits (errors, ratios, tolerances) only as
numbers. The update mode writes this machine's figures.
"""

from __future__ import annotations

import difflib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
GAP = "..."
MARK = "@@lincheck-readme@@"
_SESSION = re.compile(
    r"<!-- output(?P<options>[^\n]*?)(?: -->|\n(?P<setup>(?:\$ [^\n]*\n)*)-->)\n"
    r"```\n(?P<body>.*?)```\n",
    re.S,
)
_NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:e[-+]?\d+)?(?![\w.])")


@dataclass
class Session:
    start: int  # offsets of the block's body in the README
    end: int
    keep: str
    setup: list[str]
    commands: list[str]
    shown: str  # the body as the README has it

    @property
    def title(self) -> str:
        return self.commands[-1] if self.commands else "(no command)"


def sessions(text: str) -> list[Session]:
    found = []
    for match in _SESSION.finditer(text):
        options = dict(re.findall(r"(\w+)=(\S+)", match["options"]))
        setup = [line[2:] for line in (match["setup"] or "").splitlines() if line.startswith("$ ")]
        body = match["body"]
        commands = [line[2:] for line in body.splitlines() if line.startswith("$ ")]
        found.append(
            Session(
                match.start("body"),
                match.end("body"),
                options.get("keep", ""),
                setup,
                commands,
                body,
            )
        )
    return found


def _environment(folder: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("GITHUB_ACTIONS", "FORCE_COLOR", "PY_COLORS", "TERMINAL_WIDTH")
    }
    bin_dir = str(Path(sys.executable).parent)
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        COLUMNS="80",
        NO_COLOR="1",
        OPENBLAS_NUM_THREADS="1",
        PYTHONDONTWRITEBYTECODE="1",
        HOME=str(folder),
    )
    return env


def transcript(session: Session) -> list[str]:
    """Run a session's commands; each ``$`` line followed by its output."""
    with tempfile.TemporaryDirectory() as folder:
        script = ["exec 2>&1"]
        script += [f"{command} >/dev/null" for command in session.setup]
        script.append("__rc=0")
        for command in session.commands:  # $? as the previous command left it
            script += [f"echo '{MARK}'", "(exit $__rc)", command, "__rc=$?", f"echo '{MARK}'"]
        done = subprocess.run(
            ["bash", "-c", "\n".join(script)],
            cwd=folder,
            env=_environment(Path(folder)),
            capture_output=True,
            text=True,
            timeout=300,
        )
    parts = done.stdout.split(MARK + "\n")
    outputs = parts[1::2]
    lines = []
    for command, output in zip(session.commands, outputs):
        lines.append(f"$ {command}")
        lines += [line.rstrip() for line in output.splitlines()]
    return lines


def _ranges(keep: str, lines: list[str]) -> list[tuple[int, int]]:
    """``keep`` as slices of ``lines``: comma-separated ``start:end`` ranges, 1-based and
    inclusive. An endpoint is a line number (negative: from the end, -1 the last line),
    ``/regex/`` (the first line that matches after the range before, or for ``end``
    from the range's start), or for ``end``,
    ``+N`` (N lines after the start); an empty start is the first line, an empty end the
    last. ``1:21,-3:`` keeps lines 1 to 21 and the last three. (No comma or space in a
    regex: ``.`` stands for either.)"""
    count = len(lines)
    if not keep:
        return [(0, count)]

    def line(at: str, default: int, after: int = 0) -> int:  # 0-based index
        if not at:
            return default
        if at.startswith("/"):
            pattern = re.compile(at.strip("/"))
            for i in range(after, count):
                if pattern.search(lines[i]):
                    return i
            raise ValueError(f"keep: no line matches {at}")
        n = int(at)
        return count + n if n < 0 else n - 1

    chosen: list[tuple[int, int]] = []
    for part in keep.split(","):
        first, _, last = part.partition(":")
        start = line(first, 0, chosen[-1][1] if chosen else 0)  # a regex: after the last
        end = start + int(last) if last.startswith("+") else line(last, count - 1, start)
        if chosen and start < chosen[-1][1]:
            raise ValueError(f"keep: {part} starts before the range ahead of it ends")
        chosen.append((start, min(count, end + 1)))
    return chosen


def shown(session: Session, lines: list[str]) -> str:
    """The transcript's kept lines, with a ``...`` line for each gap."""
    out: list[str] = []
    position = 0
    for a, b in _ranges(session.keep, lines):
        if a > position:
            out.append(GAP)
        out += lines[a:b]
        position = b
    if position < len(lines):
        out.append(GAP)
    return "\n".join(out) + "\n"


def _significant(token: str) -> int:
    digits = token.lower().split("e")[0].lstrip("+-").replace(".", "").lstrip("0")
    return len(digits)


def _same_line(want: str, got: str) -> bool:
    if _NUMBER.sub("#", want) != _NUMBER.sub("#", got):
        return False
    for a, b in zip(_NUMBER.findall(want), _NUMBER.findall(got)):
        if not any(c in a for c in ".e") and not any(c in b for c in ".e"):
            if a != b:
                return False
        elif min(_significant(a), _significant(b)) >= 4:
            if abs(float(a) - float(b)) > 1e-4 * max(abs(float(a)), abs(float(b))):
                return False
    return True


def differences(session: Session, lines: list[str]) -> list[str]:
    """What differs between the README's block and the program's (empty if nothing)."""
    want, got = session.shown.splitlines(), shown(session, lines).splitlines()
    if len(want) == len(got) and all(_same_line(a, b) for a, b in zip(want, got)):
        return []
    return list(difflib.unified_diff(want, got, "README.md", "the program", lineterm=""))


def main(argv: list[str]) -> int:
    update = "--update" in argv
    if shutil.which("bash") is None:
        print("bash is needed to run the README's sessions", file=sys.stderr)
        return 2
    text = README.read_text()
    found = sessions(text)
    changed = 0
    for session in reversed(found):  # from the end: offsets before stay valid
        lines = transcript(session)
        diff = differences(session, lines)
        if not diff:
            continue
        changed += 1
        if update:
            text = text[: session.start] + shown(session, lines) + text[session.end :]
        else:
            print("\n".join(diff))
    if update and changed:  # atomically: a new file renamed over the old
        temporary = README.with_name(README.name + ".new")
        temporary.write_text(text)
        os.replace(temporary, README)
    verb = "rewrote" if update else "differ"
    print(f"{len(found)} README sessions; {changed} {verb}", file=sys.stderr)
    return 1 if changed and not update else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
