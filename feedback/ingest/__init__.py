"""The feedback ingestor: Kafka (interactions, feedback, policy health) → Postgres, exactly
once in effect.

* :mod:`feedback.ingest.consumer`: the consume → store → commit loop (:class:`Ingestor`);
* :mod:`feedback.ingest.writer`: one batch of events → Postgres in one transaction;
* :mod:`feedback.ingest.dead_letters`: what the loop keeps of a message it could not store.
"""
