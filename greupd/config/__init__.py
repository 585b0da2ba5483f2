"""tunnels.toml: the pydantic models of the user's contract, and loading them with errors a person can act on.

A config is the main file plus `tunnels.d/*.toml` beside it, merged in name order: `[daemon]` and
`[defaults]` are merged key by key (later files win), `[[tunnel]]` entries are appended. Every error names
the file, the line where the TOML text shows the field, and the field path (`tunnel[1].keepalive.interval`).

The rooms, in the order the data passes them:
- `loader`: the files on disk (tunnels.d, what may be read and how much), TOML parsing;
- `validate`: merging the files, the models, the rules across tunnels, each problem placed;
- `models` (pydantic) over `fields` (a parser per kind of value) and `keyfiles` (psk_file, key);
- `lines`: where a field stands in the text; `problems`: ConfigError.
Everything the rest of greupd uses is importable from `greupd.config` itself.
"""

from greupd.config.fields import (
    DEFAULT_CONFIG,
    DEFAULT_CONTROL_SOCKET,
    DEFAULT_STATE_DIR,
    DEFAULT_VICI_SOCKET,
    KEEPALIVE_MODES,
    KERNEL_NAMES,
    MAX_MTU,
    NetnsInstance,
    format_duration,
    listen_address,
    netns_instance,
)
from greupd.config.keyfiles import secret_file_problem
from greupd.config.lines import locate_fields
from greupd.config.loader import (
    config_files,
    load_config,
    load_config_sources,
    load_config_text,
    read_daemon_table,
    unvalidated_path,
)
from greupd.config.models import (
    DEFAULT_ESP_PROPOSALS,
    DEFAULT_IKE_PROPOSALS,
    Config,
    DaemonConfig,
    IpsecConfig,
    KeepaliveConfig,
    MssConfig,
    NatConfig,
    TunnelConfig,
    json_schema,
)
from greupd.config.problems import ConfigError, ConfigProblem

__all__ = [
    "DEFAULT_CONFIG", "DEFAULT_CONTROL_SOCKET", "DEFAULT_ESP_PROPOSALS", "DEFAULT_IKE_PROPOSALS", "DEFAULT_STATE_DIR",
    "DEFAULT_VICI_SOCKET", "KEEPALIVE_MODES", "KERNEL_NAMES", "MAX_MTU", "Config", "ConfigError", "ConfigProblem",
    "DaemonConfig", "IpsecConfig", "KeepaliveConfig", "MssConfig", "NatConfig", "NetnsInstance", "TunnelConfig",
    "config_files", "format_duration", "json_schema", "listen_address", "load_config", "load_config_sources",
    "load_config_text", "locate_fields", "netns_instance", "read_daemon_table", "secret_file_problem",
    "unvalidated_path",
]
