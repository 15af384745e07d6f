import contextlib
import hashlib
import os
import shutil
import sys
import tempfile

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


# ------------------------------------------------------------------------------------ parallel runs (xdist)
#
# `make test` runs the suite on several xdist workers with `--dist loadgroup`. Tests that share an expensive
# fixture (anything of this suite wider than one test: the session's trained chain, a module's trained project,
# the package's stage-job project, the wheelhouse bundle) must run on one worker, or each worker builds it
# again. The groups are derived, not hand-kept: tests that share any such fixture instance, directly or through
# another fixture, are joined into one group, in collection order (order-dependent tests stay in order).

TESTS = os.path.dirname(os.path.abspath(__file__))


def pytest_configure(config):
    """On an xdist worker: one compute thread per process (the worker's torch and every job it starts). Several
    workers share the cores; OpenMP pools sized for the whole machine then spin against each other (measured on
    2 cores, 3 workers: a 10 s in-process training test took 225 s).

    Every session (each xdist worker is one) forks its tests' training jobs from warm runners of its own
    (motus.launch.runner, the default for local CPU jobs), kept in a folder that `pytest_unconfigure` stops and
    removes. Set here rather than by a fixture: an autouse session fixture would join every test into one xdist
    group."""
    if hasattr(config, "workerinput"):
        os.environ["OMP_NUM_THREADS"] = "1"
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(1)
    if not hasattr(config, "workerinput") and config.getoption("numprocesses", None):
        return  # the xdist controller runs no tests
    config._motus_runners = tempfile.mkdtemp(prefix="mr")  # short: a socket path has 107 bytes
    os.environ["MOTUS_RUNNER_DIR"] = config._motus_runners


def pytest_unconfigure(config):
    folder = getattr(config, "_motus_runners", None)
    if folder:
        from motus.launch.runner import Runners

        Runners(folder).stop()
        shutil.rmtree(folder, ignore_errors=True)


def _shared_fixtures(item) -> list[str]:
    """Keys of the suite's own non-function-scoped fixture instances this test uses."""
    keys = []
    for name in item.fixturenames:
        for fixturedef in item._fixtureinfo.name2fixturedefs.get(name, ()):
            source = os.path.abspath(fixturedef.func.__code__.co_filename)
            if fixturedef.scope == "function" or not source.startswith(TESTS):
                continue
            where = {"session": "", "package": os.path.dirname(source), "module": str(item.path),
                     "class": item.nodeid.rsplit("::", 1)[0]}[fixturedef.scope]
            keys.append(f"{name}@{where}")
    return keys


def xdist_groups(items) -> dict[str, str]:
    """nodeid -> group name, for the tests that share a fixture instance with another test."""
    parent: dict[str, str] = {}

    def root(k: str) -> str:
        while parent.setdefault(k, k) != k:
            k = parent[k]
        return k

    shared = {item.nodeid: _shared_fixtures(item) for item in items}
    for keys in shared.values():
        for k in keys[1:]:
            parent[root(k)] = root(keys[0])
    # a name every worker computes alike (workers must collect identical ids; str hashes are salted per process)
    return {nodeid: f"{root(keys[0]).split('@')[0]}-{hashlib.sha1(root(keys[0]).encode()).hexdigest()[:8]}"
            for nodeid, keys in shared.items() if keys}


# The end-to-end pipeline runs are the suite's longest single units (measured: the spine ~470 s, the production
# profile ~120 s) and have nothing to share. Left to xdist's size order they come after every multi-test group,
# and its prefetch of two units per worker queued the production profile behind a long group: it ran alone in
# the suite's last two minutes. `make test` passes --no-loadscope-reorder and this order instead: tests/e2e
# first, then the groups by size, largest first, as xdist would.
FIRST = ("tests/e2e/",)


def scheduling_order(items, groups: dict[str, str]) -> list:
    units: dict[str, list] = {}
    for item in items:
        units.setdefault(groups.get(item.nodeid, item.nodeid), []).append(item)
    ranked = sorted(enumerate(units.values()),
                    key=lambda iu: (not iu[1][0].nodeid.startswith(FIRST), -len(iu[1]), iu[0]))
    return [item for _, unit in ranked for item in unit]


# Critical paths first: the spine alone was most of the suite's wall time when it shared the cores evenly
# (measured on 2 cores, 4 workers: 810 s of a 901 s run), and with the spine ahead the session's trained chain and
# its readers became the tail (380 s of set-up). A worker lowers its own priority before its first test that is
# neither in tests/e2e nor a reader of the chain (a process may always lower its own), so those units, scheduled
# first, get the cores they ask for and the other workers fill the rest; jobs and servers a worker starts
# inherit its priority.
BACKGROUND_NICE = 10


def on_critical_path(item) -> bool:
    return item.nodeid.startswith(FIRST) or "chains" in item.fixturenames


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    config = item.config
    if (hasattr(config, "workerinput") and config.getvalue("loadgroup") and not on_critical_path(item)
            and not getattr(config, "_motus_background", False)):
        config._motus_background = True
        os.nice(BACKGROUND_NICE)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """On an xdist worker with `--dist loadgroup`: suffix each grouped test's id with `@<group>`, which is how
    xdist's scheduler reads groups. Written here rather than through `xdist_group` marks because pytest-xdist 3.8
    writes the suffix to `_nodeid` while pytest >= 9.2 reads a node's id from `_id`, so marks alone are silently
    ignored (measured: one group of 7 tests spread over 3 workers)."""
    if not (hasattr(config, "workerinput") and config.getvalue("loadgroup")):
        return
    groups = xdist_groups(items)
    if not config.getoption("loadscopereorder", True):
        items[:] = scheduling_order(items, groups)
    for item in items:
        group = groups.get(item.nodeid)
        if group is None or "@" in item.nodeid:
            continue
        if hasattr(item, "_id"):
            from _pytest.nodeid import NodeId

            item._id = NodeId.parse(f"{item.nodeid}@{group}")
        else:  # pytest < 9.2
            item._nodeid = f"{item.nodeid}@{group}"
