"""Bearer tokens with nested roles, configured by file or environment, stored hashed."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import yaml

from medattn.errors import MedattnError
from medattn.serving.auth import (
    ANONYMOUS,
    AuthConfigError,
    Authenticator,
    AuthError,
    Principal,
    hash_token,
    hash_token_command,
)

TOKENS = {"predict": "tok-predict-0123456789", "expert": "tok-expert-0123456789", "admin": "tok-admin-0123456789"}
CONFIG = {"tokens": [{"name": f"{role}-user", "role": role, "sha256": hash_token(token)}
                     for role, token in TOKENS.items()]}


@pytest.fixture
def auth() -> Authenticator:
    return Authenticator.from_mapping(CONFIG, "test config")


@pytest.mark.parametrize("token_role", ["predict", "expert", "admin"])
@pytest.mark.parametrize("required", ["predict", "expert", "admin"])
def test_role_matrix(auth: Authenticator, token_role: str, required: str) -> None:
    order = ["predict", "expert", "admin"]
    header = f"Bearer {TOKENS[token_role]}"
    if order.index(token_role) >= order.index(required):
        assert auth.check(header, required) == Principal(f"{token_role}-user", token_role)
    else:
        with pytest.raises(AuthError) as caught:
            auth.check(header, required)
        assert caught.value.status_code == 403
        assert caught.value.message == (f"token '{token_role}-user' has role '{token_role}'; "
                                        f"this needs '{required}'")


@pytest.mark.parametrize("header, message", [
    (None, "missing Authorization header"),
    ("", "missing Authorization header"),
    ("Basic dXNlcjpwYXNz", "malformed Authorization header"),
    ("Bearer", "malformed Authorization header"),
    ("Bearer two tokens", "malformed Authorization header"),
    (TOKENS["admin"], "malformed Authorization header"),
    ("Bearer not-a-configured-token", "invalid token"),
    (f"Bearer {hash_token(TOKENS['admin'])}", "invalid token"),  # the stored digest is not a credential
])
def test_bad_credentials_are_401(auth: Authenticator, header: str | None, message: str) -> None:
    with pytest.raises(AuthError) as caught:
        auth.check(header, "predict")
    assert caught.value.status_code == 401 and message in str(caught.value)
    assert isinstance(caught.value, MedattnError)
    assert TOKENS["admin"] not in str(caught.value)  # the header value is never echoed


def test_scheme_is_case_insensitive_and_whitespace_tolerated(auth: Authenticator) -> None:
    assert auth.check(f"  bearer   {TOKENS['expert']} ", "expert").name == "expert-user"


def test_open_predict_lets_anonymous_predict_only() -> None:
    auth = Authenticator.from_mapping({**CONFIG, "open_predict": True}, "cfg")
    assert auth.check(None, "predict") == ANONYMOUS
    assert auth.check(f"Bearer {TOKENS['expert']}", "predict").name == "expert-user"
    with pytest.raises(AuthError) as caught:
        auth.check(None, "expert")
    assert caught.value.status_code == 401
    with pytest.raises(AuthError):  # a token that is sent must still be valid
        auth.check("Bearer wrong-token-value", "predict")
    closed = Authenticator.from_mapping(CONFIG, "cfg")
    assert pytest.raises(AuthError, closed.check, None, "predict").value.status_code == 401


def test_config_from_yaml_file_json_file_and_env(tmp_path: Path) -> None:
    yaml_file = tmp_path / "tokens.yaml"
    yaml_file.write_text("open_predict: true\ntokens:\n" + "".join(
        f"  - {{name: {e['name']}, role: {e['role']}, sha256: {e['sha256']}}}\n" for e in CONFIG["tokens"]))
    json_file = tmp_path / "tokens.json"
    json_file.write_text(json.dumps(CONFIG))
    for auth in (Authenticator.from_file(yaml_file), Authenticator.load(json_file),
                 Authenticator.load(environ={"MEDATTN_TOKENS": json.dumps(CONFIG)}),
                 Authenticator.from_env({"MEDATTN_TOKENS": json.dumps(CONFIG["tokens"])})):
        assert auth.check(f"Bearer {TOKENS['admin']}", "admin").name == "admin-user"
    assert Authenticator.from_file(yaml_file).open_predict
    assert not Authenticator.load(json_file).open_predict
    with pytest.raises(AuthConfigError, match="no token configuration"):
        Authenticator.load(environ={})
    # the service's own open_predict setting wins over the file's
    assert not Authenticator.load(yaml_file, open_predict=False).open_predict
    assert Authenticator.load(json_file, open_predict=True).check(None, "predict") == ANONYMOUS
    predict_only = Authenticator.load(environ={}, open_predict=True)
    assert predict_only.check(None, "predict") == ANONYMOUS
    assert pytest.raises(AuthError, predict_only.check, f"Bearer {TOKENS['admin']}", "predict").value.status_code == 401


@pytest.mark.parametrize("raw, message", [
    ({"tokens": [{"name": "x", "role": "root", "sha256": "0" * 64}]}, "tokens[0].role must be one of predict"),
    ({"tokens": [{"name": "x", "role": "admin", "sha256": "plain-token"}]}, "tokens[0].sha256 must be 64 hex"),
    ({"tokens": [{"name": "", "role": "admin", "sha256": "0" * 64}]}, "tokens[0].name must be a non-empty"),
    ({"tokens": [{"name": "x", "role": "admin", "sha256": "0" * 64, "token": "t"}]}, "unknown key 'token'"),
    ({"tokens": [{"name": "a", "role": "admin", "sha256": "0" * 64},
                 {"name": "b", "role": "expert", "sha256": "0" * 64}]}, "'a' and 'b' have the same sha256"),
    ({"tokens": []}, "no tokens and open_predict is false"),
    ({"tokens": [], "open_predict": "yes"}, "open_predict must be true or false"),
    ({"tokenz": []}, "unknown key 'tokenz'"),
    ("tokens", "expected a mapping"),
])
def test_malformed_config_names_source_and_entry(raw: object, message: str) -> None:
    with pytest.raises(AuthConfigError) as caught:
        Authenticator.from_mapping(raw, "tokens.yaml")
    assert message in str(caught.value)
    assert str(caught.value).startswith("tokens.yaml")


def test_unreadable_config(tmp_path: Path) -> None:
    with pytest.raises(AuthConfigError, match="cannot read token file"):
        Authenticator.from_file(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("tokens: [unclosed")
    with pytest.raises(AuthConfigError, match="bad.yaml: not valid YAML/JSON"):
        Authenticator.from_file(tmp_path / "bad.yaml")
    with pytest.raises(AuthConfigError, match="MEDATTN_TOKENS: not valid JSON"):
        Authenticator.from_env({"MEDATTN_TOKENS": "{tokens"})


def test_hash_token_command_prints_a_working_entry(capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    hash_token_command("dr-lee", role="expert")
    out, err = capsys.readouterr()
    token = err.strip().rsplit(" ", 1)[-1]
    (entry,) = yaml.safe_load(out)
    assert entry == {"name": "dr-lee", "role": "expert", "sha256": hash_token(token)}
    assert token not in out  # stdout (what goes into the file) holds only the digest
    assert Authenticator.from_mapping([entry], "cfg").check(f"Bearer {token}", "expert").name == "dr-lee"

    monkeypatch.setattr("sys.stdin", io.StringIO("my-own-long-token-value\n"))
    hash_token_command("ops", role="admin", stdin=True)
    second = capsys.readouterr().out
    assert yaml.safe_load(second)[0]["sha256"] == hash_token("my-own-long-token-value")
    tokens_file = tmp_path / "tokens.yaml"
    tokens_file.write_text(out + second)  # what `>> tokens.yaml` twice leaves behind
    both = Authenticator.from_file(tokens_file)
    assert both.check(f"Bearer {token}", "expert").name == "dr-lee"
    assert both.check("Bearer my-own-long-token-value", "admin").name == "ops"
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    with pytest.raises(AuthConfigError, match="at least 16 characters"):
        hash_token_command("ops", role="admin", stdin=True)
    with pytest.raises(AuthConfigError, match="--role must be one of"):
        hash_token_command("ops", role="root")
