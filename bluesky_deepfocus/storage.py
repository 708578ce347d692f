"""Where runs are stored: an embedded Tiled catalog of Bluesky runs, or a facility server.

``open_catalog()`` gives a Tiled client of Bluesky runs (``CatalogOfBlueskyRuns``) either

- **embedded** (default): a Tiled SQL catalog on SQLite served in-process, no server
  process, in a per-user data folder (``platformdirs.user_data_dir("bluesky-deepfocus")``,
  or the folder named by the argument or by ``$BLUESKY_DEEPFOCUS_CATALOG``). One process at
  a time may open it for writing (an exclusive lock); any number may read.
- **facility**: ``open_catalog("https://tiled.example.org/api/v1/...")`` connects to a
  ``tiled serve config`` server (see ``deploy/tiled-postgres.yml``) with the API key from
  ``$TILED_API_KEY``.

``CatalogWriter`` is the RunEngine callback that stores runs. It journals every document
to a local write-ahead journal before handing it to ``bluesky_tiled_plugins.TiledWriter``
(which batches events until the stop document), so that nothing measured is lost when the
process dies or the server is unreachable: incomplete journals are replayed into the
catalog by the next writable ``open_catalog`` and by :func:`deliver_pending`.

Folder layout of an embedded catalog::

    bluesky-deepfocus-catalog.json   marker (format version)
    catalog.db                       Tiled catalog (SQLite, WAL mode)
    tables.db                        event tables (SQLite, WAL mode)
    data/                            arrays (zarr), e.g. images
    journal/                         write-ahead journals of runs not yet safely stored
    writer.lock                      holds the PID of the writing process

Examples
--------
>>> import tempfile
>>> from bluesky import RunEngine
>>> from bluesky.plans import count
>>> from ophyd.sim import det
>>> tmp = tempfile.TemporaryDirectory()
>>> catalog = open_catalog(f"{tmp.name}/catalog")
>>> RE = RunEngine({})
>>> writer = subscribe_writer(RE, catalog)
>>> (uid,) = RE(count([det], 3))
>>> catalog[uid]["primary"].read()["det"].values.tolist()
[1.0, 1.0, 1.0]

The same catalog through the databroker 1.x API (needs ``databroker[back-compat]``):

>>> import databroker
>>> db = databroker.Broker(catalog)  # or catalog.v1
>>> db[uid].table()["det"].tolist()
[1.0, 1.0, 1.0]
>>> close_catalog(catalog)
>>> tmp.cleanup()
"""

from __future__ import annotations

import contextlib
import copy
import errno
import fcntl
import functools
import hashlib
import json
import logging
import math
import os
import queue
import re
import sqlite3
import threading
import time
import uuid
import warnings
import weakref
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import numpy as np

from ._journal import (
    JOURNAL_SUFFIX,
    JournalFile,
    is_journal_locked,
    journal_path,
    read_journal,
)
from .errors import CatalogError, DeepFocusWarning
from .schema import RESULT_STREAM, SUMMARY_KEY, AutofocusSummary

if TYPE_CHECKING:
    from bluesky_tiled_plugins import CatalogOfBlueskyRuns

__all__ = [
    "API_KEY_ENV",
    "CATALOG_ENV",
    "SPOOL_ENV",
    "CatalogWriter",
    "catalog_folder",
    "close_catalog",
    "default_catalog_location",
    "deliver_pending",
    "open_catalog",
    "pending_journals",
    "subscribe_writer",
    "summary_from_result",
]

logger = logging.getLogger(__name__)

CATALOG_ENV = "BLUESKY_DEEPFOCUS_CATALOG"
"""Environment variable naming the catalog folder (or a Tiled server URL)."""
SPOOL_ENV = "BLUESKY_DEEPFOCUS_SPOOL"
"""Environment variable naming the local spool folder for runs bound to a Tiled server."""
API_KEY_ENV = "TILED_API_KEY"
"""Environment variable holding the API key of the facility Tiled server."""

APP_NAME = "bluesky-deepfocus"
MARKER_NAME = "bluesky-deepfocus-catalog.json"
CATALOG_DB = "catalog.db"
TABLES_DB = "tables.db"
DATA_DIR = "data"
JOURNAL_DIR = "journal"
LOCK_NAME = "writer.lock"
FORMAT_VERSION = 1
ROOT_SPECS = [{"name": "CatalogOfBlueskyRuns", "version": "3.0"}]
RECOVERED_REASON = (
    "recovered from the write-ahead journal after the writing process died or could not "
    "reach the catalog; the stop document was synthesized by bluesky-deepfocus"
)


# --------------------------------------------------------------------------------------
# Locations
# --------------------------------------------------------------------------------------


def default_catalog_location() -> str:
    """Where :func:`open_catalog` looks without an argument.

    ``$BLUESKY_DEEPFOCUS_CATALOG`` if set (a folder or a Tiled server URL), else the folder
    ``catalog`` in ``platformdirs.user_data_dir("bluesky-deepfocus")``.
    """
    env = os.environ.get(CATALOG_ENV, "").strip()
    if env:
        return env
    import platformdirs

    return str(Path(platformdirs.user_data_dir(APP_NAME)) / "catalog")


def _is_url(location: str | os.PathLike[str]) -> bool:
    return isinstance(location, str) and location.startswith(("http://", "https://"))


def _spool_root() -> Path:
    env = os.environ.get(SPOOL_ENV, "").strip()
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir(APP_NAME)) / "spool"


def _spool_dir_for_url(url: str) -> Path:
    """Local spool folder of runs bound for the server node at ``url``."""
    normalized = url.rstrip("/")
    parsed = urlparse(normalized)
    slug = re.sub(r"[^A-Za-z0-9.-]+", "_", f"{parsed.hostname}_{parsed.port or ''}")
    digest = hashlib.sha256(normalized.encode()).hexdigest()[:12]
    return _spool_root() / f"{slug}-{digest}"


# --------------------------------------------------------------------------------------
# Bookkeeping of the catalogs this process opened
# --------------------------------------------------------------------------------------


@dataclass
class _CatalogInfo:
    """What this module knows about a client it created (keyed by its Tiled Context)."""

    location: str
    journal_dir: Path
    folder: Path | None = None  # embedded catalogs only
    writable: bool = True
    closed: list[bool] = field(default_factory=lambda: [False])


_INFO: weakref.WeakKeyDictionary[Any, _CatalogInfo] = weakref.WeakKeyDictionary()
_LOCKS: dict[Path, list[int]] = {}  # folder -> [fd, refcount]
_LOCKS_GUARD = threading.Lock()


def _info(catalog: Any) -> _CatalogInfo | None:
    return _INFO.get(getattr(catalog, "context", None))


def _journal_dir_for(catalog: Any) -> Path:
    info = _info(catalog)
    if info is not None:
        return info.journal_dir
    return _spool_dir_for_url(str(catalog.uri))


def _acquire_writer_lock(folder: Path) -> None:
    """Take (or share, within this process) the exclusive writer lock of ``folder``."""
    key = folder.resolve()
    with _LOCKS_GUARD:
        held = _LOCKS.get(key)
        if held is not None:
            held[1] += 1
            return
        path = key / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise CatalogError(
                f"The catalog {str(folder)!r} is already open for writing by process "
                f"{holder} (lock file {str(path)!r}); only one process may write to an "
                f"embedded catalog. Open it read-only with "
                f"open_catalog({str(folder)!r}, writable=False), or stop process {holder} "
                "first."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _LOCKS[key] = [fd, 1]


def _release_writer_lock(folder: Path) -> None:
    key = folder.resolve()
    with _LOCKS_GUARD:
        held = _LOCKS.get(key)
        if held is None:
            return
        held[1] -= 1
        if held[1] <= 0:
            with contextlib.suppress(OSError):
                os.ftruncate(held[0], 0)
            os.close(held[0])
            del _LOCKS[key]


# --------------------------------------------------------------------------------------
# Embedded catalog: checks, creation, opening
# --------------------------------------------------------------------------------------


def _check_local_location(folder: Path, *, writable: bool, source: str) -> bool:
    """Validate ``folder``; return whether a new catalog must be created there.

    ``source`` says where the location came from: ``"argument"``, ``"env"`` (then the
    parent must exist, as for an argument) or ``"default"`` (parents are created).
    """
    how = {"argument": "open_catalog()", "env": f"${CATALOG_ENV}"}.get(source, "")
    if folder.exists() and not folder.is_dir():
        raise CatalogError(
            f"The catalog location {str(folder)!r} is a file, not a catalog folder. Give "
            "the folder that holds an existing catalog (the one with "
            f"{MARKER_NAME!r}), or a new or empty folder to create one."
        )
    if folder.is_dir():
        if (folder / MARKER_NAME).is_file():
            _check_marker(folder)
            return False
        # A lone lock file is what an interrupted creation leaves behind.
        entries = sorted(p.name for p in folder.iterdir() if p.name != LOCK_NAME)
        if entries:
            shown = ", ".join(repr(e) for e in entries[:5]) + (" ..." if len(entries) > 5 else "")
            raise CatalogError(
                f"The folder {str(folder)!r} is not a bluesky-deepfocus catalog (no "
                f"{MARKER_NAME!r}) and is not empty ({shown}); nothing was changed in it. "
                "Give the folder of an existing catalog, or a new or empty folder to "
                "create one."
            )
        if not writable:
            raise CatalogError(
                f"No catalog in the empty folder {str(folder)!r}, so there is nothing to "
                "read. Open it with writable=True once to create the catalog."
            )
        return True
    parent = folder.parent
    if not parent.is_dir():
        if source != "default":
            raise CatalogError(
                f"Cannot create a catalog at {str(folder)!r}: its parent folder "
                f"{str(parent)!r} does not exist. Create the parent folder first, or give "
                f"another location to {how}."
            )
        parent.mkdir(parents=True, exist_ok=True)
    if not writable:
        raise CatalogError(
            f"No catalog at {str(folder)!r}, so there is nothing to read. Open it with "
            "writable=True once to create it, or give the folder of an existing catalog."
        )
    return True


def _check_marker(folder: Path) -> None:
    marker = folder / MARKER_NAME
    try:
        info = json.loads(marker.read_text())
        version = int(info["format"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CatalogError(
            f"The catalog marker {str(marker)!r} is unreadable ({err}); the folder may be "
            "damaged. Restore it from a backup or give another location."
        ) from err
    if version > FORMAT_VERSION:
        raise CatalogError(
            f"The catalog {str(folder)!r} has format {version!r}, newer than this "
            f"bluesky-deepfocus understands ({FORMAT_VERSION}); upgrade bluesky-deepfocus."
        )
    db = folder / CATALOG_DB
    try:
        with open(db, "rb") as f:
            head = f.read(16)
    except OSError as err:
        raise CatalogError(
            f"The catalog {str(folder)!r} lacks its database {CATALOG_DB!r} ({err}); the "
            "folder is damaged. Restore it from a backup or give another location."
        ) from err
    if head != b"SQLite format 3\x00":
        raise CatalogError(
            f"{str(db)!r} is not a SQLite database; the catalog {str(folder)!r} is "
            "damaged. Restore it from a backup or give another location."
        )


def _sqlite_uri(path: Path) -> str:
    return f"sqlite:///{path}"


def _run_in_thread(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` in a fresh thread (free of any running asyncio loop), return its value."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as err:  # pragma: no cover - re-raised below
            box["error"] = err

    thread = threading.Thread(target=target, name="bluesky-deepfocus-catalog-init")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box.get("value")


def _initialize_sqlite_catalog(db: Path) -> None:
    """Create the Tiled catalog tables in ``db`` in-process (``tiled catalog init``)."""
    import asyncio

    from sqlalchemy.ext.asyncio import create_async_engine
    from tiled.alembic_utils import stamp_head
    from tiled.catalog.alembic_constants import ALEMBIC_DIR, ALEMBIC_INI_TEMPLATE_PATH
    from tiled.catalog.core import initialize_database
    from tiled.utils import ensure_specified_sql_driver

    uri = ensure_specified_sql_driver(_sqlite_uri(db))

    async def create() -> None:
        engine = create_async_engine(uri)
        try:
            await initialize_database(engine)
        finally:
            await engine.dispose()

    def work() -> None:
        asyncio.run(create())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # alembic config style
            stamp_head(ALEMBIC_INI_TEMPLATE_PATH, ALEMBIC_DIR, uri)

    _run_in_thread(work)


def _set_wal(db: Path) -> None:
    """WAL journal mode, so readers in other processes never wait for the writer."""
    con = sqlite3.connect(db)
    try:
        con.execute("PRAGMA journal_mode=WAL")
    finally:
        con.close()


def _create_catalog(folder: Path) -> None:
    """Create a new catalog in the (new or empty) ``folder``; the marker comes last."""
    created_folder = False
    try:
        folder.mkdir()
        created_folder = True
    except FileExistsError:
        pass
    made: list[Path] = []
    try:
        for sub in (DATA_DIR, JOURNAL_DIR):
            (folder / sub).mkdir(exist_ok=True)
            made.append(folder / sub)
        made.append(folder / CATALOG_DB)
        _initialize_sqlite_catalog(folder / CATALOG_DB)
        _set_wal(folder / CATALOG_DB)
        made.append(folder / TABLES_DB)
        _set_wal(folder / TABLES_DB)
        tmp = folder / (MARKER_NAME + ".tmp")
        made.append(tmp)
        tmp.write_text(
            json.dumps(
                {"format": FORMAT_VERSION, "created": time.time(), "application": APP_NAME},
                indent=1,
            )
        )
        os.replace(tmp, folder / MARKER_NAME)
    except BaseException as err:
        _remove_partial(folder, made, created_folder)
        if isinstance(err, CatalogError):
            raise
        if isinstance(err, Exception):
            raise CatalogError(
                f"Could not create a catalog in {str(folder)!r}: {err}. Check that the "
                "folder is writable and the disk is not full."
            ) from err
        raise


def _remove_partial(folder: Path, made: list[Path], created_folder: bool) -> None:
    import shutil

    for path in reversed(made):
        with contextlib.suppress(OSError):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        for suffix in ("-wal", "-shm", "-journal"):
            with contextlib.suppress(OSError):
                Path(str(path) + suffix).unlink(missing_ok=True)
    if created_folder:
        with contextlib.suppress(OSError):
            (folder / LOCK_NAME).unlink(missing_ok=True)
            folder.rmdir()


def _serialization_registry() -> Any:
    from bluesky_tiled_plugins.exporters import json_seq_exporter
    from tiled.media_type_registration import default_serialization_registry

    registry = copy.deepcopy(default_serialization_registry)
    registry.register("BlueskyRun", "application/json-seq", json_seq_exporter)
    return registry


@functools.cache
def _catalog_client_class() -> type:
    """``CatalogOfBlueskyRuns`` that lets this process's background writers finish first."""
    from bluesky_tiled_plugins import CatalogOfBlueskyRuns

    class DeepFocusCatalog(CatalogOfBlueskyRuns):
        """A catalog of Bluesky runs whose reads see runs this process wrote."""

        def __getitem__(self, key: Any) -> Any:
            _flush_writers(self.context)
            return super().__getitem__(key)

        def __contains__(self, key: Any) -> bool:
            _flush_writers(self.context)
            return bool(super().__contains__(key))

        def __len__(self) -> int:
            _flush_writers(self.context)
            return int(super().__len__())

        def search(self, query: Any) -> Any:
            _flush_writers(self.context)
            return super().search(query)

        def _keys_slice(self, *args: Any, **kwargs: Any) -> Any:
            _flush_writers(self.context)
            return super()._keys_slice(*args, **kwargs)

        def _items_slice(self, *args: Any, **kwargs: Any) -> Any:
            _flush_writers(self.context)
            return super()._items_slice(*args, **kwargs)

    DeepFocusCatalog.__qualname__ = "DeepFocusCatalog"
    return DeepFocusCatalog


def _structure_clients() -> Any:
    """Tiled's default structure clients, with :func:`_catalog_client_class` for catalogs."""
    from tiled.client.container import DEFAULT_STRUCTURE_CLIENT_DISPATCH, Container
    from tiled.utils import OneShotCachedMap

    Container.discover_clients_from_entrypoints()
    base = DEFAULT_STRUCTURE_CLIENT_DISPATCH["numpy"]
    # An independent map (copy.copy would share, and so change, Tiled's default one).
    clients: Any = OneShotCachedMap(
        {key: functools.partial(base.__getitem__, key) for key in base}
    )
    clients.set("CatalogOfBlueskyRuns", _catalog_client_class)
    return clients


def _serve_embedded(folder: Path, *, writable: bool) -> Any:
    """Build the in-process Tiled app over the catalog in ``folder``; return a client."""
    from tiled.catalog import from_uri
    from tiled.client import Context, from_context
    from tiled.server.app import build_app

    data_dir = str(folder / DATA_DIR)
    tables = _sqlite_uri(folder / TABLES_DB)
    storage: dict[str, Any] = (
        {"writable_storage": [data_dir, tables]}
        if writable
        else {"readable_storage": [data_dir, tables]}
    )
    adapter = from_uri(
        _sqlite_uri(folder / CATALOG_DB),
        specs=ROOT_SPECS,
        init_if_not_exists=False,
        **storage,
    )
    app = build_app(adapter, serialization_registry=_serialization_registry())
    server_logger = logging.getLogger("tiled.server.app")
    level = server_logger.level
    server_logger.setLevel(logging.WARNING)  # no "Tiled version ..." line per open
    try:
        with warnings.catch_warnings():
            # starlette's TestClient (Tiled's in-process transport) warns about httpx.
            warnings.filterwarnings("ignore", message=".*starlette.testclient.*")
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            context = Context.from_app(app)
    finally:
        server_logger.setLevel(level)
    try:
        client = from_context(context, structure_clients=_structure_clients())
    except BaseException:
        context.close()
        raise
    return client


def _close_context_quietly(http_client: Any) -> None:
    with contextlib.suppress(Exception):
        http_client.__exit__(None, None, None)


def _finalize(http_client: Any, folder: Path | None, writable: bool, closed: list[bool]) -> None:
    if closed[0]:
        return
    closed[0] = True
    _close_context_quietly(http_client)
    if folder is not None and writable:
        _release_writer_lock(folder)


def _register(client: Any, info: _CatalogInfo) -> None:
    context = client.context
    _INFO[context] = info
    weakref.finalize(
        context, _finalize, context.http_client, info.folder, info.writable, info.closed
    )


def _open_embedded(folder: Path, *, writable: bool, source: str) -> Any:
    create = _check_local_location(folder, writable=writable, source=source)
    if writable:
        if create:
            folder.mkdir(exist_ok=True)
        _acquire_writer_lock(folder)
    try:
        if create:
            _create_catalog(folder)
        if writable:
            (folder / JOURNAL_DIR).mkdir(exist_ok=True)
        try:
            client = _serve_embedded(folder, writable=writable)
        except CatalogError:
            raise
        except Exception as err:
            raise CatalogError(
                f"Could not open the catalog in {str(folder)!r}: {type(err).__name__}: "
                f"{err}. The folder may be damaged or written by a newer version; "
                "nothing in it was changed."
            ) from err
    except BaseException:
        if writable:
            _release_writer_lock(folder)
        raise
    info = _CatalogInfo(
        location=str(folder),
        journal_dir=folder / JOURNAL_DIR,
        folder=folder,
        writable=writable,
    )
    _register(client, info)
    return client


# --------------------------------------------------------------------------------------
# Facility server
# --------------------------------------------------------------------------------------


def _server_reachable(url: str, timeout: float = 3.0) -> Exception | None:
    """Probe the server quickly (Tiled's own client retries for up to 45 s)."""
    import httpx

    parsed = urlparse(url)
    root = f"{parsed.scheme}://{parsed.netloc}/"
    try:
        httpx.get(root, timeout=timeout, follow_redirects=True)
    except httpx.HTTPError as err:
        return err
    return None


def _open_remote(url: str, *, writable: bool) -> Any:
    from tiled.client import from_uri

    problem = _server_reachable(url)
    if problem is not None:
        raise CatalogError(
            f"Cannot reach the Tiled server at {url!r} ({type(problem).__name__}: "
            f"{problem}). Check the address and that the server runs; meanwhile "
            f"CatalogWriter({url!r}) keeps runs in the local spool "
            f"{str(_spool_dir_for_url(url))!r} and deliver_pending() sends them later."
        )
    api_key = os.environ.get(API_KEY_ENV) or None
    try:
        client = from_uri(url, api_key=api_key, structure_clients=_structure_clients())
    except Exception as err:
        hint = (
            f"Set ${API_KEY_ENV} to an API key the server accepts."
            if api_key is None
            else f"Check that ${API_KEY_ENV} holds a valid key for this server."
        )
        raise CatalogError(
            f"Could not open the Tiled server node {url!r}: {type(err).__name__}: {err}. {hint}"
        ) from err
    specs = {getattr(s, "name", None) for s in getattr(client, "specs", [])}
    if "CatalogOfBlueskyRuns" not in specs:
        raise CatalogError(
            f"The Tiled node {url!r} is not a catalog of Bluesky runs (specs "
            f"{sorted(s for s in specs if s)!r}). Give the URL of a node with the "
            "CatalogOfBlueskyRuns spec (see deploy/tiled-postgres.yml)."
        )
    info = _CatalogInfo(location=url, journal_dir=_spool_dir_for_url(url), writable=writable)
    _INFO[client.context] = info
    return client


# --------------------------------------------------------------------------------------
# Public: open / close
# --------------------------------------------------------------------------------------


def open_catalog(
    location: str | os.PathLike[str] | None = None, *, writable: bool = True
) -> CatalogOfBlueskyRuns:
    """Open the catalog of Bluesky runs: embedded (a folder) or a facility Tiled server.

    Parameters
    ----------
    location
        A folder holding an embedded catalog, a new or empty folder (whose parent exists)
        to create one in, or a ``http(s)://`` URL of a Tiled node with the
        ``CatalogOfBlueskyRuns`` spec. ``None``: ``$BLUESKY_DEEPFOCUS_CATALOG`` if set,
        else ``platformdirs.user_data_dir("bluesky-deepfocus")/catalog`` (created with
        its parents on first use).
    writable
        Embedded catalogs: ``True`` takes the exclusive writer lock (one writing process
        at a time), creates the catalog if needed and replays journals of runs that a
        crashed process left incomplete; ``False`` opens for reading only, alongside a
        writing process. Facility servers: ``True`` also delivers runs waiting in the
        local spool (see :func:`deliver_pending`); permissions are the server's.

    Returns
    -------
    CatalogOfBlueskyRuns
        A Tiled client; ``catalog[uid]`` is a ``BlueskyRun``, ``catalog.search(query)``
        takes ``tiled.queries`` (``Key``, ``Eq``, ...) and
        ``bluesky_tiled_plugins.queries.TimeRange``. For the databroker 1.x API use
        ``databroker.Broker(catalog)`` (or ``catalog.v1``).

    Raises
    ------
    CatalogError
        The location is not a catalog, is damaged, cannot be created, is locked by another
        writer, or the server cannot be reached. Nothing stored is changed.

    Examples
    --------
    >>> catalog = open_catalog(tmp_path / "runs")  # doctest: +SKIP
    >>> reader = open_catalog(tmp_path / "runs", writable=False)  # doctest: +SKIP
    >>> db = databroker.Broker(reader)  # doctest: +SKIP
    """
    source = "argument"
    if location is None:
        location = default_catalog_location()
        source = "env" if os.environ.get(CATALOG_ENV, "").strip() else "default"
    if _is_url(location):
        url = str(location)
        client = _open_remote(url, writable=writable)
        if writable:
            _recover(client, reason="from the local spool")
        return client
    folder = Path(location).expanduser().absolute()
    client = _open_embedded(folder, writable=writable, source=source)
    if writable:
        _recover(client, reason="after an unfinished session")
    return client


def catalog_folder(catalog: Any) -> Path | None:
    """The folder of an embedded catalog opened by :func:`open_catalog` (else ``None``)."""
    info = _info(catalog)
    return info.folder if info is not None else None


def close_catalog(catalog: Any) -> None:
    """Close a catalog opened by :func:`open_catalog` and release its writer lock.

    Closing is also done when the client is garbage-collected or the process exits; call
    this to let another process write to the embedded catalog right away.
    """
    context = getattr(catalog, "context", None)
    if context is None:
        return
    _flush_writers(context)
    info = _INFO.get(context)
    if info is None:
        context.close()
        return
    _finalize(context.http_client, info.folder, info.writable, info.closed)


# --------------------------------------------------------------------------------------
# Summary of an autofocus run
# --------------------------------------------------------------------------------------

_SUMMARY_FIELDS = [f.name for f in fields(AutofocusSummary)]


def _plain(value: Any) -> Any:
    """JSON-safe plain value (NaN and infinities become None)."""
    if isinstance(value, np.ndarray):
        value = value.item() if value.size == 1 else value.tolist()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def summary_from_result(data: dict[str, Any]) -> dict[str, Any]:
    """The :data:`~bluesky_deepfocus.schema.SUMMARY_KEY` metadata from a result event.

    ``data`` is the ``data`` of the one :data:`~bluesky_deepfocus.schema.RESULT_STREAM`
    event. A summary field is taken from the data key of the same name, else from the one
    data key ending in ``_<field>`` (device-prefixed names). NaN is stored as ``None``.
    """
    summary: dict[str, Any] = {}
    for name in _SUMMARY_FIELDS:
        if name in data:
            summary[name] = _plain(data[name])
            continue
        matches = [k for k in data if k.endswith("_" + name)]
        if len(matches) == 1:
            summary[name] = _plain(data[matches[0]])
    return summary


# --------------------------------------------------------------------------------------
# Writing: journal + TiledWriter
# --------------------------------------------------------------------------------------

_IN_WORKER = threading.local()
FLUSH_BEFORE_READ_TIMEOUT = 120.0


def _warn(message: str) -> None:
    logger.warning(message)
    if getattr(_IN_WORKER, "active", False):
        # A warning raised as an error (pytest's filterwarnings) must not kill the worker.
        with contextlib.suppress(Exception):
            warnings.warn(message, DeepFocusWarning, stacklevel=3)
    else:
        warnings.warn(message, DeepFocusWarning, stacklevel=3)


class _Worker:
    """One thread storing documents in order for one catalog (SQLite takes one writer).

    At most ``max_pending`` documents wait in memory: when acquisition outpaces the
    catalog, ``submit`` blocks until the thread catches up (the documents are already in
    the journal), so memory stays bounded in long sessions.
    """

    max_pending = 400

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._pending = 0
        self._idle = threading.Condition()
        self._thread: threading.Thread | None = None

    @property
    def pending(self) -> int:
        return self._pending

    def submit(self, fn: Callable[..., None], *args: Any) -> None:
        with self._idle:
            if threading.current_thread() is not self._thread and self._thread is not None:
                self._idle.wait_for(lambda: self._pending < self.max_pending)
            self._pending += 1
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._work, name="bluesky-deepfocus-catalog-writer", daemon=True
                )
                self._thread.start()
                _flush_at_exit(self)
        self._queue.put((fn, args))

    def _work(self) -> None:
        _IN_WORKER.active = True
        while True:
            fn, args = self._queue.get()
            try:
                fn(*args)
            except BaseException:  # pragma: no cover - the callables handle their errors
                logger.exception("The catalog writer thread failed on %r", args[:1])
            finally:
                with self._idle:
                    self._pending -= 1
                    if self._pending == 0 or self._pending == self.max_pending - 1:
                        self._idle.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        if threading.current_thread() is self._thread:
            return True
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Call ``fn(*args)`` in the worker thread (after what is queued); return its value."""
        if threading.current_thread() is self._thread:
            return fn(*args)
        future: Future[Any] = Future()

        def call() -> None:
            try:
                future.set_result(fn(*args))
            except BaseException as err:
                future.set_exception(err)

        self.submit(call)
        return future.result()


_WORKERS: weakref.WeakKeyDictionary[Any, _Worker] = weakref.WeakKeyDictionary()
_WORKERS_GUARD = threading.Lock()


def _worker_for(context: Any) -> _Worker:
    with _WORKERS_GUARD:
        worker = _WORKERS.get(context)
        if worker is None:
            worker = _WORKERS[context] = _Worker()
        return worker


def _flush_writers(context: Any) -> None:
    """Let background writers bound to ``context`` finish (read-your-writes)."""
    if context is None or getattr(_IN_WORKER, "active", False):
        return
    worker = _WORKERS.get(context)
    if worker is not None and worker.pending:
        worker.flush(timeout=FLUSH_BEFORE_READ_TIMEOUT)


class _RunRecorder:
    """Journal (in the RunEngine thread), then store (maybe in the worker), one run."""

    def __init__(self, owner: CatalogWriter, start: dict[str, Any]) -> None:
        self.owner = owner
        self.uid: str = start["uid"]
        self.journal: JournalFile | None = None
        self.writer: Any = None
        self.failure: BaseException | None = None
        self.result_descriptors: set[str] = set()
        self.summary: dict[str, Any] | None = None
        if owner.journal:
            try:
                owner.journal_dir.mkdir(parents=True, exist_ok=True)
                self.journal = JournalFile(
                    journal_path(owner.journal_dir, self.uid), fsync=owner.fsync
                )
            except OSError as err:
                _warn(
                    f"Cannot journal run {self.uid!r} in {str(owner.journal_dir)!r} ({err}); "
                    "its documents are only sent to the catalog and are lost if the "
                    "process dies before they are stored. Check the disk."
                )

    # -- RunEngine thread -------------------------------------------------------------
    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        if self.journal is not None:
            try:
                self.journal.append(name, doc)
            except (OSError, TypeError, ValueError) as err:
                self.journal.close()
                self.journal = None
                _warn(
                    f"Journaling run {self.uid!r} failed ({err}); the rest of the run is "
                    "only sent to the catalog."
                )
        self.owner._submit(self._store, name, doc)

    # -- storing (worker thread in background mode) ------------------------------------
    def _store(self, name: str, doc: dict[str, Any]) -> None:
        self._track(name, doc)
        if name == "start" and self.failure is None:
            client = self.owner._connect()
            if isinstance(client, BaseException):
                self.failure = client
                self._report_failure(name)
            else:
                from bluesky_tiled_plugins import TiledWriter

                # every array as its own node: TiledWriter puts arrays of <= 16 values in
                # the SQL event table, where 2-D ones (e.g. a 4x4 blur map) fail in Arrow
                self.writer = TiledWriter(
                    client, batch_size=self.owner.batch_size, max_array_size=0
                )
        if self.writer is not None and self.failure is None:
            try:
                self.writer(name, doc)
            except Exception as err:
                self.failure = err
                self._report_failure(name)
        if name == "stop":
            self._finish()

    def _track(self, name: str, doc: dict[str, Any]) -> None:
        if name == "descriptor" and doc.get("name") == RESULT_STREAM:
            self.result_descriptors.add(doc["uid"])
        elif name == "event" and doc.get("descriptor") in self.result_descriptors:
            self.summary = summary_from_result(doc["data"])
        elif name == "event_page" and doc.get("descriptor") in self.result_descriptors:
            data = {k: v[-1] for k, v in doc["data"].items() if len(v)}
            self.summary = summary_from_result(data)

    def _report_failure(self, name: str) -> None:
        where = (
            f"kept in the journal {str(self.journal.path)!r}"
            if self.journal is not None
            else "NOT journaled (journal=False), so it is lost"
        )
        _warn(
            f"Could not store the {name!r} document of run {self.uid!r} in the catalog "
            f"{self.owner.location!r} ({type(self.failure).__name__}: {self.failure}). "
            f"The run is {where}; deliver it later with deliver_pending(catalog)."
        )

    def _finish(self) -> None:
        if self.failure is None and self.writer is not None and self.summary is not None:
            try:
                client = self.owner._connect()
                if isinstance(client, BaseException):
                    raise client
                _store_summary(client, self.uid, self.summary)
            except Exception as err:
                self.failure = err
                self._report_failure("summary")
        if self.journal is not None:
            if self.failure is None:
                self.journal.discard()
            else:
                self.journal.close()


class CatalogWriter:
    """RunEngine callback storing runs in a catalog, with a write-ahead journal.

    In the RunEngine thread each document is appended to a per-run journal file
    (``os.fsync`` per document by default). It is then stored by
    ``bluesky_tiled_plugins.TiledWriter`` — by default in a background thread, so the
    RunEngine does not wait for the catalog (Tiled batches a run's events until its stop
    document, then needs some 20 requests). When the run's stop document is stored, the
    decision of an autofocus run (its :data:`~bluesky_deepfocus.schema.RESULT_STREAM`
    event) is copied into the run's metadata under
    :data:`~bluesky_deepfocus.schema.SUMMARY_KEY` and the journal is deleted. If the
    process dies or the catalog cannot be reached, the journal stays and is replayed by
    the next writable :func:`open_catalog` or by :func:`deliver_pending`.

    Reading through a catalog from :func:`open_catalog` waits for that catalog's
    background writers first, so ``RE(plan)`` followed by ``catalog[uid]`` sees the run.

    Parameters
    ----------
    catalog
        A client from :func:`open_catalog`, or the URL of a facility Tiled server (then
        each run connects when it starts; while the server is unreachable runs are kept
        in the local spool only).
    journal
        Write the journal (default). ``False`` trades crash safety for a little speed.
    fsync
        ``True`` (default): ``fsync`` after each document, durable across power loss.
        ``False``: one ``write`` per document, durable across the death of the process.
    background
        ``True`` (default): store in a worker thread; :meth:`flush` waits for it.
        ``False``: store before returning to the RunEngine.
    journal_dir
        Where journals go. Default: the ``journal`` folder of an embedded catalog, or
        the per-server spool folder (``$BLUESKY_DEEPFOCUS_SPOOL``) for a server.
    batch_size
        Events the TiledWriter collects before writing a table batch.

    Examples
    --------
    >>> writer = CatalogWriter(open_catalog())  # doctest: +SKIP
    >>> RE.subscribe(writer)  # doctest: +SKIP
    >>> RE(plan)  # doctest: +SKIP
    >>> writer.flush()  # only needed when reading through another client  # doctest: +SKIP
    True
    """

    def __init__(
        self,
        catalog: Any,
        *,
        journal: bool = True,
        fsync: bool = True,
        background: bool = True,
        journal_dir: str | os.PathLike[str] | None = None,
        batch_size: int = 10000,
    ) -> None:
        from event_model import RunRouter

        self._client: Any = None
        if isinstance(catalog, str | os.PathLike):
            location = os.fspath(catalog)
            if not _is_url(location):
                raise CatalogError(
                    f"CatalogWriter takes a catalog client or a http(s):// server URL, got "
                    f"{location!r}. Open a local catalog first: "
                    f"CatalogWriter(open_catalog({location!r}))."
                )
            self.location = location
            default_dir = _spool_dir_for_url(location)
        else:
            self._client = catalog
            info = _info(catalog)
            if info is not None and not info.writable:
                raise CatalogError(
                    f"The catalog {info.location!r} was opened read-only; open it with "
                    "open_catalog(..., writable=True) to write runs."
                )
            self.location = info.location if info is not None else str(catalog.uri)
            default_dir = _journal_dir_for(catalog)
        self.journal = journal
        self.fsync = fsync
        self.background = background
        self.journal_dir = Path(journal_dir) if journal_dir is not None else default_dir
        self.batch_size = batch_size
        self._data_client: Any = None
        self._router = RunRouter([self._factory])
        self._worker = _worker_for(catalog.context) if self._client is not None else _Worker()
        self.token: int | None = None
        """Subscription token, set by :func:`subscribe_writer`."""

    def _factory(self, name: str, doc: dict[str, Any]) -> tuple[list[Any], list[Any]]:
        return [_RunRecorder(self, doc)], []

    def _connect(self) -> Any:
        """The client to write with, or the error that prevents connecting."""
        if self._data_client is not None:
            return self._data_client
        try:
            if self._client is None:
                self._client = open_catalog(self.location, writable=False)
            self._data_client = self._client.include_data_sources()
        except Exception as err:
            return err
        return self._data_client

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        self._router(name, doc)

    # -- background worker -------------------------------------------------------------
    def _submit(self, fn: Callable[[str, dict[str, Any]], None], name: str, doc: Any) -> None:
        # All writes to one catalog go through one thread: SQLite takes one writer at a
        # time and Tiled's SQLite table storage fails at once rather than waiting.
        if not self.background:
            self._worker.run(fn, name, doc)
            return
        # The worker must not see later changes made by devices to reused buffers.
        self._worker.submit(fn, name, copy.deepcopy(doc))

    @property
    def pending(self) -> int:
        """Documents handed to the background thread and not stored yet."""
        return self._worker.pending

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every document received so far is stored (or failed and journaled).

        Returns ``False`` if ``timeout`` (s) passed first.
        """
        return self._worker.flush(timeout)


def _flush_at_exit(writer: _Worker) -> None:
    """Store what is queued before the interpreter exits.

    Registered with ``threading``'s own exit hooks (as Tiled registers the shutdown of its
    in-process server there): they run last-in first-out before the interpreter's
    ``atexit`` handlers, so the writer finishes before the embedded server stops.
    """
    ref = weakref.ref(writer)

    def flush() -> None:
        w = ref()
        if w is not None and not w.flush(timeout=60.0):
            logger.warning(
                "The catalog writer still had %d documents to store at exit; their runs "
                "stay in the journal and are stored by the next open_catalog() or "
                "deliver_pending().",
                w.pending,
            )

    register = getattr(threading, "_register_atexit", None)
    try:
        if register is not None:
            register(flush)
            return
    except RuntimeError:  # interpreter already shutting down
        return
    import atexit

    atexit.register(flush)


def subscribe_writer(RE: Any, catalog: Any, **kwargs: Any) -> CatalogWriter:
    """Subscribe a :class:`CatalogWriter` for ``catalog`` to ``RE`` and return it.

    Extra keyword arguments go to :class:`CatalogWriter`. ``RE.unsubscribe`` takes the
    writer's ``token`` attribute.
    """
    writer = CatalogWriter(catalog, **kwargs)
    writer.token = RE.subscribe(writer)
    return writer


def _store_summary(client: Any, uid: str, summary: dict[str, Any]) -> None:
    node = _lookup_run(client, uid)
    if node is None:
        raise KeyError(f"run {uid!r} not found to attach its summary")
    node.update_metadata(metadata={SUMMARY_KEY: summary}, drop_revision=True)


def _lookup_run(client: Any, uid: str) -> Any:
    from tiled.client.container import Container

    try:
        return Container.__getitem__(client, uid)
    except KeyError:
        return None


# --------------------------------------------------------------------------------------
# Recovery: replay journals
# --------------------------------------------------------------------------------------


def pending_journals(
    catalog: Any, *, journal_dir: str | os.PathLike[str] | None = None
) -> list[Path]:
    """Journals of runs not yet safely in ``catalog`` (excluding runs still measuring)."""
    folder = Path(journal_dir) if journal_dir is not None else _journal_dir_for(catalog)
    if not folder.is_dir():
        return []
    paths = sorted(folder.glob("*" + JOURNAL_SUFFIX), key=lambda p: p.stat().st_mtime)
    return [p for p in paths if not is_journal_locked(p)]


def _synthesized_stop(uid: str, last_time: float, counts: Counter[str]) -> dict[str, Any]:
    return {
        "uid": str(uuid.uuid4()),
        "time": last_time,
        "run_start": uid,
        "exit_status": "fail",
        "reason": f"{RECOVERED_REASON} (at {time.strftime('%Y-%m-%d %H:%M:%S')})",
        "num_events": dict(counts),
    }


def _replay(client: Any, path: Path) -> str | None:
    """Store the run journaled in ``path``; return its uid. The journal is then deleted.

    Returns ``None`` if another process holds the journal (it is measuring or
    delivering that run right now).
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None  # delivered meanwhile by someone else
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    try:
        if not path.exists():
            return None
        return _replay_locked(client, path)
    finally:
        os.close(fd)


def _replay_locked(client: Any, path: Path) -> str:
    from bluesky_tiled_plugins import TiledWriter

    records = read_journal(path)
    first = next(records, None)
    if first is None or first[0] != "start":
        bad = path.with_suffix(path.suffix + ".unreadable")
        os.replace(path, bad)
        raise CatalogError(
            f"The journal {str(path)!r} holds no readable start document; it was renamed "
            f"to {str(bad)!r} for inspection."
        )
    start = first[1]
    uid = start["uid"]
    existing = _lookup_run(client, uid)
    if existing is not None:
        if "stop" in existing.metadata:
            # Stored completely before the process died; only the summary may be missing.
            summary = _summary_from_records(records)
            if summary is not None and SUMMARY_KEY not in existing.metadata:
                _store_summary(client, uid, summary)
            path.unlink()
            return uid
        client.delete_contents(uid, recursive=True, external_only=False)
    writer = TiledWriter(client, max_array_size=0)
    tracker = _ReplayTracker()
    writer("start", start)
    last_time = float(start.get("time", time.time()))
    stopped = False
    for name, doc in records:
        tracker(name, doc)
        writer(name, doc)
        last_time = _latest_time(doc, last_time)
        if name == "stop":
            stopped = True
            break
    if not stopped:
        writer("stop", _synthesized_stop(uid, last_time, tracker.counts))
    if tracker.summary is not None:
        _store_summary(client, uid, tracker.summary)
    path.unlink()
    return uid


def _latest_time(doc: dict[str, Any], default: float) -> float:
    value = doc.get("time")
    if isinstance(value, list | tuple):
        value = max(value, default=None)
    try:
        return float(value) if value is not None else default
    except (TypeError, ValueError):
        return default


class _ReplayTracker:
    """Counts events per stream and catches the result event while replaying."""

    def __init__(self) -> None:
        self.stream_of: dict[str, str] = {}
        self.counts: Counter[str] = Counter()
        self.summary: dict[str, Any] | None = None

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        if name == "descriptor":
            self.stream_of[doc["uid"]] = doc.get("name", "primary")
        elif name in ("event", "event_page"):
            stream = self.stream_of.get(doc.get("descriptor", ""), "primary")
            n = 1 if name == "event" else len(doc.get("seq_num", []))
            self.counts[stream] += n
            if stream == RESULT_STREAM:
                data = (
                    doc["data"]
                    if name == "event"
                    else {k: v[-1] for k, v in doc["data"].items() if len(v)}
                )
                self.summary = summary_from_result(data)


def _summary_from_records(records: Any) -> dict[str, Any] | None:
    tracker = _ReplayTracker()
    for name, doc in records:
        tracker(name, doc)
    return tracker.summary


def deliver_pending(
    catalog: Any, *, journal_dir: str | os.PathLike[str] | None = None
) -> list[str]:
    """Store runs waiting in the journal / spool into ``catalog``; return their uids.

    Runs whose writer died mid-run are closed with a synthesized stop document
    (``exit_status="fail"``, ``reason`` saying they were recovered). Runs still being
    measured by a live process are left alone. A run that is already complete in the
    catalog is not written twice.

    Parameters
    ----------
    catalog
        Client from :func:`open_catalog` (opened writable).
    journal_dir
        Folder of the journals; default: the one :class:`CatalogWriter` uses for
        ``catalog``.

    Raises
    ------
    CatalogError
        Some runs could not be delivered (they stay pending; call again later).
    """
    info = _info(catalog)
    if info is not None and info.folder is not None and not info.writable:
        raise CatalogError(
            f"The catalog {info.location!r} was opened read-only; deliver pending runs "
            "through open_catalog(..., writable=True), which also does it on opening."
        )
    delivered: list[str] = []
    errors: list[str] = []
    worker = _WORKERS.get(getattr(catalog, "context", None))
    for path in pending_journals(catalog, journal_dir=journal_dir):
        try:
            if worker is not None:  # serialized with this catalog's writers
                uid = worker.run(_replay, catalog, path)
            else:
                uid = _replay(catalog, path)
            if uid is not None:
                delivered.append(uid)
        except Exception as err:
            errors.append(f"{path.name}: {type(err).__name__}: {err}")
    if errors:
        raise CatalogError(
            f"{len(errors)} run(s) could not be delivered to the catalog and stay pending "
            f"({'; '.join(errors[:3])}). Fix the cause and call deliver_pending(catalog) "
            "again."
        )
    return delivered


def _recover(client: Any, *, reason: str) -> None:
    try:
        if not pending_journals(client):
            return
        uids = deliver_pending(client)
    except CatalogError as err:
        _warn(str(err))
        return
    except OSError as err:
        if err.errno in (errno.EACCES, errno.EPERM):
            return
        raise
    if uids:
        _warn(
            f"Recovered {len(uids)} run(s) {reason} into the catalog "
            f"({', '.join(uids)}); runs cut short are closed with exit_status 'fail'."
        )
