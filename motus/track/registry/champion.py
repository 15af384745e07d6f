"""The aliases: `candidate` moves on every registration; `champion` only by `promote` (a passing verdict for
that exact version, judged against the champion that is still the champion, under the same gate policy and
evaluation run) or `rollback` (back to the champion before). Every move is appended to an audit trail kept as
registered-model tags `motus.audit.NNNNNN` (JSON: seq, at, action, alias, from, to, actor).

Inside the model's lock, `promote` re-reads the champion and refuses when it differs from the one the verdict
was judged against: of two promotions racing on verdicts judged against the same champion, the first to take
the lock wins and the other is refused ("the champion moved").
"""

from __future__ import annotations

import json
from typing import Any

from ..evaluations import EVALUATION_RUN_TAG
from ..gates import Verdict, gate_hash
from .lock import ModelLock
from .store import CHAMPION, ModelVersionRef, RegistryError, Store, default_actor, now
from .verdicts import VERDICT_JSON_TAG

AUDIT_PREFIX = "motus.audit."


class PromotionRefused(RegistryError):
    """A promotion its verdict does not allow; the message names the failed rule or the reason."""


class Champion:
    def __init__(self, store: Store, lock: ModelLock):
        self.store, self.lock = store, lock

    def current(self, name: str) -> ModelVersionRef | None:
        v = self.store.aliases(name).get(CHAMPION)
        return None if v is None else self.store.version(name, v)

    def history(self, name: str) -> list[dict[str, Any]]:
        """Every alias move of `name`, oldest first."""
        tags = self.store.registered(name).tags or {}
        entries = [json.loads(v) for k, v in tags.items() if k.startswith(AUDIT_PREFIX)]
        return sorted(entries, key=lambda e: e["seq"])

    def _audit(self, name: str, action: str, alias: str, old: int | None, new: int | None, actor: str,
               **extra: Any) -> dict[str, Any]:
        """Append one entry; callers hold the model's lock, so sequence numbers never collide."""
        seq = max((e["seq"] for e in self.history(name)), default=0) + 1
        entry = {"seq": seq, "at": now(), "action": action, "alias": alias, "from": old, "to": new,
                 "actor": actor, **extra}
        self.store.client.set_registered_model_tag(name, f"{AUDIT_PREFIX}{seq:06d}",
                                                   json.dumps(entry, sort_keys=True))
        return entry

    def move_alias(self, name: str, alias: str, version: int, action: str, actor: str, **extra: Any) -> None:
        """Point `alias` at `version` and audit it; the caller holds the model's lock."""
        old = self.store.aliases(name).get(alias)
        self.store.client.set_registered_model_alias(name, alias, str(version))
        self._audit(name, action, alias, old, version, actor, **extra)

    def promote(self, name: str, version: int | str, gate: Any, actor: str | None = None) -> None:
        """Move `champion` to this version; PromotionRefused (naming the rule or reason) unless its verdict,
        judged under `gate` (the policy in force now), allows."""
        actor = actor or default_actor()
        ref = self.store.version(name, version)
        with self.lock(name, actor):
            ref = self.store.version(name, version)  # tags as they are now, inside the lock
            text = ref.tags.get(VERDICT_JSON_TAG)
            if not text:
                raise PromotionRefused(f"{ref} has no verdict: run `motus registry evaluate {name} {ref.version}` "
                                       "first")
            verdict = Verdict.from_json(text)
            if verdict.name != name or verdict.version != ref.version:
                raise PromotionRefused(f"{ref}: its verdict is for {verdict.name} v{verdict.version}")
            if not verdict.passed:
                failed = "; ".join(f"{r.label}: {r.reason}" for r in verdict.failed_rules)
                raise PromotionRefused(f"{ref} failed its gate: {failed}")
            current = self.store.aliases(name).get(CHAMPION)
            if current == ref.version:
                return
            if current != verdict.champion_version:
                judged = "no champion" if verdict.champion_version is None else f"champion v{verdict.champion_version}"
                raise PromotionRefused(f"{ref}: the champion moved since its verdict (judged against {judged}, "
                                       f"the champion is now v{current}); evaluate it again")
            if verdict.gate_hash != gate_hash(gate):
                raise PromotionRefused(f"{ref}: the gate of '{name}' in params.yaml changed since its verdict; "
                                       "evaluate it again")
            if verdict.evaluation_run != ref.tags.get(EVALUATION_RUN_TAG):
                raise PromotionRefused(f"{ref}: its evaluation run changed since its verdict; evaluate it again")
            self.move_alias(name, CHAMPION, ref.version, "promote", actor, verdict_at=verdict.judged_at)

    def _stack(self, name: str) -> list[int]:
        """Champions in order, as promotions pushed them and rollbacks popped them."""
        stack: list[int] = []
        for e in self.history(name):
            if e.get("alias") != CHAMPION:
                continue
            if e["action"] == "rollback" and stack:
                stack.pop()
            elif e["action"] == "promote":
                stack.append(int(e["to"]))
        return stack

    def rollback(self, name: str, actor: str | None = None) -> ModelVersionRef:
        """Give `champion` back to the champion before the current one; returns it."""
        actor = actor or default_actor()
        self.store.registered(name)
        with self.lock(name, actor):
            current = self.store.aliases(name).get(CHAMPION)
            if current is None:
                raise RegistryError(f"'{name}' has no champion to roll back")
            stack = self._stack(name)
            if len(stack) < 2 or stack[-1] != current:
                raise RegistryError(f"'{name}': no previous champion recorded before v{current}")
            previous = self.store.version(name, stack[-2])
            self.move_alias(name, CHAMPION, previous.version, "rollback", actor)
            return previous
