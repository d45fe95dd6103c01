from pathlib import Path

import pytest

from metald.api.auth import TokenAuthenticator
from metald.core.errors import Unauthenticated


async def customer_of(auth: TokenAuthenticator, header: str | None) -> str | None:
    return (await auth.caller_for(header)).customer_id


async def test_dev_tokens_only_when_enabled() -> None:
    dev = TokenAuthenticator(dev_tokens=True)
    assert await customer_of(dev, "Bearer dev_customer_acme") == "acme"
    assert await customer_of(dev, "Bearer dev_user_acme") == "acme"
    assert (await dev.caller_for("Bearer dev_user_acme")).actor == "dev:acme"
    for token in ("dev_customer_acme", "dev_user_acme"):
        with pytest.raises(Unauthenticated, match="invalid token"):
            await TokenAuthenticator(dev_tokens=False).caller_for(f"Bearer {token}")


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        "Basic dev_customer_acme",
        "dev_customer_acme",
        "Bearer dev_customer_",
        "Bearer dev_customer_a/b",
        "Bearer dev_user_",
        "Bearer dev_user_a b",
        "Bearer nonsense",
    ],
)
async def test_bad_headers_are_unauthenticated(header: str | None) -> None:
    with pytest.raises(Unauthenticated):
        await TokenAuthenticator(dev_tokens=True).caller_for(header)


async def test_static_tokens_file(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("# customers\nacme s3cret-token\n\nglobex other-token  # comment\n")
    auth = TokenAuthenticator(dev_tokens=False, tokens_file=tokens)
    assert await customer_of(auth, "Bearer s3cret-token") == "acme"
    assert await customer_of(auth, "bearer other-token") == "globex"
    assert (await auth.caller_for("Bearer s3cret-token")).actor == "token:acme"
    with pytest.raises(Unauthenticated):
        await auth.caller_for("Bearer s3cret")


def test_a_malformed_tokens_file_is_refused(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("just-a-token\n")
    with pytest.raises(ValueError, match=":1:"):
        TokenAuthenticator(dev_tokens=False, tokens_file=tokens)
