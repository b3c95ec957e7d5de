"""`python -m smapctl`: the `smapctl` program."""

import sys

if __name__ == "__main__":
    # A process multiprocessing's `spawn` starts (a DataLoader worker, on macOS and Windows) imports the
    # program's main module before it takes its work, so smapctl.cli sets it up (SIGINT and SIGTERM
    # ignored while it imports torch; the command's log format). It skips a package's `__main__` named by
    # its module: named by its file instead, this one runs there as `__mp_main__`, importing smapctl.cli
    # and, below the guard, running no command.
    sys.modules["__main__"].__spec__ = None
    from smapctl.cli import entry

    try:
        entry()
    finally:
        # CPython marks a KeyboardInterrupt that ended an exec() of a string (a dataclass being made as a
        # module is imported), caught or not, and under `-m` the mark left by the last one would kill the
        # process with SIGINT (130) instead of its status: a SIGTERM in a command's first seconds would say
        # "stopped by SIGTERM" and exit 130. An exec of a string clears the mark.
        exec("")
else:
    import smapctl.cli  # noqa: F401  (a spawned worker's set-up, as `__mp_main__`)
