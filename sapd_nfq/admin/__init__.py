"""The operator's side: the control socket, status, the tallies and recent
decisions behind `status` and `why`, the metrics endpoint, and captures for
`replay`. It reaches a running worker only through the control socket."""
