"""Offline validation of what the platform sends to Kubernetes.

Three checks, each naming the offending field:

* core objects (Namespace, ServiceAccount, PVC, ConfigMap, Deployment, ...) against the Kubernetes OpenAPI
  schemas bundled with `kubernetes-validate`, in strict mode (unknown fields are errors);
* custom resources (PyTorchJob) against their CRD's ``openAPIV3Schema``. The API server *prunes* unknown
  fields of a structural schema silently; here every object with ``properties`` but no
  ``additionalProperties`` gets ``additionalProperties: false``, so a typo is an error instead of a field
  that quietly vanishes;
* the Training Operator's admission rules for PyTorchJobs, which the CRD schema cannot express: a container
  named ``pytorch`` in every replica, exactly one Master, only Master/Worker replicas, an elastic policy only
  with Workers, a DNS-1035 job name.

The PyTorchJob CRD (Training Operator v1.9) ships inside the package (``motus/launch/crds/``, gzipped), so an
installed wheel validates offline; ``MOTUS_PYTORCHJOB_CRD`` or an explicit path overrides it (plain or .gz);
against a live cluster, `crd_from_cluster` reads the installed one.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

DEFAULT_PYTORCHJOB_CRD = Path(__file__).resolve().parent / "crds" / "kubeflow.org_pytorchjobs.v1.9.yaml.gz"
CRD_ENV = "MOTUS_PYTORCHJOB_CRD"
KUBERNETES_VERSION = "1.30"  # the oldest API the manifests must work on (native sidecars are GA-on-by-default)
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


class ManifestError(ValueError):
    """A rendered object that Kubernetes or the Training Operator would reject; `problems` name each field."""

    def __init__(self, source: str, problems: list[str]):
        self.source, self.problems = source, problems
        super().__init__("\n".join(f"{source}: {p}" for p in problems))


@dataclass
class Verdict:
    """The outcome for one object: `problems` empty = valid; `checked_with` says what it was checked against."""

    kind: str
    name: str
    checked_with: str  # "nothing" = skipped: a custom resource whose CRD was not given
    problems: list[str]

    @property
    def skipped(self) -> bool:
        return self.checked_with == "nothing" and not self.problems

    @property
    def ok(self) -> bool:
        return not self.problems


# ------------------------------------------------------------------------------------------------ CRDs


def pytorchjob_crd_path(path: str | Path | None = None) -> Path:
    """The CRD file to validate PyTorchJobs against: explicit path, else $MOTUS_PYTORCHJOB_CRD, else the packaged one."""
    chosen = Path(path or os.environ.get(CRD_ENV) or DEFAULT_PYTORCHJOB_CRD)
    if not chosen.is_file():
        raise FileNotFoundError(
            f"PyTorchJob CRD not found: {chosen} (set {CRD_ENV} or pass --crd; on a cluster use --from-cluster)")
    return chosen


def _forbid_unknown(node: Any) -> Any:
    """Structural-schema pruning turned into errors: `additionalProperties: false` wherever a schema lists
    properties and says nothing about others (and does not ask to preserve unknown fields)."""
    if isinstance(node, dict):
        out = {k: _forbid_unknown(v) for k, v in node.items()}
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(node, list):
        return [_forbid_unknown(v) for v in node]
    return node


def crd_schemas(crd: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """`(apiVersion, kind) -> strict openAPIV3Schema` for every served version of a CRD object."""
    spec = crd.get("spec") or {}
    group, kind = spec.get("group"), (spec.get("names") or {}).get("kind")
    if crd.get("kind") != "CustomResourceDefinition" or not group or not kind:
        raise ValueError("not a CustomResourceDefinition (needs kind, spec.group, spec.names.kind)")
    out = {}
    for version in spec.get("versions") or []:
        schema = ((version.get("schema") or {}).get("openAPIV3Schema"))
        if schema and version.get("served", True):
            out[(f"{group}/{version['name']}", kind)] = _forbid_unknown(schema)
    return out


@lru_cache(maxsize=8)
def _crd_file_schemas(path: str) -> dict[tuple[str, str], dict[str, Any]]:
    schemas: dict[tuple[str, str], dict[str, Any]] = {}
    if path.endswith(".gz"):
        import gzip

        text = gzip.decompress(Path(path).read_bytes()).decode()
    else:
        text = Path(path).read_text()
    for doc in yaml.safe_load_all(text):
        if doc:
            schemas.update(crd_schemas(doc))
    return schemas


def load_crd_schemas(paths: Iterable[str | Path]) -> dict[tuple[str, str], dict[str, Any]]:
    schemas: dict[tuple[str, str], dict[str, Any]] = {}
    for p in paths:
        try:
            schemas.update(_crd_file_schemas(str(Path(p).resolve())))
        except (OSError, EOFError, yaml.YAMLError, ValueError) as e:
            raise ValueError(f"{p}: cannot read CRD: {e}") from None
    return schemas


def crd_from_cluster(api_client: Any, name: str = "pytorchjobs.kubeflow.org") -> dict[str, Any]:
    """The CRD installed in the cluster, as plain data (for `crd_schemas`)."""
    from kubernetes import client

    obj = client.ApiextensionsV1Api(api_client).read_custom_resource_definition(name)
    return api_client.sanitize_for_serialization(obj)


# ------------------------------------------------------------------------------------------ field paths


def _path(parts: Iterable[Any]) -> str:
    text = ""
    for p in parts:
        text += f"[{p}]" if isinstance(p, int) else (f".{p}" if text else str(p))
    return text or "(root)"


def _schema_problems(obj: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(schema)
    problems = []
    for err in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path))):
        where = _path(err.absolute_path)
        if err.validator == "additionalProperties":
            allowed = set(err.schema.get("properties") or {})
            extra = sorted(k for k in err.instance if k not in allowed)
            for k in extra:
                field = f"{where}.{k}" if err.absolute_path else k
                near = _closest(k, allowed)
                problems.append(f"{field}: unknown field" + (f" (did you mean '{near}'?)" if near else ""))
        else:
            problems.append(f"{where}: {err.message}")
    return problems


def _closest(word: str, choices: Iterable[str]) -> str | None:
    import difflib

    hit = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.75)
    return hit[0] if hit else None


# ------------------------------------------------------------------------------------ admission rules


def pytorchjob_admission_problems(job: dict[str, Any]) -> list[str]:
    """The Training Operator v1.9 webhook's rules for a PyTorchJob, as field-named problems."""
    problems = []
    name = (job.get("metadata") or {}).get("name", "")
    if not isinstance(name, str) or not _DNS1035.match(name) or len(name) > 63:
        problems.append(f"metadata.name: '{name}' is not a DNS-1035 label (lowercase letters, digits, '-', "
                        "starting with a letter, at most 63 characters)")
    spec = job.get("spec") or {}
    replicas = spec.get("pytorchReplicaSpecs") or {}
    if not isinstance(replicas, dict) or not replicas:
        return problems + ["spec.pytorchReplicaSpecs: must define a Master (and optionally Workers)"]
    for rtype, rspec in replicas.items():
        where = f"spec.pytorchReplicaSpecs.{rtype}"
        if rtype not in ("Master", "Worker"):
            problems.append(f"{where}: replica type must be Master or Worker")
        if not isinstance(rspec, dict):
            continue
        containers = (((rspec.get("template") or {}).get("spec") or {}).get("containers")) or []
        named = [c for c in containers if isinstance(c, dict) and c.get("name") == "pytorch"]
        if not named:
            problems.append(f"{where}.template.spec.containers: needs a container named 'pytorch'")
        elif not named[0].get("image"):
            problems.append(f"{where}.template.spec.containers[pytorch].image: required")
    master = replicas.get("Master")
    if not isinstance(master, dict):
        problems.append("spec.pytorchReplicaSpecs.Master: exactly one Master is required")
    elif master.get("replicas", 1) != 1:
        problems.append(f"spec.pytorchReplicaSpecs.Master.replicas: must be 1 (exactly one Master), "
                        f"got {master.get('replicas')}")
    elastic = spec.get("elasticPolicy")
    if elastic is not None:
        if "Worker" not in replicas:
            problems.append("spec.elasticPolicy: needs Worker replicas (an elastic job scales Workers)")
        lo, hi = elastic.get("minReplicas"), elastic.get("maxReplicas")
        if isinstance(lo, int) and isinstance(hi, int) and lo > hi:
            problems.append(f"spec.elasticPolicy.minReplicas: {lo} exceeds maxReplicas {hi}")
        if elastic.get("nProcPerNode") is not None and spec.get("nprocPerNode") is not None:
            problems.append("spec.elasticPolicy.nProcPerNode: set spec.nprocPerNode only (both are set)")
    return problems


# ----------------------------------------------------------------------------------------- validation


def validate_object(obj: Any, *, crd_schemas: dict[tuple[str, str], dict[str, Any]] | None = None,
                    kubernetes_version: str = KUBERNETES_VERSION) -> Verdict:
    """Validate one object; custom resources need their CRD's schema in `crd_schemas`."""
    if not isinstance(obj, dict) or not obj.get("kind") or not obj.get("apiVersion"):
        return Verdict("?", "?", "nothing", ["(root): not a Kubernetes object (needs apiVersion and kind)"])
    kind, api = obj["kind"], obj["apiVersion"]
    name = str((obj.get("metadata") or {}).get("name", "?"))
    schema = (crd_schemas or {}).get((api, kind))
    if schema is not None:
        problems = _schema_problems(obj, schema)
        if (api, kind) == ("kubeflow.org/v1", "PyTorchJob"):
            problems += pytorchjob_admission_problems(obj)
        return Verdict(kind, name, f"CRD schema {api} {kind}", problems)
    import kubernetes_validate

    try:
        version = kubernetes_validate.validate(obj, kubernetes_version, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        if "." in api.split("/")[0]:  # a custom resource (group with a domain): say it was not checked
            return Verdict(kind, name, "nothing", [])
        return Verdict(kind, name, "nothing", [f"(root): no schema for {api} {kind} in Kubernetes {kubernetes_version}"])
    except kubernetes_validate.ValidationError as e:
        return Verdict(kind, name, f"Kubernetes {kubernetes_version} (strict)", _core_problem(e))
    return Verdict(kind, name, f"Kubernetes {version} (strict)", [])


def _core_problem(e: Any) -> list[str]:
    # kubernetes-validate raises on the first error; re-express "Additional properties" with the field's path.
    where = _path(e.absolute_path)
    if e.validator == "additionalProperties":
        allowed = set(e.schema.get("properties") or {})
        extra = [k for k in e.instance if k not in allowed]
        return [f"{where + '.' if e.absolute_path else ''}{k}: unknown field" for k in extra] or [e.message]
    return [f"{where}: {e.message}"]


def validate_documents(docs: Iterable[Any], *, crd_paths: Iterable[str | Path] = (),
                       kubernetes_version: str = KUBERNETES_VERSION) -> list[Verdict]:
    """Validate every document; PyTorchJobs against the default CRD plus any `crd_paths` given."""
    docs = [d for d in docs if d is not None]
    paths = list(crd_paths)
    if any(isinstance(d, dict) and d.get("kind") == "PyTorchJob" for d in docs):
        paths = [pytorchjob_crd_path(), *paths]
    schemas = load_crd_schemas(paths)
    return [validate_object(d, crd_schemas=schemas, kubernetes_version=kubernetes_version) for d in docs]


def validate_pytorchjob(job: dict[str, Any], crd_path: str | Path | None = None) -> list[str]:
    """Problems with one PyTorchJob manifest (empty = valid): CRD schema (unknown fields rejected) + admission."""
    schemas = load_crd_schemas([pytorchjob_crd_path(crd_path)])
    return validate_object(copy.deepcopy(job), crd_schemas=schemas).problems
