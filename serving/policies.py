"""Which policy answers a request.

Issue scope today: one engine, one policy, the base model (version ``base``). The
routing table (stable/canary arms, adapters per version) plugs in here, so the chat
handler only ever asks "which version, and which adapter, serves this request?".
"""

from __future__ import annotations

from dataclasses import dataclass

from serving.engine import Adapter

BASE_VERSION = "base"


@dataclass(frozen=True)
class PolicyTarget:
    version: str
    adapter: Adapter | None  # None = the base weights, no adapter


class UnknownModel(LookupError):
    pass


class PolicyRouter:
    def __init__(self, served_model_name: str) -> None:
        self.served_model_name = served_model_name

    def model_names(self) -> list[str]:
        """What GET /v1/models lists: the routed name, then every servable version."""
        return [self.served_model_name, BASE_VERSION]

    def resolve(self, model: str, user_key: str | None) -> PolicyTarget:
        """The served name routes (today: always to base); a version name pins it."""
        if model in (self.served_model_name, BASE_VERSION):
            return PolicyTarget(BASE_VERSION, None)
        raise UnknownModel(model)
