"""One canonical form of an e-mail address (docs/design.md §9): lookup and lockout can never disagree.

The property the lockout rests on: whatever text a sign-in sends, if the lookup finds user U, the
lockout counts the attempt against U's own key — so no spelling (whitespace, case, compatibility
forms, an IDNA domain in either form) gets a fresh counter for the same account.
"""

from __future__ import annotations

import asyncio
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import idna
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from thallus.server.identity.emails import MAX_LENGTH, SignInName, canonical_email, parse_email
from thallus.server.identity.lockout import LoginLockout, MemoryLockoutStore
from thallus.server.identity.service import Identity
from thallus.server.settings import ServiceSettings
from thallus.server.storage.models import User

LOCKOUT = LoginLockout(MemoryLockoutStore(), threshold=5, steps=(900,))
ACCOUNTS = ("hank@example.com", "ådä@bücher.example", "grace.hopper+navy@faß.de", "ζωή@παράδειγμα.ελ")


def lockout_key(text: str) -> str:
    return LOCKOUT.key(SignInName.of(text).lockout_subject)


def _fullwidth(char: str) -> str:
    """The full-width compatibility form of a printable ASCII character (NFKC folds it back)."""
    return chr(ord(char) + 0xFEE0) if "!" <= char <= "~" else char


@st.composite
def spellings(draw: st.DrawFn, address: str) -> str:
    """``address`` as a person or an attacker might type it: case, padding, full-width letters,
    NFD, and the domain in its IDNA (``xn--``) form."""
    local, _, domain = address.partition("@")
    if draw(st.booleans()):
        domain = idna.encode(domain, uts46=True).decode("ascii")  # IDNA 2008, not Python's 2003 codec
    text = f"{local}@{domain}"
    chars = []
    for char in text:
        form = "same" if char == "@" else draw(st.sampled_from(("same", "upper", "fullwidth")))
        if form == "upper" and char.upper().lower() == char:  # not ß → SS, a different address
            chars.append(char.upper())
        else:
            chars.append(_fullwidth(char) if form == "fullwidth" else char)
    text = "".join(chars)
    if draw(st.booleans()):
        text = unicodedata.normalize("NFD", text)
    padding = st.text(alphabet=" \t\n\u00a0\u2003\u3000", max_size=3)
    return draw(padding) + text + draw(padding)


def any_text() -> st.SearchStrategy[str]:
    """Arbitrary strings, and strings near an address (where the interesting cases live)."""
    near = st.builds(
        lambda local, domain, pad: f"{pad}{local}@{domain}{pad}",
        st.text(min_size=1, max_size=12),
        st.sampled_from(
            ("example.com", "EXAMPLE.com", "ｅｘａｍｐｌｅ.com", "bücher.example", "xn--bcher-kva.example")
        ),
        st.text(alphabet=" \t\u3000", max_size=2),
    )
    return st.one_of(st.text(max_size=40), near, *(spellings(address) for address in ACCOUNTS))


@given(any_text())
@settings(max_examples=600)
def test_the_canonical_form_is_a_fixed_point(text: str) -> None:
    canonical = canonical_email(text)
    if canonical is not None:
        assert canonical_email(canonical) == canonical
        assert SignInName.of(canonical).lockout_subject == canonical


@given(st.sampled_from(ACCOUNTS).flatmap(lambda address: st.tuples(st.just(address), spellings(address))))
@settings(max_examples=400)
def test_every_spelling_of_an_account_shares_its_lockout_key(pair: tuple[str, str]) -> None:
    address, spelled = pair
    stored = parse_email(address)
    assert canonical_email(spelled) == stored, f"{spelled!r} does not resolve to {stored!r}"
    assert lockout_key(spelled) == lockout_key(stored)


@pytest.fixture(scope="module")
def identity(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Identity, list[User], asyncio.AbstractEventLoop]]:
    """A real identity service on SQLite with the accounts registered (their stored, canonical form)."""
    path: Path = tmp_path_factory.mktemp("emails")
    config = ServiceSettings(
        env="development", data_dir=path, argon2_time_cost=1, argon2_memory_cost=1024, argon2_parallelism=1
    )
    service = Identity.from_settings(config)
    loop = asyncio.new_event_loop()

    async def register() -> list[User]:
        await service.database.migrate()
        return [await service.create_user(address, "Correct-Horse-Battery-9!") for address in ACCOUNTS]

    users = loop.run_until_complete(register())
    yield service, users, loop
    loop.run_until_complete(service.database.dispose())
    loop.close()


@given(any_text())
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_lookup_finds_user_then_the_lockout_key_is_the_users(
    identity: tuple[Identity, list[User], asyncio.AbstractEventLoop], text: str
) -> None:
    """lookup(x) finds user U ⇒ lockout_key(x) == lockout_key(U.email), through the real lookup."""
    service, users, loop = identity
    found = loop.run_until_complete(service.user_by_email(text))
    if found is not None:
        assert found.email in {user.email for user in users}
        assert lockout_key(text) == lockout_key(found.email)


def test_spellings_of_one_account_cannot_register_twice(
    identity: tuple[Identity, list[User], asyncio.AbstractEventLoop],
) -> None:
    service, _, loop = identity
    from thallus.errors import ConflictError

    for spelled in (" HANK@EXAMPLE.COM", "ｈａｎｋ@example.com", "hank@ｅｘａｍｐｌｅ.com\t"):
        with pytest.raises(ConflictError):
            loop.run_until_complete(service.create_user(spelled, "Correct-Horse-Battery-9!"))


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("user@faß.de", "user@fass.de"),  # IDNA 2008 keeps ß (IDNA 2003 mapped it to ss)
        ("straße@example.com", "strasse@example.com"),  # lower(), not casefold(): two mailboxes
        ("user@example.com", "user@examp1e.com"),
    ],
)
def test_different_addresses_stay_different(first: str, second: str) -> None:
    assert canonical_email(first) != canonical_email(second)
    assert lockout_key(first) != lockout_key(second)


@pytest.mark.parametrize(
    "text",
    ["Tr0ub4dor&3-horse", "correct horse battery", "", "@", "a" * 2000, "\ud800@example.com", "user@localhost"],
)
def test_text_that_is_no_address_names_no_account(text: str) -> None:
    name = SignInName.of(text)
    assert name.email is None
    assert name.lockout_subject.startswith("not-an-address:")
    details = name.audit_details(lambda subject: "hash-of-" + str(len(subject)))
    assert details["identifier_valid"] is False
    assert text not in str(details) or not text, "the text itself is never in the audit details"


def test_overlong_text_is_refused_before_normalising() -> None:
    assert canonical_email("a" * 64 + "@" + "b" * 300 + ".com") is None
    assert canonical_email("x" * (10 * MAX_LENGTH)) is None


def test_the_migration_rewrites_stored_addresses_to_the_canonical_form(tmp_path: Path) -> None:
    """Rows stored before NFKC folding are found again; a row whose canonical form another user
    holds is left alone (an operator decides)."""
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import create_engine, text

    from thallus.server.storage.database import MIGRATIONS

    engine = create_engine(f"sqlite:///{tmp_path / 'old.db'}")

    def upgrade(connection: object, revision: str) -> None:
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        config.attributes["connection"] = connection
        command.upgrade(config, revision)

    rows = [("u1", "ｈａｎｋ@example.com"), ("u2", "grace@example.com"), ("u3", "ｇｒａｃｅ@example.com")]
    with engine.begin() as connection:
        upgrade(connection, "0003")
        for user_id, email in rows:
            connection.execute(
                text(
                    "INSERT INTO users (id, email, name, password_hash, role, api_access, is_active, created_at,"
                    " password_changed_at) VALUES (:id, :email, '', 'x', 'user', 0, 1, '2026-01-01', '2026-01-01')"
                ),
                {"id": user_id, "email": email},
            )
        upgrade(connection, "head")
        stored: dict[str, str] = {row.id: row.email for row in connection.execute(text("SELECT id, email FROM users"))}
    assert stored == {"u1": "hank@example.com", "u2": "grace@example.com", "u3": "ｇｒａｃｅ@example.com"}
