from __future__ import annotations

from pathlib import Path

import pytest

from kasched import config as config_module
from kasched.errors import ConfigError
from tests.conftest import write


def test_defaults_and_relative_paths(tmp_path: Path) -> None:
    path = write(tmp_path / "k.yaml", "site: s1\nstate_dir: state\nmax_grant_hours: 12\n")
    config = config_module.load(path)
    assert config.state_dir == tmp_path / "state"
    assert config.database == f"sqlite:///{tmp_path / 'state' / 'kasched.db'}"
    assert config.boot_dir == tmp_path / "state" / "boot" and config.max_grant_hours == 12


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("datbase: x\n", "unknown setting 'datbase'"),
        ("max_grant_hours: -1\n", "max_grant_hours: expected a positive number"),
        ("disabled_plugins: journal\n", "disabled_plugins: expected a list"),
        ("state_dir: 3\n", "state_dir: expected a path"),
        ("- a\n- b\n", "expected a mapping"),
        ("site: [\n", "cannot read"),
    ],
)
def test_bad_settings(tmp_path: Path, content: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        config_module.load(write(tmp_path / "k.yaml", content))


def test_check_reports_problems(tmp_path: Path) -> None:
    creds = write(tmp_path / "creds.yaml", "lab: {user: admin}\n")
    creds.chmod(0o644)
    config = config_module.load(write(tmp_path / "k.yaml", f"credentials_file: {creds}\nstate_dir: st\n"))
    problems, warnings = config_module.check(config)
    assert any("readable by others" in p for p in problems)
    assert any("'lab' needs 'user' and 'password'" in p for p in problems)
    assert any("admin_group" in w for w in warnings)
    creds.write_text("lab: {user: admin, password: pw}\n")
    creds.chmod(0o600)
    assert config_module.check(config)[0] == []
    assert config_module.load_credentials(config) == {"lab": {"user": "admin", "password": "pw"}}


def test_missing_named_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        config_module.load(tmp_path / "none.yaml")
