#!/bin/sh
# Sendmail for the sapd-nfq lab, beside the lab's Postfix, entirely under one state directory.
#
#   sendmail.sh setup STATE_DIR IPV4   (on the host: apt-get needs its network) unpack Debian's sendmail packages, write sendmail.cf
#                                      (m4), the virtusertable map (makemap), aliases
#   sendmail.sh start STATE_DIR        run the daemon (inside the server namespace)
#   sendmail.sh stop  STATE_DIR
#
# Debian's MTAs conflict as packages, so none is installed: `apt-get download` fetches
# sendmail-bin, sendmail-base, sendmail-cf and m4, and `dpkg -x` unpacks them into
# STATE_DIR/root; sendmail runs from there with `-C STATE_DIR/sendmail.cf` and listens on
# IPV4 port 25 only. The virtusertable is the lab's own (provision/virtusertable),
# copied to STATE_DIR/virtusertable and compiled next to it with makemap: that text file
# is the one the gate reads. lab.example users are aliased to a program that writes each
# message to STATE_DIR/mail/USER/. Sendmail canonicalises its host name at start (and
# sleeps a minute if it cannot) and looks up every client's name (DNS is out of reach
# in the lab: timeouts): it runs in a mount and UTS namespace of its own, with
# STATE_DIR's hosts, nsswitch.conf (files only) and resolv.conf bound over /etc's
# there, and the host name mx2.lab.example.
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)
VMAIL_USER=${VMAIL_USER:-mail}
PACKAGES="sendmail-bin sendmail-base sendmail-cf m4"
HOSTNAME_=mx2.lab.example

usage() {
    echo "usage: $0 setup STATE_DIR IPV4 | start STATE_DIR | stop STATE_DIR" >&2
    exit 2
}

setup() {
    ROOT=$STATE/root
    install -d -m 755 "$STATE" "$STATE/debs"
    install -d -m 700 "$STATE/queue"
    install -d -m 755 -o "$VMAIL_USER" "$STATE/mail"
    if [ ! -x "$ROOT/usr/libexec/sendmail/sendmail" ]; then
        (cd "$STATE/debs" && apt-get download $PACKAGES >/dev/null 2>&1) || {
            echo "apt-get download $PACKAGES failed" >&2; exit 1; }
        for deb in "$STATE"/debs/*.deb; do dpkg -x "$deb" "$ROOT"; done
    fi

    printf '127.0.0.1 localhost\n%s %s mx2\n' "$IPV4" "$HOSTNAME_" > "$STATE/hosts"
    printf 'hosts files\naliases files\n' > "$STATE/service.switch"
    printf 'passwd: files\ngroup: files\nhosts: files\n' > "$STATE/nsswitch.conf"
    echo 'nameserver 127.0.0.1' > "$STATE/resolv.conf"
    echo lab.example > "$STATE/local-host-names"
    : > "$STATE/helpfile"
    : > "$STATE/statistics"
    cat > "$STATE/deliver" <<'EOF'
#!/bin/sh
# a message on stdin for user $1: one file each
exec cat > "$(dirname "$0")/mail/$1/$(date +%s.%N).$$"
EOF
    chmod 755 "$STATE/deliver"
    {
        for user in $(awk -F: '!/^#/ && NF == 2 { print $1 }' "$HERE/users"); do
            install -d -m 755 -o "$VMAIL_USER" "$STATE/mail/$user"
            echo "$user: \"|$STATE/deliver $user\""
        done
        echo "MAILER-DAEMON: postmaster"
    } > "$STATE/aliases"

    cat > "$STATE/sendmail.mc" <<EOF
divert(-1)
include(\`$ROOT/usr/share/sendmail/cf/m4/cf.m4')
divert(0)dnl
VERSIONID(\`sapd-nfq lab')dnl
OSTYPE(\`linux')dnl
define(\`confDOMAIN_NAME', \`$HOSTNAME_')dnl
define(\`confSERVICE_SWITCH_FILE', \`$STATE/service.switch')dnl
define(\`confHOSTS_FILE', \`$STATE/hosts')dnl
define(\`confCW_FILE', \`-o $STATE/local-host-names')dnl
define(\`QUEUE_DIR', \`$STATE/queue')dnl
define(\`STATUS_FILE', \`$STATE/statistics')dnl
define(\`confPID_FILE', \`$STATE/sendmail.pid')dnl
define(\`ALIAS_FILE', \`$STATE/aliases')dnl
define(\`HELP_FILE', \`$STATE/helpfile')dnl
define(\`confDONT_PROBE_INTERFACES', \`True')dnl
define(\`confDEF_USER_ID', \`$VMAIL_USER:$VMAIL_USER')dnl
define(\`confPRIVACY_FLAGS', \`goaway')dnl
define(\`confTO_IDENT', \`0s')dnl
define(\`confDELIVERY_MODE', \`background')dnl
FEATURE(\`no_default_msa')dnl
FEATURE(\`virtusertable', \`hash $STATE/virtusertable')dnl
dnl the lab's MTAs relay for every lab client: the gate alone decides
FEATURE(\`promiscuous_relay')dnl
FEATURE(\`accept_unresolvable_domains')dnl
LOCAL_DOMAIN(\`lab.example')dnl
DAEMON_OPTIONS(\`Family=inet, Port=smtp, Addr=$IPV4, Name=MTA')dnl
MAILER(\`local')dnl
MAILER(\`smtp')dnl
EOF
    "$ROOT/usr/bin/m4" "$STATE/sendmail.mc" > "$STATE/sendmail.cf" 2>/dev/null

    grep -v '^#' "$HERE/virtusertable" | grep . > "$STATE/virtusertable"
    "$ROOT/usr/libexec/sendmail/makemap" -C "$STATE/sendmail.cf" hash "$STATE/virtusertable" \
        < "$STATE/virtusertable"
    "$ROOT/usr/libexec/sendmail/sendmail" -C "$STATE/sendmail.cf" -bi >/dev/null
}

start() {
    exec unshare --mount --uts --propagation private sh -c '
        for f in hosts nsswitch.conf resolv.conf; do mount --bind "$1/$f" "/etc/$f"; done &&
        hostname "$2" &&
        exec "$1/root/usr/libexec/sendmail/sendmail" -C "$1/sendmail.cf" -bd -q1m' \
        sendmail "$STATE" "$HOSTNAME_"
}

stop() {
    [ -s "$STATE/sendmail.pid" ] || return 0
    pid=$(head -n 1 "$STATE/sendmail.pid")
    kill "$pid" 2>/dev/null || return 0
    while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
}

[ $# -ge 2 ] || usage
COMMAND=$1 STATE=$2
case $COMMAND in
    setup) [ $# -eq 3 ] || usage; IPV4=$3; setup ;;
    start) start ;;
    stop) stop ;;
    *) usage ;;
esac
