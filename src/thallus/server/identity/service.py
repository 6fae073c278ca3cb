"""The identity service: users, sessions, refresh-token rotation, API keys (docs/design.md §9).

Everything that touches identity state goes through :class:`Identity`, shared by the API routers,
the authentication layer and the CLI, so every path applies the same rules and writes the same
audit events.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import Counter
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, NoReturn, TypeVar

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from thallus.audit import AuditEvent, AuditSink, LogAuditSink
from thallus.correlation import uuid7
from thallus.errors import (
    AuthenticationError,
    ConflictError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    ServiceUnavailableError,
    ValidationError,
    invalid_field,
)
from thallus.principal import Principal
from thallus.server.identity import api_keys
from thallus.server.identity.emails import InvalidEmailError, SignInName, canonical_email, parse_email
from thallus.server.identity.keys import KeyRing
from thallus.server.identity.lockout import Attempt, LockoutUnavailableError, LoginLockout, Reservation
from thallus.server.identity.passwords import POLICY, HashingUnavailableError, PasswordHasher, password_problems
from thallus.server.identity.tokens import REFRESH_PURPOSE, AccessTokens, InvalidTokenError, new_refresh_token
from thallus.server.identity.view import IdentityView, SessionView, UserView
from thallus.server.settings import ServiceSettings
from thallus.server.storage import Database
from thallus.server.storage.models import ApiKey, RefreshToken, Session, User, utcnow

logger = logging.getLogger("thallus.server.identity")

T = TypeVar("T")
LOGIN_FAILED_MESSAGE = "The e-mail address or password is incorrect."
ROLES = ("user", "admin")
LAST_USED_FLUSH_SECONDS = 60.0
#: The keyed-hash purpose for sign-in identifiers that are not addresses (audit details only).
IDENTIFIER_PURPOSE = "sign-in-identifier"
#: Retry-After when an address's remaining attempts are all being verified right now.
BUSY_RETRY_AFTER = 1
HASHING_RETRY_AFTER = 2
#: How a sign-in ends, as :attr:`Identity.logins` counts it: a session, a wrong or unknown
#: credential, or an attempt the lockout refused (locked, or its attempts all under way).
LOGIN_OUTCOMES = ("success", "failure", "locked", "concurrent_attempts")


def normalize_email(email: str, *, loc: Sequence[str | int] = ("body", "email")) -> str:
    """The e-mail address in its canonical form (:mod:`thallus.server.identity.emails`), or a 422."""
    try:
        return parse_email(email)
    except InvalidEmailError as exc:
        raise invalid_field(loc, str(exc), printable(email[:320])) from None


def printable(text: str) -> str:
    """``text`` safe to encode as UTF-8 (a lone surrogate becomes an escape, not a crash)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def require_session(principal: Principal, action: str) -> None:
    """Password change and key management need a session, never an API key (docs/design.md §9)."""
    if principal.auth_method != "session":
        raise PermissionDeniedError(f"{action} needs a signed-in session, not an API key.")


def check_password(password: str, *, loc: Sequence[str | int] = ("body", "password")) -> None:
    problems = password_problems(password)
    if problems:
        raise ValidationError(
            f"The password must be {POLICY}.",
            details=[
                {"type": "password_policy", "loc": list(loc), "msg": problem, "input": "[redacted]"}
                for problem in problems
            ],
        )


def user_document(user: User | UserView) -> dict[str, Any]:
    return {
        "id": user.id,
        "email": user.email,
        "name": user.name,
        "role": user.role,
        "features": user.features,
        "created_at": user.created_at.isoformat(),
    }


def key_document(key: ApiKey, last_used_at: datetime | None = None) -> dict[str, Any]:
    last_used = max(filter(None, (key.last_used_at, last_used_at)), default=None)
    return {
        "id": key.id,
        "name": key.name,
        "preview": key.preview,
        "created_at": key.created_at.isoformat(),
        "expires_at": key.expires_at.isoformat() if key.expires_at else None,
        "last_used_at": last_used.isoformat() if last_used else None,
        "revoked_at": key.revoked_at.isoformat() if key.revoked_at else None,
    }


@dataclass(frozen=True, slots=True)
class Login:
    """A signed-in session: the access token for the client, the refresh token for the cookie."""

    user: User
    session_id: str
    access_token: str
    refresh_token: str


@dataclass(frozen=True, slots=True)
class ClientInfo:
    """The request an operation serves, for its audit record."""

    ip_address: str | None = None
    user_agent: str | None = None
    method: str | None = None
    path: str | None = None


class Identity:
    """Identity operations over one database; create with :meth:`from_settings`."""

    def __init__(
        self,
        settings: ServiceSettings,
        database: Database,
        keys: KeyRing,
        hasher: PasswordHasher,
        audit: AuditSink,
        *,
        lockout: LoginLockout | None = None,
    ) -> None:
        self.settings = settings
        self.lockout = lockout
        self.database = database
        self.keys = keys
        self.hasher = hasher
        self.audit = audit
        self.tokens = AccessTokens(keys)
        self.view = IdentityView(database)
        self.last_used = api_keys.LastUsedBuffer()
        self._flusher: asyncio.Task[None] | None = None
        #: sign-ins by outcome (:data:`LOGIN_OUTCOMES`) and locks begun, for the metrics (never reset)
        self.logins: Counter[str] = Counter()
        self.lockouts = 0

    @classmethod
    def from_settings(
        cls,
        settings: ServiceSettings,
        audit: AuditSink | None = None,
        lockout: LoginLockout | None = None,
        database: Database | None = None,
    ) -> Identity:
        hasher = PasswordHasher(
            time_cost=settings.argon2_time_cost,
            memory_cost=settings.argon2_memory_cost,
            parallelism=settings.argon2_parallelism,
            concurrency=settings.password_hash_concurrency,
            max_wait=settings.password_hash_max_wait,
        )
        return cls(
            settings,
            database or Database(settings.effective_database_url),
            KeyRing.from_settings(settings),
            hasher,
            audit or LogAuditSink(),
            lockout=lockout,
        )

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Migrate the schema, start following the change log (:class:`IdentityView`) and the
        background flush of API-key last-used times."""
        await self.database.migrate()
        await self.view.start()
        self._flusher = asyncio.create_task(self._flush_periodically())

    async def stop(self, *, dispose: bool = True) -> None:
        await self.view.stop()
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        with contextlib.suppress(Exception):
            await self.flush_last_used()
        if dispose:
            await self.database.dispose()

    async def _flush_periodically(self) -> None:
        """Every minute: API-key last-used times; every hour: the database's planner statistics and
        the change log's old rows."""
        for minute in itertools.count(1):
            await asyncio.sleep(LAST_USED_FLUSH_SECONDS)
            try:
                await self.flush_last_used()
                if minute % 60 == 0:
                    await self.database.analyze()
                    await self.view.prune()
            except Exception:
                logger.exception("periodic database upkeep failed; will retry")

    async def flush_last_used(self) -> None:
        pending = self.last_used.drain()
        if not pending:
            return
        try:
            async with self.database.session() as db:
                for key_id, when in pending.items():
                    await db.execute(
                        update(ApiKey)
                        .where(ApiKey.id == key_id)
                        .where((ApiKey.last_used_at.is_(None)) | (ApiKey.last_used_at < when))
                        .values(last_used_at=when)
                    )
                await db.commit()
        except Exception:
            self.last_used.restore(pending)
            raise

    # -- users ------------------------------------------------------------------------------------

    async def create_user(
        self, email: str, password: str, name: str = "", *, role: str = "user", api_access: bool = False
    ) -> User:
        email = normalize_email(email)
        check_password(password)
        if role not in ROLES:
            raise ValidationError(f"The role must be one of {', '.join(ROLES)}.")
        user = User(email=email, name=name.strip()[:200], role=role, api_access=api_access)
        user.password_hash = await self._hashing(self.hasher.hash(password))
        async with self.database.session() as db:
            db.add(user)
            try:
                await db.commit()
            except IntegrityError:
                raise ConflictError("A user with this e-mail address already exists.") from None
        return user

    async def list_users(self) -> list[User]:
        async with self.database.session() as db:
            return list((await db.scalars(select(User).order_by(User.created_at, User.id))).all())

    async def get_user(self, user_id: str) -> User:
        async with self.database.session() as db:
            user = await db.get(User, user_id)
        if user is None:
            raise NotFoundError("No such user.")
        return user

    async def user_view(self, user_id: str) -> UserView | None:
        """The user as the view knows it (a query only on first sight, or when the view is stale)."""

        async def load() -> UserView | None:
            async with self.database.session() as db:
                user = await db.get(User, user_id)
            if user is None:
                return None
            return UserView(user.id, user.email, user.name, user.role, user.api_access, user.is_active, user.created_at)

        return await self.view.through(self.view.users, user_id, load)

    async def current_user(self, principal: Principal) -> UserView:
        """The principal's user, from the view (``/users/me`` and every route that needs it)."""
        user = await self.user_view(principal.user_id)
        if user is None or not user.is_active:
            raise AuthenticationError("The account is no longer active; sign in again.")
        return user

    async def update_user(
        self,
        user_id: str,
        client: ClientInfo,
        *,
        role: str | None = None,
        api_access: bool | None = None,
        is_active: bool | None = None,
        actor: str | None = None,
    ) -> User:
        """Change a user's role, features or active flag; every instance's view follows (a
        deactivated user's sessions and keys stop working)."""
        if role is not None and role not in ROLES:
            raise ValidationError(f"The role must be one of {', '.join(ROLES)}.")
        values: dict[str, Any] = {
            name: value
            for name, value in (("role", role), ("api_access", api_access), ("is_active", is_active))
            if value is not None
        }
        async with self.database.session() as db:
            user = await db.get(User, user_id)
            if user is None:
                raise NotFoundError("No such user.")
            if values:
                await db.execute(update(User).where(User.id == user_id).values(**values))
                await self.view.record(db, "user", user_id)
                await db.commit()
                await db.refresh(user)
        if values:
            self.view.apply("user", user_id)
            self._audit(
                "user_update", "success", user_id, client, resource=("user", user_id), details={**values, "by": actor}
            )
        return user

    async def user_by_email(self, email: str) -> User | None:
        """The user of an address in any spelling that has the same canonical form."""
        canonical = canonical_email(email)
        if canonical is None:
            return None
        async with self.database.session() as db:
            return await db.scalar(select(User).where(User.email == canonical))

    # -- sessions ---------------------------------------------------------------------------------

    async def login(self, email: str, password: str, client: ClientInfo) -> Login:
        """Check the password and open a session (docs/design.md §9, §10).

        The attempt is reserved with the lockout *before* any password is verified, so concurrent
        attempts cannot verify more than the threshold between two locks. Unknown e-mail, text that
        is no address and a wrong password fail alike, and so do locked addresses, known or not.
        """
        name = SignInName.of(email)
        attempt = await self._reserve_attempt(name, client)
        try:
            user = await self.user_by_email(name.email) if name.email else None
            if user is None or not user.is_active:
                await self._hashing(self.hasher.burn(password))
                verified = False
            else:
                verified = await self._hashing(self.hasher.verify(user.password_hash, password))
            if not verified:
                await self._failed_login(name, user.id if user else None, client, attempt)
            assert user is not None
            if attempt is not None:
                await self._lockout_call(attempt.succeeded())
        finally:
            if attempt is not None:
                await self._lockout_call(attempt.release())  # no-op once failed() or succeeded() ran
        rehashed = (
            await self._hashing(self.hasher.hash(password)) if self.hasher.needs_rehash(user.password_hash) else None
        )
        async with self.database.session() as db:
            if rehashed is not None:  # made with other cost parameters: re-made now (no connection held meanwhile)
                user.password_hash = rehashed
                await db.execute(update(User).where(User.id == user.id).values(password_hash=rehashed))
            generation = self.view.generation
            session, refresh = await self._new_session(db, user, client)
            await db.commit()
        if self.view.fresh and self.view.generation == generation:  # the first request needs no query
            self.view.sessions.put(session.id, SessionView(session.id, user.id, session.expires_at, revoked=False))
        self._audit("login", "success", user.id, client, resource=("session", session.id))
        self.logins["success"] += 1
        return Login(user, session.id, self.tokens.issue(user.id, session.id), refresh)

    def _identifier_details(self, name: SignInName) -> dict[str, Any]:
        return name.audit_details(lambda subject: self.keys.hash(IDENTIFIER_PURPOSE, subject)[:32])

    async def _reserve_attempt(self, name: SignInName, client: ClientInfo) -> Attempt | None:
        """An attempt that may verify one password; 429 when the subject is locked or its remaining
        attempts are all under way (the lookup for the audit record costs no password check)."""
        if self.lockout is None:
            return None
        outcome: Attempt | Reservation = await self._lockout_call(self.lockout.reserve(name.lockout_subject))
        if isinstance(outcome, Attempt):
            return outcome
        user = await self.user_by_email(name.email) if name.email else None
        if outcome.verdict == "locked":
            seconds = outcome.seconds
            message = f"Too many failed sign-ins; try again in {seconds} seconds."
        else:
            seconds = BUSY_RETRY_AFTER
            message = "Too many sign-in attempts for this account at once; try again shortly."
        reason = "locked" if outcome.verdict == "locked" else "concurrent_attempts"
        self.logins[reason] += 1
        details = {**self._identifier_details(name), "reason": reason, "retry_after": seconds}
        self._audit("login_failed", "denied", user.id if user else None, client, details=details)
        raise RateLimitError(
            message, details={"retry_after": seconds}, headers=[(b"retry-after", str(seconds).encode())]
        )

    async def _failed_login(
        self, name: SignInName, user_id: str | None, client: ClientInfo, attempt: Attempt | None
    ) -> NoReturn:
        identifier = self._identifier_details(name)
        self._audit("login_failed", "failure", user_id, client, details=identifier)
        self.logins["failure"] += 1
        await self._count_failure(attempt, user_id, client, identifier)
        raise AuthenticationError(LOGIN_FAILED_MESSAGE)

    async def _count_failure(
        self, attempt: Attempt | None, user_id: str | None, client: ClientInfo, identifier: dict[str, Any]
    ) -> None:
        """A wrong password, counted with the lockout; the lock it may begin is audited and logged."""
        if attempt is None:
            return
        outcome = await self._lockout_call(attempt.failed())
        if outcome.locked_for:
            self.lockouts += 1
            details = {**identifier, "failed_attempts": outcome.failed_attempts, "locked_for": outcome.locked_for}
            self._audit("account_locked", "denied", user_id, client, details=details)
            logger.warning(
                "sign-in locked for %s seconds after %s failures", outcome.locked_for, outcome.failed_attempts
            )

    @staticmethod
    async def _lockout_call(operation: Awaitable[T]) -> T:
        """Lockout state is required to sign in: without it, refuse (fail closed) with a 503."""
        try:
            return await operation
        except LockoutUnavailableError as exc:
            logger.error("lockout storage unreachable; sign-in refused: %s", exc)
            raise ServiceUnavailableError(
                "Sign-in is temporarily unavailable; try again shortly.", headers=[(b"retry-after", b"5")]
            ) from None

    @staticmethod
    async def _hashing(operation: Awaitable[T]) -> T:
        """Password hashing is capped per process; a request that found no slot in time gets a 503."""
        try:
            return await operation
        except HashingUnavailableError as exc:
            logger.warning("password hashing saturated; request refused: %s", exc)
            raise ServiceUnavailableError(
                "Too many sign-ins are being processed; try again shortly.",
                headers=[(b"retry-after", str(HASHING_RETRY_AFTER).encode())],
            ) from None

    async def unlock(self, user_id: str, client: ClientInfo, *, actor: str | None = None) -> bool:
        """Clear a user's lock, failure count and step level (admin); whether a lock was in place."""
        user = await self.get_user(user_id)
        if self.lockout is None:
            return False
        was_locked = await self._lockout_call(self.lockout.unlock(user.email))
        details = {"email": user.email, "was_locked": was_locked, "by": actor}
        self._audit("account_unlocked", "success", user.id, client, resource=("user", user.id), details=details)
        return was_locked

    async def _new_session(self, db: AsyncSession, user: User, client: ClientInfo) -> tuple[Session, str]:
        now = utcnow()
        session = Session(
            id=uuid7(),
            user_id=user.id,
            created_at=now,
            last_used_at=now,
            expires_at=now + timedelta(seconds=self.settings.refresh_token_ttl),
            user_agent=client.user_agent,
            ip_address=client.ip_address,
        )
        db.add(session)
        await db.flush()  # the token row references it
        refresh = new_refresh_token()
        db.add(RefreshToken(session_id=session.id, token_hash=self.keys.hash(REFRESH_PURPOSE, refresh), created_at=now))
        return session, refresh

    async def refresh(self, raw_refresh: str, client: ClientInfo) -> Login:
        """Rotate a refresh token. A token presented twice revokes its whole family (theft)."""
        now = utcnow()
        async with self.database.session() as db:
            token = await db.scalar(
                select(RefreshToken).where(RefreshToken.token_hash.in_(self.keys.hashes(REFRESH_PURPOSE, raw_refresh)))
            )
            if token is None:
                raise AuthenticationError("The refresh token is invalid.")
            session = await db.get(Session, token.session_id)
            assert session is not None
            if session.revoked_at is not None:
                raise AuthenticationError("The session has ended; sign in again.")
            if token.rotated_at is not None:
                await self._revoke_for_reuse(db, session, client)
            if session.expires_at <= now:
                await self._revoke(db, session, "expired")
                raise AuthenticationError("The session has expired; sign in again.")
            idle = (now - session.last_used_at).total_seconds()
            if idle > self.settings.session_inactivity_timeout:
                await self._revoke(db, session, "inactivity")
                raise AuthenticationError("The session ended after a period of inactivity; sign in again.")
            claimed = await db.execute(
                update(RefreshToken)
                .where(RefreshToken.id == token.id, RefreshToken.rotated_at.is_(None))
                .values(rotated_at=now)
            )
            if getattr(claimed, "rowcount", 0) != 1:  # a concurrent request used it first
                await self._revoke_for_reuse(db, session, client)
            user = await db.get(User, session.user_id)
            assert user is not None
            if not user.is_active:
                await self._revoke(db, session, "user_inactive")
                raise AuthenticationError("The session has ended; sign in again.")
            refresh = new_refresh_token()
            db.add(
                RefreshToken(session_id=session.id, token_hash=self.keys.hash(REFRESH_PURPOSE, refresh), created_at=now)
            )
            session.last_used_at = now
            await db.commit()
        return Login(user, session.id, self.tokens.issue(user.id, session.id), refresh)

    async def _revoke_for_reuse(self, db: AsyncSession, session: Session, client: ClientInfo) -> None:
        await self._revoke(db, session, "token_reuse")
        self._audit(
            "token_reuse_detected",
            "denied",
            session.user_id,
            client,
            resource=("session", session.id),
            details={"session_id": session.id},
        )
        logger.warning("refresh token reuse detected; session %s revoked", session.id)
        raise AuthenticationError("The refresh token was already used; the session has been revoked.")

    async def _revoke(self, db: AsyncSession, session: Session, reason: str) -> None:
        """End a session; its access tokens stop here at once and on every instance within the bound."""
        session.revoked_at = utcnow()
        session.revoked_reason = reason
        await self.view.record(db, "session", session.id)
        await db.commit()
        self.view.apply("session", session.id)

    async def logout(self, *, raw_refresh: str | None, session_id: str | None, client: ClientInfo) -> None:
        """End the session named by the refresh cookie or the access token (idempotent)."""
        if not raw_refresh and not session_id:
            return  # nothing names a session: no database round trip
        async with self.database.session() as db:
            session = None
            if raw_refresh:
                token = await db.scalar(
                    select(RefreshToken).where(
                        RefreshToken.token_hash.in_(self.keys.hashes(REFRESH_PURPOSE, raw_refresh))
                    )
                )
                session = await db.get(Session, token.session_id) if token else None
            if session is None and session_id:
                session = await db.get(Session, session_id)
            if session is None or session.revoked_at is not None:
                return
            await self._revoke(db, session, "logout")
        self._audit("logout", "success", session.user_id, client, resource=("session", session.id))

    async def change_password(self, principal: Principal, current: str, new: str, client: ClientInfo) -> None:
        """Replace the password, end every session of the user (their access tokens fail at once)."""
        require_session(principal, "Changing the password")
        check_password(new, loc=("body", "new_password"))
        user = await self.get_user(principal.user_id)
        # The current password is a guess like a sign-in's: it counts with the account's lockout
        # (a stolen access token must not buy unlimited guesses at it), reserved before verifying.
        attempt = await self._reserve_attempt(SignInName.of(user.email), client)
        try:
            if not await self._hashing(self.hasher.verify(user.password_hash, current)):
                self._audit("password_change", "failure", user.id, client, error="wrong current password")
                await self._count_failure(attempt, user.id, client, {})
                raise PermissionDeniedError("The current password is incorrect.")
            if attempt is not None:
                await self._lockout_call(attempt.succeeded())
        finally:
            if attempt is not None:
                await self._lockout_call(attempt.release())
        new_hash = await self._hashing(self.hasher.hash(new))
        now = utcnow()
        async with self.database.session() as db:
            await db.execute(
                update(User).where(User.id == user.id).values(password_hash=new_hash, password_changed_at=now)
            )
            await db.execute(
                update(Session)
                .where(Session.user_id == user.id, Session.revoked_at.is_(None))
                .values(revoked_at=now, revoked_reason="password_change")
            )
            await self.view.record(db, "user", user.id)
            await db.commit()
        self.view.apply("user", user.id)
        self._audit("password_change", "success", user.id, client)

    async def principal_from_access_token(self, token: str) -> Principal:
        """The principal of a Bearer token: its signature and claims, then its session and user from
        the view — no query once both are known (:class:`IdentityView`); the database decides while
        the view is stale."""
        try:
            claims = self.tokens.decode(token)
        except InvalidTokenError as exc:
            raise AuthenticationError(str(exc)[0].upper() + str(exc)[1:] + ".") from None
        session = await self._session_view(claims.session_id)
        user = await self.user_view(claims.user_id) if session is not None else None
        if (
            session is None
            or user is None
            or session.user_id != user.id
            or session.revoked
            or session.expires_at <= utcnow()
            or not user.is_active
        ):
            raise AuthenticationError("The session has ended; sign in again.")
        return Principal(user.id, user.email, user.name, user.role, "session", session_id=session.id)

    async def _session_view(self, session_id: str) -> SessionView | None:
        async def load() -> SessionView | None:
            async with self.database.session() as db:
                row = (
                    await db.execute(
                        select(Session.id, Session.user_id, Session.expires_at, Session.revoked_at).where(
                            Session.id == session_id
                        )
                    )
                ).first()
            return None if row is None else SessionView(row.id, row.user_id, row.expires_at, row.revoked_at is not None)

        return await self.view.through(self.view.sessions, session_id, load)

    # -- API keys ---------------------------------------------------------------------------------

    async def create_api_key(
        self,
        principal: Principal,
        name: str,
        expires_at: datetime | None,
        client: ClientInfo,
        *,
        require_feature: bool = True,
    ) -> tuple[ApiKey, str]:
        """A new key for the principal's user; the raw key is returned here and never again.

        ``require_feature=False`` is for the operator's CLI, which may issue keys to any user.
        """
        require_session(principal, "Creating API keys")
        user = await self.get_user(principal.user_id)
        if require_feature and not user.api_access:
            self._audit("permission_denied", "denied", user.id, client, details={"needs": "api_access"})
            raise PermissionDeniedError("Creating API keys needs the api_access feature.")
        if expires_at is not None and expires_at <= utcnow():
            raise invalid_field(("body", "expires_at"), "must be in the future", expires_at.isoformat())
        raw = api_keys.generate_api_key()
        key = ApiKey(
            user_id=user.id,
            name=name,
            key_hash=self.keys.hash(api_keys.PURPOSE, raw),
            preview=api_keys.mask(raw),
            expires_at=expires_at,
        )
        async with self.database.session() as db:
            db.add(key)
            await db.commit()
        self._audit(
            "api_key_create",
            "success",
            user.id,
            client,
            resource=("api_key", key.id),
            details={"name": name, "preview": key.preview, **self._via(principal)},
        )
        return key, raw

    async def list_api_keys(self, principal: Principal) -> list[dict[str, Any]]:
        require_session(principal, "Listing API keys")
        user_id = principal.user_id
        async with self.database.session() as db:
            keys = (
                await db.scalars(select(ApiKey).where(ApiKey.user_id == user_id).order_by(ApiKey.created_at.desc()))
            ).all()
        return [key_document(key, self.last_used.get(key.id)) for key in keys]

    async def revoke_api_key(self, principal: Principal, key_id: str, client: ClientInfo) -> None:
        require_session(principal, "Revoking API keys")
        async with self.database.session() as db:
            key = await db.get(ApiKey, key_id)
            if key is None or key.user_id != principal.user_id:
                raise NotFoundError("No such API key.")
            if key.revoked_at is None:
                key.revoked_at = utcnow()
                await self.view.record(db, "api_key", key_id)
                await db.commit()
        self.view.apply("api_key", key_id)
        self._audit(
            "api_key_revoke",
            "success",
            principal.user_id,
            client,
            resource=("api_key", key_id),
            details={"preview": key.preview, **self._via(principal)},
        )

    async def principal_from_api_key(self, raw: str) -> Principal:
        """The principal of an ``X-API-Key``; 401 when it is malformed, unknown, revoked or expired."""
        if not api_keys.is_well_formed(raw):
            raise AuthenticationError("The API key is invalid.")
        record = await self._key_record(raw)
        if record is None or not record.usable:
            raise AuthenticationError("The API key is invalid or revoked.")
        now = utcnow()
        if record.expires_at is not None and record.expires_at <= now:
            raise AuthenticationError("The API key has expired.")
        self.last_used.touch(record.key_id, now)
        return Principal(record.user_id, record.email, record.name, record.role, "api_key", api_key_id=record.key_id)

    async def _key_record(self, raw: str) -> api_keys.KeyRecord | None:
        """The record of a key from the view (``False`` there: known not to exist), else the database."""

        async def load() -> api_keys.KeyRecord | Literal[False]:
            hashes = self.keys.hashes(api_keys.PURPOSE, raw)  # every secret still accepted (rotation)
            async with self.database.session() as db:
                row = (
                    await db.execute(
                        select(ApiKey, User).join(User, User.id == ApiKey.user_id).where(ApiKey.key_hash.in_(hashes))
                    )
                ).first()
            if row is None:
                return False
            key, user = row
            usable = key.revoked_at is None and user.is_active
            return api_keys.KeyRecord(key.id, user.id, user.email, user.name, user.role, key.expires_at, usable)

        record = await self.view.through(self.view.keys, self.keys.hash(api_keys.PURPOSE, raw), load)
        return record or None

    # -- audit ------------------------------------------------------------------------------------

    @staticmethod
    def _via(principal: Principal) -> dict[str, Any]:
        if principal.auth_method == "api_key":
            return {"auth_method": "api_key", "api_key_id": principal.api_key_id}
        return {"auth_method": "session"}

    def _audit(
        self,
        action: str,
        outcome: Any,
        user_id: str | None,
        client: ClientInfo,
        *,
        resource: tuple[str, str] | None = None,
        details: dict[str, Any] | None = None,
        error: str | None = None,
    ) -> None:
        self.audit.record(
            AuditEvent(
                action=action,
                outcome=outcome,
                user_id=user_id,
                resource_type=resource[0] if resource else None,
                resource_id=resource[1] if resource else None,
                details=details,
                error_message=error,
                ip_address=client.ip_address,
                user_agent=client.user_agent,
                method=client.method,
                path=client.path,
            )
        )


def utc(value: datetime) -> datetime:
    """``value`` as an aware UTC datetime (naive input is taken as UTC)."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
