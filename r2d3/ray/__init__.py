"""The Ray seam: the only package in r2d3 that imports Ray (Train for alignment; Data/Tune build on it).

A Ray that an r2d3 job starts for itself on one machine listens on 127.0.0.1 only. Ray on Linux binds
its gRPC servers (GCS, raylets, workers), dashboard agent and metrics ports to every interface, and
``--node-ip-address=127.0.0.1`` is rewritten to the machine's address; its single-machine mode (the
default on macOS and Windows, ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``) binds them to loopback. The
switch is read when Ray is imported, so it is set here, before this package imports Ray, and only when
the job will start its own Ray: not when it joins a cluster (``RAY_ADDRESS`` set, as ``ray job submit``
does, or a cluster started on this machine with ``ray start``), nor when Ray was imported already.
Set ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1`` to keep Ray's default.
"""

import os as _os
import sys as _sys
import tempfile as _tempfile
from pathlib import Path as _Path

LOCAL_ONLY_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def _joins_a_cluster() -> bool:
    if _os.environ.get("RAY_ADDRESS"):
        return True
    temp = _Path(_os.environ.get("RAY_TMPDIR") or _tempfile.gettempdir()) / "ray"
    return (temp / "ray_current_cluster").exists()  # written by `ray start`, removed by `ray stop`


if "ray" not in _sys.modules and not _joins_a_cluster():
    _os.environ.setdefault(LOCAL_ONLY_SWITCH, "0")
