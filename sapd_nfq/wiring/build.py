"""Building the decision pieces from a Config: table, login store, policy.

Shared by the CLI and the daemon so both judge exactly alike.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..engine.logins import LoginScope, LoginStore, MemoryLoginStore, StoreError
from ..engine.policy import AnyOf, LocalAddresses, RelayPolicy
from ..engine.virtusertable import VirtUserTable
from ..logins import backend, open_store
from ..logins.replica import ReplicaLoginStore
from . import postfix_maps
from .access import check_state, denied
from .config import Config


def load_locals(config: Config) -> AnyOf:
    """Every map that says which addresses are local; raises MapError."""
    maps: list[LocalAddresses] = []
    if config.virtusertable is not None:
        maps.append(VirtUserTable.load(config.virtusertable))
    if config.postfix_maps:
        delimiter = postfix_maps.recipient_delimiter(config.postfix_config_directory)
        maps += [postfix_maps.load(spec, config.postfix_config_directory, delimiter)
                 for spec in config.postfix_maps]
    return AnyOf(maps)


def map_files(config: Config) -> list[Path]:
    """The files whose change means a map changed."""
    files = [] if config.virtusertable is None else [config.virtusertable]
    for spec in config.postfix_maps:
        files += postfix_maps.watched_files(spec)
    return files


def load_policy(config: Config, logins: LoginStore) -> RelayPolicy:
    """The relay policy for `config`; raises MapError on a broken table."""
    return RelayPolicy(
        load_locals(config),
        logins,
        trusted_networks=config.trusted_networks,
        never_relay_networks=config.never_relay_networks,
    )


def login_scope(config: Config) -> LoginScope:
    """What one login opens, as the config's prefixes say."""
    return LoginScope(config.ipv4_login_prefix, config.ipv6_login_prefix)


def open_logins(config: Config) -> LoginStore:
    """The login store itself, for the commands: each call does its I/O.
    Refuses an SQLite file a local user could reach (AccessError), since
    writing it would open the relay."""
    check_state(config.state)
    try:
        return open_store(config.state, login_scope(config))
    except StoreError as e:
        if isinstance(e.__cause__, PermissionError):
            raise denied("login store", Path(config.state)) from None
        raise


def daemon_logins(config: Config, log: logging.Logger) -> ReplicaLoginStore | MemoryLoginStore:
    """The daemon's store: the backend's logins held in memory, kept fresh and
    written by a thread (not started yet); "memory" is memory already. Refuses
    what open_logins refuses, and a spec no backend takes; a store that cannot
    be reached is the replica's to retry."""
    check_state(config.state)
    scope = login_scope(config)
    found = backend(config.state, scope)
    if found is None:
        return MemoryLoginStore(scope)
    return ReplicaLoginStore(found.open, found.name, log, scope=scope)
