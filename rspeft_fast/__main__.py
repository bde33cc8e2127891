"""Command line: ``python -m rspeft_fast train ...`` (classification fine-tuning), ``python -m rspeft_fast retrieval ...``
(image-text retrieval fine-tuning / evaluation), ``python -m rspeft_fast compare ...`` (several methods, one table)
and ``python -m rspeft_fast bench ...``."""
from __future__ import annotations

import sys
import warnings


def _cli_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings of a command-line run as one line for the user (``warning: ...``), never a line of our source."""
    return f"warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    warnings.formatwarning = _cli_warning
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = ("usage: python -m rspeft_fast {train,retrieval,segment,change,compare,bench} [options]   "
             "(see `python -m rspeft_fast train --help`, `... retrieval --help`)")
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "train":
        from .train.cli import main as train_main

        return int(train_main(rest) or 0)
    if cmd == "retrieval":
        from .retrieval.job import main as retrieval_main

        return int(retrieval_main(rest) or 0)
    if cmd in ("segment", "change"):
        from .dense import job

        return int((job.main_segment if cmd == "segment" else job.main_change)(rest) or 0)
    if cmd == "compare":
        from .train.compare import main as compare_main

        return int(compare_main(rest) or 0)
    if cmd == "bench":
        from .bench.cli import main as bench_main

        return int(bench_main(rest) or 0)
    print(f"unknown command {cmd!r}\n{usage}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
