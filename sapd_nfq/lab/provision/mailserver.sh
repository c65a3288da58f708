#!/bin/sh
# Postfix + Dovecot (POP3, IMAP) for the sapd-nfq lab, entirely under one state directory.
#
#   mailserver.sh setup STATE_DIR IPV4 IPV6   write configs, TLS cert, users, mail dirs
#   mailserver.sh start STATE_DIR             start Postfix and Dovecot from those configs
#   mailserver.sh stop  STATE_DIR             stop both and wait until they have exited
#
# IPV4/IPV6 are the server addresses to listen on (25; 110, 995; 143, 993). Dovecot logs
# to STATE_DIR/log/dovecot.log. Nothing is written
# outside STATE_DIR: Postfix runs with `postfix -c STATE_DIR/postfix`, Dovecot with
# `dovecot -c STATE_DIR/dovecot/dovecot.conf`. Mailboxes belong to $VMAIL_USER (default:
# mail). Used by sapd_nfq/lab/mail.py inside a network namespace, and usable as is to
# provision a VM.
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/common.sh"
VMAIL_USER=${VMAIL_USER:-mail}

usage() {
    echo "usage: $0 setup STATE_DIR IPV4 IPV6 | start STATE_DIR | stop STATE_DIR" >&2
    exit 2
}

render() {  # template -> stdout, placeholders filled in
    sed -e "s|@STATE@|$STATE|g" -e "s|@IPV4@|$IPV4|g" -e "s|@IPV6@|$IPV6|g" \
        -e "s|@VUID@|$VUID|g" -e "s|@VGID@|$VGID|g" "$HERE/$1"
}

setup() {
    VUID=$(id -u "$VMAIL_USER")
    VGID=$(id -g "$VMAIL_USER")
    install -d -m 755 "$STATE" "$STATE/postfix" "$STATE/postfix-queue" "$STATE/dovecot" \
        "$STATE/log" "$STATE/tls"
    install -d -m 700 -o postfix -g postfix "$STATE/postfix-data"
    install -d -m 750 -o "$VUID" -g "$VGID" "$STATE/mail"

    render main.cf.in > "$STATE/postfix/main.cf"
    render master.cf.in > "$STATE/postfix/master.cf"
    render dovecot.conf.in > "$STATE/dovecot/dovecot.conf"

    # Postfix mailboxes: every virtusertable entry whose value is a lab user (users holds
    # name:password lines). The error: catch-all needs no entry: Postfix rejects
    # unlisted lab.example addresses by itself.
    awk 'NR == FNR { if (!/^#/ && sub(/:.*/, "")) user[$0] = 1; next }
         !/^#/ && NF == 2 && $1 !~ /^@/ && ($2 in user) { print $1 "\t" $2 "/Maildir/" }' \
        "$HERE/users" "$HERE/virtusertable" > "$STATE/postfix/vmailbox"

    # The post-login hook: sapd-nfq's script, told where the lab's gate listens. Without
    # python3 to run it a login would fail, so then there is no hook.
    install -d -m 755 "$STATE/hook"
    rm -f "$STATE/dovecot/postlogin.conf"
    if [ -x /usr/bin/python3 ]; then
        install -m 755 "$HERE/../../../packaging/sapd-nfq-postlogin" \
            "$STATE/dovecot/sapd-nfq-postlogin"
        printf '#!/bin/sh\nSAPD_NFQ_HOOK_SOCKET=%s exec %s "$@"\n' "$STATE/hook/login.sock" \
            "$STATE/dovecot/sapd-nfq-postlogin" > "$STATE/dovecot/postlogin"
        chmod 755 "$STATE/dovecot/postlogin"
        render postlogin.conf.in > "$STATE/dovecot/postlogin.conf"
    fi

    # Dovecot passdb/userdb; the auth process reads it as the dovecot user.
    (umask 027; awk -F: -v uid="$VUID" -v gid="$VGID" -v base="$STATE/mail" \
        '!/^#/ && NF == 2 { print $1 ":{PLAIN}" $2 ":" uid ":" gid "::" base "/" $1 "::" }' \
        "$HERE/users" > "$STATE/dovecot/passwd")
    chgrp dovecot "$STATE/dovecot/passwd"

    # Self-signed certificate for STARTTLS, STLS, POP3S and IMAPS; both daemons read the
    # key as root.
    if [ ! -s "$STATE/tls/key.pem" ]; then
        (umask 077; openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
            -days 365 -subj "/CN=mail.lab.example" \
            -addext "subjectAltName=DNS:mail.lab.example,IP:$IPV4,IP:$IPV6" \
            -keyout "$STATE/tls/key.pem" -out "$STATE/tls/cert.pem" 2>/dev/null)
        chmod 644 "$STATE/tls/cert.pem"
    fi
}

start() {
    postfix -c "$STATE/postfix" start
    dovecot -c "$STATE/dovecot/dovecot.conf"
}

stop() {
    # SIGTERM to each master is what `postfix stop` and `doveadm stop` send; waiting here
    # in tenths of a second is quicker than their one-second polling.
    stop_pidfiles "$STATE/postfix-queue/pid/master.pid" "$STATE/dovecot/run/master.pid"
}

[ $# -ge 2 ] || usage
STATE=$2
absolute_state "$STATE"
case "$1" in
    setup) [ $# -eq 4 ] || usage; IPV4=$3; IPV6=$4; setup ;;
    start) [ $# -eq 2 ] || usage; start ;;
    stop) [ $# -eq 2 ] || usage; stop ;;
    *) usage ;;
esac
