# Shell functions shared by the lab's provisioning scripts; sourced, never run.

STOP_WAIT=100  # tenths of a second a daemon gets to exit after SIGTERM

running() {  # pid is alive and not a zombie waiting to be reaped
    [ -r "/proc/$1/stat" ] && [ "$(cut -d' ' -f3 "/proc/$1/stat")" != Z ]
}

stop_pidfiles() {  # SIGTERM the daemon of each pid file given, and wait until it has exited
    for pidfile; do
        [ -s "$pidfile" ] || continue
        pid=$(tr -d ' ' < "$pidfile")
        running "$pid" || continue
        kill -TERM "$pid"
        n=0
        while running "$pid"; do
            n=$((n + 1))
            [ "$n" -le "$STOP_WAIT" ] || { echo "$0: pid $pid did not exit" >&2; exit 1; }
            sleep 0.1
        done
    done
}

absolute_state() {  # STATE_DIR must be absolute: the daemons run from elsewhere
    case "$1" in /*) ;; *) echo "$0: STATE_DIR must be absolute" >&2; exit 2 ;; esac
}
