"""Connecting to a dask cluster, one way for every scale-out entry (``predict_files``, ``fit_distributed``,
``build_crossmatch``): :func:`open_client`. Imports nothing of the package but its errors, so the data layer's
build and the entry points share it."""
from __future__ import annotations

from typing import Any, Callable

from .errors import BackendUnavailableError, InvalidInputError

__all__ = ["open_client"]

_INSTALL_HINT = "pip install 'cannon_bridge[distributed]'"


def _import_distributed():
    try:
        import distributed
    except ImportError as exc:
        raise BackendUnavailableError(
            f"a dask cluster was requested but dask.distributed cannot be imported ({exc}): install the "
            f"'distributed' extra ({_INSTALL_HINT}), or pass client=False to run in this process"
        ) from None
    return distributed


def open_client(client) -> tuple[Any, Callable[[], None]]:
    """(client or None for in-process, close function) from a ``client`` argument as :func:`predict_files`
    takes it (None or "local", False or "sync", a scheduler address, a Client or a cluster object)."""
    if client is False or (isinstance(client, str) and client in ("sync", "synchronous")):
        return None, lambda: None
    if client is None or (isinstance(client, str) and client == "local"):
        distributed = _import_distributed()
        # processes, one thread each: the test step holds the GIL in its Python loops. The scheduler's
        # HTTP server binds a port even without a dashboard, 8787 by default; ":0" picks a free one, so a
        # second cluster on this machine neither fails nor warns
        cluster = distributed.LocalCluster(processes=True, threads_per_worker=1, dashboard_address=":0")
        own = distributed.Client(cluster)

        def close():
            own.close()
            cluster.close()

        return own, close
    if isinstance(client, str):
        distributed = _import_distributed()
        own = distributed.Client(client)
        return own, own.close
    distributed = _import_distributed()
    if isinstance(client, distributed.Client):
        return client, lambda: None  # the caller's client: the caller closes it
    if hasattr(client, "scheduler_address"):  # a cluster object (LocalCluster, ...)
        own = distributed.Client(client)
        return own, own.close
    raise InvalidInputError(
        f"client must be None or 'local' (start a LocalCluster), False or 'sync' (run in this process), "
        f"a scheduler address string, a dask.distributed Client or a cluster object; got {type(client).__name__}"
    )
