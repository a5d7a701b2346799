"""The ``mimia`` command: ``mimia verify results/<experiment>``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mimia", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    verify = sub.add_parser(
        "verify",
        help="re-hash an experiment's inputs against the hashes its results recorded",
        description="Re-hash the manifest, shards, checkpoints and error tables of an "
        "experiment against the SHA-256s recorded in its results' metadata. Exit status: 0 "
        "all match, 1 a mismatch, 2 a missing or unreadable artifact.",
    )
    verify.add_argument("experiment", help="the experiment's results folder, e.g. results/tiny")
    verify.add_argument(
        "--root",
        default=None,
        help="folder the recorded paths are relative to (the workflow's working directory; "
        "default: the current directory, then the experiment folder's grandparent)",
    )
    args = parser.parse_args(argv)
    from mimia.verify import verify as run_verify

    status, lines = run_verify(args.experiment, args.root)
    print("\n".join(lines))
    return status


if __name__ == "__main__":
    sys.exit(main())
