#!/bin/sh
# sapd-nfq on the lab's gateway, in forward mode in front of the mail server, entirely under
# one state directory.
#
#   gateway.sh setup STATE_DIR INTERFACE AUTH_TTL [LOGIN_LOG]
#                                 write the config and the gate's virtusertable
#   gateway.sh start STATE_DIR    install the rules, start the daemon, wait until it is bound
#   gateway.sh stop  STATE_DIR    stop the daemon and wait until it has exited, remove the rules
#   gateway.sh unit  STATE_DIR    have the installed package's systemd unit run this gate, enabled
#
# INTERFACE is the one clients come in through (the lab's "to-client"), AUTH_TTL the login
# window in seconds, LOGIN_LOG a mail server log to learn logins from (login_logs). The config is STATE_DIR/sapd-nfq.toml; the daemon logs to
# STATE_DIR/log/sapd-nfq.log and keeps its logins in STATE_DIR/logins.sqlite. $SAPD_NFQ is
# the command that runs sapd-nfq (default "sapd-nfq"; split at spaces, so
# SAPD_NFQ="python3 -m sapd_nfq" works). With $SAPD_NFQ_UNIT set (after `unit`), start and
# stop go through systemd: the unit installs the rules and runs the daemon, logging to the
# same file. Used by sapd_nfq/lab/gate.py inside the lab's gw namespace, and by
# vagrant/Vagrantfile on the gw VM, which runs the Debian package.
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/common.sh"
SAPD_NFQ=${SAPD_NFQ:-sapd-nfq}
SAPD_NFQ_UNIT=${SAPD_NFQ_UNIT:-}
UNIT=sapd-nfq.service
QUEUE=0
READY_WAIT=150  # tenths of a second for the daemon to bind its queue

usage() {
    echo "usage: $0 setup STATE_DIR INTERFACE AUTH_TTL [LOGIN_LOG] | start STATE_DIR |" \
        "stop STATE_DIR | unit STATE_DIR" >&2
    exit 2
}

setup() {
    install -d -m 755 "$STATE" "$STATE/log"
    install -d -m 700 "$STATE/run"
    # The gate's own copy, as a real gateway has its /etc/mail/virtusertable.
    install -m 644 "$HERE/virtusertable" "$STATE/virtusertable"
    cat > "$STATE/sapd-nfq.toml" <<TOML
# sapd-nfq on the lab's gateway, written by gateway.sh. Relative paths are under $STATE.
mode = "forward"
interfaces = ["$INTERFACE"]
virtusertable = "virtusertable"
auth_ttl = $AUTH_TTL
state = "logins.sqlite"
run_dir = "run"
queue = $QUEUE
log_level = "info"
TOML
    if [ -n "$LOGIN_LOG" ]; then
        echo "login_logs = [\"$LOGIN_LOG\"]" >> "$STATE/sapd-nfq.toml"
    fi
}

unit() {
    # The package's unit, hardened as it ships, with this gate's config; its state directory
    # writable, its output in the gate's log.
    install -d "/etc/systemd/system/$UNIT.d"
    cat > "/etc/systemd/system/$UNIT.d/lab-gate.conf" <<UNIT
[Service]
Environment=CONFIG=$STATE/sapd-nfq.toml
ReadWritePaths=$STATE
StandardOutput=append:$STATE/log/sapd-nfq.log
StandardError=append:$STATE/log/sapd-nfq.log
UNIT
    systemctl daemon-reload
    systemctl enable --quiet "$UNIT"
}

start() {
    config="$STATE/sapd-nfq.toml"
    if [ -n "$SAPD_NFQ_UNIT" ]; then
        # a unit that gave up while the lab's links were not there yet (at boot) may start
        systemctl reset-failed "$SAPD_NFQ_UNIT" 2>/dev/null || true
        systemctl start "$SAPD_NFQ_UNIT"  # its ExecStartPre installs the rules
        alive() { systemctl --quiet is-active "$SAPD_NFQ_UNIT"; }
    else
        $SAPD_NFQ up --config "$config" >/dev/null
        # setsid: the daemon outlives this script and whatever session started it.
        setsid $SAPD_NFQ run --config "$config" </dev/null >>"$STATE/log/sapd-nfq.log" 2>&1 &
        echo $! > "$STATE/sapd-nfq.pid"
        daemon=$!
        alive() { running "$daemon"; }
    fi
    # The control socket appears once the queue is bound.
    n=0
    until [ -S "$STATE/run/queue-$QUEUE.sock" ]; do
        n=$((n + 1))
        if ! alive || [ "$n" -gt "$READY_WAIT" ]; then
            echo "$0: sapd-nfq did not start; its log ends:" >&2
            tail -n 20 "$STATE/log/sapd-nfq.log" >&2
            exit 1
        fi
        sleep 0.1
    done
}

stop() {
    if [ -n "$SAPD_NFQ_UNIT" ]; then
        systemctl stop "$SAPD_NFQ_UNIT"
    else
        stop_pidfiles "$STATE/sapd-nfq.pid"
    fi
    [ ! -e "$STATE/sapd-nfq.toml" ] || $SAPD_NFQ down --config "$STATE/sapd-nfq.toml" >/dev/null
}

[ $# -ge 2 ] || usage
STATE=$2
absolute_state "$STATE"
case "$1" in
    setup) [ $# -eq 4 ] || [ $# -eq 5 ] || usage; INTERFACE=$3; AUTH_TTL=$4
        LOGIN_LOG=${5:-}; setup ;;
    start) [ $# -eq 2 ] || usage; start ;;
    stop) [ $# -eq 2 ] || usage; stop ;;
    unit) [ $# -eq 2 ] || usage; unit ;;
    *) usage ;;
esac
