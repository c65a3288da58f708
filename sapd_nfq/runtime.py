"""Building the decision pieces from a Config: table, login store, policy.

Shared by the CLI and the daemon so both judge exactly alike.
"""

from __future__ import annotations

import logging

from .config import Config
from .engine.logins import MemoryLoginStore
from .engine.policy import RelayPolicy
from .engine.virtusertable import VirtUserTable
from .logins import LoginStore, backend, open_store
from .logins.replica import ReplicaLoginStore


def load_policy(config: Config, logins: LoginStore) -> RelayPolicy:
    """The relay policy for `config`; raises MapError on a broken table."""
    return RelayPolicy(
        VirtUserTable.load(config.virtusertable),
        logins,
        trusted_networks=config.trusted_networks,
        never_relay_networks=config.never_relay_networks,
    )


def open_logins(config: Config) -> LoginStore:
    """The store itself, for the commands: each call does its I/O."""
    return open_store(config.state)


def daemon_logins(config: Config, log: logging.Logger) -> ReplicaLoginStore | MemoryLoginStore:
    """The daemon's store: the backend's logins held in memory, kept fresh and
    written by a thread (not started yet); "memory" is memory already. Raises
    StoreError only for a spec no backend takes; a store that cannot be
    reached is the replica's to retry."""
    found = backend(config.state)
    if found is None:
        return MemoryLoginStore()
    return ReplicaLoginStore(found.open, found.name, log)
