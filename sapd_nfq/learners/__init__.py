"""Login sources the wire cannot show (POP3S, IMAPS, STARTTLS): the mail
server's log and its post-login hook. They import only the engine and the
login stores: what they learn reaches the worker as logins, nothing else."""
