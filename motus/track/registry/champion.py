"""The aliases: `candidate` moves on every registration; `champion` only by `promote` (a passing verdict for
that exact version, judged against the champion that is still the champion, under the same gate policy and
evaluation run) or `rollback` (back to the champion before). Every move is appended to an audit trail kept as
registered-model tags `motus.audit.NNNNNN` (JSON: seq, at, action, alias, from, to, actor).

Inside the model's lock, `promote` re-reads the champion and refuses when it differs from the one the verdict
was judged against: of two promotions racing on verdicts judged against the same champion, the first to take
the lock wins and the other is refused ("the champion moved").

The audit trail is also what an alias is trusted by. MLflow lets any client with write access move an alias
(`MlflowClient().set_registered_model_alias`), and such a move leaves no audit entry. Each alias's audited state
is the `to` of its last audit entry; an alias whose live version differs from it (set, moved or deleted
outside the platform) is *unverified*: `verified` refuses to hand it to a gate or a pipeline (`UnverifiedAlias`,
naming the fix), and `repair` puts the audited state back under the model's lock, with an audit entry of its
own. Production also closes the door itself (MLflow's basic-auth app: only the platform's service account may
change a registered model; see infra/services/mlflow.yaml); the check here is what catches what got through.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from ..evaluations import EVALUATION_RUN_TAG
from ..gates import Verdict, gate_hash
from .lock import ModelLock
from .store import CHAMPION, LOCK_SUFFIX, ModelVersionRef, RegistryError, Store, default_actor, now
from .verdicts import VERDICT_JSON_TAG

AUDIT_PREFIX = "motus.audit."


class PromotionRefused(RegistryError):
    """A promotion its verdict does not allow; the message names the failed rule or the reason."""


class UnverifiedAlias(RegistryError):
    """An alias whose live version is not the one its audit trail says (moved outside the platform)."""

    def __init__(self, name: str, state: AliasState):
        self.name, self.state = name, state
        super().__init__(f"'{name}': {state.describe()}; the platform will not use it. "
                         f"`motus registry verify {name} --repair` restores the audited state")


@dataclass(frozen=True)
class AliasState:
    """One alias of a model: the version MLflow has now (`live`) and the one its audit trail says (`audited`);
    None where there is none."""

    alias: str
    live: int | None
    audited: int | None

    @property
    def verified(self) -> bool:
        return self.live == self.audited

    def describe(self) -> str:
        audited = "none" if self.audited is None else f"v{self.audited}"
        if self.verified:
            return f"{self.alias} -> {audited} (audited)"
        if self.live is None:
            return f"UNVERIFIED: {self.alias} deleted outside the platform; audited: {audited}"
        return f"UNVERIFIED: {self.alias} -> v{self.live} set outside the platform; audited: {audited}"


def _entries(rm: Any) -> list[dict[str, Any]]:
    tags = rm.tags or {}
    return sorted((json.loads(v) for k, v in tags.items() if k.startswith(AUDIT_PREFIX)), key=lambda e: e["seq"])


def _states(rm: Any) -> list[AliasState]:
    """Every alias the model has now or its audit trail names, live against audited, by alias name."""
    live = {a: int(v) for a, v in (rm.aliases or {}).items()}
    audited: dict[str, int | None] = {}
    for e in _entries(rm):  # oldest first: the last entry of an alias wins
        audited[e["alias"]] = None if e.get("to") is None else int(e["to"])
    return [AliasState(a, live.get(a), audited.get(a)) for a in sorted(set(live) | set(audited))]


class Champion:
    def __init__(self, store: Store, lock: ModelLock):
        self.store, self.lock = store, lock

    def current(self, name: str) -> ModelVersionRef | None:
        """The champion, only when its audit trail agrees (UnverifiedAlias otherwise); None when there is none."""
        return self.verified(name, CHAMPION)

    def verified(self, name: str, alias: str) -> ModelVersionRef | None:
        """The version `alias` points at when that is what the audit trail says; UnverifiedAlias otherwise."""
        state = self.state(name, alias)
        if not state.verified:
            raise UnverifiedAlias(name, state)
        return None if state.live is None else self.store.version(name, state.live)

    def state(self, name: str, alias: str) -> AliasState:
        return next((s for s in self.states(name) if s.alias == alias), AliasState(alias, None, None))

    def states(self, name: str, *, settle: bool = True) -> list[AliasState]:
        """Live against audited, for every alias of `name`. A platform move sets the alias, then appends its
        entry, under the model's lock: a reader between the two would see a disagreement that is not one. So
        with `settle`, a disagreement seen while the lock is held is read again once the lock is released (or
        after twice the lock's ttl, when a dead holder's lock is stale); callers holding the lock pass False."""
        states = _states(self.store.registered(name))
        if not settle or all(s.verified for s in states) or not self._wait_for_lock(name):
            return states
        return _states(self.store.registered(name))

    def _wait_for_lock(self, name: str) -> bool:
        """Wait (reading only: a read-only account must be able to do it) while `<name>.lock` exists; whether
        it existed at all."""
        from mlflow.exceptions import MlflowException

        # a live holder's section takes seconds; a dead holder's lock is stale after ttl: never wait past that
        deadline, seen = time.monotonic() + min(self.lock.wait, 2 * self.lock.ttl), False
        while time.monotonic() < deadline:
            try:
                self.store.client.get_registered_model(name + LOCK_SUFFIX)
            except MlflowException:
                return seen
            seen = True
            time.sleep(0.1)
        return seen

    def history(self, name: str) -> list[dict[str, Any]]:
        """Every alias move of `name`, oldest first."""
        return _entries(self.store.registered(name))

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
            current = self._checked(name)
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

    def _checked(self, name: str) -> int | None:
        """The champion's version inside the lock, refused when unaudited: a promotion or rollback from a state
        nobody audited would record it as its `from` and make it look legitimate."""
        state = next((s for s in self.states(name, settle=False) if s.alias == CHAMPION),
                     AliasState(CHAMPION, None, None))
        if not state.verified:
            raise UnverifiedAlias(name, state)
        return state.live

    def repair(self, name: str, actor: str | None = None) -> list[dict[str, Any]]:
        """Put every unverified alias of `name` back to its audited state (moved back, or deleted where the audit
        has none), each with an audit entry `repair` naming what was found; the entries, none when all agreed."""
        actor = actor or default_actor()
        self.store.registered(name)
        done = []
        with self.lock(name, actor):
            for s in self.states(name, settle=False):
                if s.verified:
                    continue
                if s.audited is None:
                    self.store.client.delete_registered_model_alias(name, s.alias)
                else:
                    self.store.version(name, s.audited)  # a deleted version cannot be restored: said by name
                    self.store.client.set_registered_model_alias(name, s.alias, str(s.audited))
                done.append(self._audit(name, "repair", s.alias, s.live, s.audited, actor, found=s.describe()))
        return done

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
            current = self._checked(name)
            if current is None:
                raise RegistryError(f"'{name}' has no champion to roll back")
            stack = self._stack(name)
            if len(stack) < 2 or stack[-1] != current:
                raise RegistryError(f"'{name}': no previous champion recorded before v{current}")
            previous = self.store.version(name, stack[-2])
            self.move_alias(name, CHAMPION, previous.version, "rollback", actor)
            return previous
