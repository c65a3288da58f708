#!/bin/sh
# A sending MTA on the lab's client: a Postfix instance of its own that hands every message
# to the lab's mail server through the gateway, entirely under one state directory.
#
#   client-mta.sh setup STATE_DIR RELAYHOST   write its config (relayhost = [RELAYHOST])
#   client-mta.sh start STATE_DIR             start it
#   client-mta.sh stop  STATE_DIR             stop it and wait until it has exited
#
# Mail goes in with `sendmail -C STATE_DIR/postfix`; the log is STATE_DIR/log/postfix.log.
# The instance is named postfix-lab-client, with its own queue and data directories, so it
# runs beside the mail server's Postfix (on the same host too). Used by
# sapd_nfq/lab/client_mta.py inside the lab's client namespace, and by vagrant/Vagrantfile
# on the client VM.
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/common.sh"

usage() {
    echo "usage: $0 setup STATE_DIR RELAYHOST | start STATE_DIR | stop STATE_DIR" >&2
    exit 2
}

setup() {
    install -d -m 755 "$STATE" "$STATE/postfix" "$STATE/postfix-queue" "$STATE/log"
    install -d -m 700 -o postfix -g postfix "$STATE/postfix-data"
    sed -e "s|@STATE@|$STATE|g" -e "s|@RELAYHOST@|$RELAYHOST|g" \
        "$HERE/client-main.cf.in" > "$STATE/postfix/main.cf"
    # The server's services, plus the SMTP client that this instance exists for.
    { cat "$HERE/master.cf.in"
      echo "relay     unix  -       -       n       -       -       smtp"
      echo "smtp      unix  -       -       n       -       -       smtp"
    } > "$STATE/postfix/master.cf"
}

start() {
    postfix -c "$STATE/postfix" start
}

stop() {
    stop_pidfiles "$STATE/postfix-queue/pid/master.pid"
}

[ $# -ge 2 ] || usage
STATE=$2
absolute_state "$STATE"
case "$1" in
    setup) [ $# -eq 3 ] || usage; RELAYHOST=$3; setup ;;
    start) [ $# -eq 2 ] || usage; start ;;
    stop) [ $# -eq 2 ] || usage; stop ;;
    *) usage ;;
esac
