"""ClientConfig/RetryConfig parsing and validation from TQ's config section."""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
import types
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from tq_mooncake.client.config import (
    MAX_LOCAL_BUFFER_SIZE,
    MAX_SIZE,
    METADATA_SCHEMES,
    ClientConfig,
    GiB,
    RetryConfig,
    default_max_workers,
    etcd_endpoints,
    host_port,
    http_endpoint,
    normalize_metadata_server,
    parse_host_port,
    parse_size,
)
from tq_mooncake.client.retry import RetryPolicy

pytestmark = pytest.mark.pure

MiB = 1 << 20


class FrozenMapping(Mapping):
    """A read-only Mapping that is not a dict, like OmegaConf's DictConfig."""

    def __init__(self, data: dict[str, Any]) -> None:
        self._data = {k: FrozenMapping(v) if isinstance(v, dict) else v for k, v in data.items()}

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)


class ItemsOnly:
    """Has ``items()`` but is not a Mapping."""

    def __init__(self, data: dict[str, Any]) -> None:
        self._data = data

    def items(self):
        return self._data.items()


# ------------------------------------------------------------------------------------------------ defaults
def test_from_none_gives_defaults():
    cfg = ClientConfig.from_dict(None)
    assert cfg == ClientConfig()
    assert cfg.local_hostname == "127.0.0.1"
    assert cfg.metadata_server == "P2PHANDSHAKE"
    assert cfg.master_server_address == "127.0.0.1:50051"
    assert cfg.protocol == "tcp"
    assert cfg.global_segment_size == 4 * GiB
    assert cfg.local_buffer_size == 1 * GiB
    assert cfg.device_name == ""
    assert cfg.replica_num == 1
    assert cfg.hard_pin is True
    assert cfg.batch_size == 400
    assert cfg.max_workers == default_max_workers()
    assert cfg.allow_pickle is False
    assert cfg.max_value_bytes == 1 * GiB
    assert cfg.setup_timeout_s == 5.0
    assert cfg.retry == RetryConfig()


def test_from_empty_dict_gives_defaults():
    assert ClientConfig.from_dict({}) == ClientConfig()


def test_retry_defaults():
    r = RetryConfig()
    assert (r.max_attempts, r.initial_backoff_s, r.max_backoff_s, r.multiplier, r.deadline_s) == (
        4,
        0.05,
        2.0,
        2.0,
        30.0,
    )
    assert (r.budget_ratio, r.budget_min_per_s) == (0.2, 10.0)


def test_none_values_fall_back_to_defaults():
    cfg = ClientConfig.from_dict({"replica_num": None, "retry": None, "global_segment_size": None})
    assert cfg.replica_num == 1
    assert cfg.retry == RetryConfig()
    assert cfg.global_segment_size == 4 * GiB


def test_config_is_frozen():
    cfg = ClientConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.batch_size = 1  # type: ignore[misc]


# ------------------------------------------------------------------------------------------------ TQ keys
def test_tq_keys_are_parsed():
    cfg = ClientConfig.from_dict(
        {
            "local_hostname": "10.0.0.5",
            "metadata_server": "10.0.0.1:8080",
            "master_server_address": "10.0.0.1:50051",
            "protocol": "rdma",
            "global_segment_size": "8GB",
            "local_buffer_size": 268435456,
            "device_name": "mlx5_0",
            "replica_num": 2,
            "hard_pin": False,
            "batch_size": 64,
            "max_workers": 8,
            "allow_pickle": True,
            "max_value_bytes": "256MB",
            "setup_timeout_s": 2.5,
            "retry": {"max_attempts": 6, "deadline_s": 12.0, "budget_ratio": 0.5},
        }
    )
    assert cfg.local_hostname == "10.0.0.5"
    assert cfg.metadata_server == "http://10.0.0.1:8080/metadata"
    assert cfg.master_server_address == "10.0.0.1:50051"
    assert cfg.protocol == "rdma"
    assert cfg.global_segment_size == 8 * GiB
    assert cfg.local_buffer_size == 256 * MiB
    assert cfg.device_name == "mlx5_0"
    assert cfg.replica_num == 2
    assert cfg.hard_pin is False
    assert cfg.batch_size == 64
    assert cfg.max_workers == 8
    assert cfg.allow_pickle is True
    assert cfg.max_value_bytes == 256 * MiB
    assert cfg.setup_timeout_s == 2.5
    assert cfg.retry.max_attempts == 6
    assert cfg.retry.deadline_s == 12.0
    assert cfg.retry.budget_ratio == 0.5
    assert cfg.retry.initial_backoff_s == 0.05  # untouched keys keep their defaults


def test_unknown_top_level_keys_are_ignored():
    cfg = ClientConfig.from_dict({"client_name": "MooncakeStoreClient", "auto_init": True, "whatever": [1], "x": None})
    assert cfg == ClientConfig()


def test_unknown_retry_keys_raise_naming_them():
    with pytest.raises(ValueError, match=r"unknown retry config key\(s\) \['backof', 'max_atempts'\]"):
        ClientConfig.from_dict({"retry": {"max_atempts": 3, "backof": 1, "deadline_s": 1.0}})


def test_unknown_retry_key_message_lists_known_keys():
    with pytest.raises(ValueError, match="known keys: .*'max_attempts'"):
        RetryConfig.from_dict({"tries": 3})


def test_retry_policy_comes_from_retry_section():
    cfg = ClientConfig.from_dict(
        {"retry": {"max_attempts": 2, "initial_backoff_s": 0.01, "max_backoff_s": 0.5, "multiplier": 3}}
    )
    assert cfg.retry.policy() == RetryPolicy(
        max_attempts=2, initial_backoff_s=0.01, max_backoff_s=0.5, multiplier=3, deadline_s=30.0
    )


# ------------------------------------------------------------------------------------------------- sizes
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, 0),
        (12345, 12345),
        ("4GB", 4 * GiB),
        ("4gb", 4 * GiB),
        ("4 GiB", 4 * GiB),
        ("4G", 4 * GiB),
        ("512 MiB", 512 * MiB),
        ("16MB", 16 * MiB),
        ("1.5GB", 3 * GiB // 2),
        ("64KB", 64 * 1024),
        ("2TB", 2 << 40),
        ("100", 100),
        ("100B", 100),
        ("  7 mb  ", 7 * MiB),
    ],
)
def test_parse_size(value, expected):
    assert parse_size("global_segment_size", value) == expected


@pytest.mark.parametrize("key", ["global_segment_size", "local_buffer_size", "max_value_bytes"])
def test_sizes_accept_ints_and_strings(key):
    assert getattr(ClientConfig.from_dict({key: "16MB"}), key) == 16 * MiB
    assert getattr(ClientConfig.from_dict({key: 4096}), key) == 4096


@pytest.mark.parametrize("value", ["abc", "4XB", "", "GB", "4 G B", "1e9", "-1", "4GBs", 1.5, True, [4], "0x10"])
def test_invalid_sizes_raise_with_the_key_name(value):
    with pytest.raises(ValueError, match="^local_buffer_size must be"):
        ClientConfig.from_dict({"local_buffer_size": value})


@pytest.mark.parametrize(
    "value",
    ["\u0663", "\uff11\uff12", "1\u0663MB", "\u00b2", "1.\u0665GB", "\u0661\u0660 KiB", "12\u2003MB", "\u00a012"],
)
def test_sizes_are_ascii_digits_only(value):
    """Arabic-Indic, fullwidth and superscript digits are digits to str.isdigit() (and a plain regex \\d), and
    Unicode spaces are spaces to \\s: not here."""
    with pytest.raises(ValueError, match="^global_segment_size must be a size in bytes"):
        ClientConfig.from_dict({"global_segment_size": value})


@pytest.mark.parametrize("value", ["4i", "4ib"])
def test_size_with_bare_i_unit_raises_value_error(value):
    with pytest.raises(ValueError, match="local_buffer_size"):
        parse_size("local_buffer_size", value)


def test_negative_size_raises_with_the_key_name():
    with pytest.raises(ValueError, match="^global_segment_size must be >= 0, got -1$"):
        ClientConfig.from_dict({"global_segment_size": -1})


def test_zero_max_value_bytes_is_refused():
    with pytest.raises(ValueError, match="^max_value_bytes must be an integer from 1 to"):
        ClientConfig.from_dict({"max_value_bytes": "0MB"})


@pytest.mark.parametrize("key", ["global_segment_size", "local_buffer_size", "max_value_bytes"])
@pytest.mark.parametrize("value", ["9" * 400, "99999999TB", "1" + "0" * 5000, MAX_SIZE + 1, 10**400, "2048 TB"])
def test_absurd_sizes_are_a_value_error_naming_the_limit(key, value):
    with pytest.raises(ValueError, match=f"^{key} must be at most {MAX_SIZE} bytes"):
        ClientConfig.from_dict({key: value})


def test_the_largest_size_is_accepted_and_local_buffer_size_has_mooncakes_limit():
    assert ClientConfig.from_dict({"global_segment_size": "1024TB"}).global_segment_size == MAX_SIZE
    assert ClientConfig.from_dict({"local_buffer_size": "1TB"}).local_buffer_size == MAX_LOCAL_BUFFER_SIZE
    with pytest.raises(ValueError, match=f"^local_buffer_size must be a size in bytes from 0 to {1 << 40}, got"):
        ClientConfig.from_dict({"local_buffer_size": "2TB"})


@pytest.mark.parametrize("value", [-1, 1.5, "4GB", None, 10**400])
def test_sizes_given_to_the_dataclass_directly_are_checked_too(value):
    with pytest.raises(ValueError, match="^global_segment_size must be a size in bytes from 0 to"):
        ClientConfig(global_segment_size=value)


def test_an_error_message_never_prints_a_huge_value_whole():
    with pytest.raises(ValueError) as info:
        ClientConfig.from_dict({"local_buffer_size": "9" * 100_000})
    assert len(str(info.value)) < 200


# --------------------------------------------------------------------------------------- metadata server
@pytest.mark.parametrize("value", ["P2PHANDSHAKE", "p2phandshake", "P2pHandShake"])
def test_p2phandshake_any_case(value):
    assert normalize_metadata_server(value) == "P2PHANDSHAKE"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:8080", "http://127.0.0.1:8080/metadata"),
        ("meta-host:8080", "http://meta-host:8080/metadata"),
        ("127.0.0.1:8080/", "http://127.0.0.1:8080/metadata"),
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080/metadata"),
        ("http://127.0.0.1:8080/", "http://127.0.0.1:8080/metadata"),
        ("https://meta:443", "https://meta:443/metadata"),
    ],
)
def test_host_port_becomes_metadata_url(value, expected):
    assert normalize_metadata_server(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "http://127.0.0.1:8080/metadata",
        "https://meta.example:8443/metadata",
        "etcd://10.0.0.1:2379",
        "etcd://a:2379,b:2379",
        "redis://10.0.0.1:6379",
    ],
)
def test_full_urls_are_unchanged(value):
    assert normalize_metadata_server(value) == value


@pytest.mark.parametrize("value", ["redis://10.0.0.1:6379", "consul://h:1", "zk://h:1", "etcd://h:1"])
def test_other_schemes_are_left_for_validation_to_refuse(value):
    assert normalize_metadata_server(value) == value


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("HTTP://h:1", "http://h:1/metadata"),
        ("Https://h/Path", "https://h/Path/metadata"),
        ("ETCD://h:2379", "etcd://h:2379"),
        ("REDIS://h:1", "redis://h:1"),
    ],
)
def test_schemes_are_lowered_and_only_the_scheme(value, expected):
    """Schemes are case-insensitive (RFC 3986); Mooncake matches them in lower case. Paths keep their case."""
    assert normalize_metadata_server(value) == expected


def test_an_upper_case_scheme_given_to_the_dataclass_is_refused_for_its_case():
    with pytest.raises(ValueError, match=r"^metadata_server's scheme must be in lower case \('http'\), as Mooncake"):
        ClientConfig(metadata_server="HTTP://h:1/metadata")
    assert ClientConfig.from_dict({"metadata_server": "HTTP://h:1/metadata"}).metadata_server == "http://h:1/metadata"
    assert ClientConfig.from_dict({"metadata_server": "EtcD://h:1"}).metadata_server == "etcd://h:1"


@pytest.mark.parametrize(
    ("value", "normalized"),
    [
        ("http://h:5?k=1", "http://h:5?k=1"),
        ("h:5?k=1", "http://h:5?k=1"),
        ("http://h:5/metadata?x=1", "http://h:5/metadata?x=1"),
        ("http://h:5/metadata?", "http://h:5/metadata?"),
        ("http://h:5/metadata#x", "http://h:5/metadata#x"),
        ("https://h/metadata#", "https://h/metadata#"),
        ("HTTP://h:5/?a=b#c", "http://h:5/?a=b#c"),
    ],
)
def test_a_metadata_url_with_a_query_or_fragment_is_refused_not_mangled(value, normalized):
    """Mooncake appends '?key=<key>' to the URL as it is: a query or fragment would break every key. The URL
    is refused as given (no '/metadata' spliced into its query), so the message shows what was meant."""
    assert normalize_metadata_server(value) == normalized
    with pytest.raises(ValueError, match=r"^metadata_server must be an http\(s\) URL without a query or fragment"):
        ClientConfig.from_dict({"metadata_server": value})


def test_the_accepted_schemes_are_the_wheels_metadata_plugins():
    assert METADATA_SCHEMES == ("http", "https", "etcd")  # tests/test_setup.py checks them against the wheel


@pytest.mark.parametrize(
    "value",
    ["redis://10.0.0.1:6379", "redis://h:6379/0", "REDIS://h:6379", "consul://h:8500", "zk://h:2181", "Consul://h:1"],
)
def test_unsupported_metadata_schemes_are_a_value_error_naming_the_accepted_forms(value):
    with pytest.raises(
        ValueError, match=r"^metadata_server must be 'P2PHANDSHAKE', 'host:port' .*'etcd://host:port"
    ) as info:
        ClientConfig.from_dict({"metadata_server": value})
    assert "metadata plugin (it would abort the process)" in str(info.value)
    assert f"no {value.split('://')[0].lower()!r} metadata plugin" in str(info.value)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "etcd://",
        "etcd://,;",
        "etcd://h",
        "etcd://h:0",
        "etcd://h:2379,h",
        "etcd://:2379",
        "http://:8080/metadata",
        "http://h:0/metadata",
        "http://h:99999/metadata",
        "http://h:port/metadata",
        "http://user@h:80/metadata",
        "127.0.0.1:0",
        ":8080",
    ],
)
def test_malformed_metadata_addresses_are_a_value_error(value):
    with pytest.raises(ValueError, match="^(metadata_server|every etcd endpoint of metadata_server) must"):
        ClientConfig.from_dict({"metadata_server": value})


_CONTROL = ["\x00", "\n", "\r", "\t", "\x7f", "\x1f", "\u0085", "\u00a0", "\u2028", "\u3000"]


@pytest.mark.parametrize("char", _CONTROL)
@pytest.mark.parametrize(
    ("key", "template"),
    [
        ("metadata_server", "http://h{}:8080/metadata"),
        ("metadata_server", "http://h:8080/meta{}data"),
        ("metadata_server", "http://h:8080/metadata{}"),
        ("metadata_server", "h{}:8080"),
        ("metadata_server", "etcd://h{}:2379"),
        ("metadata_server", "etcd://h:2379,{}h:2380"),
        ("master_server_address", "h{}:50051"),
        ("master_server_address", "h:50051{}"),
        ("local_hostname", "node{}"),
        ("local_hostname", "{}127.0.0.1"),
        ("local_hostname", "fe80::1%{}"),
    ],
)
def test_control_space_and_non_ascii_characters_in_an_address_are_refused(key, template, char):
    """A newline (CRLF) in a host name would reach the probe's request line and Mooncake; none gets past."""
    with pytest.raises(ValueError, match=f"^(every etcd endpoint of )?{key}( must|'s scheme)"):
        ClientConfig.from_dict({key: template.format(char)})


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("master_server_address", "[1.2.3.4]:5"),
        ("master_server_address", "[fe80::1%eth0]:5"),
        ("master_server_address", "[h]:5"),
        ("local_hostname", "[1.2.3.4]:5"),
        ("local_hostname", "fe80::1%eth0"),
        ("metadata_server", "etcd://[1.2.3.4]:2379"),
        ("metadata_server", "http://[1.2.3.4]:8080/metadata"),
        ("metadata_server", "http://[fe80::1%25eth0]:8080/metadata"),
        ("metadata_server", "[1.2.3.4]:8080"),
    ],
)
def test_brackets_hold_an_ipv6_address_and_nothing_else(key, value):
    with pytest.raises(ValueError, match=f"^(every etcd endpoint of )?{key} must"):
        ClientConfig.from_dict({key: value})


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("master_server_address", "[::1]:5"),
        ("master_server_address", "[::ffff:1.2.3.4]:5"),
        ("local_hostname", "[fe80::1]:5"),
        ("metadata_server", "etcd://[::1]:2379"),
        ("metadata_server", "http://[::1]:8080/metadata"),
    ],
)
def test_bracketed_ipv6_addresses_are_kept(key, value):
    assert getattr(ClientConfig.from_dict({key: value}), key) == value


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("etcd://10.0.0.1:2379", [("10.0.0.1", 2379)]),
        ("etcd://a:2379,b:2379", [("a", 2379), ("b", 2379)]),
        ("etcd://a:1; b:2 ,", [("a", 1), ("b", 2)]),
        ("etcd://[::1]:2379", [("::1", 2379)]),
    ],
)
def test_etcd_endpoints_are_split_as_mooncake_splits_them(value, expected):
    assert etcd_endpoints(value) == expected
    assert ClientConfig.from_dict({"metadata_server": value}).metadata_server == value


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://h:8080/metadata", ("h", 8080)),
        ("http://h/metadata", ("h", 80)),
        ("https://h/metadata", ("h", 443)),
        ("http://[::1]:8080/metadata", ("::1", 8080)),
    ],
)
def test_http_endpoint_defaults_the_port_by_scheme(url, expected):
    assert http_endpoint(url) == expected


def test_the_dataclass_takes_metadata_server_as_given():
    """Normalisation is from_dict's (TQ's forms); a bare host:port given to the dataclass is refused."""
    with pytest.raises(ValueError, match="^metadata_server must be"):
        ClientConfig(metadata_server="127.0.0.1:8080")
    assert ClientConfig(metadata_server="http://127.0.0.1:8080/metadata").metadata_server.endswith("/metadata")


def test_from_dict_normalizes_metadata_server():
    assert ClientConfig.from_dict({"metadata_server": "p2phandshake"}).metadata_server == "P2PHANDSHAKE"
    assert ClientConfig.from_dict({"metadata_server": "h:1"}).metadata_server == "http://h:1/metadata"


def test_non_string_metadata_server_raises():
    with pytest.raises(ValueError, match="^metadata_server must be a string"):
        ClientConfig.from_dict({"metadata_server": 8080})


# ------------------------------------------------------------------------------------------ local hostname
def test_missing_local_hostname_is_loopback():
    assert ClientConfig.from_dict({}).local_hostname == "127.0.0.1"


def test_empty_local_hostname_resolves_to_an_address(monkeypatch):
    monkeypatch.setattr(socket, "gethostname", lambda: "localhost")
    host = ClientConfig.from_dict({"local_hostname": ""}).local_hostname
    assert host
    ipaddress.ip_address(host)  # raises if it is not an address


def test_empty_local_hostname_uses_this_hosts_address(monkeypatch):
    monkeypatch.setattr(socket, "gethostname", lambda: "node-7")
    monkeypatch.setattr(socket, "gethostbyname", lambda name: {"node-7": "10.1.2.3"}[name])
    assert ClientConfig.from_dict({"local_hostname": ""}).local_hostname == "10.1.2.3"


def test_empty_local_hostname_falls_back_to_loopback_when_unresolvable(monkeypatch):
    def fail(name):
        raise socket.gaierror("no such host")

    monkeypatch.setattr(socket, "gethostname", lambda: "nowhere")
    monkeypatch.setattr(socket, "gethostbyname", fail)
    assert ClientConfig.from_dict({"local_hostname": ""}).local_hostname == "127.0.0.1"


def test_explicit_local_hostname_is_kept(monkeypatch):
    monkeypatch.setattr(socket, "gethostbyname", lambda name: pytest.fail("must not resolve"))
    assert ClientConfig.from_dict({"local_hostname": "node-3"}).local_hostname == "node-3"


# ---------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("key", ["replica_num", "batch_size", "max_workers"])
@pytest.mark.parametrize("value", [0, -1, "2", 2.0, True, [1]])
def test_bad_counts_raise_with_the_key_name(key, value):
    with pytest.raises(ValueError, match=rf"^{key} must be an integer (>= 1|from 1 to \d+), got "):
        ClientConfig.from_dict({key: value})


@pytest.mark.parametrize(("key", "high"), [("replica_num", 64), ("max_workers", 256)])
def test_counts_have_an_upper_bound(key, high):
    assert getattr(ClientConfig.from_dict({key: high}), key) == high
    for value in (high + 1, 10**9, 10**400):
        with pytest.raises(ValueError, match=f"^{key} must be an integer from 1 to {high}, got "):
            ClientConfig.from_dict({key: value})


def test_a_huge_batch_size_is_fine():
    assert ClientConfig.from_dict({"batch_size": 10**12}).batch_size == 10**12


@pytest.mark.parametrize("key", ["local_hostname", "master_server_address", "protocol", "device_name"])
def test_non_string_fields_raise(key):
    with pytest.raises(ValueError, match=f"^{key} must be a string"):
        ClientConfig.from_dict({key: 5})


def test_empty_master_address_raises():
    with pytest.raises(ValueError, match="master_server_address must be 'host:port'"):
        ClientConfig.from_dict({"master_server_address": ""})


@pytest.mark.parametrize(
    "value",
    [
        "127.0.0.1",
        "localhost",
        ":50051",
        "127.0.0.1:",
        "127.0.0.1:0",
        "127.0.0.1:65536",
        "127.0.0.1:99999999999999999999",
        "127.0.0.1:-1",
        "127.0.0.1:abc",
        "127.0.0.1:\uff15",  # a fullwidth digit: str.isdigit() says yes, a port it is not
        "::1:50051",  # IPv6 needs brackets
        "[::1]",
        "[]:50051",
        " 127.0.0.1:50051",
        "127.0.0.1 :50051",
        "host name:50051",
        "http://127.0.0.1:50051",
        "etcd://127.0.0.1:2379",
        "127.0.0.1:50051/x",
    ],
)
def test_bad_master_address_forms_are_a_value_error(value):
    with pytest.raises(ValueError, match=r"^master_server_address must be 'host:port' with a port from 1 to 65535"):
        ClientConfig.from_dict({"master_server_address": value})


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:50051", ("127.0.0.1", 50051)),
        ("localhost:1", ("localhost", 1)),
        ("mooncake-master:65535", ("mooncake-master", 65535)),
        ("my_host.example.com:8080", ("my_host.example.com", 8080)),
        ("[::1]:50051", ("::1", 50051)),
    ],
)
def test_good_master_addresses_parse(value, expected):
    assert parse_host_port("master_server_address", value) == expected
    assert ClientConfig.from_dict({"master_server_address": value}).master_server_address == value


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("127.0.0.1:50051", ("127.0.0.1", 50051)),
        ("http://h:8080/metadata", ("h", 8080)),
        ("[::1]:1", ("::1", 1)),
        ("127.0.0.1", None),
        ("127.0.0.1:0", None),
        ("127.0.0.1:65536", None),
        ("h:\u00b2", None),  # superscript two: isdigit() but int() refuses it
        (":1", None),
        ("P2PHANDSHAKE", None),
    ],
)
def test_host_port_is_none_for_anything_but_a_usable_address(address, expected):
    assert host_port(address) == expected


@pytest.mark.parametrize(
    "value", ["127.0.0.1", "node-3", "node-3.example.com", "10.0.0.5:12345", "::1", "[::1]:12345", "fe80::1"]
)
def test_local_hostname_is_a_host_or_address_with_an_optional_port(value):
    assert ClientConfig.from_dict({"local_hostname": value}).local_hostname == value


@pytest.mark.parametrize("value", ["a b", "http://x", "127.0.0.1:0", "127.0.0.1:99999", "h:", ":1", "[::1]", "h/x"])
def test_local_hostname_of_any_other_form_is_a_value_error(value):
    """Mooncake would set up with any of these (measured: rc 0) and advertise an address no peer can reach."""
    with pytest.raises(ValueError, match="^local_hostname must be a host name or address, optionally with ':port'"):
        ClientConfig.from_dict({"local_hostname": value})


def test_an_empty_local_hostname_given_to_the_dataclass_is_refused():
    with pytest.raises(ValueError, match="^local_hostname must be"):
        ClientConfig(local_hostname="")


@pytest.mark.parametrize("value", ["TCP", "efa", "", "udp", "rdma ", "ascend"])
def test_protocol_must_be_tcp_or_rdma(value):
    """Mooncake compares protocols exactly: its setup() with "TCP" took 22.6 s to fail (measured)."""
    with pytest.raises(ValueError, match=r"^protocol must be one of 'tcp', 'rdma', got "):
        ClientConfig.from_dict({"protocol": value})


@pytest.mark.parametrize("value", [0, -1.0, "5", True])
def test_bad_setup_timeout_raises(value):
    with pytest.raises(ValueError, match="^setup_timeout_s must be"):
        ClientConfig.from_dict({"setup_timeout_s": value})


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan"), 3600.001, 1e308, 10**400, -(10**400)])
def test_infinite_nan_and_absurd_setup_timeouts_name_the_range(value):
    with pytest.raises(ValueError, match=r"^setup_timeout_s must be a number of seconds > 0 and <= 3600, got "):
        ClientConfig.from_dict({"setup_timeout_s": value})


@pytest.mark.parametrize("value", [1e-3, 1, 3600, 3600.0])
def test_setup_timeouts_in_range_are_kept(value):
    assert ClientConfig.from_dict({"setup_timeout_s": value}).setup_timeout_s == value


@pytest.mark.parametrize("key", ["hard_pin", "allow_pickle"])
@pytest.mark.parametrize("value", [1, 0, "true", "false"])
def test_bools_must_be_real_bools(key, value):
    with pytest.raises(ValueError, match=f"^{key} must be true or false"):
        ClientConfig.from_dict({key: value})


@pytest.mark.parametrize(
    ("retry", "message"),
    [
        ({"max_attempts": 0}, r"retry\.max_attempts must be an integer >= 1"),
        ({"deadline_s": -1}, r"retry\.deadline_s must be a finite number >= 0"),
        ({"initial_backoff_s": -0.5}, r"retry\.initial_backoff_s must be a finite number >= 0"),
        ({"multiplier": 0.5}, r"retry\.multiplier must be a finite number >= 1"),
        ({"initial_backoff_s": 5, "max_backoff_s": 1}, r"retry\.max_backoff_s \(1\) must be >="),
        ({"budget_ratio": -0.1}, r"retry\.budget_ratio must be a finite number >= 0"),
        ({"budget_min_per_s": -1}, r"retry\.budget_min_per_s must be a finite number >= 0"),
    ],
)
def test_bad_retry_values_raise_with_the_key_name(retry, message):
    with pytest.raises(ValueError, match=message):
        ClientConfig.from_dict({"retry": retry})


def test_retry_that_is_not_a_mapping_raises():
    with pytest.raises(ValueError, match="^retry must be a mapping, got 5$"):
        ClientConfig.from_dict({"retry": 5})


@pytest.mark.parametrize("value", ["max_attempts=3", [("max_attempts", 3)], [1, 2], b"x", 1.5, True])
def test_retry_of_any_other_type_is_a_value_error(value):
    with pytest.raises(ValueError, match="^retry must be a mapping, got "):
        ClientConfig.from_dict({"retry": value})


def test_retry_keys_that_are_not_strings_are_unknown_keys():
    with pytest.raises(ValueError, match=r"^unknown retry config key\(s\) \[1, 'x'\]"):
        ClientConfig.from_dict({"retry": {1: 2, "x": 3}})


@pytest.mark.parametrize("key", ["deadline_s", "initial_backoff_s", "max_backoff_s", "multiplier", "budget_ratio"])
def test_retry_numbers_too_large_for_a_float_are_a_value_error(key):
    with pytest.raises(ValueError, match=rf"^retry\.{key} must be a finite number"):
        ClientConfig.from_dict({"retry": {key: 10**400}})


@pytest.mark.parametrize("key", ["deadline_s", "multiplier", "budget_min_per_s"])
@pytest.mark.parametrize("value", [float("inf"), float("nan"), "1"])
def test_retry_infinities_nans_and_strings_are_a_value_error(key, value):
    with pytest.raises(ValueError, match=rf"^retry\.{key} must be a finite number"):
        ClientConfig.from_dict({"retry": {key: value}})


def test_retry_given_to_the_dataclass_must_be_a_retry_config():
    with pytest.raises(TypeError, match="^retry must be a RetryConfig"):
        ClientConfig(retry={"max_attempts": 2})  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ the config itself
@pytest.mark.parametrize("config", [[], [("batch_size", 1)], "batch_size=1", b"x", 5, 1.5, True, object()])
def test_a_config_that_is_not_a_mapping_is_a_type_error(config):
    with pytest.raises(TypeError, match=r"^the client config must be a mapping .* or a ClientConfig, got "):
        ClientConfig.from_dict(config)  # type: ignore[arg-type]


def test_a_config_with_only_items_works():
    assert ClientConfig.from_dict(ItemsOnly({"batch_size": 3})).batch_size == 3  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ non-dict mappings
def test_mapping_proxy_works():
    cfg = ClientConfig.from_dict(
        types.MappingProxyType(
            {
                "batch_size": 10,
                "global_segment_size": "1GB",
                "retry": types.MappingProxyType({"max_attempts": 2}),
                "client_name": "ignored",
            }
        )
    )
    assert cfg.batch_size == 10
    assert cfg.global_segment_size == GiB
    assert cfg.retry.max_attempts == 2


def test_omegaconf_like_mapping_works():
    cfg = ClientConfig.from_dict(
        FrozenMapping(
            {
                "metadata_server": "127.0.0.1:8080",
                "local_buffer_size": "512 MiB",
                "retry": {"deadline_s": 3.0, "budget_min_per_s": 1.0},
                "auto_init": True,
            }
        )
    )
    assert cfg.metadata_server == "http://127.0.0.1:8080/metadata"
    assert cfg.local_buffer_size == 512 * MiB
    assert cfg.retry.deadline_s == 3.0
    assert cfg.retry.budget_min_per_s == 1.0


def test_omegaconf_like_mapping_still_rejects_unknown_retry_keys():
    with pytest.raises(ValueError, match="maxattempts"):
        ClientConfig.from_dict(FrozenMapping({"retry": {"maxattempts": 2}}))


def test_retry_section_with_only_items_works():
    cfg = ClientConfig.from_dict({"retry": ItemsOnly({"max_attempts": 7})})
    assert cfg.retry.max_attempts == 7


@pytest.mark.parametrize(("cpus", "workers"), [(1, 1), (2, 1), (7, 1), (8, 2), (16, 4), (128, 4)])
def test_default_max_workers_is_one_per_four_cpus_from_one_to_four(cpus, workers):
    assert default_max_workers(cpus) == workers


@pytest.mark.parametrize("value", ["yes", "true", 1, 0, [True]])
def test_register_memory_is_true_false_or_null(value):
    with pytest.raises(ValueError, match="register_memory must be true, false or null"):
        ClientConfig.from_dict({"register_memory": value})


def test_memory_is_registered_by_default_only_where_the_protocol_needs_it():
    assert ClientConfig().registers_memory is False  # TCP
    assert ClientConfig.from_dict({"protocol": "rdma"}).registers_memory is True
    assert ClientConfig.from_dict({"protocol": "rdma", "register_memory": False}).registers_memory is False
    assert ClientConfig.from_dict({"register_memory": True, "local_buffer_size": None}).registers_memory is True
