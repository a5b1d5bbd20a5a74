"""The ``sfoptim`` console command."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def main(argv=None) -> int:
    """Dispatch ``sfoptim <command> ...``; returns the process exit status."""
    from sfoptim import __version__

    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="sfoptim", description="Schedule-free optimizers for PyTorch.")
    p.add_argument("--version", action="version", version=f"sfoptim {__version__}")
    sub = p.add_subparsers(dest="command", metavar="command")
    sub.add_parser("demo", add_help=False,
                   help="one schedule-free run vs schedules tuned per stopping time (see 'sfoptim demo --help')")
    if not argv:
        p.print_help()
        return 2
    if argv[0] != "demo":
        p.parse_args(argv)  # prints the version, usage or help and exits
        return 2
    # The subcommand owns its options; it is imported only when used so that
    # `sfoptim --help` stays fast and needs nothing beyond the core package.
    from sfoptim import demo

    return demo.main(argv[1:])


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
