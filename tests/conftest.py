import contextlib
import os

import pytest

# Nothing in the tests may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def chains(tmp_path_factory):
    """The tiny three-stage chain, trained once per session into SQLite and into an MLflow server on a fresh
    PostgreSQL database (see tests/support/chain.py). The server stops when the session ends."""
    from .support.chain import build_base, train_chains
    from .support.servers import fresh_postgres_database, mlflow_server

    root = tmp_path_factory.mktemp("chain")
    base = build_base(root / "base")
    with contextlib.ExitStack() as stack:
        db = stack.enter_context(fresh_postgres_database("motus_chain"))
        url = stack.enter_context(mlflow_server(db, root / "pg-artifacts"))
        yield train_chains(base, {"sqlite": (f"sqlite:///{root}/sqlite/mlflow.db", root / "sqlite"),
                                  "postgres": (url, root / "postgres")})
