"""Kafka topic names. One place, so producers and consumers never disagree."""

INTERACTIONS = "alignloop.interactions"
"""One `InteractionLogged` event per chat completion, keyed by response id."""

FEEDBACK = "alignloop.feedback"
"""Thumbs and preference events, keyed by the response id they rate."""

DEAD_LETTER = "alignloop.dead-letter"
"""Messages a consumer could not parse or validate, with the reason."""

POLICY = "alignloop.policy"
"""Policy lifecycle events (candidates registered, promotions, rollbacks)."""
