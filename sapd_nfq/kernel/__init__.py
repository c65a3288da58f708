"""The packet path's adapters: the worker that binds a queue and carries out
the engine's decisions, the workers' supervision, the iptables rules that
feed the queues, the raw sockets that inject, and the host's interfaces."""
