"""The Kafka connection settings (TLS, SASL) as each client library spells them.

alignloop talks to Kafka through two libraries: serving's event producer is
confluent-kafka (librdkafka, dotted names), the ingestor (consumer, dead-letter producer,
topic admin) and the trainer's announcer are kafka-python (snake_case names). Both get
their security configuration from here, from the same settings
(``ALIGNLOOP_KAFKA_SECURITY_PROTOCOL``, ``ALIGNLOOP_KAFKA_SASL_*``, ``ALIGNLOOP_KAFKA_SSL_*``),
so the two can never disagree::

    Producer({"bootstrap.servers": ..., **confluent_config(settings)})
    KafkaConsumer(bootstrap_servers=..., **kafka_python_config(settings))

With the default ``PLAINTEXT`` both are empty: the clients keep their own defaults.
Pure mapping, no I/O: a file named in the settings is passed on, not opened (the clients
open it when they start, and refuse a bad one then). :func:`check` names what is missing
(a SASL protocol without a mechanism, user or password; a key without its certificate).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from pydantic import SecretStr

SSL_PROTOCOLS = frozenset({"SSL", "SASL_SSL"})
SASL_PROTOCOLS = frozenset({"SASL_PLAINTEXT", "SASL_SSL"})


class KafkaSecuritySettings(Protocol):
    """The fields of :class:`schemas.settings.Settings` this module reads (read-only)."""

    @property
    def kafka_security_protocol(self) -> str: ...
    @property
    def kafka_sasl_mechanism(self) -> str | None: ...
    @property
    def kafka_sasl_username(self) -> str | None: ...
    @property
    def kafka_sasl_password(self) -> SecretStr | None: ...
    @property
    def kafka_ssl_cafile(self) -> Path | None: ...
    @property
    def kafka_ssl_certfile(self) -> Path | None: ...
    @property
    def kafka_ssl_keyfile(self) -> Path | None: ...
    @property
    def kafka_ssl_key_password(self) -> SecretStr | None: ...
    @property
    def kafka_ssl_check_hostname(self) -> bool: ...


def _secret(value: SecretStr | None) -> str | None:
    return None if value is None else value.get_secret_value()


def check(settings: KafkaSecuritySettings) -> None:
    """ValueError naming every missing or contradictory setting (none: fine)."""
    protocol = settings.kafka_security_protocol
    problems = []
    if protocol in SASL_PROTOCOLS:
        for name in ("kafka_sasl_mechanism", "kafka_sasl_username", "kafka_sasl_password"):
            value = getattr(settings, name)
            if not (_secret(value) if isinstance(value, SecretStr) else value):
                problems.append(f"ALIGNLOOP_{name.upper()} is required with {protocol}")
    if settings.kafka_ssl_keyfile is not None and settings.kafka_ssl_certfile is None:
        problems.append("ALIGNLOOP_KAFKA_SSL_KEYFILE needs ALIGNLOOP_KAFKA_SSL_CERTFILE")
    if protocol not in SSL_PROTOCOLS:
        tls = ("kafka_ssl_cafile", "kafka_ssl_certfile", "kafka_ssl_keyfile")
        for name in tls:
            if getattr(settings, name) is not None:
                problems.append(f"ALIGNLOOP_{name.upper()} is set but {protocol} uses no TLS")
    if problems:
        raise ValueError("Kafka connection settings: " + "; ".join(problems))


def confluent_config(settings: KafkaSecuritySettings) -> dict[str, Any]:
    """librdkafka's properties (serving's producer); ``{}`` for PLAINTEXT."""
    check(settings)
    protocol = settings.kafka_security_protocol
    if protocol == "PLAINTEXT":
        return {}
    config: dict[str, Any] = {"security.protocol": protocol}
    if protocol in SASL_PROTOCOLS:
        config["sasl.mechanism"] = settings.kafka_sasl_mechanism
        config["sasl.username"] = settings.kafka_sasl_username
        config["sasl.password"] = _secret(settings.kafka_sasl_password)
    if protocol in SSL_PROTOCOLS:
        check_hostname = settings.kafka_ssl_check_hostname
        config["ssl.endpoint.identification.algorithm"] = "https" if check_hostname else "none"
        optional = {
            "ssl.ca.location": settings.kafka_ssl_cafile,
            "ssl.certificate.location": settings.kafka_ssl_certfile,
            "ssl.key.location": settings.kafka_ssl_keyfile,
            "ssl.key.password": _secret(settings.kafka_ssl_key_password),
        }
        config.update({k: str(v) for k, v in optional.items() if v is not None})
    return config


def kafka_python_config(settings: KafkaSecuritySettings) -> dict[str, Any]:
    """kafka-python's keyword arguments (KafkaConsumer, KafkaProducer, KafkaAdminClient);
    ``{}`` for PLAINTEXT."""
    check(settings)
    protocol = settings.kafka_security_protocol
    if protocol == "PLAINTEXT":
        return {}
    config: dict[str, Any] = {"security_protocol": protocol}
    if protocol in SASL_PROTOCOLS:
        config["sasl_mechanism"] = settings.kafka_sasl_mechanism
        # kafka-python's names for every username/password mechanism, SCRAM included.
        config["sasl_plain_username"] = settings.kafka_sasl_username
        config["sasl_plain_password"] = _secret(settings.kafka_sasl_password)
    if protocol in SSL_PROTOCOLS:
        config["ssl_check_hostname"] = settings.kafka_ssl_check_hostname
        optional = {
            "ssl_cafile": settings.kafka_ssl_cafile,
            "ssl_certfile": settings.kafka_ssl_certfile,
            "ssl_keyfile": settings.kafka_ssl_keyfile,
            "ssl_password": _secret(settings.kafka_ssl_key_password),
        }
        config.update({k: str(v) for k, v in optional.items() if v is not None})
    return config
