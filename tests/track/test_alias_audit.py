"""The production profile's MLflow server: the basic-auth app, where only the platform's service account may move
a registered model's aliases (infra/services/mlflow.yaml). A real `mlflow server --app-name basic-auth` on
127.0.0.1 (SQLite backend and user store in tmp_path): the service account judges and promotes through the
platform's Registry; a human account, created through the auth REST API, reads the audited champion but gets
PERMISSION_DENIED when it moves the alias with the raw MLflow client."""

import base64
import json
import urllib.request

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from motus.config import Gate
from motus.config import Rule as RuleModel
from motus.contracts import mask_secrets
from motus.track.registry import Registry

from ..support.servers import mlflow_server

pytestmark = pytest.mark.slow

SERVICE, SERVICE_PW = "motus-platform", "service-account-password-1"
HUMAN, HUMAN_PW = "alice", "alice-password-123"
MODEL = "motus-auth-test"


def as_user(monkeypatch, user: str, password: str) -> None:
    """The credentials MLflow's client sends (it reads them from the environment on every request)."""
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)


def create_user(url: str, user: str, password: str) -> dict:
    """A human account through the auth REST API, as the admin (the service account) does it."""
    basic = base64.b64encode(f"{SERVICE}:{SERVICE_PW}".encode()).decode()
    req = urllib.request.Request(f"{url}/api/2.0/mlflow/users/create", method="POST",
                                 data=json.dumps({"username": user, "password": password}).encode(),
                                 headers={"Content-Type": "application/json", "Authorization": f"Basic {basic}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())["user"]


def test_only_the_service_account_moves_aliases_on_the_basic_auth_server(tmp_path, monkeypatch):
    # the ini as infra/services/mlflow.yaml mounts it (users in a database of their own), the admin from the env
    ini = tmp_path / "basic_auth.ini"
    ini.write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{tmp_path}/auth.db\n"
                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                   "auth_cache_ttl_seconds = 60\n")
    env = {"MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_AUTH_ADMIN_USERNAME": SERVICE,
           "MLFLOW_AUTH_ADMIN_PASSWORD": SERVICE_PW, "MLFLOW_FLASK_SERVER_SECRET_KEY": "csrf-key-of-this-test"}
    with mlflow_server(f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "artifacts", env=env,
                       app_name="basic-auth") as url:
        monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
        monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
        with pytest.raises(MlflowException, match="401"):  # nobody gets in without an account
            MlflowClient(url, url).search_registered_models()

        # the service account: a version with a passing verdict, promoted through the registry (lock, audit)
        as_user(monkeypatch, SERVICE, SERVICE_PW)
        service = MlflowClient(url, url)
        run = service.create_run(service.create_experiment("auth-test"))
        service.log_metric(run.info.run_id, "val/loss", 0.5)
        service.create_registered_model(MODEL)
        version = int(service.create_model_version(MODEL, f"{run.info.artifact_uri}/model", run.info.run_id).version)
        reg = Registry(url)
        gate = Gate(rules=[RuleModel(metric="val/loss", comparator="<=", threshold=1.0)])
        assert reg.verdicts.judge(reg.version(MODEL, version), gate, reg.champion(MODEL)).passed
        reg.champions.promote(MODEL, version, gate, actor="pipeline")
        assert reg.champion(MODEL).version == version
        assert [(e["action"], e["to"]) for e in reg.history(MODEL)] == [("promote", version)]

        # a human: reads everything (default_permission READ), the audited champion included
        assert create_user(url, HUMAN, HUMAN_PW)["is_admin"] is False
        as_user(monkeypatch, HUMAN, HUMAN_PW)
        human = MlflowClient(url, url)
        assert Registry(url).champion(MODEL).version == version
        # ... and cannot move or delete the alias behind the platform's back
        for move in (lambda: human.set_registered_model_alias(MODEL, "champion", str(version)),
                     lambda: human.delete_registered_model_alias(MODEL, "champion")):
            with pytest.raises(MlflowException) as denied:
                move()
            assert denied.value.error_code == "PERMISSION_DENIED" and "403" in str(denied.value)
        assert Registry(url).alias_states(MODEL)[0].verified

    # the credentials are masked wherever the platform prints, by the names MLflow reads them from
    text = f"user {SERVICE} password {SERVICE_PW} key csrf-key-of-this-test"
    masked = mask_secrets(text, {"MLFLOW_TRACKING_USERNAME": SERVICE, "MLFLOW_TRACKING_PASSWORD": SERVICE_PW,
                                 "MLFLOW_FLASK_SERVER_SECRET_KEY": "csrf-key-of-this-test"})
    assert masked == f"user {SERVICE} password *** key ***"
