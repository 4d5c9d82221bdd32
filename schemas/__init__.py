"""alignloop's contracts: the HTTP wire protocol, the Kafka events, the settings.

Nothing in this package does I/O; every other package may import it.
"""
