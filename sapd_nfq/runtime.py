"""Building the decision pieces from a Config: table, login store, policy.

Shared by the CLI and the daemon so both judge exactly alike.
"""

from __future__ import annotations

from .config import Config
from .engine.policy import RelayPolicy
from .engine.virtusertable import VirtUserTable
from .logins import LoginStore, open_store


def load_policy(config: Config, logins: LoginStore) -> RelayPolicy:
    """The relay policy for `config`; raises MapError on a broken table."""
    return RelayPolicy(
        VirtUserTable.load(config.virtusertable),
        logins,
        trusted_networks=config.trusted_networks,
        never_relay_networks=config.never_relay_networks,
    )


def open_logins(config: Config) -> LoginStore:
    return open_store(config.state)
