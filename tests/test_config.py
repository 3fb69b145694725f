from __future__ import annotations

import re
from pathlib import Path

import pytest

from kasched import config as config_module
from kasched.config import Config
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


def test_broadcast_timeouts_reach_the_chain(tmp_path: Path) -> None:
    from kasched.deploy.operations import site_broadcast_options

    config = config_module.load(
        write(
            tmp_path / "k.yaml",
            "broadcast_stall_timeout: 60\nbroadcast_ack_timeout: 0\nservice_address: 10.0.0.9\n"
            "broadcast_source_rate: 2.5Gbit\n",
        )
    )
    options = site_broadcast_options(config)
    assert (options.stall_timeout, options.ack_timeout, options.report_host) == (60.0, 0.0, "10.0.0.9")
    assert options.source_rate == 2.5e9 / 8
    default = site_broadcast_options(config_module.load(write(tmp_path / "d.yaml", "site: s\n")))
    assert (default.stall_timeout, default.ack_timeout, default.report_host) == (30.0, 3.0, None)
    assert default.source_rate is None


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("broadcast_ack_timeout: -1\n", "broadcast_ack_timeout: expected seconds (0: off)"),
        ("broadcast_ack_timeout: true\n", "broadcast_ack_timeout: expected seconds (0: off)"),
        ("broadcast_stall_timeout: 0\n", "broadcast_stall_timeout: expected a positive number"),
        ("broadcast_source_rate: 1000\n", "broadcast_source_rate: 1000 is not a link rate such as 100mbit"),
        ("broadcast_source_rate: 10mbps\n", "broadcast_source_rate: '10mbps' is not a link rate such as 100mbit"),
        ("broadcast_source_rate: 0gbit\n", "broadcast_source_rate: '0gbit' is not a link rate such as 100mbit"),
        ("broadcast_source_rate: ''\n", "broadcast_source_rate: '' is not a link rate such as 100mbit"),
    ],
)
def test_bad_broadcast_timeouts(tmp_path: Path, content: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_module.load(write(tmp_path / "k.yaml", content))


def test_network_boot_settings_reach_the_pxe_driver(tmp_path: Path) -> None:
    from kasched.builtin.drivers import BuiltinDrivers
    from kasched.drivers.base import BootTarget, NodeTarget

    config = config_module.load(
        write(
            tmp_path / "k.yaml",
            "pxe_base_url: http://${next-server}/\npxe_local_initrd: reference/initrd.img\n"
            "pxe_kernel_args: console=ttyS0,115200\n",
        )
    )
    driver = BuiltinDrivers().kasched_boot_drivers()["pxe"](config)
    node = NodeTarget("n1", "02:00:00:00:00:01", "10.0.0.1", disk_device="/dev/vda")
    profile = driver.profile(node, BootTarget.LOCAL, partition=2)  # type: ignore[attr-defined]
    assert (profile.kernel, profile.initrd) == ("reference/vmlinuz", "reference/initrd.img")
    assert profile.cmdline == "root=/dev/vda2 ro console=ttyS0,115200"
    assert "kernel http://${next-server}/reference/vmlinuz root=/dev/vda2" in profile.ipxe(driver.base_url)  # type: ignore[attr-defined]
    plain = BuiltinDrivers().kasched_boot_drivers()["pxe"](config_module.load(write(tmp_path / "d.yaml", "site: s\n")))
    assert plain.profile(node, BootTarget.LOCAL, partition=2).initrd == ""  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("pxe_base_url: next-server/\n", "pxe_base_url: expected a URL prefix"),
        ("pxe_local_initrd: /srv/tftp/initrd.img\n", "pxe_local_initrd: expected a path relative to boot_dir"),
        ("pxe_local_initrd: ../initrd.img\n", "pxe_local_initrd: expected a path relative to boot_dir"),
        ("pxe_kernel_args: [console=ttyS0]\n", "pxe_kernel_args: expected a non-empty string"),
    ],
)
def test_bad_network_boot_settings(tmp_path: Path, content: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_module.load(write(tmp_path / "k.yaml", content))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("image_max_size: 0\n", "image_max_size: expected a size such as 16G"),
        ("image_max_size: lots\n", "image_max_size: expected a size such as 16G"),
        ("image_max_size: true\n", "image_max_size: expected a size such as 16G"),
        ("stateless_quota: -1G\n", "stateless_quota: expected a size such as 16G"),
        ("image_url_allow: https://images.example.org/\n", "image_url_allow: expected a list of URL prefixes"),
        ("image_url_allow: [https://images.example.org]\n", "must end with '/'"),
        ("image_url_allow: ['ftp://images.example.org/']\n", "is not an http(s)://HOST[:PORT]/PATH/ prefix"),
        ("image_url_allow: ['https://u:p@images.example.org/']\n", "is not an http(s)://HOST[:PORT]/PATH/ prefix"),
    ],
)
def test_bad_image_settings(tmp_path: Path, content: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_module.load(write(tmp_path / "k.yaml", content))


def test_image_settings() -> None:
    config = config_module.from_mapping(
        {"image_max_size": "512M", "stateless_quota": 4096, "image_url_allow": ["https://img.example.org/envs/"]}
    )
    assert (config.image_max_size, config.stateless_quota) == (512 << 20, 4096)
    assert config.image_url_allow == ("https://img.example.org/envs/",)
    assert (Config().image_max_size, Config().stateless_quota, Config().image_url_allow) == (16 << 30, 8 << 30, ())


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("scheduler_settings: [a]\n", "scheduler_settings: expected a mapping"),
        ("scheduler_settings: {PATH: /tmp}\n", "'PATH' is not a scheduler plugin variable"),
        ("scheduler_settings: {KASCHED_X: [1]}\n", "KASCHED_X: expected a text value"),
        ("revert_wait: -1\n", "revert_wait: expected seconds (0: refused at once)"),
    ],
)
def test_bad_give_back_settings(tmp_path: Path, content: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_module.load(write(tmp_path / "k.yaml", content))


def test_scheduler_settings_reach_the_environment_unless_already_set(monkeypatch: pytest.MonkeyPatch) -> None:
    config = config_module.from_mapping({"scheduler_settings": {"KASCHED_T_A": "site", "KASCHED_T_B": 5}})
    monkeypatch.setenv("KASCHED_T_A", "hook")
    monkeypatch.delenv("KASCHED_T_B", raising=False)
    config_module.export_scheduler_settings(config)
    import os

    assert (os.environ["KASCHED_T_A"], os.environ["KASCHED_T_B"]) == ("hook", "5")
    monkeypatch.delenv("KASCHED_T_B")
