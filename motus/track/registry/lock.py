"""The per-model mutex of the registry, on any MLflow store.

It uses only what every store makes atomic: creating a registered model fails when one with that name exists.
The lock is the registered model `<name>.lock` (tags: owner, acquired_at, heartbeat); releasing it deletes it.
While it holds the lock the holder refreshes `heartbeat` every `ttl / 3` seconds, so a lock is stale only when
its holder has stopped beating for `ttl` seconds (it died): the next contender breaks it (deletes it) with a
warning. A long critical section is never broken, and a dead holder costs its successors `ttl` seconds, not a
fixed minute. A lock whose tags are not visible yet (a holder between its create and its tags) is aged from its
creation time, never from the epoch. Known limit: two contenders breaking the same stale lock at the same
instant can both believe they hold it for one critical section; stale locks only exist after a crash.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
import time
from collections.abc import Iterator

from mlflow.exceptions import MlflowException

from .store import LOCK_SUFFIX, RegistryError, Store, default_actor, error_code

log = logging.getLogger(__name__)


class LockTimeout(RegistryError):
    """The model's lock stayed taken for longer than the registry waits."""

    # another holder (or a dead one whose heartbeat has not gone stale yet) is infrastructure, not the step's
    # fault: the pipeline tries the step again, once per distinct failure (`pipeline.errors.RetryGuard`)
    transient = True


class ModelLock:
    def __init__(self, store: Store, *, ttl: float = 15.0, wait: float = 60.0):
        self.store, self.ttl, self.wait = store, ttl, wait

    @contextlib.contextmanager
    def __call__(self, name: str, owner: str | None = None) -> Iterator[None]:
        client = self.store.client
        lock_name = name + LOCK_SUFFIX
        owner = f"{owner or default_actor()}#{secrets.token_hex(4)}"
        deadline = time.monotonic() + self.wait
        delay = 0.02
        while True:
            try:
                client.create_registered_model(
                    lock_name, tags={"motus.lock.owner": owner, "motus.lock.acquired_at": f"{time.time():.3f}"},
                    description=f"registry lock of {name}; deleted on release")
                break
            except MlflowException as e:
                # taken; or taken and released while the store answered: on a unique-name conflict MLflow's SQL
                # store re-reads the model to word its error, and the holder may have deleted it in between
                # (seen on PostgreSQL: "Registered Model with name=<name>.lock not found")
                if error_code(e) not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                    raise
            self._break_if_stale(lock_name)
            if time.monotonic() > deadline:
                raise LockTimeout(f"registry lock '{lock_name}' is still taken after {self.wait:.0f}s "
                                  f"(it is broken automatically when older than {self.ttl:.0f}s)")
            time.sleep(delay * (0.5 + secrets.randbelow(1000) / 1000))
            delay = min(delay * 2, 0.5)
        stop = threading.Event()
        beat = threading.Thread(target=self._beat, args=(lock_name, stop), daemon=True, name=f"lock-{name}")
        beat.start()
        try:
            yield
        finally:
            stop.set()
            beat.join()
            with contextlib.suppress(MlflowException):
                client.delete_registered_model(lock_name)

    def _beat(self, lock_name: str, stop: threading.Event) -> None:
        while not stop.wait(self.ttl / 3):
            try:
                self.store.client.set_registered_model_tag(lock_name, "motus.lock.heartbeat", f"{time.time():.3f}")
            except MlflowException as e:  # a broken lock (we were presumed dead) or a store hiccup: say so
                log.warning("could not refresh registry lock %s: %s", lock_name, e)

    def _break_if_stale(self, lock_name: str) -> None:
        try:
            rm = self.store.client.get_registered_model(lock_name)
        except MlflowException:
            return  # released in between
        tags = dict(rm.tags or {})
        # the holder's last sign of life: its heartbeat, else when it took the lock, else (tags not visible yet)
        # when the lock was created
        created = (getattr(rm, "creation_timestamp", None) or time.time() * 1000) / 1000
        try:
            last = float(tags.get("motus.lock.heartbeat") or tags.get("motus.lock.acquired_at") or created)
        except ValueError:
            last = created
        age = time.time() - last
        if age > self.ttl:
            log.warning("breaking stale registry lock %s held by %s for %.0fs", lock_name,
                        tags.get("motus.lock.owner", "?"), age)
            with contextlib.suppress(MlflowException):
                self.store.client.delete_registered_model(lock_name)
