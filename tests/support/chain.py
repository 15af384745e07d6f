"""One trained tiny chain for every test that only reads one: Stage 1, the latent-action VAE and its
latent actions, Stage 2, and two Stage 3 fine-tunes (two learning rates), trained for real by the `motus` CLI
into a store. The registry tests need it in two stores (SQLite, and an MLflow server on PostgreSQL); the
evaluation tests read the SQLite one. Both are trained once per test session, in parallel.

Consumers that write to a store (register, tag, promote) get their own copy of the SQLite database as it was
right after training (`Chain.fresh_uri`), so no test sees another's registrations.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

from .project import MOTUS, loosen_gates, project_env, shipped_params, write_project

STAGE3 = "motus-aloha"
RUNS = ("s1", "lam", "s2", "s3a", "s3b")


def motus(proj: Path, uri: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([str(MOTUS), *args], cwd=proj, env=project_env(proj, uri), capture_output=True, text=True,
                       timeout=900)
    if check:
        assert r.returncode == 0, f"motus {' '.join(args)}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def chain_params() -> dict:
    """Three small ALOHA tiers, 2-step stages; Stage 3 on both target tiers (the evaluation runs both tasks)."""
    raw = shipped_params()
    keep = {"task-agnostic-aloha": 3, "target-aloha-transfer": 3, "target-aloha-insertion": 2}
    raw["tiers"] = {k: v for k, v in raw["tiers"].items() if k in keep}
    for k, n in keep.items():
        raw["tiers"][k]["source"]["options"]["n"] = n
    raw["tiers"]["target-aloha-insertion"]["source"]["options"]["max_steps"] = 160
    raw["stages"]["stage1"]["tiers"] = {"task-agnostic-aloha": 1.0}
    raw["stages"]["stage2"]["tiers"] = {"task-agnostic-aloha": 0.5, "target-aloha-transfer": 0.5}
    raw["stages"]["stage3"]["tiers"] = {"target-aloha-transfer": 0.5, "target-aloha-insertion": 0.5}
    for s in raw["stages"].values():
        s.update(steps=2, batch_size=2, checkpoint_every=2, validate_every=2, warmup_steps=0)
    raw["latent_action"].update(steps=2, batch_size=8, checkpoint_every=2, validate_every=2, warmup_steps=0)
    loosen_gates(raw)
    # the registry tests' gate: a loose threshold on what training logs, a regression rule on what evaluation logs
    raw["gates"][STAGE3] = {"rules": [{"metric": "val/action_loss", "comparator": "<=", "threshold": 100.0},
                                      {"metric": "eval/success_rate", "comparator": ">=", "max_regression": 0.05}],
                            "required_tags": ["code.commit"]}
    return raw


def build_base(root: Path) -> Path:
    """The chain's project before any training: params (and the second fine-tune's), tiers, optical flow."""
    raw = chain_params()
    write_project(root, raw)
    alt = json.loads(json.dumps(raw))
    alt["stages"]["stage3"]["lr"] = 2e-3  # the second fine-tune: another recipe, another export
    (root / "params-b.yaml").write_text(__import__("yaml").safe_dump(alt, sort_keys=False))
    motus(root, f"sqlite:///{root}/unused.db", "latent-action", "flow")
    return root


def train_chain(base: Path, proj: Path, uri: str) -> dict[str, Path]:
    """Every job of the chain against `uri`, in a copy of the base project; returns the run folders."""
    shutil.copytree(base, proj, ignore=shutil.ignore_patterns("*.db", "mlartifacts"))
    runs = {k: proj / "runs" / k for k in RUNS}
    motus(proj, uri, "train", "--stage", "1", "--run-dir", str(runs["s1"]))
    motus(proj, uri, "latent-action", "train", "--run-dir", str(runs["lam"]))
    motus(proj, uri, "latent-action", "export", "--model", str(runs["lam"] / "export"))
    motus(proj, uri, "train", "--stage", "2", "--run-dir", str(runs["s2"]), "--init-from", str(runs["s1"] / "export"))
    for key, params in (("s3a", "params.yaml"), ("s3b", "params-b.yaml")):
        motus(proj, uri, "train", "--stage", "3", "--params", params, "--run-dir", str(runs[key]),
              "--init-from", str(runs["s2"] / "export"))
    return runs


@dataclass
class Chain:
    kind: str  # sqlite | postgres
    uri: str
    proj: Path
    runs: dict[str, Path]
    pristine: Path | None = None  # the SQLite database right after training

    def fresh_uri(self, folder: Path) -> str:
        """A store of its own for one consumer: the trained database copied (SQLite), or the server (PostgreSQL,
        whose consumers must not depend on each other's writes)."""
        if self.pristine is None:
            return self.uri
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(self.pristine, folder / "mlflow.db")
        return f"sqlite:///{folder}/mlflow.db"


def train_chains(base: Path, plan: dict[str, tuple[str, Path]]) -> dict[str, Chain]:
    """Train the chain into every store of `plan` ({kind: (uri, project folder)}) at once: the jobs are mostly
    single-threaded Python, so two chains share the two cores well."""
    results: dict[str, dict[str, Path]] = {}
    errors: list[BaseException] = []

    def build(kind: str, uri: str, proj: Path) -> None:
        try:
            results[kind] = train_chain(base, proj, uri)
        except BaseException as e:  # noqa: BLE001 - re-raised below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=build, args=(k, u, p)) for k, (u, p) in plan.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    chains = {}
    for kind, (uri, proj) in plan.items():
        pristine = None
        if uri.startswith("sqlite:///"):
            db = Path(uri.removeprefix("sqlite:///"))
            pristine = db.with_name("pristine.db")
            shutil.copy(db, pristine)
        chains[kind] = Chain(kind, uri, proj, results[kind], pristine)
    return chains
