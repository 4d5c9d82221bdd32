"""schemas/kafka_config.py: the settings' Kafka security as each client library spells it.

The mapping is checked for both libraries against the libraries themselves: every
kafka-python name is a configuration key of KafkaConsumer, KafkaProducer and
KafkaAdminClient, and librdkafka accepts the confluent properties (it refuses unknown ones
and loads the CA, certificate and key files when a producer is made). The files are a real
CA and client certificate made here."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from confluent_kafka import KafkaException, Producer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from kafka import KafkaConsumer, KafkaProducer
from kafka.admin import KafkaAdminClient

from schemas.kafka_config import check, confluent_config, kafka_python_config
from schemas.settings import Settings


def _settings(**values: object) -> Settings:
    """Settings of these values and the defaults (model_validate reads no environment)."""
    return Settings.model_validate(values)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA (PEM) and a client certificate it signed, with an encrypted key."""
    where = tmp_path_factory.mktemp("pki")
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "alignloop test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ingestor")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(ca_key, hashes.SHA256())
    )
    files = {"ca": where / "ca.pem", "cert": where / "client.pem", "key": where / "client.key"}
    files["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files["key"].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"key-pass"),
        )
    )
    return files


def test_plaintext_maps_to_nothing() -> None:
    settings = _settings()
    assert settings.kafka_security_protocol == "PLAINTEXT"
    assert confluent_config(settings) == {} and kafka_python_config(settings) == {}


def test_sasl_ssl_with_mutual_tls_for_both_libraries(pki: dict[str, Path]) -> None:
    settings = _settings(
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username="ingestor",
        kafka_sasl_password="pa55",
        kafka_ssl_cafile=pki["ca"],
        kafka_ssl_certfile=pki["cert"],
        kafka_ssl_keyfile=pki["key"],
        kafka_ssl_key_password="key-pass",
    )
    assert confluent_config(settings) == {
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "ingestor",
        "sasl.password": "pa55",
        "ssl.endpoint.identification.algorithm": "https",
        "ssl.ca.location": str(pki["ca"]),
        "ssl.certificate.location": str(pki["cert"]),
        "ssl.key.location": str(pki["key"]),
        "ssl.key.password": "key-pass",
    }
    assert kafka_python_config(settings) == {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "ingestor",
        "sasl_plain_password": "pa55",
        "ssl_check_hostname": True,
        "ssl_cafile": str(pki["ca"]),
        "ssl_certfile": str(pki["cert"]),
        "ssl_keyfile": str(pki["key"]),
        "ssl_password": "key-pass",
    }


def test_tls_only_and_sasl_only() -> None:
    tls = _settings(kafka_security_protocol="SSL", kafka_ssl_check_hostname=False)
    assert confluent_config(tls) == {
        "security.protocol": "SSL",
        "ssl.endpoint.identification.algorithm": "none",
    }  # no CA file: librdkafka's and the system's trust store
    assert kafka_python_config(tls) == {"security_protocol": "SSL", "ssl_check_hostname": False}
    sasl = _settings(
        kafka_security_protocol="SASL_PLAINTEXT",
        kafka_sasl_mechanism="PLAIN",
        kafka_sasl_username="u",
        kafka_sasl_password="p",
    )
    assert set(confluent_config(sasl)) == {
        "security.protocol", "sasl.mechanism", "sasl.username", "sasl.password",
    }  # fmt: skip
    assert set(kafka_python_config(sasl)) == {
        "security_protocol", "sasl_mechanism", "sasl_plain_username", "sasl_plain_password",
    }  # fmt: skip


def test_every_kafka_python_name_is_a_client_setting(pki: dict[str, Path]) -> None:
    settings = _settings(
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="PLAIN",
        kafka_sasl_username="u",
        kafka_sasl_password="p",
        kafka_ssl_cafile=pki["ca"],
        kafka_ssl_certfile=pki["cert"],
        kafka_ssl_keyfile=pki["key"],
        kafka_ssl_key_password="key-pass",
    )
    names = set(kafka_python_config(settings))
    for client in (KafkaConsumer, KafkaProducer, KafkaAdminClient):
        assert names <= set(client.DEFAULT_CONFIG), (
            client.__name__,
            names - set(client.DEFAULT_CONFIG),
        )


def test_librdkafka_accepts_the_properties_and_loads_the_files(pki: dict[str, Path]) -> None:
    settings = _settings(
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-256",
        kafka_sasl_username="serving",
        kafka_sasl_password="p",
        kafka_ssl_cafile=pki["ca"],
        kafka_ssl_certfile=pki["cert"],
        kafka_ssl_keyfile=pki["key"],
        kafka_ssl_key_password="key-pass",
    )
    producer = Producer({"bootstrap.servers": "127.0.0.1:1", **confluent_config(settings)})
    assert producer.flush(0) == 0
    wrong = _settings(
        kafka_security_protocol="SSL",
        kafka_ssl_certfile=pki["cert"],
        kafka_ssl_keyfile=pki["key"],
        kafka_ssl_key_password="not-the-pass",
    )
    with pytest.raises(KafkaException, match=r"ssl\.key"):  # the key is really opened
        Producer({"bootstrap.servers": "127.0.0.1:1", **confluent_config(wrong)})


@pytest.mark.parametrize(
    ("values", "needle"),
    [
        ({"kafka_security_protocol": "SASL_SSL"}, "ALIGNLOOP_KAFKA_SASL_MECHANISM is required"),
        (
            {"kafka_security_protocol": "SASL_PLAINTEXT", "kafka_sasl_mechanism": "PLAIN",
             "kafka_sasl_username": "u"},
            "ALIGNLOOP_KAFKA_SASL_PASSWORD is required",
        ),
        (
            {"kafka_security_protocol": "SSL", "kafka_ssl_keyfile": "/k.pem"},
            "KEYFILE needs ALIGNLOOP_KAFKA_SSL_CERTFILE",
        ),
        ({"kafka_ssl_cafile": "/ca.pem"}, "PLAINTEXT uses no TLS"),
    ],
    ids=["sasl-without-mechanism", "sasl-without-password", "key-without-cert", "ca-plaintext"],
)  # fmt: skip
def test_contradictions_are_named(values: dict, needle: str) -> None:
    settings = _settings(**values)
    with pytest.raises(ValueError, match=needle):
        check(settings)
    with pytest.raises(ValueError, match=needle):
        confluent_config(settings)
    with pytest.raises(ValueError, match=needle):
        kafka_python_config(settings)


def test_unknown_protocols_and_mechanisms_are_refused_by_the_settings() -> None:
    with pytest.raises(ValueError, match="kafka_security_protocol"):
        _settings(kafka_security_protocol="TLS")
    with pytest.raises(ValueError, match="kafka_sasl_mechanism"):
        _settings(kafka_sasl_mechanism="GSSAPI")
