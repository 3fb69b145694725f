"""The lab's small root filesystem, built from real Debian packages and cached between runs.

``apt-get download`` (or the local apt cache) gives the .deb files of busybox-static, dash, openssh-server
and e2fsprogs; ``dpkg-deb -x`` unpacks them, with the packages of every shared library their programs
link to (found with ``ldd`` and ``dpkg -S`` on the host, which runs the same Debian). The result, a
~15 MB tree, is the base of both the reference environment (on each node's disk) and the deployment
system (an initramfs served over TFTP). Nothing lab-specific (keys, hostnames) goes into the cache.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from kasched.errors import LabError
from kasched.lab.system import run

DEFAULT_CACHE = Path("/var/cache/kasched-lab")
BASE_PACKAGES = ("busybox-static", "dash", "openssh-server", "e2fsprogs")
# The deployment system also carries python3 with paramiko, GNU tar, xz and zstd: what the deployment
# transports' node-side agent and relay, and image unpacking, need.
DEPLOY_PACKAGES = (
    *BASE_PACKAGES,
    "python3-minimal",
    "python3.11-minimal",
    "libpython3.11-minimal",
    "libpython3.11-stdlib",
    "tar",
    "xz-utils",
    "zstd",
    # paramiko, for the transports' relay (tree exec); the lab adds the kasched package itself
    "python3-paramiko",
    "python3-bcrypt",
    "python3-cffi-backend",
    "python3-cryptography",
    "python3-nacl",
    "python3-six",
)
APT_ARCHIVES = Path("/var/cache/apt/archives")
_KEEP = ("bin", "sbin", "lib", "lib64", "usr/bin", "usr/sbin", "usr/lib", "usr/lib64", "usr/libexec")


def package_version(package: str) -> str:
    out = run(["dpkg-query", "-W", "-f=${Version}", package], check=False)
    if out:
        return out.strip()
    out = run(["apt-cache", "show", "--no-all-versions", package])
    for line in out.splitlines():
        if line.startswith("Version: "):
            return line.split(": ", 1)[1]
    raise LabError(f"package {package} has no version in the apt cache")


def fetch_deb(package: str, version: str, dest: Path) -> Path:
    """The .deb of ``package=version``: from apt's archive cache if there, else ``apt-get download``."""
    arch = run(["dpkg", "--print-architecture"]).strip()
    escaped = version.replace(":", "%3a")
    for directory in (dest, APT_ARCHIVES):
        for candidate_arch in (arch, "all"):
            candidate = directory / f"{package}_{escaped}_{candidate_arch}.deb"
            if candidate.exists():
                return candidate
    dest.mkdir(parents=True, exist_ok=True)
    # The installed version first; the mirror may only have the current one (same ABI in a release).
    out = run(["sh", "-c", f"cd '{dest}' && (apt-get download '{package}={version}' || apt-get download '{package}')"],
              timeout=300)  # fmt: skip
    found = sorted(dest.glob(f"{package}_*.deb"))
    if not found:
        raise LabError(f"apt-get download {package}={version} gave no file: {out.strip()}")
    return found[-1]


def elf_files(root: Path) -> list[Path]:
    """The programs and shared objects of ``root`` (regular files starting with the ELF magic)."""
    found = []
    for path in root.rglob("*"):
        if path.is_symlink() or not path.is_file() or path.stat().st_size < 64:
            continue
        with open(path, "rb") as handle:
            if handle.read(4) == b"\x7fELF":
                found.append(path)
    return found


def needed_libraries(root: Path) -> tuple[set[str], set[str]]:
    """The shared libraries the programs of ``root`` load: (found, not found), as sonames. A library
    nobody provides (a Python module nothing here imports, say) stays missing.

    ``ldd`` looks in the tree's own library directories first, then the host's.
    """
    search = [root / d for d in ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib", "usr/lib")]
    env = {**os.environ, "LD_LIBRARY_PATH": ":".join(str(d) for d in search if d.is_dir())}
    found: set[str] = set()
    missing: set[str] = set()
    for path in elf_files(root):
        done = subprocess.run(["ldd", str(path)], capture_output=True, text=True, env=env, check=False)
        for line in done.stdout.splitlines():
            parts = line.split()
            if "not" in parts and "found" in parts:
                missing.add(parts[0])
            elif any(p.startswith("/") for p in parts):
                found.add(Path(next(p for p in parts if p.startswith("/"))).name)
    return found, missing - found


def package_for_soname(soname: str) -> str:
    """Debian's name for the package of a library (policy 8.1): libfoo.so.3 → libfoo3,
    libfoo-1.2.so.0 → libfoo-1.2-0."""
    base, _, version = soname.partition(".so.")
    base = base.lower().replace("_", "-")
    return f"{base}-{version}" if base[-1:].isdigit() else f"{base}{version}"


def library_packages(root: Path) -> set[str]:
    """Debian packages of the shared libraries the programs of ``root`` load: the owner (dpkg -S on
    the host) of each library found, the policy name of each library not found."""
    packages: set[str] = set()
    found, missing = needed_libraries(root)
    for name in sorted(found):
        owner = run(["dpkg-query", "-S", f"*/{name}"], check=False)
        for entry in owner.splitlines():
            package = entry.split(":", 1)[0].strip()
            if package and " " not in package and "," not in package and not package.endswith("-dev"):
                packages.add(package)
    for name in sorted(missing):  # not on the host either: guess the package by Debian's naming
        candidate = package_for_soname(name)
        if run(["apt-cache", "show", "--no-all-versions", candidate], check=False).strip():
            packages.add(candidate)
    return packages


_TREE_LAYOUT = "5"  # bump when the way trees are built changes: old caches are then rebuilt
_PRUNED = (
    "usr/lib/x86_64-linux-gnu/gconv",
    *(f"usr/lib/python3.11/{name}" for name in ("test", "pydoc_data", "idlelib", "lib2to3", "ensurepip",
                                                "tkinter", "turtledemo", "config-3.11-x86_64-linux-gnu")),
)  # fmt: skip


def cache_key(packages: tuple[str, ...]) -> str:
    text = _TREE_LAYOUT + " " + " ".join(f"{p}={package_version(p)}" for p in packages)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def build_rootfs(cache_dir: Path = DEFAULT_CACHE, packages: tuple[str, ...] = BASE_PACKAGES) -> Path:
    """The cached tree of ``packages`` (built once per set of package versions); returns its directory."""
    key = cache_key(packages)
    final = cache_dir / f"rootfs-{key}"
    if (final / ".complete").exists():
        return final
    _remove_stale_builds(cache_dir)
    work = cache_dir / f".rootfs-{key}.build{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    debs = cache_dir / "debs"
    for package in packages:
        _extract(fetch_deb(package, package_version(package), debs), work)
    extracted = set(packages)
    for _ in range(5):  # libraries of libraries, until nothing new is needed
        needed = library_packages(work) - extracted
        if not needed:
            break
        for package in sorted(needed):
            _extract(fetch_deb(package, package_version(package), debs), work)
        extracted |= needed
    _prune(work)
    _install_busybox_links(work)
    (work / ".complete").write_text(key + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(work, final)
    return final


def _remove_stale_builds(cache_dir: Path) -> None:
    """Half-built trees left by a killed build (their builder's pid is gone)."""
    for stale in cache_dir.glob(".rootfs-*.build*"):
        pid = stale.name.rsplit(".build", 1)[1]
        if not pid.isdigit() or not Path(f"/proc/{pid}").exists():
            shutil.rmtree(stale, ignore_errors=True)


def _extract(deb: Path, root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    run(["dpkg-deb", "-x", str(deb), str(root)], timeout=120)


def _prune(root: Path) -> None:
    """Keep programs and libraries; drop documentation, locales and package scripts."""
    for child in list(root.iterdir()):
        if child.name not in {"bin", "sbin", "lib", "lib64", "usr", "etc"}:
            shutil.rmtree(child, ignore_errors=True)
    usr = root / "usr"
    for child in list(usr.iterdir()) if usr.is_dir() else []:
        if f"usr/{child.name}" not in _KEEP:
            shutil.rmtree(child, ignore_errors=True)
    for unwanted in ("etc/init.d", "etc/default", "etc/pam.d", "etc/systemd", "lib/systemd", "etc/ufw", *_PRUNED):
        shutil.rmtree(root / unwanted, ignore_errors=True)


def _install_busybox_links(root: Path) -> None:
    busybox = root / "bin" / "busybox"
    if not busybox.exists():
        raise LabError("busybox-static did not provide /bin/busybox")
    programs = {p.name for d in ("bin", "sbin", "usr/bin", "usr/sbin") if (root / d).is_dir()
                for p in (root / d).iterdir()}  # fmt: skip
    for applet in run([str(busybox), "--list-full"]).split():
        link = root / applet
        if link.name in programs:  # a real program (GNU tar, xz...) wins over the applet
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to("/bin/busybox")
    for directory in ("dev", "proc", "sys", "run", "tmp", "root", "var/log", "var/empty", "mnt"):
        (root / directory).mkdir(parents=True, exist_ok=True)
    (root / "tmp").chmod(0o1777)
