#!/bin/sh
# Exim for the sapd-nfq lab, beside the lab's Postfix and Sendmail, entirely under one state directory.
#
#   exim.sh setup STATE_DIR IPV4   (on the host: apt-get needs its network) unpack Debian's exim4
#                                  packages, write exim4.conf, the files /etc holds for it, mail dirs
#   exim.sh start STATE_DIR        run the daemon (inside the server namespace)
#   exim.sh stop  STATE_DIR
#   exim.sh setup-client STATE_DIR RELAYHOST   (on the host) the same for a sending Exim
#   exim.sh send STATE_DIR SENDER RCPT...      (inside the client namespace) submit the message
#                                              on stdin and deliver it at once
#
# Debian's MTAs conflict as packages, so none is installed: `apt-get download` fetches
# exim4-daemon-light and exim4-base (and libidn12, which the daemon links and a mail
# server host may lack), and `dpkg -x` unpacks them into STATE_DIR/root. Exim reads its
# configuration from a compiled-in path (/etc/exim4/exim4.conf, no -C, so it keeps its
# privileges), re-executes itself by its compiled-in path /usr/sbin/exim4, and runs as
# the user Debian-exim: it runs in a mount namespace of its own where read-only overlays
# put STATE_DIR/root's /usr/sbin and libraries over the host's, and STATE_DIR/etc over
# /etc. That etc holds exim4/exim4.conf, hosts, nsswitch.conf (files only), resolv.conf,
# and passwd and group: the host's own plus Debian-exim, on an id the host does not use.
# Nothing of the host changes. Exim listens on IPV4 port 25 only, logs to
# STATE_DIR/log/mainlog, delivers lab.example users (the lab's users file, `+tag`
# suffixes allowed) to the maildirs STATE_DIR/mail/USER, and drops mail for any other
# domain (the lab reaches no outside host). It relays for every client: the gate alone
# decides. Limits, log selectors and host lookups stay at Exim's defaults.
#
# A sending Exim (setup-client) runs no daemon: `send` submits a message and delivers
# it in the foreground (-odi) to RELAYHOST port 25, with CHUNKING where offered
# (hosts_try_chunking), logging to STATE_DIR/log/mainlog; its bounces are dropped.
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)
VMAIL_USER=${VMAIL_USER:-mail}
PACKAGES="exim4-daemon-light exim4-base libidn12"
HOSTNAME_=mx3.lab.example
EXIM_USER=Debian-exim
LIBDIR=/usr/lib/x86_64-linux-gnu

usage() {
    echo "usage: $0 setup STATE_DIR IPV4 | start STATE_DIR | stop STATE_DIR" \
         "| setup-client STATE_DIR RELAYHOST | send STATE_DIR SENDER RCPT..." >&2
    exit 2
}

# An id below 1000 that neither /etc/passwd nor /etc/group uses.
free_id() {
    id=999
    while cut -d: -f3 /etc/passwd /etc/group | grep -qx "$id"; do id=$((id - 1)); done
    echo "$id"
}

# The packages, the files /etc holds for Exim, its spool and log.
unpack() {
    ROOT=$STATE/root
    install -d -m 755 "$STATE" "$STATE/debs" "$STATE/etc" "$STATE/etc/exim4"
    if [ ! -x "$ROOT/usr/sbin/exim4" ]; then
        (cd "$STATE/debs" && apt-get download $PACKAGES >/dev/null 2>&1) || {
            echo "apt-get download $PACKAGES failed" >&2; exit 1; }
        for deb in "$STATE"/debs/*.deb; do dpkg -x "$deb" "$ROOT"; done
    fi

    cp /etc/passwd "$STATE/etc/passwd"
    cp /etc/group "$STATE/etc/group"
    if ! getent passwd "$EXIM_USER" >/dev/null; then
        id=$(free_id)
        echo "$EXIM_USER:x:$id:$id::/nonexistent:/usr/sbin/nologin" >> "$STATE/etc/passwd"
        echo "$EXIM_USER:x:$id:" >> "$STATE/etc/group"
    fi
    exim_uid=$(awk -F: -v u="$EXIM_USER" '$1 == u { print $3 }' "$STATE/etc/passwd")
    exim_gid=$(awk -F: -v u="$EXIM_USER" '$1 == u { print $4 }' "$STATE/etc/passwd")
    echo '127.0.0.1 localhost' > "$STATE/etc/hosts"
    printf 'passwd: files\ngroup: files\nshadow: files\nhosts: files\n' > "$STATE/etc/nsswitch.conf"
    echo 'nameserver 127.0.0.1' > "$STATE/etc/resolv.conf"

    install -d -m 750 -o "$exim_uid" -g "$exim_gid" "$STATE/spool" "$STATE/log"
}

setup() {
    unpack
    echo "$IPV4 $HOSTNAME_ mx3" >> "$STATE/etc/hosts"
    install -d -m 755 -o "$VMAIL_USER" "$STATE/mail"
    : > "$STATE/localparts"
    for user in $(awk -F: '!/^#/ && NF == 2 { print $1 }' "$HERE/users"); do
        install -d -m 755 -o "$VMAIL_USER" "$STATE/mail/$user"
        echo "$user: $user" >> "$STATE/localparts"
    done

    cat > "$STATE/etc/exim4/exim4.conf" <<EOF
primary_hostname = $HOSTNAME_
qualify_domain = lab.example
domainlist local_domains = lab.example
local_interfaces = $IPV4
daemon_smtp_ports = 25
spool_directory = $STATE/spool
log_file_path = $STATE/log/%slog
pid_file_path = $STATE/exim.pid
keep_environment =
tls_advertise_hosts =
acl_smtp_rcpt = acl_check_rcpt

begin acl

acl_check_rcpt:
  accept

begin routers

lab_users:
  driver = accept
  domains = +local_domains
  local_parts = lsearch;$STATE/localparts
  local_part_suffix = +*
  local_part_suffix_optional
  transport = maildir

elsewhere:
  driver = redirect
  domains = ! +local_domains
  data = :blackhole:

begin transports

maildir:
  driver = appendfile
  directory = $STATE/mail/\${local_part_data}
  maildir_format
  create_directory
  delivery_date_add
  envelope_to_add
  return_path_add
  user = $VMAIL_USER
  group = $VMAIL_USER
  mode = 0644

begin retry

* * F,1h,1m
EOF
}

setup_client() {
    unpack
    cat > "$STATE/etc/exim4/exim4.conf" <<EOF
primary_hostname = client.lab.example
qualify_domain = lab.example
spool_directory = $STATE/spool
log_file_path = $STATE/log/%slog
keep_environment =
tls_advertise_hosts =

begin routers

bounces:
  driver = redirect
  senders = :
  data = :blackhole:

relayhost:
  driver = manualroute
  route_list = * $RELAYHOST byname
  self = send
  transport = remote_smtp

begin transports

remote_smtp:
  driver = smtp
  hosts_try_chunking = *
  hosts_avoid_tls = *

begin retry

* * F,1h,1m
EOF
}

# exim4 with these arguments, in a mount namespace where it finds itself, its
# libraries and its /etc.
exim() {
    exec unshare --mount --propagation private sh -c '
        state=$1 libdir=$2; shift 2
        mount -t overlay overlay -o "lowerdir=$state/root/usr/sbin:/usr/sbin" /usr/sbin &&
        mount -t overlay overlay -o "lowerdir=$state/root$libdir:$libdir" "$libdir" &&
        mount -t overlay overlay -o "lowerdir=$state/etc:/etc" /etc &&
        exec /usr/sbin/exim4 "$@"' \
        exim "$STATE" "$LIBDIR" "$@"
}

stop() {
    [ -s "$STATE/exim.pid" ] || return 0
    pid=$(head -n 1 "$STATE/exim.pid")
    kill "$pid" 2>/dev/null || return 0
    while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
}

[ $# -ge 2 ] || usage
COMMAND=$1 STATE=$2
shift 2
case $COMMAND in
    setup) [ $# -eq 1 ] || usage; IPV4=$1; setup ;;
    start) exim -bd -q1m ;;
    stop) stop ;;
    setup-client) [ $# -eq 1 ] || usage; RELAYHOST=$1; setup_client ;;
    send) [ $# -ge 2 ] || usage; exim -odi -f "$@" ;;
    *) usage ;;
esac
