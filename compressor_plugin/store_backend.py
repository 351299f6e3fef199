"""The storage engine under :class:`~compressor_plugin.store.ContextStore`: one SQLite table plus value files.

:class:`SafeCache` keeps ``name -> bytes`` entries in the table layout of diskcache's
``Cache`` (so stores written by earlier versions open unchanged), but trusts nothing it reads
back from the folder:

* settings (size limit, eviction policy, value-file folder, minimum file size, SQLite
  pragmas) come from the constructor, never from the database's ``Settings`` table;
* a value-file name read from the database must have the exact form this engine writes
  (``ab/cd/<28 hex>.val``); every path component is opened without following symlinks
  relative to the folder, so a planted row can never make a read, an eviction or a delete
  touch a file outside the folder;
* a value file must be a regular file whose size equals the row's size and is at most
  ``max_value_size``, checked with ``fstat`` *before* reading (FIFOs, devices and huge
  sparse files are refused without blocking or allocating); values kept inside SQLite are
  size-checked in the query before they are fetched;
* only ``bytes`` values in diskcache's raw or binary-file modes are returned; anything in
  pickle or text mode comes back as a :class:`RefusedValue` and is never unpickled;
* overwrites cannot lose a committed entry: a replaced value file is removed only after the
  transaction that replaced its row has committed, and a failed batch removes the files it
  wrote before raising;
* the LRU access-time update of a read is skipped (not raised) when the database cannot be
  written, so hits stay hits on a full or read-only disk;
* ``read_only=True`` opens the database without ever writing to it (also on a read-only
  volume) and every write raises :class:`StoreReadOnlyError`;
* every connection (the first, a new thread's, a reconnect after :meth:`~SafeCache.close`, a
  forked child's) refuses, with :class:`StoreFormatError`, a folder or database file that is
  a symlink, a database file other than the one first opened, and a database holding any
  table, index, view or trigger this engine (or diskcache, which wrote older stores) does not
  create, SQL text compared; and no statement runs more than ``_MAX_STATEMENT_STEPS`` SQLite
  VM steps, so a trigger or view planted after that check cannot make it run forever;
* values inside SQLite are returned only as raw-mode BLOBs, whose size (in bytes) is checked
  in the query; anything else is refused without being fetched.

What it does not protect against: whoever can write the folder can replace entries with
other well-formed ones, delete them or fill the disk. SQLite itself parses the database file.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import sqlite3
import stat
import threading
import time
import urllib.parse
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import StoreError, StoreFormatError, StoreReadOnlyError, StoreWriteError, ValueTooLargeError

logger = logging.getLogger(__name__)

DBNAME = "cache.db"  # diskcache's database file name
#: diskcache's value modes: bytes in SQLite, bytes in a file, text in a file, pickle.
MODE_RAW, MODE_BINARY, MODE_TEXT, MODE_PICKLE = 1, 2, 3, 4
#: Hard ceiling on one value read back from the folder, whatever the database says.
DEFAULT_MAX_VALUE_SIZE = 64 * 2**20  # a k=16 fp32 context of an 80-layer, 8-KV-head model is ~10 MiB
_FILE_RE = re.compile(r"([0-9a-f]{2})/([0-9a-f]{2})/([0-9a-f]{28}\.val)")
#: Longest key listed by iterkeys (longer ones are planted; clear() removes them).
_MAX_KEY_LENGTH = 2**16
#: Databases up to this size get an integrity check (PRAGMA quick_check) when opened.
_QUICK_CHECK_MAX = 64 * 2**20
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS Settings (key TEXT NOT NULL UNIQUE, value)",
    "CREATE TABLE IF NOT EXISTS Cache (rowid INTEGER PRIMARY KEY, key BLOB, raw INTEGER, store_time REAL,"
    " expire_time REAL, access_time REAL, access_count INTEGER DEFAULT 0, tag BLOB, size INTEGER DEFAULT 0,"
    " mode INTEGER DEFAULT 0, filename TEXT, value BLOB)",
    "CREATE UNIQUE INDEX IF NOT EXISTS Cache_key_raw ON Cache(key, raw)",
    "CREATE INDEX IF NOT EXISTS Cache_expire_time ON Cache (expire_time)",
    "CREATE INDEX IF NOT EXISTS Cache_access_time ON Cache (access_time)",
    "CREATE INDEX IF NOT EXISTS Cache_store_time ON Cache (store_time)",
    # Running total of the value-file bytes, kept by triggers, so a write need not sum the
    # whole table to know whether to evict. Sizes are cast and defaulted so that a planted
    # row with a NULL or text size cannot make deletes (and so eviction or clear) fail.
    "CREATE TABLE IF NOT EXISTS StoreVolume (id INTEGER PRIMARY KEY CHECK (id = 0), file_bytes INTEGER)",
    "INSERT INTO StoreVolume SELECT 0, (SELECT coalesce(sum(CAST(size AS INTEGER)), 0) FROM Cache"
    " WHERE filename IS NOT NULL) WHERE NOT EXISTS (SELECT 1 FROM StoreVolume WHERE id = 0)",
    "CREATE TRIGGER IF NOT EXISTS StoreVolume_insert AFTER INSERT ON Cache FOR EACH ROW WHEN NEW.filename IS NOT NULL"
    " BEGIN UPDATE StoreVolume SET file_bytes = file_bytes + coalesce(CAST(NEW.size AS INTEGER), 0) WHERE id = 0;"
    " END",
    "CREATE TRIGGER IF NOT EXISTS StoreVolume_delete AFTER DELETE ON Cache FOR EACH ROW WHEN OLD.filename IS NOT NULL"
    " BEGIN UPDATE StoreVolume SET file_bytes = file_bytes - coalesce(CAST(OLD.size AS INTEGER), 0) WHERE id = 0;"
    " END",
    "CREATE TRIGGER IF NOT EXISTS StoreVolume_update AFTER UPDATE OF size, filename ON Cache FOR EACH ROW BEGIN"
    " UPDATE StoreVolume SET file_bytes = file_bytes"
    " - (CASE WHEN OLD.filename IS NOT NULL THEN coalesce(CAST(OLD.size AS INTEGER), 0) ELSE 0 END)"
    " + (CASE WHEN NEW.filename IS NOT NULL THEN coalesce(CAST(NEW.size AS INTEGER), 0) ELSE 0 END) WHERE id = 0;"
    " END",
)
_EXACT_FILE_BYTES = "SELECT coalesce(sum(CAST(size AS INTEGER)), 0) FROM Cache WHERE filename IS NOT NULL"
#: The schema of diskcache 5.x, which wrote the stores of earlier versions (every eviction
#: policy's index and the tag index included). Its objects are accepted beside ours.
_LEGACY_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS Settings ( key TEXT NOT NULL UNIQUE, value)",
    "CREATE TABLE IF NOT EXISTS Cache ( rowid INTEGER PRIMARY KEY, key BLOB, raw INTEGER, store_time REAL,"
    " expire_time REAL, access_time REAL, access_count INTEGER DEFAULT 0, tag BLOB, size INTEGER DEFAULT 0,"
    " mode INTEGER DEFAULT 0, filename TEXT, value BLOB)",
    "CREATE UNIQUE INDEX IF NOT EXISTS Cache_key_raw ON Cache(key, raw)",
    "CREATE INDEX IF NOT EXISTS Cache_expire_time ON Cache (expire_time)",
    "CREATE INDEX IF NOT EXISTS Cache_store_time ON Cache (store_time)",
    "CREATE INDEX IF NOT EXISTS Cache_access_time ON Cache (access_time)",
    "CREATE INDEX IF NOT EXISTS Cache_access_count ON Cache (access_count)",
    "CREATE INDEX IF NOT EXISTS Cache_tag_rowid ON Cache(tag, rowid)",
    'CREATE TRIGGER IF NOT EXISTS Settings_count_insert AFTER INSERT ON Cache FOR EACH ROW BEGIN'
    ' UPDATE Settings SET value = value + 1 WHERE key = "count"; END',
    'CREATE TRIGGER IF NOT EXISTS Settings_count_delete AFTER DELETE ON Cache FOR EACH ROW BEGIN'
    ' UPDATE Settings SET value = value - 1 WHERE key = "count"; END',
    'CREATE TRIGGER IF NOT EXISTS Settings_size_insert AFTER INSERT ON Cache FOR EACH ROW BEGIN'
    ' UPDATE Settings SET value = value + NEW.size WHERE key = "size"; END',
    'CREATE TRIGGER IF NOT EXISTS Settings_size_update AFTER UPDATE ON Cache FOR EACH ROW BEGIN'
    ' UPDATE Settings SET value = value + NEW.size - OLD.size WHERE key = "size"; END',
    'CREATE TRIGGER IF NOT EXISTS Settings_size_delete AFTER DELETE ON Cache FOR EACH ROW BEGIN'
    ' UPDATE Settings SET value = value - OLD.size WHERE key = "size"; END',
)


def _known_schema() -> frozenset[tuple[Any, ...]]:
    """``(type, name, tbl_name, sql)`` of every schema object this engine or diskcache creates.

    Taken from ``sqlite_master`` of in-memory databases built with the statements above, so
    the SQL text is exactly as SQLite records it (``IF NOT EXISTS`` dropped) and comparing
    it with a store's ``sqlite_master`` proves each object is one of ours, body included.
    """
    known: set[tuple[Any, ...]] = set()
    for statements in (_SCHEMA, _LEGACY_SCHEMA):
        con = sqlite3.connect(":memory:")
        try:
            for statement in statements:
                con.execute(statement)
            known.update(con.execute("SELECT type, name, tbl_name, sql FROM sqlite_master"))
        finally:
            con.close()
    return frozenset(known)


_KNOWN_SCHEMA = _known_schema()
#: A statement is aborted ("interrupted") after this many SQLite VM steps: no trigger or view
#: planted in the database after it was checked can make one statement run forever. The
#: store's own statements take a few steps per row at most (clear deletes in batches), so
#: this is ~50 M rows' worth of a full scan, and a few seconds (2.5-5 s on a 2-core Xeon)
#: of a planted endless loop.
_MAX_STATEMENT_STEPS = 300_000_000
#: Rows deleted per statement by clear() (each row costs 30-80 steps with the triggers).
_CLEAR_BATCH = 10_000
#: Names looked up by one query of get_many (SQLite allows 999 parameters in old builds).
_NAMES_PER_QUERY = 256
_ABSENT = object()  # a row whose value file was removed meanwhile: a miss
_NOFOLLOW_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def _abort_statement() -> int:
    return 1  # called once a statement has run _MAX_STATEMENT_STEPS steps: abort it


class RefusedValue:
    """Stand-in for a stored value that is refused unread (pickled, text-mode or otherwise foreign)."""

    __slots__ = ("reason",)

    def __init__(self, reason: str):
        self.reason = reason

    def __repr__(self) -> str:
        return f"RefusedValue({self.reason!r})"


#: What :meth:`SafeCache.iterkeys` yields for a key stored in pickle form (never unpickled).
FOREIGN_KEY = RefusedValue("key stored in pickle form")


def is_disk_full(exc: BaseException) -> bool:
    """True for ENOSPC/EDQUOT and SQLite's "database or disk is full"."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return True
    return isinstance(exc, sqlite3.Error) and "full" in str(exc).lower()


def is_read_only(exc: BaseException) -> bool:
    """True for EROFS/EACCES/EPERM and SQLite's read-only errors."""
    if isinstance(exc, StoreReadOnlyError):
        return True
    if isinstance(exc, OSError) and exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return True
    return isinstance(exc, sqlite3.Error) and "readonly" in str(exc).lower().replace("-", "").replace(" ", "")


def _uri_path(path: Path) -> str:
    """``path`` for a ``file:`` URI (``?``, ``#`` and ``%`` in a folder name would otherwise end it)."""
    return urllib.parse.quote(os.path.abspath(path), safe="/")


def _folder_writable(folder: Path) -> bool:
    """Whether files can be created in ``folder`` (False on a read-only volume)."""
    if not os.access(folder, os.W_OK):
        return False
    try:
        st = os.statvfs(folder)
    except OSError:
        return True
    return not (st.f_flag & getattr(os, "ST_RDONLY", 1))


class _FanOut:
    """The ``ab/cd`` folder that the value files of one batch are written into, while open."""

    __slots__ = ("fd", "prefix")

    def __init__(self) -> None:
        self.fd = -1
        self.prefix = ""

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class SafeCache:
    """``str -> bytes`` entries in one folder: SQLite rows, large values in their own files.

    Args:
        directory: the folder (created unless ``read_only``).
        size_limit: bound on the bytes of all values plus the database pages; writes evict
            entries (by ``eviction_policy``) until the cache is under it again.
        eviction_policy: ``"least-recently-used"`` (reads update the access time),
            ``"least-recently-stored"`` or ``"none"``.
        min_file_size: values at least this large are kept in their own file.
        max_value_size: largest value read back from the folder (larger rows are refused
            unread) and written.
        timeout: seconds to wait for another process's lock.
        read_only: never write; writes raise :class:`StoreReadOnlyError`.

    Every method is safe to call from several threads and processes at once (one SQLite
    connection per thread; SQLite's locks serialise writes).
    """

    def __init__(self, directory: str | os.PathLike, *, size_limit: int, eviction_policy: str = "least-recently-used",
                 min_file_size: int = 32 * 2**10, max_value_size: int = DEFAULT_MAX_VALUE_SIZE,
                 timeout: float = 60.0, read_only: bool = False):
        if eviction_policy not in ("least-recently-used", "least-recently-stored", "none"):
            raise ValueError(f"unknown eviction policy {eviction_policy!r}")
        self.directory = Path(directory)
        self.size_limit = int(size_limit)
        self.eviction_policy = eviction_policy
        self.min_file_size = int(min_file_size)
        self.max_value_size = int(max_value_size)
        self.timeout = float(timeout)
        self.read_only = bool(read_only)
        self._local = threading.local()
        self._pid = os.getpid()
        self._immutable = False
        self._db_identity: tuple[Any, ...] | None = None  # the database file every connection must open
        if not self.read_only:
            self.directory.mkdir(parents=True, exist_ok=True)
            if not _folder_writable(self.directory):
                self.read_only = True
        self._check_not_linked()
        if self.read_only:
            if not (self.directory / DBNAME).is_file():
                raise FileNotFoundError(f"no store database {self.directory / DBNAME} to open read-only")
        else:
            try:
                self._create_schema()
            except sqlite3.OperationalError as exc:
                if not (is_read_only(exc) and (self.directory / DBNAME).is_file()):
                    raise
                # The database file itself cannot be written (e.g. another user's store): serve it read-only.
                # debug, not info: like an unwritable folder above, this is not worth a message on every open;
                # a write then raises StoreReadOnlyError, which says so
                logger.debug("store database %s is not writable (%s); opening it read-only", self.directory, exc)
                self.close()
                self.read_only = True
        try:
            self._con.execute("SELECT count(*) FROM Cache WHERE rowid = -1").fetchall()  # fail early if unreadable
        except sqlite3.OperationalError:
            if not self.read_only:
                raise
            # A WAL database on a read-only volume cannot be opened without its -shm file
            # unless SQLite is told the file cannot change while it is open (immutable).
            self.close()
            self._immutable = True
            self._con.execute("SELECT count(*) FROM Cache WHERE rowid = -1").fetchall()
        if (self.directory / DBNAME).stat().st_size <= _QUICK_CHECK_MAX:
            # A damaged small database is reported at open, not entry by entry. Larger ones
            # (many values kept inside SQLite) are not read through at every open: a read
            # that meets their damage is logged and treated as a miss.
            ((check,), *_) = self._con.execute("PRAGMA quick_check(1)").fetchall()
            if check != "ok":
                raise sqlite3.DatabaseError(f"database disk image is malformed ({check})")

    def _create_schema(self) -> None:
        con = self._con
        con.execute("PRAGMA auto_vacuum = FULL")  # only takes effect on a new database
        con.execute("PRAGMA journal_mode=WAL")
        with self._write_txn(con):
            for statement in _SCHEMA:
                con.execute(statement)

    def _check_not_linked(self) -> None:
        """Refuse a folder, database or SQLite side file that is a symlink or not a regular file.

        SQLite follows symlinks: a planted ``cache.db`` (or ``-wal``/``-shm``) link would make
        it write to a file outside the folder.
        """
        if self.directory.is_symlink() or not self.directory.is_dir():
            raise StoreFormatError(f"{self.directory} is a symlink or not a folder; a store folder must be a real "
                                   "folder inside the store")
        for name in (DBNAME, DBNAME + "-wal", DBNAME + "-shm", DBNAME + "-journal"):
            path = self.directory / name
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if not stat.S_ISREG(st.st_mode):
                raise StoreFormatError(f"{path} is a symlink or not a regular file; refusing to open it. Remove it "
                                       "if the store is yours (its entries can be recomputed)")

    # ------------------------------------------------------------------ connections
    @property
    def _con(self) -> sqlite3.Connection:
        if os.getpid() != self._pid:  # forked: never share a parent's connection
            self._local = threading.local()
            self._pid = os.getpid()
        con = getattr(self._local, "con", None)
        if con is None:
            con = self._local.con = self._connect()
        return con

    def _connect(self) -> sqlite3.Connection:
        """A new connection, checked like the first one: a new thread's connection, a reconnect
        after :meth:`close` or a forked child's connection opens the database by path again,
        so what was planted in the folder meanwhile must be refused again.

        Raises:
            StoreFormatError: the folder or a database file is a symlink (or not a regular
                file), the database file is not the one this object opened first, or the
                database holds schema objects this store does not create.
        """
        self._check_not_linked()
        db = self.directory / DBNAME
        if self.read_only:
            mode = "ro&immutable=1" if self._immutable else "ro"
            con = sqlite3.connect(f"file:{_uri_path(db)}?mode={mode}", uri=True, timeout=self.timeout,
                                  isolation_level=None, check_same_thread=False)
        else:
            con = sqlite3.connect(str(db), timeout=self.timeout, isolation_level=None, check_same_thread=False)
        try:
            # Pragmas from the code only (the Settings table is never read). trusted_schema=OFF
            # keeps triggers and views planted in the file from calling risky functions.
            for pragma in ("trusted_schema = OFF", "synchronous = NORMAL", "cell_size_check = ON"):
                try:
                    con.execute(f"PRAGMA {pragma}")
                except sqlite3.Error:  # pragma: no cover - older SQLite
                    pass
            con.set_progress_handler(_abort_statement, _MAX_STATEMENT_STEPS)
            self._check_identity(con)
            self._check_schema(con)
        except BaseException:
            con.close()
            raise
        return con

    def _check_identity(self, con: sqlite3.Connection) -> None:
        """Refuse a connection to another file than the first connection of this object opened.

        Checked after connecting: the path is a regular file (not a symlink) with the same
        device and inode, and SQLite reports the same file name (SQLite resolves symlinks in
        that name, so a link swapped in and out around the open is caught too).
        """
        db = self.directory / DBNAME
        try:
            st = os.lstat(db)
        except FileNotFoundError:
            st = None
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise StoreFormatError(f"{db} is a symlink or not a regular file; refusing to open it. Remove it "
                                   "if the store is yours (its entries can be recomputed)")
        main = [row[2] for row in con.execute("PRAGMA database_list").fetchall() if row[1] == "main"]
        identity = (st.st_dev, st.st_ino, tuple(main)) if st is not None else None
        if self._db_identity is None:
            self._db_identity = identity
        elif identity != self._db_identity:
            raise StoreFormatError(f"{db} was replaced or removed since the store was opened; refusing to use "
                                   "it. Open the store again")

    def _check_schema(self, con: sqlite3.Connection) -> None:
        """Refuse a database holding any table, index, view or trigger this store does not create.

        ``CREATE ... IF NOT EXISTS`` keeps whatever the file already holds, and SQLite runs a
        planted trigger inside the store's own statements (``trusted_schema=OFF`` only bars
        functions): a trigger selecting from a recursive view would make every write spin
        forever. Each object must match one of ours exactly, its SQL text included.
        """
        for row in con.execute("SELECT type, name, tbl_name, sql FROM sqlite_master"):
            if tuple(row) not in _KNOWN_SCHEMA:
                kind, name = (str(part)[:80] for part in row[:2])
                raise StoreFormatError(
                    f"the store database {self.directory / DBNAME} holds a {kind} {name!r} that compressor-plugin "
                    f"does not create: it was changed by another program, and is not used. Everything in a store "
                    f"can be recomputed: delete the store folder ({self.directory.parent}) to start it afresh")

    def close(self) -> None:
        """Close this thread's connection (reopened on next use)."""
        con = getattr(self._local, "con", None)
        if con is not None:
            con.close()
            self._local.con = None

    def _check_writable(self) -> None:
        if self.read_only:
            raise StoreReadOnlyError(f"the store folder {self.directory} is open read-only")

    @contextmanager
    def _write_txn(self, con: sqlite3.Connection | None = None) -> Iterator[sqlite3.Connection]:
        con = con or self._con
        con.execute("BEGIN IMMEDIATE")
        try:
            yield con
        except BaseException:
            try:
                con.execute("ROLLBACK")
            except sqlite3.Error:  # the failed statement may have rolled back already
                pass
            raise
        con.execute("COMMIT")

    # ------------------------------------------------------------------ files
    def _open_dir(self, parts: Iterable[str], create: bool = False) -> int:
        """A descriptor of ``directory/part/...``, opening each step without following symlinks."""
        fd = os.open(self.directory, _NOFOLLOW_DIR)
        try:
            for part in parts:
                if create:
                    try:
                        os.mkdir(part, 0o755, dir_fd=fd)
                    except FileExistsError:
                        pass
                nxt = os.open(part, _NOFOLLOW_DIR, dir_fd=fd)
                os.close(fd)
                fd = nxt
        except BaseException:
            os.close(fd)
            raise
        return fd

    @staticmethod
    def _parse_filename(filename: Any) -> tuple[str, str, str]:
        m = _FILE_RE.fullmatch(filename) if isinstance(filename, str) else None
        if m is None:
            raise ValueError(f"value file name {filename!r} is not one this store writes")
        return m.group(1), m.group(2), m.group(3)

    def read_file(self, filename: Any, size: Any) -> bytes:
        """The bytes of value file ``filename`` (relative), checked before reading.

        Raises:
            ValueError: a name of another form, a size that is not the row's, too large, or a
                path that is not a regular file inside the folder.
            OSError: the file is missing or unreadable.
        """
        a, b, name = self._parse_filename(filename)
        if not isinstance(size, int) or size < 0 or size > self.max_value_size:
            raise ValueError(f"value file {filename} has size {size!r} in the database "
                             f"(at most {self.max_value_size} bytes are read)")
        dfd = self._open_dir((a, b))
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0), dir_fd=dfd)
        finally:
            os.close(dfd)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ValueError(f"value file {filename} is not a regular file")
            if st.st_size != size:
                raise ValueError(f"value file {filename} has {st.st_size} bytes, the database says {size}")
            chunks, left = [], size
            while left > 0:
                chunk = os.read(fd, left)
                if not chunk:
                    break
                chunks.append(chunk)
                left -= len(chunk)
            data = b"".join(chunks)
            if len(data) != size or os.read(fd, 1):
                raise ValueError(f"value file {filename} changed size while being read")
            return data
        finally:
            os.close(fd)

    def _write_file(self, data: bytes, folder: "_FanOut | None" = None) -> str:
        """Write ``data`` to a new value file; returns its relative name. No partial file is left.

        ``folder``: the fan-out folder shared by the files of one batch (opened on first use,
        reopened elsewhere when another process removed it meanwhile; the caller closes it), so
        a batch descends the folder tree once instead of once per file. Without it, the file
        gets a folder of its own choosing.
        """
        own = folder is None
        folder = _FanOut() if own else folder
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
        try:
            for attempt in range(10):
                # Another process removing the last file of ab/cd also removes the emptied
                # folders; if that happens between opening them and creating the file, retry.
                if folder.fd < 0:
                    a_b = os.urandom(2).hex()
                    folder.fd, folder.prefix = self._open_dir((a_b[:2], a_b[2:]), create=True), f"{a_b[:2]}/{a_b[2:]}"
                name = os.urandom(14).hex() + ".val"
                try:
                    fd = os.open(name, flags, 0o644, dir_fd=folder.fd)
                    break
                except FileNotFoundError:
                    folder.close()
                    if attempt == 9:
                        raise
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            except BaseException:
                os.close(fd)
                fd = -1
                try:
                    os.unlink(name, dir_fd=folder.fd)
                except OSError:
                    pass
                raise
            finally:
                if fd >= 0:
                    os.close(fd)
            return f"{folder.prefix}/{name}"
        finally:
            if own:
                folder.close()

    def remove_file(self, filename: Any) -> bool:
        """Remove a value file (and its emptied sub-folders); names of any other form are ignored."""
        try:
            a, b, name = self._parse_filename(filename)
        except ValueError:
            logger.warning("not removing %r: not a value file name of store %s", filename, self.directory)
            return False
        try:
            dfd = self._open_dir((a, b))
        except OSError:
            return False
        try:
            os.unlink(name, dir_fd=dfd)  # unlinks a symlink itself, never its target
            removed = True
        except OSError:
            removed = False
        finally:
            os.close(dfd)
        for parts in ((a, b), (a,)):
            try:
                pfd = self._open_dir(parts[:-1])
                try:
                    os.rmdir(parts[-1], dir_fd=pfd)
                finally:
                    os.close(pfd)
            except OSError:
                break  # not empty (or gone)
        return removed

    # ------------------------------------------------------------------ reads
    def get(self, name: str, default: Any = None, retry: bool = False, *, touch: bool = True) -> Any:
        """The bytes stored under ``name``, a :class:`RefusedValue`, or ``default``.

        Expired entries read as absent. With the LRU policy and ``touch`` the access time is
        updated; a failure to do so (full or read-only disk, lock held) is logged and skipped.

        Raises:
            sqlite3.Error: the database cannot be read.
        """
        return self.get_many([name], touch=touch).get(name, default)

    def get_many(self, names: Iterable[str], *, touch: bool = True) -> dict[str, Any]:
        """``{name: value}`` for those of ``names`` that are present, each value as :meth:`get` returns it.

        One query per ``_NAMES_PER_QUERY`` names and one access-time update for their rows,
        instead of two statements per name.

        Raises:
            sqlite3.Error: the database cannot be read.
        """
        wanted = list(dict.fromkeys(names))
        found: dict[str, Any] = {}
        for i in range(0, len(wanted), _NAMES_PER_QUERY):
            part = wanted[i:i + _NAMES_PER_QUERY]
            # The value is fetched only for a raw-mode BLOB (the only row kind whose value is
            # returned), and only up to max_value_size bytes: length() counts characters for a
            # TEXT value (a 4-byte character counts 1), so only a BLOB's length is a byte count.
            # typeof() and a BLOB's length() are answered without reading the value. Rows are
            # taken one at a time (a planted duplicate row is dropped as soon as it is read).
            rows = self._con.execute(
                "SELECT key, rowid, mode, filename, size, typeof(value), CASE WHEN typeof(value) = 'blob' THEN"
                " length(value) END, CASE WHEN mode = ? AND typeof(value) = 'blob' AND length(value) <= ? THEN value"
                f" END FROM Cache WHERE key IN ({','.join('?' * len(part))}) AND raw = 1 AND"
                " (expire_time IS NULL OR expire_time > ?)",
                (MODE_RAW, self.max_value_size, *part, time.time()))
            read: list[int] = []
            for name, rowid, mode, filename, size, vtype, vlen, value in rows:
                if name in found:  # one row per name (a unique index); a planted duplicate is ignored
                    continue
                result = self._row_value(mode, filename, size, vtype, vlen, value)
                if result is not _ABSENT:
                    found[name] = result
                    read.append(rowid)
            if touch and read and self.eviction_policy == "least-recently-used" and not self.read_only:
                self._touch(read)
        return found

    def _row_value(self, mode: Any, filename: Any, size: Any, vtype: Any, vlen: Any, value: Any) -> Any:
        """The bytes of one row, a :class:`RefusedValue`, or ``_ABSENT`` (its file was removed meanwhile)."""
        if mode == MODE_RAW:
            if vtype != "blob":
                return RefusedValue(f"raw {vtype} value")
            if value is None:
                return RefusedValue(f"value of {vlen} bytes in the database is larger than {self.max_value_size}")
            return bytes(value)
        if mode == MODE_BINARY:
            try:
                return self.read_file(filename, size)
            except ValueError as exc:
                return RefusedValue(str(exc))
            except FileNotFoundError:
                # Removed meanwhile (an overwrite or eviction in another process that committed
                # after this row was read): a plain miss. The current row may be a good one, so
                # it is not reported as bad; verify() removes rows whose file stays missing.
                return _ABSENT
            except OSError as exc:
                return RefusedValue(f"value file {filename!r} cannot be read: {exc}")
        return RefusedValue(f"value stored in diskcache mode {mode!r} (pickle or text), refused")

    def _touch(self, rowids: list[int]) -> None:
        con = self._con
        try:
            # A hit does not wait for another process's write lock: it gives up on the LRU
            # update after 50 ms instead of waiting up to ``timeout``.
            con.execute("PRAGMA busy_timeout = 50")
            try:
                con.execute("UPDATE Cache SET access_time = ?, access_count = access_count + 1 WHERE rowid IN"
                            f" ({','.join('?' * len(rowids))})", (time.time(), *rowids))
            finally:
                con.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
        except sqlite3.Error as exc:
            if not getattr(self._local, "touch_warned", False):
                self._local.touch_warned = True
                logger.warning("store %s: cannot record a read for LRU eviction (%s); serving it anyway",
                               self.directory, exc)

    def __contains__(self, name: object) -> bool:
        row = self._con.execute("SELECT 1 FROM Cache WHERE key = ? AND raw = 1 AND "
                                "(expire_time IS NULL OR expire_time > ?)", (name, time.time())).fetchone()
        return row is not None

    def iterkeys(self) -> Iterator[Any]:
        """Every key, in insertion order; keys in pickle form (or absurdly long) as :data:`FOREIGN_KEY`.

        Reads the table in pages of 1,000 rows, so memory stays bounded however many rows
        the database holds, and rows added or removed meanwhile do not disturb the walk.
        """
        start = -2**63  # rowids are 64-bit signed; "rowid >= ?" is a range seek, not a scan from the start
        while True:
            # A key's length is measured in bytes (length() of TEXT counts characters).
            rows = self._con.execute(
                "SELECT rowid, CASE WHEN length(CAST(key AS BLOB)) <= ? THEN key END, raw FROM Cache"
                " WHERE rowid >= ? ORDER BY rowid LIMIT 1000", (_MAX_KEY_LENGTH, start)).fetchall()
            if not rows:
                return
            for rowid, key, raw in rows:
                yield key if raw == 1 and isinstance(key, str) else FOREIGN_KEY
            if rows[-1][0] >= 2**63 - 1:
                return
            start = rows[-1][0] + 1

    def __len__(self) -> int:
        return int(self._con.execute("SELECT count(*) FROM Cache").fetchone()[0])

    def volume(self) -> int:
        """Bytes used: values plus database pages."""
        return self._volume(self._con)

    def _volume(self, con: sqlite3.Connection) -> int:
        ((pages,),) = con.execute("PRAGMA page_count").fetchall()
        ((page_size,),) = con.execute("PRAGMA page_size").fetchall()
        try:
            row = con.execute("SELECT file_bytes FROM StoreVolume WHERE id = 0").fetchone()
        except sqlite3.OperationalError:  # a database this version has not opened for writing yet
            row = None
        values = row[0] if row is not None and isinstance(row[0], int) else con.execute(_EXACT_FILE_BYTES).fetchone()[0]
        return int(pages) * int(page_size) + max(int(values or 0), 0)

    # ------------------------------------------------------------------ writes
    def set_many(self, entries: Iterable[tuple[str, bytes]], *, expire: float | None = None) -> int:
        """Store every ``(name, bytes)`` in one transaction, then evict; returns the bytes written.

        Atomic: either every entry is committed or none is, and a failure removes the value
        files this call wrote. Files of replaced entries are removed only after the commit.

        Raises:
            StoreReadOnlyError: the cache is read-only.
            ValueTooLargeError: a value larger than ``max_value_size`` or the size limit.
            StoreWriteError: the disk is full or a write failed (nothing was kept).
        """
        self._check_writable()
        items = list(entries)
        for name, data in items:
            if type(name) is not str:
                raise TypeError(f"store keys are str, not {type(name).__name__}")
            if type(data) is not bytes:
                raise TypeError(f"the store keeps bytes only, not {type(data).__name__}")
            if len(data) > min(self.max_value_size, self.size_limit):
                raise ValueTooLargeError(
                    f"value for {name!r} is {len(data)} bytes; store {self.directory} takes values of at most "
                    f"{min(self.max_value_size, self.size_limit)} bytes (its size limit is {self.size_limit})")
        written: list[str] = []
        replaced: list[str] = []
        now = time.time()
        expire_time = now + expire if expire is not None else None
        folder = _FanOut()  # the batch's value files share one fan-out folder
        try:
            rows = []
            for name, data in items:
                if len(data) >= self.min_file_size:
                    filename = self._write_file(data, folder)
                    written.append(filename)
                    rows.append((name, len(data), MODE_BINARY, filename, None))
                else:
                    rows.append((name, len(data), MODE_RAW, None, sqlite3.Binary(data)))
            folder.close()
            with self._write_txn() as con:
                for name, size, mode, filename, value in rows:
                    old = con.execute("SELECT rowid, filename FROM Cache WHERE key = ? AND raw = 1", (name,)).fetchone()
                    if old is not None:
                        replaced.append(old[1])
                        con.execute("UPDATE Cache SET store_time = ?, expire_time = ?, access_time = ?, access_count = 0,"
                                    " tag = NULL, size = ?, mode = ?, filename = ?, value = ? WHERE rowid = ?",
                                    (now, expire_time, now, size, mode, filename, value, old[0]))
                    else:
                        con.execute("INSERT INTO Cache (key, raw, store_time, expire_time, access_time, access_count,"
                                    " tag, size, mode, filename, value) VALUES (?, 1, ?, ?, ?, 0, NULL, ?, ?, ?, ?)",
                                    (name, now, expire_time, now, size, mode, filename, value))
                replaced.extend(self._cull(con, protect=now))
        except BaseException as exc:
            folder.close()
            for filename in written:
                self.remove_file(filename)
            if isinstance(exc, (OSError, sqlite3.OperationalError)) and not isinstance(exc, StoreError):
                if is_read_only(exc):
                    raise StoreReadOnlyError(f"store folder {self.directory} cannot be written: {exc}") from exc
                raise StoreWriteError(f"could not write to store {self.directory}: {exc}"
                                      + (" (disk full)" if is_disk_full(exc) else "")) from exc
            raise
        for filename in replaced:
            if filename is not None:
                self.remove_file(filename)
        return sum(len(d) for _, d in items)

    def set(self, name: str, data: bytes, expire: float | None = None, retry: bool = False) -> bool:
        """Store one entry (see :meth:`set_many`)."""
        self.set_many([(name, data)], expire=expire)
        return True

    def _cull(self, con: sqlite3.Connection, protect: float | None = None) -> list[str | None]:
        """Evict (inside the caller's transaction) until under the size limit; returns files to remove.

        Rows stored at time ``protect`` (the batch being written) are never evicted, so a
        write is kept even when the database pages alone fill the limit (the limit is then
        exceeded by that batch).
        """
        if self.eviction_policy == "none":
            return []
        order = "access_time" if self.eviction_policy == "least-recently-used" else "store_time"
        over = self._volume(con) - self.size_limit
        files: list[str | None] = []
        while over > 0:
            rows = con.execute(f"SELECT rowid, size, filename FROM Cache WHERE store_time IS NOT ? ORDER BY {order} "
                               "LIMIT 10", (protect,)).fetchall()
            if not rows:
                break
            for rowid, size, filename in rows:
                con.execute("DELETE FROM Cache WHERE rowid = ?", (rowid,))
                files.append(filename)
                # A value inside SQLite frees its pages at commit (auto_vacuum); count it alike.
                over -= size if isinstance(size, int) else 0
                if over <= 0:
                    break
        return files

    def delete(self, name: str, retry: bool = False) -> bool:
        """Remove ``name`` (any stored form of a str key); True if it was there."""
        self._check_writable()
        with self._write_txn() as con:
            row = con.execute("SELECT rowid, filename FROM Cache WHERE key = ? AND raw = 1", (name,)).fetchone()
            if row is None:
                return False
            con.execute("DELETE FROM Cache WHERE rowid = ?", (row[0],))
        if row[1] is not None:
            self.remove_file(row[1])
        return True

    def expire(self, retry: bool = False) -> int:
        """Remove expired entries; returns how many."""
        self._check_writable()
        with self._write_txn() as con:
            rows = con.execute("SELECT rowid, filename FROM Cache WHERE expire_time IS NOT NULL AND expire_time <= ?",
                               (time.time(),)).fetchall()
            con.executemany("DELETE FROM Cache WHERE rowid = ?", [(r,) for r, _ in rows])
        for _, filename in rows:
            if filename is not None:
                self.remove_file(filename)
        return len(rows)

    def clear(self, retry: bool = False) -> int:
        """Remove every row and every value file; returns the number of rows.

        On a full disk the value files are removed first, to free the space SQLite needs.
        """
        self._check_writable()
        try:
            count = self._delete_all()
        except sqlite3.OperationalError as exc:
            if not is_disk_full(exc):
                raise
            self._remove_value_files(set())
            count = self._delete_all()
        self._remove_value_files(set())
        return count

    def _delete_all(self) -> int:
        """Delete every row in one transaction, in batches (one statement per batch stays far
        below the statement step limit, however many rows there are); returns how many."""
        with self._write_txn() as con:
            ((count,),) = con.execute("SELECT count(*) FROM Cache").fetchall()
            while con.execute("DELETE FROM Cache WHERE rowid IN (SELECT rowid FROM Cache LIMIT ?)",
                              (_CLEAR_BATCH,)).rowcount > 0:
                pass
        return int(count)

    def _remove_value_files(self, keep: set[str]) -> int:
        """Remove value files (and stray temporary files) not named in ``keep``; symlinks are unlinked, not followed."""
        removed = 0
        for a in sorted(os.listdir(self.directory)):
            if not re.fullmatch(r"[0-9a-f]{2}", a):
                continue
            try:
                subs = os.listdir(self.directory / a) if not (self.directory / a).is_symlink() else []
            except OSError:
                continue
            for b in sorted(subs):
                if not re.fullmatch(r"[0-9a-f]{2}", b) or (self.directory / a / b).is_symlink():
                    continue
                try:
                    names = os.listdir(self.directory / a / b)
                except OSError:
                    continue
                for name in names:
                    rel = f"{a}/{b}/{name}"
                    if rel not in keep and _FILE_RE.fullmatch(rel):
                        removed += self.remove_file(rel)
            for parts in ((a,),):  # a now-empty top folder left by a symlink or stray entries
                try:
                    os.rmdir(self.directory / parts[0])
                except OSError:
                    pass
        return removed

    def check(self, fix: bool = True) -> dict[str, int]:
        """Find value files no row refers to and rows whose file is missing, bad or malformed.

        With ``fix`` they are removed (a write in progress in another process at that moment
        may be lost: its file can look unreferenced). Returns ``orphan_files`` and ``bad_rows``.
        """
        rows = self._con.execute("SELECT rowid, filename, size FROM Cache WHERE filename IS NOT NULL").fetchall()
        bad, keep = [], set()
        for rowid, filename, size in rows:
            try:
                a, b, name = self._parse_filename(filename)
                dfd = self._open_dir((a, b))
                try:
                    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                finally:
                    os.close(dfd)
                if not stat.S_ISREG(st.st_mode) or st.st_size != size:
                    raise ValueError(f"not a regular file of {size!r} bytes")
                keep.add(filename)
            except (ValueError, OSError) as exc:
                logger.warning("store %s: row %d names value file %r: %s", self.directory, rowid, filename, exc)
                bad.append(rowid)
        out = {"orphan_files": 0, "bad_rows": len(bad)}
        if not fix:
            return out
        self._check_writable()
        if bad:
            with self._write_txn() as con:
                con.executemany("DELETE FROM Cache WHERE rowid = ?", [(r,) for r in bad])
        out["orphan_files"] = self._remove_value_files(keep)
        with self._write_txn() as con:  # resynchronise the running total (other clients may have skipped it)
            con.execute(f"UPDATE StoreVolume SET file_bytes = ({_EXACT_FILE_BYTES}) WHERE id = 0")
        return out
