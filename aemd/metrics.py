"""The node's Prometheus metrics, served at ``/metrics`` of the HTTP API.

Each :class:`Metrics` has its own ``CollectorRegistry`` (never
prometheus-client's global one), so several nodes in one process (tests,
benchmarks) keep separate counts. The node holds one as ``node.metrics``;
other code only increments its named counters, one line each, e.g.
``node.metrics.tasks_served.inc()``.

Counters only ever grow while the process runs (they restart at 0 with the
node, as Prometheus expects). Gauges that describe the node's current state
(peers, log entries, sync lag) are set by :meth:`Metrics.refresh` just before
each scrape, from the node itself, so they cost nothing between scrapes.

Names (all prefixed ``aem_``):

| metric | type | what |
|---|---|---|
| ``aem_peers`` | gauge | connected libp2p peers |
| ``aem_cards_known``, ``aem_ads_known`` | gauge | valid NodeCards / HostAdvertisements in the mesh table |
| ``aem_gossip_messages_in_total{topic}`` | counter | gossip messages received on cards, ads, heads (after validation) |
| ``aem_gossip_messages_out_total{topic}`` | counter | gossip messages this node published |
| ``aem_gossip_messages_refused_total{topic}`` | counter | gossip messages this node's validators refused |
| ``aem_log_entries`` | gauge | entries in the node's log store (every author) |
| ``aem_sync_sessions_total`` | counter | successful log sync sessions (pulls from a peer) |
| ``aem_sync_entries_added_total`` | counter | entries those sessions added |
| ``aem_sync_last_success_timestamp_seconds`` | gauge | Unix time of the last successful sync session (0: none yet) |
| ``aem_sync_lag_seconds`` | gauge | seconds since that session (-1: none yet); the sync lag |
| ``aem_tasks_served_total`` | counter | tasks this node executed as host and answered with a receipt |
| ``aem_tasks_failed_total`` | counter | tasks this node accepted as host that ended without a receipt |
| ``aem_tasks_refused_total`` | counter | task requests this node refused before any work |
| ``aem_tasks_routed_total{outcome}`` | counter | tasks this node submitted as payer, by outcome (ok, all_failed) |
| ``aem_tokens_generated_total`` | counter | tokens generated for tasks this node served |
| ``aem_credits_earned_total`` | counter | credits charged on receipts this node signed as host (pending until settled) |
| ``aem_replay_seconds`` | histogram | time of each ledger replay the node ran |
"""

from __future__ import annotations

import time
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST
TOPICS = ("cards", "ads", "heads")
# Replays run incrementally from a checkpoint: milliseconds normally, a
# second or more for a fresh replay of a large log.
REPLAY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
MICRO = 1_000_000


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.peers = Gauge("aem_peers", "Connected libp2p peers", registry=r)
        self.cards_known = Gauge("aem_cards_known", "Valid NodeCards in the mesh table", registry=r)
        self.ads_known = Gauge("aem_ads_known", "Valid HostAdvertisements in the mesh table", registry=r)
        self.gossip_in = Counter("aem_gossip_messages_in", "Gossip messages received and accepted",
                                 ["topic"], registry=r)
        self.gossip_out = Counter("aem_gossip_messages_out", "Gossip messages published", ["topic"], registry=r)
        self.gossip_refused = Counter("aem_gossip_messages_refused", "Gossip messages refused by validation",
                                      ["topic"], registry=r)
        for t in TOPICS:   # every series exists from the start, at 0
            self.gossip_in.labels(t)
            self.gossip_out.labels(t)
            self.gossip_refused.labels(t)
        self.log_entries = Gauge("aem_log_entries", "Entries in the log store", registry=r)
        self.sync_sessions = Counter("aem_sync_sessions", "Successful log sync sessions", registry=r)
        self.sync_entries_added = Counter("aem_sync_entries_added", "Log entries added by sync", registry=r)
        self.sync_last_success = Gauge("aem_sync_last_success_timestamp_seconds",
                                       "Unix time of the last successful sync session (0: none)", registry=r)
        self.sync_lag = Gauge("aem_sync_lag_seconds",
                              "Seconds since the last successful sync session (-1: none yet)", registry=r)
        self.tasks_served = Counter("aem_tasks_served", "Tasks executed as host, answered with a receipt",
                                    registry=r)
        self.tasks_failed = Counter("aem_tasks_failed", "Tasks accepted as host that ended without a receipt",
                                    registry=r)
        self.tasks_refused = Counter("aem_tasks_refused", "Task requests refused before any work", registry=r)
        self.tasks_routed = Counter("aem_tasks_routed", "Tasks submitted as payer, by outcome", ["outcome"],
                                    registry=r)
        for o in ("ok", "all_failed"):
            self.tasks_routed.labels(o)
        self.tokens_generated = Counter("aem_tokens_generated", "Tokens generated for served tasks", registry=r)
        self.credits_earned = Counter("aem_credits_earned",
                                      "Credits charged on receipts signed as host (pending until settled)",
                                      registry=r)
        self._last_sync = 0.0
        self.replay_seconds = Histogram("aem_replay_seconds", "Ledger replay time", buckets=REPLAY_BUCKETS,
                                        registry=r)

    # -- one-line hooks for the code that does the work ----------------------------

    def task_served(self, tokens: int, charge_micro: int) -> None:
        self.tasks_served.inc()
        self.tokens_generated.inc(max(0, tokens))
        self.credits_earned.inc(max(0, charge_micro) / MICRO)

    def synced(self, added: int) -> None:
        self.sync_sessions.inc()
        self.sync_entries_added.inc(max(0, added))
        self._last_sync = time.time()
        self.sync_last_success.set(self._last_sync)

    def watch_validators(self, validators: dict[str, Callable[[str, bytes], bool]],
                         names: dict[str, str]) -> dict[str, Callable[[str, bytes], bool]]:
        """The same topic validators, counting what each refuses under the
        topic's short name (``names``: topic -> cards/ads/heads)."""
        def wrap(name: str, fn: Callable[[str, bytes], bool]) -> Callable[[str, bytes], bool]:
            counter = self.gossip_refused.labels(name)

            def validate(peer: str, data: bytes) -> bool:
                ok = fn(peer, data)
                if not ok:
                    counter.inc()
                return ok
            return validate
        return {t: wrap(names.get(t, "other"), fn) for t, fn in validators.items()}

    # -- scraping -------------------------------------------------------------------

    def refresh(self, *, peers: int, cards: int, ads: int, log_entries: int, now: float) -> None:
        self.peers.set(peers)
        self.cards_known.set(cards)
        self.ads_known.set(ads)
        self.log_entries.set(log_entries)
        last = self._last_sync
        self.sync_lag.set(max(0.0, now - last) if last > 0 else -1)

    def render(self) -> bytes:
        return generate_latest(self.registry)
