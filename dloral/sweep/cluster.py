"""Joining a running Ray cluster by its address: the auth token, and failures said in one line.

Since Ray 2.52, `ray start --head` turns token authentication on when the machine holds a token
(`~/.ray/auth_token`, which any earlier local `ray.init()` or `ray get-auth-token --generate`
writes), and from then on every process that talks to the cluster must present that token. Ray's
own driver only looks for a token when it finds a local cluster by itself; a driver given an
address (argument or $RAY_ADDRESS) sends none unless `RAY_AUTH_MODE=token` is set, and fails
after its connection retries with a traceback and a screen of "InvalidAuthToken" log lines.

`join` does what the README says joining a cluster does: if this machine has a token where Ray
reads one ($RAY_AUTH_TOKEN, the file $RAY_AUTH_TOKEN_PATH, `~/.ray/auth_token`), it is presented
(a cluster without authentication ignores it); if the address cannot be reached or the cluster
refuses the driver, the error is one line naming the address and the likely cause.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

RAY_DEFAULT_PORT = 6379


class ClusterError(RuntimeError):
    """The Ray cluster at an address cannot be joined; the message names the address and why."""


@dataclass(frozen=True)
class Token:
    """Where the auth token a driver would present comes from (never the token itself)."""

    source: str  # "$RAY_AUTH_TOKEN", "$RAY_AUTH_TOKEN_PATH=...", "~/.ray/auth_token"


def find_token(env: dict[str, str] | None = None, home: Path | None = None) -> Token | None:
    """The token Ray would read, in Ray's order: $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, the
    default file in the home folder. None when there is none (or it is empty)."""
    env = os.environ if env is None else env
    if env.get("RAY_AUTH_TOKEN", "").strip():
        return Token("$RAY_AUTH_TOKEN")
    if env.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(env["RAY_AUTH_TOKEN_PATH"]).expanduser()
        return Token(f"$RAY_AUTH_TOKEN_PATH={path}") if _non_empty(path) else None
    default = (home or Path.home()) / ".ray" / "auth_token"
    return Token(str(default)) if _non_empty(default) else None


def _non_empty(path: Path) -> bool:
    try:
        return bool(path.read_text().strip())
    except OSError:
        return False


def host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of a cluster address such as `10.0.0.1:6379`, `ray://head:10001` or
    `head`; None for Ray's own lookups (`auto`, `local`)."""
    bare = address.removeprefix("ray://").strip().rstrip("/")
    if bare in ("auto", "local", ""):
        return None
    host, sep, port = bare.rpartition(":")
    if not sep:
        return bare, RAY_DEFAULT_PORT
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        raise ClusterError(
            f"Ray cluster address {address!r}: the port {port!r} is not a number "
            "(expected HOST:PORT, e.g. 10.0.0.1:6379)"
        ) from None


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds, not after Ray's retries, when nothing listens at `address`."""
    target = host_port(address)
    if target is None:
        return
    try:
        with socket.create_connection(target, timeout=timeout):
            pass
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise ClusterError(
            f"cannot join the Ray cluster at {address}: nothing answers there ({reason}); "
            f"is the head running (`uv run ray start --head --port={target[1]}` on that "
            "machine) and is the address right?"
        ) from None


def present_token(env: dict[str, str] | None = None) -> Token | None:
    """Make a driver that joins by address present this machine's token, as `ray start
    --address` does: sets RAY_AUTH_MODE=token when it is unset and a token exists. An explicit
    RAY_AUTH_MODE (e.g. `disabled`) is left as it is."""
    env = os.environ if env is None else env
    token = find_token(env)
    if token is not None and "RAY_AUTH_MODE" not in env:
        env["RAY_AUTH_MODE"] = "token"
        if env is os.environ:
            _reload_ray_config()
    return token


def _reload_ray_config() -> None:
    """Ray reads RAY_AUTH_MODE into its config when it is imported; re-read it (what Ray's own
    `ray start` does after enabling token auth, ray/_private/authentication)."""
    import sys

    raylet = sys.modules.get("ray._raylet")
    if raylet is not None:
        raylet.Config.initialize("")


def join(address: str, **init_kwargs) -> None:
    """`ray.init(address=address, ...)` for a running cluster, with its token; a cluster that
    cannot be joined is a ClusterError naming the address and the likely cause."""
    check_reachable(address)
    token = present_token()
    # Ray's C++ client logs every refused retry at WARNING; the one-line error below says it
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "error")
    import ray

    try:
        ray.init(address=address, **init_kwargs)
    except (ConnectionError, ray.exceptions.AuthenticationError) as err:
        raise ClusterError(_refused(address, token, err)) from err


def _refused(address: str, token: Token | None, err: Exception) -> str:
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    mode = os.environ.get("RAY_AUTH_MODE", "unset")
    if token is None:
        cause = (
            "this machine has no Ray auth token ($RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH or "
            "~/.ray/auth_token) and a cluster started by `ray start` usually requires one: "
            "run `uv run ray get-auth-token` on the head and set RAY_AUTH_TOKEN=<token> here"
        )
    elif mode != "token":
        cause = f"RAY_AUTH_MODE={mode} here, so the token in {token.source} was not sent"
    else:
        cause = (
            f"the cluster did not accept the token in {token.source}; it must be the head's "
            "(`uv run ray get-auth-token` on the head)"
        )
    return f"cannot join the Ray cluster at {address}: {cause} (Ray: {first})"
