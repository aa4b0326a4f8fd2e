"""``python -m lincheck`` and the ``lincheck`` command.

Ctrl-C is one line and exit 130 from the very start: while the command's own
modules import (Typer, Rich; NumPy for a check) as well as during the work.
"""


def main() -> None:
    import os
    import signal
    import sys

    def interrupted(signum, frame) -> None:  # until lincheck.cli installs its own handler
        sys.stderr.write("lincheck: interrupted\n")
        sys.stderr.flush()
        os._exit(130)

    signal.signal(signal.SIGINT, interrupted)
    from .cli import main as run

    run()


if __name__ == "__main__":
    main()
