"""The `vtai` command: users, usage, plans, models and the spool, against the same database as
the app.

Every failure is one line on stderr and a non-zero exit; no stack traces. A warning is a line on
stderr starting `vtai: warning:`, with exit 0. Every change to a plan, a model, a weight or a
user's tier is written to the audit trail (vtai.plans.audit) as `cli:<OS user>`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

from vtai.admin import balances
from vtai.api import keys as api_keys
from vtai.db import accounts as users
from vtai.db.connection import Database, DatabaseError
from vtai.llm import catalogue, models
from vtai.metering.gate import Gate
from vtai.metering.ledger import Ledger
from vtai.metering.spool import ReplayStopped, Spool
from vtai.plans import audit
from vtai.plans import tiers as plans
from vtai.settings import LIMIT_VARS, NEEDS_DATABASE, Settings, SettingsError, load_settings
from vtai.ui import quota


class CliError(Exception):
    pass


def _read_password(args: argparse.Namespace) -> str:
    if not args.password_stdin:
        raise CliError("pass the password on standard input with --password-stdin")
    password = sys.stdin.readline().rstrip("\r\n")
    if not password.strip():
        raise CliError("the password is empty")
    return password


async def _with_db(settings: Settings, work: Callable[[Database], Awaitable[int]]) -> int:
    if settings.rest_metering:
        # Without this, the command would quietly work on an embedded database instead.
        hint = "; with Supabase Auth, manage users in the Supabase dashboard"
        raise CliError(f"this command {NEEDS_DATABASE}{hint}")
    db = await Database(settings, pool_size=2).open()
    try:
        return await work(db)
    finally:
        await db.close()


async def user_add(settings: Settings, args: argparse.Namespace) -> int:
    password = _read_password(args)

    async def work(db: Database) -> int:
        async with db.pool.acquire() as conn:
            p = await users.create_user(conn, args.name, password, args.tier, args.admin)
        print(f"created {p.username} ({p.tier}{', admin' if p.is_admin else ''})")
        return 0

    return await _with_db(settings, work)


def _warn(text: str) -> None:
    print(f"vtai: warning: {text}", file=sys.stderr)


async def user_tier(settings: Settings, args: argparse.Namespace) -> int:
    async def work(db: Database) -> int:
        async with db.pool.acquire() as conn, conn.transaction():
            was = await conn.fetchval(
                "select tier from public.profiles where username = $1 for update", args.name
            )
            p = await users.set_tier(conn, args.name, args.tier)
            if was != p.tier:
                await audit.record(
                    conn,
                    audit.cli_actor(),
                    audit.USER_TIER,
                    p.username,
                    {"tier": was},
                    {"tier": p.tier},
                )
        print(f"{p.username} is now on the {p.tier} tier")
        return 0

    return await _with_db(settings, work)


async def user_password(settings: Settings, args: argparse.Namespace) -> int:
    password = _read_password(args)

    async def work(db: Database) -> int:
        async with db.pool.acquire() as conn:
            ended = await users.set_password(conn, args.name, password)
        print(f"password changed for {args.name}; {_logins(ended)} ended")
        return 0

    return await _with_db(settings, work)


def _logins(n: int) -> str:
    return f"{n} login{'' if n == 1 else 's'}"


async def user_logout(settings: Settings, args: argparse.Namespace) -> int:
    async def work(db: Database) -> int:
        async with db.pool.acquire() as conn:
            ended = await users.end_sessions(conn, args.name)
        print(f"{args.name}: {_logins(ended)} ended")
        return 0

    return await _with_db(settings, work)


async def user_disable(settings: Settings, args: argparse.Namespace) -> int:
    async def work(db: Database) -> int:
        async with db.pool.acquire() as conn:
            ended = await users.set_disabled(conn, args.name, True)
        print(f"{args.name} is disabled ({_logins(ended)} ended); `vtai user enable` undoes it")
        return 0

    return await _with_db(settings, work)


async def user_enable(settings: Settings, args: argparse.Namespace) -> int:
    async def work(db: Database) -> int:
        async with db.pool.acquire() as conn:
            await users.set_disabled(conn, args.name, False)
        print(f"{args.name} may log in again")
        return 0

    return await _with_db(settings, work)


async def user_list(settings: Settings, args: argparse.Namespace) -> int:
    async def work(db: Database) -> int:
        async with db.pool.acquire() as conn:
            found = await users.list_users(conn)
            disabled = await users.disabled_names(conn)
        if not found:
            print("no users yet: add one with `vtai user add NAME --password-stdin`")
        for p in found:
            marks = (("admin", p.is_admin), ("disabled", p.username in disabled))
            flags = [mark for mark, on in marks if on]
            print(f"{p.username:<24} {p.tier:<10} {' '.join(flags)}".rstrip())
        return 0

    return await _with_db(settings, work)


async def usage(settings: Settings, args: argparse.Namespace) -> int:
    async def work(db: Database) -> int:
        if args.verify:
            counters = await db.pool.fetch("select * from public.vtai_verify_counters()")
            for r in counters:
                print(
                    f"mismatch: user {r['end_user']} {r['counter']} {r['period_start']:%Y-%m-%d}: "
                    f"counter {r['counter_used']}, ledger {r['ledger_used']}"
                )
            buckets = await db.pool.fetch("select * from public.vtai_verify_aggregates()")
            for r in buckets:
                print(
                    f"mismatch: aggregates {r['bucket_start']:%Y-%m-%d} user {r['end_user']} "
                    f"model {r['model']} {r['what']}: {r['aggregate_value']} vs ledger "
                    f"{r['ledger_value']}"
                )
            if counters or buckets:
                return 1
            print("ok: usage counters and aggregates equal the ledger")
            return 0
        if not args.name:
            raise CliError("name a user (vtai usage NAME) or pass --verify")
        async with db.pool.acquire() as conn:
            profile = await users.require(conn, args.name)
        gate = Gate(db.pool, settings.usage_period)
        u = await gate.usage(profile.id)
        print(f"{u.username}: {quota.describe_usage(u)}")
        return 0

    return await _with_db(settings, work)


def _spool_dirs(settings: Settings) -> list[Path]:
    """This process's spool, and each app process's under `make run WORKERS=N` (procs/*)."""
    found = [settings.spool_dir]
    procs = settings.data_dir / "procs"
    if procs.is_dir():
        found += [d / "spool" for d in sorted(procs.iterdir()) if (d / "spool").is_dir()]
    return list(dict.fromkeys(found))


async def spool_status(settings: Settings, args: argparse.Namespace) -> int:
    for directory in _spool_dirs(settings):
        status = Spool(directory).status()
        print(f"{status.waiting} row(s) waiting, {status.quarantined} quarantined (in {directory})")
    return 0


async def _replay(ledger: Ledger) -> int:
    # Rows a dead app process was still writing; a live one's come back as no-op duplicates.
    await ledger.replayer.recover()
    try:
        r = await ledger.replayer.replay()
    except ReplayStopped as exc:
        raise CliError(f"replay stopped, the database stopped answering: {exc}") from None
    print(
        f"replayed {r.recorded} row(s), {r.duplicates} already recorded, "
        f"{r.quarantined} quarantined"
    )
    return 0


async def spool_replay(settings: Settings, args: argparse.Namespace) -> int:
    if settings.rest_metering:
        from vtai.rest.store import SupabaseStore

        store = await SupabaseStore.connect(
            settings.supabase_url,
            settings.supabase_service_key.get_secret_value(),
            settings.usage_period,
        )
        try:
            for directory in _spool_dirs(settings):
                await _replay(Ledger(store, Spool(directory)))
            return 0
        finally:
            await store.close()

    async def work(db: Database) -> int:
        for directory in _spool_dirs(settings):
            await _replay(Ledger(db.pool, Spool(directory), settings.usage_period))
        return 0

    return await _with_db(settings, work)


async def balances_sync(settings: Settings, args: argparse.Namespace) -> int:
    async def work(db: Database) -> int:
        return await balances.cli_sync(db.pool)

    return await _with_db(settings, work)


async def model_add(settings: Settings, args: argparse.Namespace) -> int:
    price_in = catalogue.parse_price(args.price_in, "--price-in")
    price_out = catalogue.parse_price(args.price_out, "--price-out")
    weight = catalogue.parse_weight(args.weight, "--weight")

    async def work(db: Database) -> int:
        async with db.pool.acquire() as conn:
            entry = await catalogue.add(
                conn,
                args.name,
                args.display,
                args.api_base,
                args.api_key_env,
                price_in,
                price_out,
                weight,
                actor=audit.cli_actor(),
            )
        reason = models.unavailable_reason(entry, settings=settings)
        where = f" at {entry.api_base}" if entry.api_base else ""
        state = "offered" if reason is None else f"not offered here yet: {reason}"
        print(f"added {entry.model}{where} ({state})")
        return 0

    return await _with_db(settings, work)


def _price(value: float | None) -> str:
    return "-" if value is None else f"{value:.10g}"


async def model_list(settings: Settings, args: argparse.Namespace) -> int:
    async def work(db: Database) -> int:
        async with db.pool.acquire() as conn:
            entries = await catalogue.read(conn)
        if not entries:
            print("no models in the catalogue: add one with `vtai model add NAME`")
        print(
            f"{'model':<46} {'display':<28} {'weight':>6} {'in $/tok':>10} {'out $/tok':>10}"
            "  status"
        )
        for e in entries:
            reason = models.unavailable_reason(e, settings=settings)
            status = "available" if reason is None else f"unavailable: {reason}"
            print(
                f"{e.model:<46} {(e.display_name or '-'):<28} {e.weight:>6g} "
                f"{_price(e.price_in):>10} {_price(e.price_out):>10}  {status}"
            )
        return 0

    return await _with_db(settings, work)


def _toggle(enabled: bool):
    async def run(settings: Settings, args: argparse.Namespace) -> int:
        async def work(db: Database) -> int:
            async with db.pool.acquire() as conn:
                changed = await catalogue.set_enabled(
                    conn, args.name, enabled, actor=audit.cli_actor()
                )
            state = "enabled" if enabled else "disabled: no longer offered or run"
            print(f"{args.name} is {state}{'' if changed else ' (it already was)'}")
            return 0

        return await _with_db(settings, work)

    return run


async def model_weight(settings: Settings, args: argparse.Namespace) -> int:
    weight = catalogue.parse_weight(args.weight, "WEIGHT")

    async def work(db: Database) -> int:
        async with db.pool.acquire() as conn:
            changed = await catalogue.set_weight(
                conn, args.pattern, weight, actor=audit.cli_actor()
            )
        if not changed:
            _warn(f"no model matches {args.pattern!r}")
        for name in changed:
            print(f"{name}: weight {weight:g}")
        return 0

    return await _with_db(settings, work)


async def tier_show(settings: Settings, args: argparse.Namespace) -> int:
    async def work(db: Database) -> int:
        async with db.pool.acquire() as conn:
            found = await plans.read(conn)
        period = settings.usage_period
        print(
            f"{'tier':<12} {'tokens/' + period:>16} {'daily':>12} {'usd/' + period:>14}"
            f" {'rpm':>7}  models"
        )
        for p in found:
            print(
                f"{p.name:<12} {plans.shown(p.token_limit):>16} {plans.shown(p.daily_limit):>12}"
                f" {plans.shown(p.usd_limit):>14} {plans.shown(p.rpm):>7}  {plans.shown(p.models)}"
            )
        for tier, limit in settings.tier_limits.items():
            print(f"({LIMIT_VARS[tier]}={limit} sets the {tier} tier's tokens at every start-up)")
        return 0

    return await _with_db(settings, work)


async def tier_set(settings: Settings, args: argparse.Namespace) -> int:
    given = {name: getattr(args, name) for name in plans.FIELDS}
    if all(value is None for value in given.values()):
        raise CliError("TIER: say what to change: --tokens, --daily, --usd, --rpm or --models")
    changes = plans.parse_changes(given, prefix="--")

    async def work(db: Database) -> int:
        async with db.pool.acquire() as conn:
            saved = await plans.save(conn, args.tier, changes, audit.cli_actor())
        for warning in saved.warnings:
            _warn(warning)
        override = plans.env_override(args.tier, changes, settings.tier_limits)
        if override:
            _warn(override)
        if not saved.changed:
            print(f"{args.tier}: no change")
            return 0
        for name, column in plans.FIELDS.items():
            was, now = getattr(saved.before, column), getattr(saved.after, column)
            if was != now:
                print(f"{args.tier}: {name} {plans.shown(was)} -> {plans.shown(now)}")
        return 0

    return await _with_db(settings, work)


# --- API keys (vtai.api.keys): audited as cli:<OS user> ---------------------------------------


async def _with_keys_db(settings: Settings, work: Callable[[Database], Awaitable[int]]) -> int:
    if settings.rest_metering:
        raise CliError(f"`vtai key` {NEEDS_DATABASE}")
    return await _with_db(settings, work)


def _cli_field(exc: Exception) -> CliError:
    """vtai.api.keys names the form's fields; here they are the command's."""
    text = str(exc)
    for field, flag in (("label: ", "--label: "), ("expires_days: ", "--expires-days: ")):
        if text.startswith(field):
            text = flag + text[len(field) :]
    return CliError(text)


def _when(value) -> str:
    return "-" if value is None else f"{value:%Y-%m-%d %H:%M}"


async def key_create(settings: Settings, args: argparse.Namespace) -> int:
    try:
        expires_at = api_keys.expiry_in_days(args.expires_days, "--expires-days")
        api_keys.check_label(args.label)
    except api_keys.ApiKeyError as exc:
        raise _cli_field(exc) from None

    async def work(db: Database) -> int:
        async with db.pool.acquire() as conn:
            profile = await users.require(conn, args.name)
            try:
                key, plain = await api_keys.create(
                    conn, profile.id, args.label, expires_at, actor=audit.cli_actor()
                )
            except api_keys.ApiKeyError as exc:
                raise _cli_field(exc) from None
        # The key alone on stdout (KEY=$(vtai key create ...)); what it is on stderr.
        print(plain)
        print(
            f"created key {key.prefix} {key.label!r} for {key.username} (id {key.id},"
            f" expires {_when(key.expires_at) if key.expires_at else 'never'})",
            file=sys.stderr,
        )
        print(api_keys.SHOWN_ONCE, file=sys.stderr)
        return 0

    return await _with_keys_db(settings, work)


async def key_list(settings: Settings, args: argparse.Namespace) -> int:
    async def work(db: Database) -> int:
        async with db.pool.acquire() as conn:
            user_id = (await users.require(conn, args.name)).id if args.name else None
            found = await api_keys.list_keys(conn, user_id)
            used = await api_keys.usage(conn, [k.id for k in found], settings.usage_period)
        if not found:
            print("no API keys yet: make one with `vtai key create NAME --label LABEL`")
            return 0
        print(
            f"{'id':<36}  {'user':<16} {'label':<20} {'prefix':<12} {'tokens':>10}"
            f"  {'created':<16}  {'last used':<16}  {'expires':<16}  state"
        )
        for k in found:
            print(
                f"{k.id!s:<36}  {k.username:<16} {k.label:<20} {k.prefix:<12}"
                f" {used.get(k.id, 0):>10,}  {_when(k.created_at):<16}  {_when(k.last_used_at):<16}"
                f"  {_when(k.expires_at):<16}  {k.state()}"
            )
        return 0

    return await _with_keys_db(settings, work)


async def key_revoke(settings: Settings, args: argparse.Namespace) -> int:
    try:
        key_id = uuid.UUID(args.id)
    except ValueError:
        raise CliError(f"ID: {args.id!r} is not a key id (see: vtai key list)") from None

    async def work(db: Database) -> int:
        async with db.pool.acquire() as conn:
            try:
                key, changed = await api_keys.revoke(conn, key_id, actor=audit.cli_actor())
            except api_keys.KeyNotFound:
                raise CliError(f"ID: no key {key_id} (see: vtai key list)") from None
        what = f"key {key.prefix} {key.label!r} of {key.username}"
        print(f"{what} is revoked" + ("" if changed else " (it already was)"))
        return 0

    return await _with_keys_db(settings, work)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vtai", description="Manage VT.ai users, usage, plans and models."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    user = sub.add_parser("user", help="manage accounts").add_subparsers(
        dest="action", required=True
    )
    add = user.add_parser("add", help="create an account")
    add.add_argument("name")
    add.add_argument("--tier", default="free")
    add.add_argument("--admin", action="store_true")
    add.add_argument("--password-stdin", action="store_true")
    add.set_defaults(run=user_add)
    tier = user.add_parser("tier", help="change an account's tier")
    tier.add_argument("name")
    tier.add_argument("tier")
    tier.set_defaults(run=user_tier)
    pw = user.add_parser("password", help="set an account's password (ends its logins)")
    pw.add_argument("name")
    pw.add_argument("--password-stdin", action="store_true")
    pw.set_defaults(run=user_password)
    for name, run, text in (
        ("logout", user_logout, "end every login of an account (its cookies stop working)"),
        ("disable", user_disable, "end every login and refuse new ones until enabled"),
        ("enable", user_enable, "let a disabled account log in again"),
    ):
        action = user.add_parser(name, help=text)
        action.add_argument("name")
        action.set_defaults(run=run)
    user.add_parser("list", help="list accounts").set_defaults(run=user_list)

    tiers = sub.add_parser("tier", help="the plans: each tier's caps and models").add_subparsers(
        dest="action", required=True
    )
    tiers.add_parser("show", help="every tier's caps (- for none) and models").set_defaults(
        run=tier_show
    )
    tset = tiers.add_parser("set", help="change a tier's caps or models (none clears a cap)")
    tset.add_argument("tier", metavar="TIER")
    tset.add_argument("--tokens", metavar="N|none", help="tokens per period")
    tset.add_argument("--daily", metavar="N|none", help="tokens per UTC day")
    tset.add_argument("--usd", metavar="X|none", help="US dollars per period")
    tset.add_argument("--rpm", metavar="N|none", help="requests per minute")
    tset.add_argument(
        "--models", metavar="'a,b'", help="model names or patterns, comma-separated (* is all)"
    )
    tset.set_defaults(run=tier_set)

    use = sub.add_parser("usage", help="a user's tokens this period, or --verify the counters")
    use.add_argument("name", nargs="?")
    use.add_argument("--verify", action="store_true")
    use.set_defaults(run=usage)

    spool = sub.add_parser("spool", help="rows waiting for the database").add_subparsers(
        dest="action", required=True
    )
    spool.add_parser("status").set_defaults(run=spool_status)
    spool.add_parser("replay").set_defaults(run=spool_replay)

    model = sub.add_parser("model", help="the models the chat offers").add_subparsers(
        dest="action", required=True
    )
    madd = model.add_parser("add", help="add a model to the catalogue")
    madd.add_argument("name", help="the LiteLLM model name, e.g. openai/my-model")
    madd.add_argument("--display", help="the name people see")
    madd.add_argument("--api-base", help="an OpenAI-compatible server's base URL")
    madd.add_argument("--api-key-env", help="the NAME of the variable holding its key")
    madd.add_argument("--price-in", help="USD per prompt token (wins over LiteLLM's price)")
    madd.add_argument("--price-out", help="USD per completion token")
    madd.add_argument("--weight", default="1")
    madd.set_defaults(run=model_add)
    model.add_parser("list", help="the catalogue, and why a model is not offered").set_defaults(
        run=model_list
    )
    for name, enabled in (("disable", False), ("enable", True)):
        toggle = model.add_parser(name, help=f"{name} a model")
        toggle.add_argument("name")
        toggle.set_defaults(run=_toggle(enabled))
    mweight = model.add_parser("weight", help="set the weight of the models matching PATTERN")
    mweight.add_argument("pattern", help="shell-style; * matches / too")
    mweight.add_argument("weight")
    mweight.set_defaults(run=model_weight)

    key = sub.add_parser("key", help="personal API keys for /v1").add_subparsers(
        dest="action", required=True
    )
    kcreate = key.add_parser("create", help="make a key for a user (shown once)")
    kcreate.add_argument("name", metavar="NAME", help="the user the key belongs to")
    kcreate.add_argument("--label", required=True, help="what the key is for, e.g. laptop")
    kcreate.add_argument("--expires-days", metavar="N", help="stop working after N days")
    kcreate.set_defaults(run=key_create)
    klist = key.add_parser("list", help="every key, or one user's, with its tokens this period")
    klist.add_argument("name", metavar="NAME", nargs="?")
    klist.set_defaults(run=key_list)
    krevoke = key.add_parser("revoke", help="revoke a key: its next request is refused")
    krevoke.add_argument("id", metavar="ID")
    krevoke.set_defaults(run=key_revoke)

    bal = sub.add_parser("balances", help="provider account balances").add_subparsers(
        dest="action", required=True
    )
    bal.add_parser("sync", help="fetch each provider's balance now").set_defaults(run=balances_sync)

    # Commands that live with the package whose job they are.
    from vtai.admin import reconcile
    from vtai.cluster import commands as cluster_commands
    from vtai.notify import commands as notify_commands
    from vtai.ops import doctor
    from vtai.retention import commands as retention_commands

    for module in (notify_commands, doctor, retention_commands, cluster_commands, reconcile):
        module.register(sub, user)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
        return asyncio.run(args.run(settings, args))
    except (
        CliError,
        SettingsError,
        DatabaseError,
        users.UserError,
        catalogue.CatalogueError,
        plans.PlanError,
        api_keys.ApiKeyError,
    ) as exc:
        print(f"vtai: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
