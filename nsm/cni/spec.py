"""What the plugin and the agent share about the CNI spec (1.1.0; 0.4.0 and 1.0.0 too), and the
wire between them. Standard library only: the plugin imports it.

- Versions: :data:`VERSIONS`, and ADD/DEL (no CHECK) at 0.3.0 and 0.3.1 as well
  (:data:`SUPPORTED`: kind's kindnet and other primary plugins still write 0.3.1 conflists, and a
  chained plugin runs at its list's version); STATUS and GC only from 1.1.0, CHECK from 0.4.0 (an
  older config gets code 1, as the reference plugins' ``skel`` answers).
- Errors: :class:`CniError` ``{cniVersion, code, msg, details}`` (printed on stdout, exit 1).
  Codes 1-11 and 50/51 are the spec's; 100 and up are ours (:data:`PLUGIN_CODES`).
- Environment: :func:`check_env` (what each command needs: code 4 otherwise), :func:`cni_args`
  (``K8S_POD_NAMESPACE=...;K8S_POD_NAME=...``).
- Config: :func:`parse_config` (code 6 for what is not JSON, 7 for what is not a network
  config).
- Wire (plugin ↔ agent, one exchange per unix-socket connection): the plugin sends one JSON
  line ``{"env": {...}, "config": {...}}``; the agent answers one JSON line ``{"result": ...}``
  (``null`` when the command prints nothing) or ``{"error": {"code", "msg", "details"}}``.
  The compiled fast path (``cni/shim/nsm-cni.c``) sends ``{"shim": 1, "env": <base64 of
  NUL-separated CNI_*=value>, "stdin": <base64>}`` and gets ``"<exit status>\n<stdout>"`` or
  ``"fallback\n"`` (:meth:`nsm.cni.agent.Agent.shim`).
"""

from __future__ import annotations

from nsm.cni import wirejson

TYPE_CHECKING = False  # importing typing costs milliseconds at every start of the plugin
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

VERSIONS = ("0.4.0", "1.0.0", "1.1.0")
#: Every version a config may have: :data:`VERSIONS` and the 0.3 ones (ADD, DEL, VERSION only).
SUPPORTED = ("0.3.0", "0.3.1", *VERSIONS)
#: The version VERSION answers with when the config names none.
LATEST = "1.1.0"
COMMANDS = ("ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC")
#: Commands the spec added in 1.1.0.
NEW_IN_1_1 = ("STATUS", "GC")

# The spec's error codes.
INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENV = 4
IO_ERROR = 5
DECODE_ERROR = 6
INVALID_CONFIG = 7
TRY_AGAIN = 11
NOT_AVAILABLE = 50
NOT_AVAILABLE_DEGRADED = 51

# Ours (100 and up).
PLUGIN_ERROR = 100
IFACE_EXISTS = 101
SERVICE_NOT_FOUND = 102
NO_ENDPOINT = 103
IFACE_CHANGED = 104
REFUSED = 105
K8S_ERROR = 106
PLUGIN_CODES = {
    PLUGIN_ERROR: "the network service mesh failed",
    IFACE_EXISTS: "the interface name is taken in the pod",
    SERVICE_NOT_FOUND: "no such network service",
    NO_ENDPOINT: "no endpoint of the service can be reached",
    IFACE_CHANGED: "an interface of the attachment is missing or changed",
    REFUSED: "the mesh refused the request",
    K8S_ERROR: "the pod cannot be read from the Kubernetes API",
}

#: Where the agent listens unless the config's ``socket`` says otherwise.
DEFAULT_SOCKET = "/run/nsm/cni/agent.sock"
#: How long ADD/CHECK/STATUS/GC wait for the agent to listen (config ``agentWait``, seconds).
DEFAULT_AGENT_WAIT = 60.0
#: How long the plugin waits for the agent's answer (config ``timeout``, seconds).
DEFAULT_TIMEOUT = 120.0
#: The longest line either side sends.
MAX_MESSAGE = 4 * 1024 * 1024
#: GC's list of attachments still in use (1.1.0's tag spelled it ``cni.dev/attachments``).
GC_KEYS = ("cni.dev/valid-attachments", "cni.dev/attachments")


class CniError(Exception):
    """A CNI error result."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = int(code)
        self.msg = msg
        self.details = details

    def to_json(self, version: str = LATEST) -> dict[str, Any]:
        out: dict[str, Any] = {"cniVersion": version, "code": self.code, "msg": self.msg}
        if self.details:
            out["details"] = self.details
        return out

    @classmethod
    def from_json(cls, obj: Any) -> CniError:
        if not isinstance(obj, dict) or not isinstance(obj.get("code"), int):
            return cls(IO_ERROR, "the node agent sent a malformed error", repr(obj)[:200])
        return cls(obj["code"], str(obj.get("msg", "")), str(obj.get("details", "") or ""))


def version_at_least(version: str, minimum: str) -> bool:
    def key(v: str) -> tuple[int, ...]:
        try:
            return tuple(int(p) for p in v.split("."))
        except ValueError:
            return (0,)
    return key(version) >= key(minimum)


def check_env(env: Mapping[str, str]) -> str:
    """The command of ``env`` when the variables it needs are there; CniError 4 otherwise.
    ADD and CHECK need ``CNI_CONTAINERID``, ``CNI_NETNS`` and ``CNI_IFNAME``; DEL the first and
    the last (the namespace may be gone); VERSION, STATUS and GC nothing more."""
    command = env.get("CNI_COMMAND", "")
    if not command:
        raise CniError(INVALID_ENV, "CNI_COMMAND is not set")
    if command not in COMMANDS:
        raise CniError(INVALID_ENV, f"CNI_COMMAND {command!r} is not one of {', '.join(COMMANDS)}")
    needed = {"ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
              "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
              "DEL": ("CNI_CONTAINERID", "CNI_IFNAME")}.get(command, ())
    missing = [v for v in needed if not env.get(v)]
    if missing:
        raise CniError(INVALID_ENV, f"{command} needs {', '.join(missing)} in the environment")
    return command


def cni_args(env: Mapping[str, str]) -> dict[str, str]:
    """``CNI_ARGS`` (``K=V;K=V``) as a dict; CniError 4 when malformed."""
    out: dict[str, str] = {}
    for part in env.get("CNI_ARGS", "").split(";"):
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise CniError(INVALID_ENV, f"CNI_ARGS has {part!r}, not KEY=VALUE")
        out[key] = value
    return out


def parse_config(raw: bytes | str, command: str) -> dict[str, Any]:
    """The network config on stdin: CniError 6 when it is not JSON, 7 when it is not an object
    with a ``name`` and a ``cniVersion`` (1 when the version is not one of :data:`VERSIONS`, or
    the command is newer than it: STATUS and GC before 1.1.0, CHECK before 0.4.0)."""
    try:
        config = wirejson.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CniError(DECODE_ERROR, "the network config is not JSON", str(exc)) from None
    if not isinstance(config, dict):
        raise CniError(DECODE_ERROR, "the network config is not a JSON object")
    version = config.get("cniVersion")
    if not isinstance(version, str) or not version:
        raise CniError(INVALID_CONFIG, "the network config has no cniVersion")
    if not isinstance(config.get("name"), str) or not config["name"]:
        raise CniError(INVALID_CONFIG, "the network config has no name")
    if version not in SUPPORTED:
        raise CniError(INCOMPATIBLE_VERSION, f"CNI version {version} is not supported",
                       f"supported: {', '.join(SUPPORTED)}")
    if command in NEW_IN_1_1 and not version_at_least(version, "1.1.0"):
        raise CniError(INCOMPATIBLE_VERSION, f"config version {version} does not allow {command}",
                       "STATUS and GC need cniVersion 1.1.0")
    if command == "CHECK" and not version_at_least(version, "0.4.0"):
        raise CniError(INCOMPATIBLE_VERSION, f"config version {version} does not allow CHECK",
                       "CHECK needs cniVersion 0.4.0")
    return config


def version_result(config_version: str | None = None) -> dict[str, Any]:
    """VERSION's answer."""
    version = config_version if config_version in SUPPORTED else LATEST
    return {"cniVersion": version, "supportedVersions": list(SUPPORTED)}


def config_number(config: Mapping[str, Any], key: str, default: float) -> float:
    """A positive number from the config (CniError 7 otherwise)."""
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise CniError(INVALID_CONFIG, f"{key} must be a positive number of seconds, not {value!r}")
    return float(value)


def encode(message: Mapping[str, Any]) -> bytes:
    return wirejson.dumps(message, compact=True).encode() + b"\n"
