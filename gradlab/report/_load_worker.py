"""A worker process for :func:`gradlab.report.load.load_runs`: loads some runs, pickles them.

``python -m gradlab.report._load_worker JOB RESULT``: ``JOB`` is a pickle of ``(paths, metrics,
max_points)``; ``RESULT`` receives a pickle of one :class:`~gradlab.report.load.LoadedRun` or
skip reason per path. A module of its own (not ``load`` run as ``__main__``) so that what it
pickles names ``gradlab.report.load``'s classes, and a fresh interpreter rather than a
``multiprocessing`` fork or spawn: no copied locks of Arrow's threads, and no re-import of the
caller's script.
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path


def main(job: Path, result: Path) -> None:
    from gradlab.report.load import _load_or_reason

    paths, metrics, max_points = pickle.loads(job.read_bytes())
    out = [_load_or_reason(p, metrics, max_points) for p in paths]
    tmp = result.with_name(result.name + ".tmp")
    tmp.write_bytes(pickle.dumps(out, protocol=pickle.HIGHEST_PROTOCOL))
    tmp.replace(result)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
