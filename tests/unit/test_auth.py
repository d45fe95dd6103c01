from pathlib import Path

import pytest

from metald.api.auth import TokenAuthenticator
from metald.core.errors import Unauthenticated


def test_dev_tokens_only_when_enabled() -> None:
    assert TokenAuthenticator(dev_tokens=True).customer_for("Bearer dev_customer_acme") == "acme"
    with pytest.raises(Unauthenticated, match="invalid token"):
        TokenAuthenticator(dev_tokens=False).customer_for("Bearer dev_customer_acme")


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
        "Bearer nonsense",
    ],
)
def test_bad_headers_are_unauthenticated(header: str | None) -> None:
    with pytest.raises(Unauthenticated):
        TokenAuthenticator(dev_tokens=True).customer_for(header)


def test_static_tokens_file(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("# customers\nacme s3cret-token\n\nglobex other-token  # comment\n")
    auth = TokenAuthenticator(dev_tokens=False, tokens_file=tokens)
    assert auth.customer_for("Bearer s3cret-token") == "acme"
    assert auth.customer_for("bearer other-token") == "globex"
    with pytest.raises(Unauthenticated):
        auth.customer_for("Bearer s3cret")


def test_a_malformed_tokens_file_is_refused(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("just-a-token\n")
    with pytest.raises(ValueError, match=":1:"):
        TokenAuthenticator(dev_tokens=False, tokens_file=tokens)
