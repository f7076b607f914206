"""Entry points: the `prad` CLI and the wiring of roles and transports into running processes."""
