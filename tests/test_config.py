from dataclasses import fields
from ipaddress import ip_network
from pathlib import Path

import pytest

from sapd_nfq.engine.errors import ConfigError
from sapd_nfq.wiring.config import Config, key_docs, load_config, toml_value


def write(tmp_path, text, name="sapd-nfq.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults():
    c = Config.default()
    assert c == Config()
    assert (c.mode, c.smtp_ports, c.pop3_ports) == ("input", (25,), (110,))
    assert c.virtusertable == Path("/etc/mail/virtusertable")
    assert (c.auth_ttl, c.state) == (1800, "/var/lib/sapd-nfq/logins.sqlite")
    assert (c.trusted_networks, c.never_relay_networks) == ((), ())
    assert (c.smtp_starttls, c.pop3_stls, c.smtp_auth_relays) == ("strip", "allow", True)
    assert (c.imap_ports, c.imap_starttls) == ((143,), "allow")
    assert (c.max_flows, c.queue, c.interfaces, c.log_level) == (65536, 0, (), "info")


def test_empty_file_gives_defaults(tmp_path):
    assert load_config(write(tmp_path, "# nothing set\n")) == Config.default()


def test_every_key(tmp_path):
    path = write(tmp_path, """
mode = "forward"
smtp_ports = [25, 587]
pop3_ports = [110, 1110]
virtusertable = "/etc/mail/vt"
auth_ttl = 600
state = "memory"
trusted_networks = ["198.18.0.0/24", "2001:db8:1::/48", "198.19.0.1"]
never_relay_networks = ["198.18.0.128/25"]
smtp_starttls = "relay-clients"
pop3_stls = "strip"
smtp_auth_relays = false
refusal = "session"
max_flows = 16
queue = 65535
interfaces = ["eth0", "veth+"]
log_level = "debug"
""")
    assert load_config(path) == Config(
        mode="forward", smtp_ports=(25, 587), pop3_ports=(110, 1110),
        virtusertable=Path("/etc/mail/vt"), auth_ttl=600, state="memory",
        trusted_networks=(ip_network("198.18.0.0/24"), ip_network("2001:db8:1::/48"),
                          ip_network("198.19.0.1/32")),
        never_relay_networks=(ip_network("198.18.0.128/25"),),
        smtp_starttls="relay-clients", pop3_stls="strip", smtp_auth_relays=False,
        refusal="session", max_flows=16, queue=65535, interfaces=("eth0", "veth+"), log_level="debug")


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        Config().mode = "forward"  # type: ignore[misc]


def test_relative_paths_resolve_against_the_config_dir(tmp_path, monkeypatch):
    etc = tmp_path / "etc"
    etc.mkdir()
    write(etc, 'virtusertable = "mail/vt"\nstate = "./state/logins.sqlite"\n', "c.toml")
    monkeypatch.chdir(tmp_path)
    c = load_config("etc/c.toml")
    assert c.virtusertable == etc / "mail" / "vt"
    assert c.state == str(etc / "state" / "logins.sqlite")
    assert c.virtusertable.is_absolute()


def test_absolute_paths_and_memory_stay(tmp_path):
    c = load_config(write(tmp_path, 'virtusertable = "/x/vt"\nstate = "memory"\n'))
    assert (c.virtusertable, c.state) == (Path("/x/vt"), "memory")


BAD_VALUES = [
    ("mode", '"inline"', '"input" or "forward"'),
    ("mode", "1", '"input" or "forward"'),
    ("smtp_ports", "25", "a list of ports 1..65535"),
    ("smtp_ports", "[]", "at least 1"),
    ("smtp_ports", "[0]", "ports 1..65535; got 0"),
    ("smtp_ports", "[65536]", "got 65536"),
    ("smtp_ports", '["25"]', "got '25'"),
    ("smtp_ports", "[true]", "got True"),
    ("smtp_ports", "[25, 25]", "without repeats; got 25"),
    ("smtp_ports", "[25.0]", "got 25.0"),
    ("pop3_ports", "[-1]", "ports 1..65535"),
    ("imap_ports", "[143, 143]", "without repeats"),
    ("virtusertable", '""', "needs postfix_maps"),
    ("virtusertable", "[]", "a file path"),
    ("postfix_maps", '"hash:/etc/postfix/virtual"', "a list of Postfix maps"),
    ("postfix_maps", '["/etc/postfix/virtual"]', "not a Postfix map (type:name)"),
    ("postfix_maps", '["regexp:/etc/postfix/virtual"]', "cannot be listed by postmap -s"),
    ("postfix_maps", '["hash:"]', "not a Postfix map"),
    ("postfix_maps", '[7]', "a list of Postfix maps"),
    ("postfix_config_directory", '""', "a file path"),
    ("metrics_listen", '"9925"', "ADDRESS:PORT"),
    ("metrics_listen", '"localhost:9925"', "does not appear to be an IPv4 or IPv6 address"),
    ("metrics_listen", '"127.0.0.1:99999"', "ADDRESS:PORT"),
    ("metrics_listen", '"::1:9925"', "ADDRESS:PORT"),
    ("metrics_listen", "9925", "ADDRESS:PORT"),
    ("auth_ttl", "0", "an integer >= 1"),
    ("auth_ttl", "-5", "an integer >= 1"),
    ("auth_ttl", "1800.0", "an integer >= 1"),
    ("auth_ttl", '"30m"', "an integer >= 1"),
    ("auth_ttl", "true", "an integer >= 1"),
    ("state", '""', '"memory" or a file path'),
    ("state", '"ftp://localhost"', "no login store backend for ftp://: 'ftp://localhost'"),
    ("state", "3", '"memory" or a file path'),
    ("trusted_networks", '"198.18.0.0/15"', "a list of CIDR networks"),
    ("trusted_networks", '["198.18.0.1/15"]', "host bits set (the network is 198.18.0.0/15)"),
    ("trusted_networks", '["example.org"]', "not a network"),
    ("trusted_networks", "[42]", "a list of CIDR networks"),
    ("trusted_networks", '["::ffff:198.18.0.0/111"]', "IPv4-mapped"),
    ("never_relay_networks", '["198.18.0.0/33"]', "not a network"),
    ("never_relay_networks", '["198.18.0.0/24", "198.18.0.0/24"]', "without repeats"),
    ("smtp_starttls", '"allow"', '"strip" or "relay-clients"'),
    ("pop3_stls", '"relay-clients"', '"allow" or "strip"'),
    ("imap_starttls", '"relay-clients"', '"allow" or "strip"'),
    ("smtp_auth_relays", '"yes"', "true or false"),
    ("smtp_auth_relays", "1", "true or false"),
    ("refusal", '"rcpt"', '"recipient" or "session"'),
    ("mta", '"qmail"', '"exim" or "other"'),
    ("enforce", '"monitor"', "true or false"),
    ("enforce", "0", "true or false"),
    ("ipv4_login_prefix", "15", "an integer 16..32; got 15"),
    ("ipv4_login_prefix", "33", "got 33"),
    ("ipv6_login_prefix", "47", "an integer 48..128; got 47"),
    ("ipv6_login_prefix", "129", "got 129"),
    ("ipv6_login_prefix", "true", "got True"),
    ("max_flows", "15", "an integer >= 16"),
    ("max_flows", "1e6", "an integer >= 16"),
    ("queue", "65536", "an integer 0..65535"),
    ("queue", "-1", "an integer 0..65535"),
    ("interfaces", '"eth0"', "a list of interface names"),
    ("interfaces", '[""]', "interface names"),
    ("interfaces", '["a-very-long-name0"]', "interface names"),
    ("interfaces", '["eth 0"]', "interface names"),
    ("interfaces", '["../x"]', "interface names"),
    ("interfaces", '["eth0", "eth0"]', "without repeats"),
    ("workers", "0", "an integer 1..16"),
    ("workers", "17", "an integer 1..16"),
    ("queue_maxlen", "8", "an integer >= 16"),
    ("pop3_fail_open", '"no"', "true or false"),
    ("run_dir", '""', "a file path"),
    ("login_logs", '"/var/log/dovecot.log"', "a list of log file paths or \"journal\""),
    ("login_logs", '[""]', "a list of log file paths or \"journal\""),
    ("login_logs", '["a", "a"]', "without repeats"),
    ("login_hook", "1", "a file path"),
    ("login_hook_group", '"Bad Group"', "a group name"),
    ("log_level", '"trace"', '"debug" or "info" or "warning" or "error"'),
    ("log_level", '"INFO"', '"debug" or "info"'),
]


@pytest.mark.parametrize(("key", "value", "expected"), BAD_VALUES)
def test_bad_values_name_file_key_and_expectation(tmp_path, key, value, expected):
    path = write(tmp_path, f"{key} = {value}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    message = str(e.value)
    assert message.startswith(f"{path}: {key}: expected ")
    assert expected in message


def test_every_key_has_a_bad_value_test():
    assert {key for key, _, _ in BAD_VALUES} == {f.name for f in fields(Config)}


def test_postfix_maps_resolve_against_the_config_directory(tmp_path):
    path = write(tmp_path, 'virtusertable = ""\npostfix_maps = ["hash:maps/virtual", "lmdb:/etc/postfix/vmailbox"]\n')
    config = load_config(path)
    assert config.virtusertable is None
    assert config.postfix_maps == (f"hash:{tmp_path}/maps/virtual", "lmdb:/etc/postfix/vmailbox")


def test_ports_must_not_overlap(tmp_path):
    path = write(tmp_path, "smtp_ports = [25, 587]\npop3_ports = [110, 587]\n")
    with pytest.raises(ConfigError, match=r": pop3_ports: expected ports not in smtp_ports; "
                                          r"got 587 in both$"):
        load_config(path)
    with pytest.raises(ConfigError, match="got 25 in both"):
        load_config(write(tmp_path, "pop3_ports = [25]\n"))


def test_imap_ports_overlap_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r": imap_ports: expected ports not in pop3_ports; "
                                          r"got 110 in both"):
        load_config(write(tmp_path, "imap_ports = [110]\n"))
    with pytest.raises(ConfigError, match=r": imap_ports: expected ports not in smtp_ports"):
        load_config(write(tmp_path, "imap_ports = [25]\n"))
    assert load_config(write(tmp_path, "imap_ports = []\n")).imap_ports == ()


def test_empty_pop3_ports_is_allowed(tmp_path):
    assert load_config(write(tmp_path, "pop3_ports = []\n")).pop3_ports == ()


def test_unknown_key_suggests_the_right_one(tmp_path):
    path = write(tmp_path, "smtp_port = [25]\n")
    with pytest.raises(ConfigError, match=r"unknown key 'smtp_port' \(did you mean smtp_ports\?\)"):
        load_config(path)


def test_tables_are_unknown_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'smtp'$"):
        load_config(write(tmp_path, "[smtp]\nports = [25]\n"))


def test_syntax_error_names_file_and_position(tmp_path):
    path = write(tmp_path, 'mode = "input"\nsmtp_ports = [25,\nqueue = \n')
    with pytest.raises(ConfigError, match=rf"^{path}: not valid TOML: .*line \d+, column \d+"):
        load_config(path)


def test_not_utf8(tmp_path):
    path = tmp_path / "c.toml"
    path.write_bytes(b'mode = "input"\nlog_level = "\xff"\n')
    with pytest.raises(ConfigError, match=rf"^{path}:2: not UTF-8"):
        load_config(path)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.toml")


def test_every_default_reads_back_as_itself(tmp_path):
    """Each key's default, spelled as the config file spells it, passes the
    key's own check and gives the default again: the documented defaults are
    the ones in force."""
    text = "".join(f"{name} = {toml_value(getattr(Config(), name))}\n" for name in key_docs())
    assert load_config(write(tmp_path, text)) == Config.default()


def test_worker_queues_must_fit_below_65536(tmp_path):
    path = write(tmp_path, "queue = 65535\nworkers = 2\n")
    with pytest.raises(ConfigError, match="workers: expected queues 65535.. to end by 65535"):
        load_config(path)


def test_the_packaged_example_config_spells_out_the_defaults():
    example = Path(__file__).parent.parent / "packaging" / "sapd-nfq.toml"
    assert load_config(example) == Config.default()
