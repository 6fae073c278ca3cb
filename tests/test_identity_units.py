"""Unit tests of the identity building blocks: password policy and hashing, derived keys, access
and refresh tokens, API-key shape and caches, and the service's pure helpers.

The end-to-end behaviour (routes, sessions, rotation, revocation across instances) is in
``test_api.py``; these tests pin each piece on its own, without a server.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import re
import stat
import string
import time
import unicodedata
import warnings
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest
from argon2 import PasswordHasher as Argon2Hasher
from argon2 import Type
from hypothesis import example, given
from hypothesis import strategies as st
from pydantic import SecretStr

from thallus.errors import ValidationError
from thallus.server.identity.api_keys import LastUsedBuffer, generate_api_key, is_well_formed, mask
from thallus.server.identity.keys import SECRET_FILE, KeyRing, server_secret
from thallus.server.identity.passwords import MAX_LENGTH, MIN_LENGTH, POLICY, PasswordHasher, password_problems
from thallus.server.identity.service import (
    ClientInfo,
    Identity,
    check_password,
    key_document,
    normalize_email,
    user_document,
)
from thallus.server.identity.tokens import ACCESS_TOKEN_TTL, AccessTokens, InvalidTokenError, new_refresh_token
from thallus.server.settings import ServiceSettings
from thallus.server.storage.models import ApiKey, User

URL_SAFE = re.compile(r"[A-Za-z0-9_-]+")
SECRET = b"s" * 48
OTHER_SECRET = b"o" * 48

LENGTH = "length must be 12–128 characters"
UPPER = "needs an upper-case letter"
LOWER = "needs a lower-case letter"
DIGIT = "needs a digit"
SPECIAL = "needs a special character"


# -- password policy ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("password", "problems"),
    [
        ("", [LENGTH, UPPER, LOWER, DIGIT, SPECIAL]),
        ("Ab1!", [LENGTH]),
        ("Abcdefgh1!x", [LENGTH]),  # 11
        ("Ab1!" + "x" * 125, [LENGTH]),  # 129
        ("alllowercase-123", [UPPER]),
        ("ALLUPPERCASE-123", [LOWER]),
        ("No-Digits-Here!!", [DIGIT]),
        ("NoSpecial123456", [SPECIAL]),
        ("nospecialnodigit", [UPPER, DIGIT, SPECIAL]),
        ("x" * 200, [LENGTH, UPPER, DIGIT, SPECIAL]),
        ("éèàçüöäßøåæœ", [UPPER, DIGIT, SPECIAL]),  # letters beyond ASCII are letters
        ("ÉÈÀÇÜÖÄØÅÆŒ٣", [LOWER, SPECIAL]),  # an Arabic-Indic three is a digit, not special
    ],
)
def test_password_problems_name_each_missing_rule(password: str, problems: list[str]) -> None:
    assert password_problems(password) == problems


@pytest.mark.parametrize(
    "password",
    [
        "Correct-Horse-Battery-9!",
        "Abcdefghi1!x",  # exactly 12
        "Ab1!" + "x" * 124,  # exactly 128
        "Pässwörd-Ünïcödé-1",  # non-ASCII letters
        "Straße mit Leer 7",  # a space is a special character
        "Ωmega-σίγμα-٣٤٥",  # Greek letters and Arabic-Indic digits
        "Ünïcode123👍abc",  # an emoji is a special character
        "ЖжЖжЖжЖжЖж1#",  # Cyrillic
    ],
)
def test_acceptable_passwords(password: str) -> None:
    assert password_problems(password) == []


def test_length_bounds_are_the_documented_ones() -> None:
    assert (MIN_LENGTH, MAX_LENGTH) == (12, 128)
    assert POLICY.startswith("12–128 characters")
    core = "Ab1!"
    for length, ok in [(11, False), (12, True), (128, True), (129, False)]:
        password = core + "x" * (length - len(core))
        assert len(password) == length
        assert (password_problems(password) == []) is ok, length


def expected_problems(password: str) -> list[str]:
    """The policy, written from Unicode general categories rather than ``str`` predicates."""
    categories = [unicodedata.category(char) for char in password]
    problems = []
    if not 12 <= len(password) <= 128:
        problems.append(LENGTH)
    if "Lu" not in categories:
        problems.append(UPPER)
    if "Ll" not in categories:
        problems.append(LOWER)
    if "Nd" not in categories:
        problems.append(DIGIT)
    if not any(category[0] not in "LN" for category in categories):
        problems.append(SPECIAL)
    return problems


# Characters whose class is unambiguous: upper-/lower-case letters, other letters, decimal digits, and
# punctuation, symbols and spaces (which are "special"). Symbols that Unicode also calls upper- or
# lower-case (circled letters: test_a_symbol_is_not_also_a_letter) are left out; ª and º are letters that Python calls
# lower-case.
_UPPER = st.characters(categories=["Lu"])
_LOWER = st.characters(categories=["Ll"])
_OTHER_LETTER = st.characters(categories=["Lt", "Lo"], exclude_characters="ªº")
_DIGIT = st.characters(categories=["Nd"])
_SPECIAL = st.characters(categories=["Pc", "Pd", "Ps", "Pe", "Pi", "Pf", "Po", "Sm", "Sc", "Sk", "Zs"])
_ASCII = st.sampled_from(string.ascii_letters + string.digits + string.punctuation + " ")
PASSWORDS = st.lists(st.one_of(_ASCII, _UPPER, _LOWER, _OTHER_LETTER, _DIGIT, _SPECIAL), max_size=140).map("".join)


@given(PASSWORDS)
@example("Abcdefghi1!x")
@example("Abcdefghi1!")
@example("Ab1!" + "x" * 124)
@example("Ab1!" + "x" * 125)
@example("ǅabcdefghij1!")  # a title-case letter is not an upper-case one
def test_no_problems_iff_every_rule_holds(password: str) -> None:
    expected = expected_problems(password)
    assert password_problems(password) == expected
    assert (password_problems(password) == []) == (expected == [])


@pytest.mark.parametrize(("password", "missing"), [("abcdefghij1Ⓐ", UPPER), ("ABCDEFGHIJ1ⓐ", LOWER)])
def test_a_symbol_is_not_also_a_letter(password: str, missing: str) -> None:
    assert password_problems(password) == [missing]


# -- password hashing ---------------------------------------------------------------------------

FAST = {"time_cost": 1, "memory_cost": 1024, "parallelism": 1}


@pytest.fixture(scope="module")
def hasher() -> PasswordHasher:
    return PasswordHasher(**FAST)


def test_hash_is_argon2id_and_verifies(hasher: PasswordHasher) -> None:
    password = "Correct-Horse-Battery-9!"
    first = asyncio.run(hasher.hash(password))
    second = asyncio.run(hasher.hash(password))
    assert first.startswith("$argon2id$v=19$m=1024,t=1,p=1$")
    assert first != second, "each hash has its own salt"
    assert password not in first
    assert asyncio.run(hasher.verify(first, password)) is True
    assert asyncio.run(hasher.verify(second, password)) is True
    assert asyncio.run(hasher.verify(first, password + " ")) is False
    assert asyncio.run(hasher.verify(first, "correct-horse-battery-9!")) is False


def test_non_ascii_passwords_hash_and_verify(hasher: PasswordHasher) -> None:
    password = "Pässwörd-Ωmega-٣👍"
    hashed = asyncio.run(hasher.hash(password))
    assert asyncio.run(hasher.verify(hashed, password)) is True
    assert asyncio.run(hasher.verify(hashed, unicodedata.normalize("NFD", password))) is False


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        "garbage",
        "$argon2id$",
        "$argon2id$v=19$m=1024,t=1,p=1$c2FsdA$",
        "$argon2x$v=19$m=1024,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA",
        "$2b$12$abcdefghijklmnopqrstuuQ3w8K1nZ8o5m0gK2kK0lQ7yq8x3Vx6",  # bcrypt
        "!",  # a "disabled account" marker
    ],
)
def test_verify_against_garbage_is_false_not_an_error(hasher: PasswordHasher, garbage: str) -> None:
    assert asyncio.run(hasher.verify(garbage, "Correct-Horse-Battery-9!")) is False
    assert hasher.needs_rehash(garbage) is True


def test_verify_against_a_truncated_or_altered_hash_is_false(hasher: PasswordHasher) -> None:
    password = "Correct-Horse-Battery-9!"
    hashed = asyncio.run(hasher.hash(password))
    assert asyncio.run(hasher.verify(hashed[:-5], password)) is False
    altered = hashed[:-4] + ("AAAA" if not hashed.endswith("AAAA") else "BBBB")
    assert asyncio.run(hasher.verify(altered, password)) is False


def test_verify_against_a_non_ascii_hash_is_false(hasher: PasswordHasher) -> None:
    assert asyncio.run(hasher.verify("$argon2id$é", "Correct-Horse-Battery-9!")) is False


def test_needs_rehash_follows_the_parameters(hasher: PasswordHasher) -> None:
    hashed = asyncio.run(hasher.hash("Correct-Horse-Battery-9!"))
    assert hasher.needs_rehash(hashed) is False
    assert PasswordHasher(**FAST).needs_rehash(hashed) is False, "same parameters, another instance"
    more_time = PasswordHasher(time_cost=2, memory_cost=1024, parallelism=1)
    more_memory = PasswordHasher(time_cost=1, memory_cost=2048, parallelism=1)
    more_lanes = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=2)
    for stronger in (more_time, more_memory, more_lanes):
        assert stronger.needs_rehash(hashed) is True
        assert asyncio.run(stronger.verify(hashed, "Correct-Horse-Battery-9!")) is True, "old hashes still verify"
        assert stronger.needs_rehash(asyncio.run(stronger.hash("x"))) is False
    assert hasher.needs_rehash(asyncio.run(more_time.hash("x"))) is True, "weaker parameters also re-hash"


def test_needs_rehash_for_other_argon2_variants(hasher: PasswordHasher) -> None:
    argon2i = Argon2Hasher(time_cost=1, memory_cost=1024, parallelism=1, type=Type.I).hash("pw")
    assert argon2i.startswith("$argon2i$")
    assert hasher.needs_rehash(argon2i) is True
    assert hasher.needs_rehash("not a hash at all") is True


def test_burn_completes(hasher: PasswordHasher) -> None:
    async def burn_twice() -> None:
        await hasher.burn("Correct-Horse-Battery-9!")
        await hasher.burn("")

    asyncio.run(burn_twice())


# -- server secret and derived keys -------------------------------------------------------------


def test_configured_secret_is_used_and_no_file_is_written(tmp_path: Path) -> None:
    settings = ServiceSettings(env="development", secret_key=SecretStr("k" * 40), data_dir=tmp_path)
    assert server_secret(settings) == b"k" * 40
    assert not (tmp_path / SECRET_FILE).exists()


def test_development_secret_is_generated_once_with_mode_600(tmp_path: Path) -> None:
    data_dir = tmp_path / "not" / "yet" / "there"
    settings = ServiceSettings(env="development", data_dir=data_dir)
    first = server_secret(settings)
    path = data_dir / SECRET_FILE
    assert path.is_file()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(first) >= 32
    assert URL_SAFE.fullmatch(first.decode())
    content = path.read_bytes()
    assert server_secret(settings) == first
    assert server_secret(ServiceSettings(env="development", data_dir=data_dir)) == first, "another process agrees"
    assert path.read_bytes() == content, "never rewritten"
    other = tmp_path / "elsewhere"
    assert server_secret(ServiceSettings(env="development", data_dir=other)) != first


def test_development_secret_file_is_read_without_trailing_newline(tmp_path: Path) -> None:
    (tmp_path / SECRET_FILE).write_bytes(b"an-operator-written-secret-of-some-length\n")
    assert (
        server_secret(ServiceSettings(env="development", data_dir=tmp_path))
        == b"an-operator-written-secret-of-some-length"
    )


@pytest.mark.parametrize("content", [b"", b"\n"])
def test_an_empty_secret_file_never_yields_an_empty_secret(tmp_path: Path, content: bytes) -> None:
    (tmp_path / SECRET_FILE).write_bytes(content)
    try:
        secret = server_secret(ServiceSettings(env="development", data_dir=tmp_path))
    except (RuntimeError, ValueError):
        return  # refusing is fine too
    assert secret.strip()


def test_no_secret_outside_development_is_refused(tmp_path: Path) -> None:
    settings = ServiceSettings.model_construct(env="test", secret_key=None, data_dir=tmp_path)  # past validation
    with pytest.raises(RuntimeError, match="THALLUS_SECRET_KEY"):
        server_secret(settings)
    assert not (tmp_path / SECRET_FILE).exists()


def test_keyring_from_settings_orders_current_then_previous(tmp_path: Path) -> None:
    settings = ServiceSettings(
        env="development",
        secret_key=SecretStr("n" * 40),
        previous_secret_keys=(SecretStr("p" * 40), SecretStr(""), SecretStr("q" * 40)),
        data_dir=tmp_path,
    )
    assert KeyRing.from_settings(settings).secrets == (b"n" * 40, b"p" * 40, b"q" * 40)


def test_each_purpose_has_its_own_key() -> None:
    ring = KeyRing((SECRET,))
    _, signing = ring.signing_key()
    hashes = {purpose: ring.hash(purpose, "value") for purpose in ("api-key", "refresh-token", "access-token")}
    assert len(set(hashes.values())) == 3, "purpose-separated"
    assert signing not in (SECRET, hashlib.sha256(SECRET).digest()), "the secret is never used directly"
    raw_hmac = hmac.new(SECRET, b"value", hashlib.sha256).hexdigest()
    assert raw_hmac not in hashes.values()


def test_hash_is_deterministic_keyed_hex() -> None:
    ring = KeyRing((SECRET,))
    digest = ring.hash("api-key", "thal_example")
    assert digest == KeyRing((SECRET,)).hash("api-key", "thal_example")
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert digest != ring.hash("api-key", "thal_example2")
    assert digest != KeyRing((OTHER_SECRET,)).hash("api-key", "thal_example")
    assert digest != hashlib.sha256(b"thal_example").hexdigest()


def test_hashes_list_current_first_then_previous() -> None:
    rotated = KeyRing((OTHER_SECRET, SECRET))
    hashes = rotated.hashes("refresh-token", "token")
    assert hashes == [rotated.hash("refresh-token", "token"), KeyRing((SECRET,)).hash("refresh-token", "token")]
    assert KeyRing((SECRET,)).hashes("refresh-token", "token") == [KeyRing((SECRET,)).hash("refresh-token", "token")]


def test_signing_key_id_is_stable_and_per_secret() -> None:
    kid, key = KeyRing((SECRET,)).signing_key()
    assert KeyRing((SECRET,)).signing_key() == (kid, key)
    assert re.fullmatch(r"[0-9a-f]{16}", kid)
    assert len(key) == 32
    other_kid, other_key = KeyRing((OTHER_SECRET,)).signing_key()
    assert (other_kid, other_key) != (kid, key)
    assert other_kid != kid
    assert KeyRing((OTHER_SECRET, SECRET)).signing_key() == (other_kid, other_key), "only the current secret signs"


def test_verification_keys_cover_every_secret() -> None:
    kid, key = KeyRing((SECRET,)).signing_key()
    other_kid, other_key = KeyRing((OTHER_SECRET,)).signing_key()
    assert KeyRing((SECRET,)).verification_keys() == {kid: key}
    assert KeyRing((OTHER_SECRET, SECRET)).verification_keys() == {other_kid: other_key, kid: key}


# -- access and refresh tokens ------------------------------------------------------------------

RING = KeyRing((SECRET,))


def craft(claims: Any, *, algorithm: str = "HS256", kid: str | None = None, key: bytes | None = None) -> str:
    """A token made with pyjwt directly, by default signed like the service signs (real key, its kid)."""
    real_kid, real_key = RING.signing_key()
    return jwt.encode(claims, key or real_key, algorithm=algorithm, headers={"kid": kid or real_kid})


def valid_claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {"sub": "user-1", "sid": "session-1", "iat": now, "exp": now + 900, "jti": "jti-1"}
    claims.update(changes)
    return claims


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_issue_and_decode_round_trip() -> None:
    tokens = AccessTokens(RING)
    before = int(time.time())
    token = tokens.issue("user-1", "session-1")
    claims = tokens.decode(token)
    assert (claims.user_id, claims.session_id) == ("user-1", "session-1")
    assert before <= claims.issued_at <= int(time.time())
    assert claims.expires_at - claims.issued_at == ACCESS_TOKEN_TTL == 900
    assert claims.token_id
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "HS256"
    assert header["kid"] == RING.signing_key()[0] == tokens.kid
    payload = jwt.decode(token, options={"verify_signature": False})
    assert set(payload) == {"sub", "sid", "iat", "exp", "jti"}
    assert payload["jti"] == claims.token_id


def test_every_token_has_its_own_id() -> None:
    tokens = AccessTokens(RING)
    ids = {tokens.decode(tokens.issue("user-1", "session-1")).token_id for _ in range(50)}
    assert len(ids) == 50


def test_a_token_of_a_previous_secret_still_decodes_after_rotation() -> None:
    old = AccessTokens(KeyRing((SECRET,))).issue("user-1", "session-1")
    assert AccessTokens(KeyRing((OTHER_SECRET, SECRET))).decode(old).user_id == "user-1"
    with pytest.raises(InvalidTokenError, match="unknown signing key"):
        AccessTokens(KeyRing((OTHER_SECRET,))).decode(old)


def test_expired_tokens_are_refused() -> None:
    token = AccessTokens(RING, ttl=-1).issue("user-1", "session-1")
    with pytest.raises(InvalidTokenError, match="expired"):
        AccessTokens(RING).decode(token)
    crafted = craft(valid_claims(iat=int(time.time()) - 1000, exp=int(time.time()) - 100))
    with pytest.raises(InvalidTokenError, match="expired"):
        AccessTokens(RING).decode(crafted)


def test_a_verified_token_is_remembered_but_its_expiry_still_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    tokens = AccessTokens(RING)
    token = tokens.issue("user-1", "session-1")
    first = tokens.decode(token)
    monkeypatch.setattr("jwt.decode", lambda *args, **kwargs: pytest.fail("decoded again"))
    assert tokens.decode(token) == first, "remembered: no second decode"
    forged = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    monkeypatch.undo()
    with pytest.raises(InvalidTokenError):
        tokens.decode(forged)  # other text: verified afresh, refused
    now = time.time()
    monkeypatch.setattr("thallus.server.identity.tokens.time.time", lambda: now + ACCESS_TOKEN_TTL + 1)
    with pytest.raises(InvalidTokenError, match="expired"):
        tokens.decode(token)


def test_the_remembered_tokens_are_bounded() -> None:
    from thallus.server.identity import tokens as module

    tokens = AccessTokens(RING)
    for index in range(module.VERIFIED_CAPACITY + 10):
        tokens.decode(craft(valid_claims(jti=f"jti-{index}")))
    assert len(tokens._verified) == module.VERIFIED_CAPACITY


@pytest.mark.parametrize("missing", ["sub", "sid", "iat", "exp", "jti"])
def test_every_claim_is_required(missing: str) -> None:
    claims = valid_claims()
    del claims[missing]
    with pytest.raises(InvalidTokenError, match="invalid"):
        AccessTokens(RING).decode(craft(claims))


@pytest.mark.parametrize(
    ("claim", "value"),
    [("sub", 1), ("sub", None), ("sub", ["user-1"]), ("sid", 1), ("sid", {}), ("jti", 1), ("iat", "yesterday")],
)
def test_claims_of_the_wrong_type_are_refused(claim: str, value: Any) -> None:
    with pytest.raises(InvalidTokenError, match="invalid"):
        AccessTokens(RING).decode(craft(valid_claims(**{claim: value})))


def test_a_token_issued_in_the_future_is_refused() -> None:
    now = int(time.time())
    with pytest.raises(InvalidTokenError):
        AccessTokens(RING).decode(craft(valid_claims(iat=now + 600, exp=now + 1500)))


def test_unknown_or_missing_kid_is_refused() -> None:
    _, key = RING.signing_key()
    with pytest.raises(InvalidTokenError, match="unknown signing key"):
        AccessTokens(RING).decode(craft(valid_claims(), kid="0123456789abcdef"))
    with pytest.raises(InvalidTokenError, match="unknown signing key"):
        AccessTokens(RING).decode(jwt.encode(valid_claims(), key, algorithm="HS256"))
    with pytest.raises(InvalidTokenError, match="unknown signing key"):
        AccessTokens(RING).decode(craft(valid_claims(), kid="None"))


def test_a_kid_must_match_the_key_that_signed() -> None:
    other_kid, _ = KeyRing((OTHER_SECRET,)).signing_key()
    both = AccessTokens(KeyRing((SECRET, OTHER_SECRET)))
    with pytest.raises(InvalidTokenError, match="invalid"):
        both.decode(craft(valid_claims(), kid=other_kid))  # signed with SECRET's key, names OTHER_SECRET's


def test_alg_none_is_refused() -> None:
    kid, _ = RING.signing_key()
    header = b64url(json.dumps({"alg": "none", "typ": "JWT", "kid": kid}).encode())
    payload = b64url(json.dumps(valid_claims()).encode())
    with pytest.raises(InvalidTokenError, match="invalid"):
        AccessTokens(RING).decode(f"{header}.{payload}.")


@pytest.mark.parametrize("algorithm", ["HS384", "HS512"])
def test_the_algorithm_is_pinned(algorithm: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pyjwt warns that a 32-byte key is short for SHA-384/512
        token = craft(valid_claims(), algorithm=algorithm)
    assert jwt.get_unverified_header(token)["alg"] == algorithm
    with pytest.raises(InvalidTokenError, match="invalid"):
        AccessTokens(RING).decode(token)


@pytest.mark.parametrize(
    "token",
    ["", "not-a-jwt", "a.b.c", "a.b", b64url(b"[1]") + "." + b64url(b"{}") + ".x", "e30.e30.e30"],
)
def test_malformed_tokens_are_refused(token: str) -> None:
    with pytest.raises(InvalidTokenError):
        AccessTokens(RING).decode(token)


def test_tampered_payload_is_refused() -> None:
    token = AccessTokens(RING).issue("user-1", "session-1")
    header, _, signature = token.split(".")
    forged_payload = b64url(json.dumps(valid_claims(sub="admin-1")).encode())
    with pytest.raises(InvalidTokenError, match="invalid"):
        AccessTokens(RING).decode(f"{header}.{forged_payload}.{signature}")


def test_refresh_tokens_are_256_random_url_safe_bits() -> None:
    tokens = [new_refresh_token() for _ in range(1000)]
    assert len(set(tokens)) == 1000
    for token in tokens:
        assert len(token) == 43
        assert URL_SAFE.fullmatch(token)
    assert len(base64.urlsafe_b64decode(tokens[0] + "=")) == 32


# -- API keys -------------------------------------------------------------------------------------


def test_generated_keys_have_the_documented_shape() -> None:
    keys = [generate_api_key() for _ in range(1000)]
    assert len(set(keys)) == 1000
    for key in keys:
        assert key.startswith("thal_")
        assert len(key) == 5 + 43
        assert URL_SAFE.fullmatch(key[5:])
        assert is_well_formed(key)
    assert len(base64.urlsafe_b64decode(keys[0][5:] + "=")) == 32


def test_mask_shows_four_characters_each_side() -> None:
    raw = "thal_ABCD" + "m" * 35 + "WXYZ"
    assert is_well_formed(raw)
    assert mask(raw) == "thal_ABCD...WXYZ"
    key = generate_api_key()
    preview = mask(key)
    assert preview == f"thal_{key[5:9]}...{key[-4:]}"
    assert len(preview) == 16
    assert re.fullmatch(r"thal_[A-Za-z0-9_-]{4}\.\.\.[A-Za-z0-9_-]{4}", preview)
    assert key[9:-4] not in preview


VALID_BODY = "A" * 20 + "_-" + "z9" * 10 + "Q"  # 43 characters


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "thal_",
        VALID_BODY,  # no prefix
        "THAL_" + VALID_BODY,
        "thal-" + VALID_BODY,
        "tha_" + VALID_BODY,
        "xthal_" + VALID_BODY,
        "thal_" + VALID_BODY[:-1],  # 42
        "thal_" + VALID_BODY + "A",  # 44
        "thal_" + VALID_BODY[:-1] + "+",
        "thal_" + VALID_BODY[:-1] + "/",
        "thal_" + VALID_BODY[:-1] + "=",
        "thal_" + VALID_BODY[:-1] + " ",
        "thal_" + VALID_BODY[:-1] + ".",
        "thal_" + VALID_BODY[:-1] + "é",
        "thal_" + "٣" * 43,  # Unicode digits are not [0-9]
        "thal_" + VALID_BODY + "\n",
        "thal_" + VALID_BODY + "\r\n",
        " thal_" + VALID_BODY,
        "thal_" + VALID_BODY + " ",
        "thal_" + VALID_BODY[:-1] + "\x00",
    ],
)
def test_is_well_formed_rejects(raw: str) -> None:
    assert is_well_formed(raw) is False


def test_is_well_formed_accepts_the_shape() -> None:
    assert len(VALID_BODY) == 43
    assert is_well_formed("thal_" + VALID_BODY)
    assert is_well_formed("thal_" + "-" * 43)
    assert is_well_formed("thal_" + "_" * 43)


T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


def test_last_used_buffer_keeps_the_newest_touch() -> None:
    buffer = LastUsedBuffer()
    buffer.touch("k", T0 + timedelta(seconds=5))
    buffer.touch("k", T0)
    assert buffer.get("k") == T0 + timedelta(seconds=5)


def test_last_used_buffer_touch_get_drain() -> None:
    buffer = LastUsedBuffer()
    assert buffer.get("key-1") is None
    buffer.touch("key-1", T0)
    buffer.touch("key-1", T0 + timedelta(seconds=1))
    buffer.touch("key-2", T0)
    assert buffer.get("key-1") == T0 + timedelta(seconds=1)
    assert buffer.drain() == {"key-1": T0 + timedelta(seconds=1), "key-2": T0}
    assert buffer.get("key-1") is None
    assert buffer.drain() == {}


def test_restore_after_a_failed_flush_keeps_the_newest_time() -> None:
    buffer = LastUsedBuffer()
    buffer.touch("key-1", T0)
    buffer.touch("key-2", T0 + timedelta(seconds=5))
    buffer.touch("key-3", T0)
    pending = buffer.drain()
    buffer.touch("key-1", T0 + timedelta(seconds=10))  # used again while the flush was failing
    buffer.touch("key-2", T0)  # (an older time than the one being restored)
    buffer.restore(pending)
    assert buffer.drain() == {
        "key-1": T0 + timedelta(seconds=10),
        "key-2": T0 + timedelta(seconds=5),
        "key-3": T0,
    }


# -- service helpers ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "stored"),
    [
        ("ada@example.com", "ada@example.com"),
        ("Ada@Example.COM", "ada@example.com"),
        ("ADA.LOVELACE+tag@EXAMPLE.org", "ada.lovelace+tag@example.org"),
        ("Ådä@Bücher.example", "ådä@bücher.example"),
        (" ada@example.com\t", "ada@example.com"),
        ("ａｄａ@ｅｘａｍｐｌｅ.com", "ada@example.com"),
        ("ada@xn--bcher-kva.example", "ada@bücher.example"),
    ],
)
def test_normalize_email_lower_cases(raw: str, stored: str) -> None:
    assert normalize_email(raw) == stored


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "ada",
        "ada@",
        "@example.com",
        "ada@@example.com",
        "ada@example..com",
        "ada@exa mple.com",
        "ada@example.com\u200b",
    ],
)
def test_normalize_email_rejects_invalid_addresses(raw: str) -> None:
    with pytest.raises(ValidationError) as caught:
        normalize_email(raw)
    error = caught.value
    assert error.status_code == 422
    [detail] = error.details
    assert detail["loc"] == ["body", "email"]
    assert detail["type"] == "value_error"
    assert detail["msg"]
    assert detail["input"] == raw


def test_normalize_email_reports_the_given_location_and_truncates_the_input() -> None:
    raw = "x" * 1000
    with pytest.raises(ValidationError) as caught:
        normalize_email(raw, loc=("query", "email", 0))
    [detail] = caught.value.details
    assert detail["loc"] == ["query", "email", 0]
    assert detail["input"] == "x" * 320


def test_check_password_accepts_and_redacts() -> None:
    check_password("Correct-Horse-Battery-9!")
    secret = "nospecialnodigit"
    with pytest.raises(ValidationError) as caught:
        check_password(secret, loc=("body", "new_password"))
    error = caught.value
    assert error.status_code == 422
    assert error.message == f"The password must be {POLICY}."
    assert [detail["msg"] for detail in error.details] == [UPPER, DIGIT, SPECIAL]
    for detail in error.details:
        assert detail == {
            "type": "password_policy",
            "loc": ["body", "new_password"],
            "msg": detail["msg"],
            "input": "[redacted]",
        }
    assert secret not in repr(error.details) + error.message + str(error)


def test_check_password_default_location() -> None:
    with pytest.raises(ValidationError) as caught:
        check_password("short")
    assert {tuple(detail["loc"]) for detail in caught.value.details} == {("body", "password")}


CREATED = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)


@pytest.mark.parametrize(("api_access", "features"), [(True, ["api_access"]), (False, [])])
def test_user_document(api_access: bool, features: list[str]) -> None:
    user = User(
        id="user-1",
        email="ada@example.com",
        name="Ada",
        role="admin",
        api_access=api_access,
        password_hash="$argon2id$secret",
        created_at=CREATED,
    )
    assert user_document(user) == {
        "id": "user-1",
        "email": "ada@example.com",
        "name": "Ada",
        "role": "admin",
        "features": features,
        "created_at": "2030-01-02T03:04:05+00:00",
    }


def api_key(**changes: Any) -> ApiKey:
    values: dict[str, Any] = {
        "id": "key-1",
        "user_id": "user-1",
        "name": "ci",
        "key_hash": "f" * 64,
        "preview": "thal_ABCD...WXYZ",
        "created_at": CREATED,
        "expires_at": None,
        "revoked_at": None,
        "last_used_at": None,
    }
    values.update(changes)
    return ApiKey(**values)


def test_key_document_shape_never_includes_the_hash() -> None:
    key = api_key(expires_at=CREATED + timedelta(days=1), revoked_at=CREATED + timedelta(hours=1))
    assert key_document(key) == {
        "id": "key-1",
        "name": "ci",
        "preview": "thal_ABCD...WXYZ",
        "created_at": "2030-01-02T03:04:05+00:00",
        "expires_at": "2030-01-03T03:04:05+00:00",
        "last_used_at": None,
        "revoked_at": "2030-01-02T04:04:05+00:00",
    }
    assert key_document(api_key())["expires_at"] is None
    assert key_document(api_key())["revoked_at"] is None


EARLIER = CREATED + timedelta(minutes=1)
LATER = CREATED + timedelta(minutes=2)


@pytest.mark.parametrize(
    ("stored", "buffered", "shown"),
    [
        (None, None, None),
        (EARLIER, None, EARLIER),
        (None, EARLIER, EARLIER),
        (EARLIER, LATER, LATER),
        (LATER, EARLIER, LATER),
    ],
)
def test_key_document_shows_the_newer_last_use(
    stored: datetime | None, buffered: datetime | None, shown: datetime | None
) -> None:
    document = key_document(api_key(last_used_at=stored), buffered)
    assert document["last_used_at"] == (shown.isoformat() if shown else None)


# -- registration and sign-in agree on the address ----------------------------------------------


@pytest.mark.parametrize(
    "email",
    ["ada@xn--bcher-kva.example", unicodedata.normalize("NFD", "adé@example.com")],
    ids=["punycode-domain", "nfd-local-part"],
)
def test_a_registered_address_can_sign_in_as_typed(tmp_path: Path, email: str) -> None:
    settings = ServiceSettings(
        env="development", data_dir=tmp_path, argon2_time_cost=1, argon2_memory_cost=1024, argon2_parallelism=1
    )
    identity = Identity.from_settings(settings)
    password = "Correct-Horse-Battery-9!"

    async def register_then_sign_in() -> None:
        try:
            await identity.database.migrate()
            user = await identity.create_user(email, password)
            login = await identity.login(email, password, ClientInfo())
            assert login.user.id == user.id
        finally:
            await identity.database.dispose()

    asyncio.run(register_then_sign_in())


class _NoDatabase:
    """A database that must not be used."""

    def session(self) -> Any:
        raise AssertionError("the database was used")


def test_a_logout_naming_no_session_never_touches_the_database() -> None:
    """A credential-less logout (e.g. a cross-site form whose cookie SameSite held back) ends nothing,
    so it costs no database round trip."""
    identity = Identity.__new__(Identity)  # only the attribute logout may reach
    identity.database = _NoDatabase()  # type: ignore[assignment]
    asyncio.run(identity.logout(raw_refresh=None, session_id=None, client=ClientInfo()))
    asyncio.run(identity.logout(raw_refresh="", session_id=None, client=ClientInfo()))
    with pytest.raises(AssertionError, match="database was used"):
        asyncio.run(identity.logout(raw_refresh="some-token", session_id=None, client=ClientInfo()))
