"""A simulated site on disk: its configuration, an inventory of N simulated nodes over switches,
the settings of its simulated hardware, and two environments (the reference, raw, three 4 MiB blocks
so that a patch and a rewrite can both happen; a user's, a small tar.gz) added by an admin.

Used by the fast test tier (tests/simulated/) and bench/scale.py; ``kasched`` and ``kaschedd`` run on
it as on any site (``KASCHED_CONFIG=<base>/kasched.yaml``).
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kasched.config import Config, load
from kasched.simulated.site import FAULTS, SETTINGS

BLOCK = 4 << 20
REFERENCE_BLOCKS = 3


@dataclass(frozen=True)
class SimulatedSiteFiles:
    base: Path
    config_path: Path
    inventory: Path
    reference_env: Path
    user_env: Path

    @property
    def settings(self) -> Path:
        return self.config().state_dir / SETTINGS

    def config(self) -> Config:
        return load(self.config_path)

    def set_faults(self, faults: Mapping[str, Sequence[str]]) -> None:
        """Give nodes faults (node -> fault names), read by the site at its next operation."""
        for name, kinds in faults.items():
            unknown = set(kinds) - FAULTS.keys()
            if unknown:
                raise ValueError(f"{name}: no fault {', '.join(sorted(unknown))} (known: {', '.join(FAULTS)})")
        data = json.loads(self.settings.read_text())
        data["faults"] = {name: list(kinds) for name, kinds in faults.items()}
        _write(self.settings, data)

    def update(self, **settings: Any) -> None:
        data = json.loads(self.settings.read_text())
        data.update(settings)
        _write(self.settings, data)


def _write(path: Path, data: dict[str, Any]) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(data, indent=1))
    temporary.replace(path)


def inventory(nodes: int, per_switch: int = 50) -> dict[str, Any]:
    """``nodes`` simulated nodes (node-1 ...), ``per_switch`` (at most 99) to a switch, two switches
    to a rack; switch ``g`` has MACs 02:5a:00:GG:GG:xx and addresses 10.(100+g/250).(g%250).x."""
    groups = []
    for first in range(1, nodes + 1, per_switch):
        last = min(nodes, first + per_switch - 1)
        g = (first - 1) // per_switch
        span = (f"[01-{last - first + 1:02d}]", f"[1-{last - first + 1}]") if last > first else ("01", "1")
        groups.append(
            {
                "name": f"node-[{first}-{last}]" if last > first else f"node-{first}",
                "mac": f"02:5a:00:{g >> 8:02x}:{g & 255:02x}:{span[0]}",
                "ip": f"10.{100 + g // 250}.{g % 250}.{span[1]}",
                "switch": f"sw{g + 1}",
                "rack": f"r{g // 2 + 1}",
            }
        )
    disk = {"device": "/dev/sda", "reference_partition": 2, "deploy_partition": 3}
    defaults = {"bmc": {"driver": "simulated"}, "disk": disk}
    return {"site": "simulated", "clusters": [{"name": "sim", "defaults": defaults, "nodes": groups}]}


def service_key(path: Path) -> None:
    """The site's SSH key (the steps read it to log in; simulated nodes take any)."""
    from kasched.bootkeys import make_key

    path.parent.mkdir(parents=True, exist_ok=True)
    private, public = make_key()
    path.write_bytes(private)
    path.chmod(0o600)
    path.with_suffix(".pub").write_text(public + "\n")


def reference_image(path: Path) -> None:
    """Three 4 MiB blocks, each different (a raw partition image, no compression)."""
    with path.open("wb") as out:
        for index in range(REFERENCE_BLOCKS):
            out.write(bytes([index + 1]) * BLOCK)


def user_image(path: Path) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in (("etc/kasched-marker", b"deployed by kasched\n"), ("boot/vmlinuz", b"kernel\n")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    path.write_bytes(buffer.getvalue())


def write_site(
    base: Path, nodes: int, *, scale: float = 0.001, seed: int = 0, database: str = "",
    image_size: int | None = None, calibration: Mapping[str, float] | None = None,
    settings: Mapping[str, Any] | None = None,
) -> SimulatedSiteFiles:  # fmt: skip
    """Write the site's files under ``base`` (nothing imported yet: see :func:`populate`)."""
    base.mkdir(parents=True, exist_ok=True)
    state = base / "state"
    state.mkdir(exist_ok=True)
    config = {
        "site": "simulated", "state_dir": str(state), "admin_group": "kasched-test-admins",
        "credentials_file": str(base / "credentials.yaml"), "boot_driver": "simulated",
        "exec_method": "simulated", "broadcast_method": "simulated", "reboot_timeout": 600,
        "reconcile_interval": 0, **({"database": database} if database else {}), **(settings or {}),
    }  # fmt: skip
    config_path = base / "kasched.yaml"
    config_path.write_text(yaml.safe_dump(config))
    (base / "credentials.yaml").write_text("{}\n")
    service_key(state / "ssh" / "id_ed25519")
    inventory_path = base / "inventory.yaml"
    inventory_path.write_text(yaml.safe_dump(inventory(nodes), sort_keys=False))
    reference_image(base / "reference.img")
    user_image(base / "userenv.tar.gz")
    reference_env = base / "reference.yaml"
    reference_env.write_text(yaml.safe_dump({
        "name": "reference", "description": "the site's reference", "visibility": "public",
        "image": {"file": "reference.img", "kind": "raw", "compression": "none"},
        "boot": {"kernel": "/vmlinuz", "cmdline": "quiet"}, "reference": True,
    }))  # fmt: skip
    user_env = base / "userenv.yaml"
    user_env.write_text(yaml.safe_dump({
        "name": "userenv", "description": "a user's environment", "visibility": "public",
        "image": {"file": "userenv.tar.gz", "kind": "tar", "compression": "gz"},
        "boot": {"kernel": "/boot/vmlinuz", "cmdline": "quiet"},
    }))  # fmt: skip
    simulated = {"scale": scale, "seed": seed, "reference_image": str(base / "reference.img"), "faults": {},
                 **({"image_size": image_size} if image_size else {}),
                 **({"calibration": dict(calibration)} if calibration else {})}  # fmt: skip
    _write(state / SETTINGS, simulated)
    return SimulatedSiteFiles(base, config_path, inventory_path, reference_env, user_env)


def populate(files: SimulatedSiteFiles) -> Config:
    """Import the inventory and add both environments, as an admin (the site is then ready)."""
    from kasched.compose import open_site
    from kasched.identity import Caller

    config = files.config()
    admin = open_site(config, Caller("root", is_admin=True), load_entry_points=False)
    try:
        admin.import_nodes(files.inventory)
        admin.add_environment(files.reference_env)
        admin.add_environment(files.user_env)
    finally:
        admin.close()
    return config
