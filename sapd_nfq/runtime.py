"""Building the decision pieces from a Config: table, login store, policy.

Shared by the CLI and the daemon so both judge exactly alike.
"""

from __future__ import annotations

from pathlib import Path

from .access import check_state, denied
from .config import Config
from .engine.policy import RelayPolicy
from .engine.virtusertable import VirtUserTable
from .logins import LoginStore, StoreError, open_store


def load_policy(config: Config, logins: LoginStore) -> RelayPolicy:
    """The relay policy for `config`; raises MapError on a broken table."""
    return RelayPolicy(
        VirtUserTable.load(config.virtusertable),
        logins,
        trusted_networks=config.trusted_networks,
        never_relay_networks=config.never_relay_networks,
    )


def open_logins(config: Config) -> LoginStore:
    """The login store; refuses an SQLite file a local user could reach
    (AccessError), since writing it would open the relay."""
    check_state(config.state)
    try:
        return open_store(config.state)
    except StoreError as e:
        if isinstance(e.__cause__, PermissionError):
            raise denied("login store", Path(config.state)) from None
        raise
