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
    ClientConfig,
    GiB,
    RetryConfig,
    default_max_workers,
    normalize_metadata_server,
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


@pytest.mark.parametrize("value", ["4i", "4ib"])
def test_size_with_bare_i_unit_raises_value_error(value):
    with pytest.raises(ValueError, match="local_buffer_size"):
        parse_size("local_buffer_size", value)


def test_negative_size_raises_with_the_key_name():
    with pytest.raises(ValueError, match="^global_segment_size must be >= 0, got -1$"):
        ClientConfig.from_dict({"global_segment_size": -1})


def test_zero_max_value_bytes_is_refused():
    with pytest.raises(ValueError, match="^max_value_bytes must be an integer >= 1"):
        ClientConfig.from_dict({"max_value_bytes": "0MB"})


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
    with pytest.raises(ValueError, match=f"^{key} must be an integer >= 1, got "):
        ClientConfig.from_dict({key: value})


@pytest.mark.parametrize("key", ["local_hostname", "master_server_address", "protocol", "device_name"])
def test_non_string_fields_raise(key):
    with pytest.raises(ValueError, match=f"^{key} must be a string"):
        ClientConfig.from_dict({key: 5})


def test_empty_master_address_raises():
    with pytest.raises(ValueError, match="master_server_address must be 'host:port'"):
        ClientConfig.from_dict({"master_server_address": ""})


@pytest.mark.parametrize("value", [0, -1.0, "5", True])
def test_bad_setup_timeout_raises(value):
    with pytest.raises(ValueError, match="^setup_timeout_s must be"):
        ClientConfig.from_dict({"setup_timeout_s": value})


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
