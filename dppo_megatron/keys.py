"""The run's API keys: every server a run starts (SGLang servers, the embedded engine, node
agents) asks for them, as SGLang's `--api-key` and `--admin-api-key` do.

Two keys, with SGLang 0.5.23's meaning (sglang/srt/utils/auth.py): the generation key opens the
ordinary endpoints (/generate, /server_info, ...); the admin key alone opens the control ones
(weight updates, memory release and resume, cache flush), so a leaked generation key cannot change
the served weights. Health, readiness and metrics stay open.

The keys live in one YAML file, mode 0600, that SGLang reads itself (`--config FILE`): they never
appear on a command line, in a job script or in the project's logs. A run makes its own (random,
in the run directory); `rollout.api_key_file` names one the user made.
"""

from __future__ import annotations

import hmac
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

import yaml

KEYS_FILE = "keys.yaml"
KEY_FIELDS = ("api-key", "admin-api-key")  # SGLang's own option names: the file is its --config
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class KeyFileError(ValueError):
    """A key file that cannot be used (missing, readable by others, not the expected fields)."""


@dataclass(frozen=True)
class ApiKeys:
    api_key: str | None = None
    admin_api_key: str | None = None

    def __bool__(self) -> bool:
        return bool(self.api_key or self.admin_api_key)

    def for_control(self) -> str | None:
        """The key the control endpoints take: the admin key where there is one (SGLang then
        refuses the generation key there), else the generation key."""
        return self.admin_api_key or self.api_key

    def __repr__(self) -> str:  # never the keys themselves: a repr ends up in logs
        shown = {name: "set" if value else None for name, value in vars(self).items()}
        return f"ApiKeys(api_key={shown['api_key']}, admin_api_key={shown['admin_api_key']})"


NO_KEYS = ApiKeys()


def headers(key: str | None) -> dict[str, str]:
    """The Authorization header that carries `key` (none without one)."""
    return {"Authorization": f"Bearer {key}"} if key else {}


def bearer_matches(authorization: str | None, key: str) -> bool:
    """Whether an Authorization header carries `key` as a Bearer token (the scheme in any case,
    as SGLang reads it), compared in constant time."""
    scheme, space, token = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and bool(space) and hmac.compare_digest(token.encode(), key.encode())


def make_keys_file(path: Path) -> Path:
    """Write two fresh random keys to `path`, readable by the user alone; an existing file is kept
    (a resumed run's servers take the same keys)."""
    path = Path(path)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # Hex: SGLang turns the file into `--api-key VALUE` for argparse, which takes a value that
    # starts with "-" for an option (URL-safe base64 does, 1 in 32 keys).
    text = yaml.safe_dump({name: secrets.token_hex(32) for name in KEY_FIELDS})
    # Created 0600: never readable by others, not even for a moment.
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as f:
        f.write(text)
    return path


def read_keys(path: str | Path) -> ApiKeys:
    """The keys of `path`. Refused: a file group or others can read (the keys would be anyone's on
    the node), one that is not YAML, or one without `api-key`."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise KeyFileError(f"key file {path} does not exist") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(f"key file {path} is readable by others (mode {stat.S_IMODE(mode):04o}): chmod 600 {path}")
    try:
        found = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise KeyFileError(f"key file {path} is not YAML: {error}") from None
    if not isinstance(found, dict) or not isinstance(found.get("api-key"), str) or not found["api-key"]:
        raise KeyFileError(f"key file {path} must hold `api-key: <secret>` (and optionally `admin-api-key: <secret>`)")
    unknown = sorted(set(found) - set(KEY_FIELDS))
    if unknown:
        raise KeyFileError(f"key file {path}: unknown field(s) {', '.join(map(str, unknown))}; it holds "
                           f"{' and '.join(KEY_FIELDS)} only")
    admin = found.get("admin-api-key")
    for name in KEY_FIELDS:
        if str(found.get(name) or "").startswith("-"):
            raise KeyFileError(f"key file {path}: {name} starts with '-', which SGLang's command-line parser takes "
                               "for an option (it reads the file as --config); choose another key")
    return ApiKeys(api_key=found["api-key"], admin_api_key=str(admin) if admin else None)


def keys_of(path: str | Path | None) -> ApiKeys:
    return read_keys(path) if path else NO_KEYS


def refuse_open_interface(host: str, keys: ApiKeys, what: str) -> None:
    """A server on an interface other machines reach must ask for a key."""
    if host not in LOOPBACK and not keys:
        raise KeyFileError(f"{what} would listen on {host} without a key: anyone who reaches this node could drive "
                           "it; give it a key file (--api-key-file) or bind 127.0.0.1")
