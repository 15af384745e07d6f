"""Gates: a registered model's promotion policy (`params.gates[model]`) judged into a recorded verdict.

A verdict is for one exact version and says, rule by rule, what value was seen, what it was compared with
(the threshold and/or the champion's value) and why it passed or failed. It also records which champion it
was judged against: a verdict is only good for promotion while that champion is still the champion.

`judge` is pure (metrics in, verdict out); reading metrics from MLflow and storing the verdict is the
registry's job (`motus.track.registry`).

Rule semantics (the comparator says in which direction the metric is good):
- `threshold`: `value <comparator> threshold`.
- `max_regression`: not worse than the champion's value by more than this: for `<=`/`<` (lower is better)
  `value <= champion + max_regression`, for `>=`/`>` `value >= champion - max_regression`. With no champion
  (the first promotion), or a champion that never logged the metric, there is nothing to regress from: the
  part passes and the reason says so.
- a metric the candidate never logged, or a NaN, fails the rule.
- every `required_tags` entry must be a tag of the version's training run (or of the version).
"""

from __future__ import annotations

import hashlib
import json
import math
import operator
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

_COMPARE = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}
LOWER_IS_BETTER = ("<=", "<")


class GateError(ValueError):
    """A model without a gate, or a gate that cannot be judged."""


@dataclass(frozen=True)
class RuleResult:
    """One rule (or one required tag) judged: what was seen, against what, and why it passed or failed."""

    metric: str  # the metric key, or `tag:<name>` for a required tag
    comparator: str | None
    threshold: float | None
    max_regression: float | None
    value: float | None
    champion_value: float | None
    passed: bool
    reason: str
    # a rule relative to another metric: its name and the bound it gave; a statistical rule on a rate: the
    # episodes, successes and confidence interval it judged (None for other rules, and in older verdicts)
    relative_to: str | None = None
    bound: float | None = None
    n: int | None = None
    k: int | None = None
    interval: tuple[float, float] | None = None

    @property
    def label(self) -> str:
        if self.metric.startswith("tag:"):
            return f"required tag {self.metric[4:]}"
        bounds = []
        if self.threshold is not None:
            bounds.append(f"{self.comparator} {self.threshold:g}")
        if self.relative_to is not None:
            bounds.append(f"{self.comparator} a bound from {self.relative_to}"
                          + ("" if self.bound is None else f" ({self.bound:.6g})"))
        if self.max_regression is not None:
            bounds.append(f"max_regression {self.max_regression:g}")
        return f"{self.metric} {', '.join(bounds)}"


@dataclass(frozen=True)
class Verdict:
    """The gate's answer for `name` version `version`, judged against `champion_version` at `judged_at`."""

    name: str
    version: int
    passed: bool
    rules: tuple[RuleResult, ...]
    champion_version: int | None
    gate_hash: str  # the policy judged against: a changed gate invalidates the verdict
    judged_at: str  # UTC ISO 8601
    evaluation_run: str | None = None
    training_run: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def failed_rules(self) -> list[RuleResult]:
        return [r for r in self.rules if not r.passed]

    def summary(self) -> str:
        head = f"{self.name} v{self.version}: {'PASS' if self.passed else 'FAIL'}"
        champ = f"v{self.champion_version}" if self.champion_version is not None else "none"
        lines = [f"{head} (champion {champ}, judged {self.judged_at})"]
        lines += [f"  {'pass' if r.passed else 'FAIL'}  {r.label}: {r.reason}" for r in self.rules]
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"), default=_finite_or_str)

    @classmethod
    def from_json(cls, text: str) -> Verdict:
        d = json.loads(text)
        d["rules"] = tuple(RuleResult(**{**r, "interval": tuple(r["interval"]) if r.get("interval") else None})
                           for r in d["rules"])
        return cls(**d)


def _finite_or_str(value: Any) -> Any:
    return str(value)


def gate_hash(gate: Any) -> str:
    """sha256 of the gate's canonical JSON (pydantic model or plain dict)."""
    data = gate.model_dump(mode="json") if hasattr(gate, "model_dump") else gate
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _fmt(x: float | None) -> str:
    return "none" if x is None else f"{x:.6g}"


def episodes_key(metric: str) -> str:
    """The metric holding how many episodes a rate was measured on (logged beside it by the evaluation)."""
    return f"{metric}_n"


def judge_rule(rule: Any, metrics: Mapping[str, float], champion_metrics: Mapping[str, float] | None,
               champion_version: int | None) -> RuleResult:
    """One `motus.config.Rule` against a candidate's metrics and (optionally) the champion's."""
    value = metrics.get(rule.metric)
    champion_value = None if champion_metrics is None else champion_metrics.get(rule.metric)
    cmp = rule.comparator
    relative_to = getattr(rule, "relative_to", None)
    base = dict(metric=rule.metric, comparator=cmp, threshold=rule.threshold, max_regression=rule.max_regression,
                value=value, champion_value=champion_value, relative_to=relative_to)
    if value is None:
        return RuleResult(**base, passed=False, reason=f"metric {rule.metric} was not logged")
    if math.isnan(value):
        return RuleResult(**base, passed=False, reason=f"metric {rule.metric} is NaN")
    if getattr(rule, "statistic", None):
        return _judge_rate(rule, base, metrics, champion_metrics, champion_version)
    reasons, passed, bound = [], True, None
    if rule.threshold is not None:
        ok = _COMPARE[cmp](value, rule.threshold)
        passed &= ok
        reasons.append(f"{_fmt(value)} {cmp} {rule.threshold:g}" if ok else f"{_fmt(value)} is not {cmp} {rule.threshold:g}")
    if relative_to is not None:
        other = metrics.get(relative_to)
        if other is None or math.isnan(other):
            passed = False
            reasons.append(f"{relative_to} was not logged by the same evaluation: nothing to compare with")
        else:
            offset = getattr(rule, "offset", 0.0)
            bound = rule.factor * other + offset
            ok = _COMPARE[cmp](value, bound)
            passed &= ok
            plus = f" {'+' if offset > 0 else '-'} {abs(offset):g}" if offset else ""
            what = f"{rule.factor:g} x {relative_to} {_fmt(other)}{plus} = {_fmt(bound)}"
            # a multiple of the other metric only means something for a positive scale without a margin
            ratio = f", {_fmt(value / other)} x" if not offset and other > 0 else ""
            reasons.append(f"{_fmt(value)} {cmp} {what}" if ok else f"{_fmt(value)} is not {cmp} {what} "
                           f"(off by {_fmt(abs(value - bound))}{ratio})")
    if rule.max_regression is not None:
        if champion_version is None:
            reasons.append("no champion yet: nothing to regress from")
        elif champion_value is None or math.isnan(champion_value):
            reasons.append(f"champion v{champion_version} has no {rule.metric}: no comparison")
        else:
            lower_better = cmp in LOWER_IS_BETTER
            worse_by = (value - champion_value) if lower_better else (champion_value - value)
            ok = worse_by <= rule.max_regression + 1e-12
            passed &= ok
            where = f"champion v{champion_version} {_fmt(champion_value)}"
            if ok:
                reasons.append(f"{_fmt(value)} vs {where} (worse by {_fmt(max(worse_by, 0.0))} <= {rule.max_regression:g})")
            else:
                reasons.append(f"{_fmt(value)} is worse than {where} by {_fmt(worse_by)} "
                               f"(max_regression {rule.max_regression:g})")
    return RuleResult(**base, bound=bound, passed=passed, reason="; ".join(reasons))


def _judge_rate(rule: Any, base: dict[str, Any], metrics: Mapping[str, float],
                champion_metrics: Mapping[str, float] | None, champion_version: int | None) -> RuleResult:
    """A success rate through a confidence interval of k successes in n episodes (`rule.statistic`)."""
    from ..contracts import rate_interval

    n_value = metrics.get(episodes_key(rule.metric))
    if n_value is None or math.isnan(n_value) or n_value < 1:
        return RuleResult(**base, passed=False, reason=f"{episodes_key(rule.metric)} (the episodes behind the rate) "
                                                       "was not logged: a rate without its n cannot be judged")
    n = int(round(n_value))
    k = int(round(base["value"] * n))
    if n < rule.min_episodes:
        return RuleResult(**base, n=n, k=k, passed=False,
                          reason=f"{k}/{n} episodes: fewer than min_episodes {rule.min_episodes}")
    lo, hi = rate_interval(k, n, rule.confidence, rule.statistic)
    ci = f"{k}/{n}, {rule.confidence:.0%} {rule.statistic} [{lo:.3f}, {hi:.3f}]"
    reasons, passed = [], True
    if rule.threshold is not None:
        ok = _COMPARE[rule.comparator](lo, rule.threshold)
        passed &= ok
        reasons.append(f"{ci}: lower bound {lo:.3f} {rule.comparator} {rule.threshold:g}" if ok else
                       f"{ci}: lower bound {lo:.3f} is not {rule.comparator} {rule.threshold:g} "
                       f"(short by {rule.threshold - lo:.3f}; more episodes narrow the interval)")
    if rule.max_regression is not None:
        champ = base["champion_value"]
        if champion_version is None:
            reasons.append(f"{ci}; no champion yet: nothing to regress from")
        elif champ is None or math.isnan(champ):
            reasons.append(f"{ci}; champion v{champion_version} has no {rule.metric}: no comparison")
        else:
            floor = champ - rule.max_regression
            ok = hi >= floor - 1e-12
            passed &= ok
            reasons.append(f"{ci}: upper bound {hi:.3f} >= champion v{champion_version} {champ:.3f} - "
                           f"{rule.max_regression:g} (not confidently worse)" if ok else
                           f"{ci}: even the upper bound {hi:.3f} is below champion v{champion_version} "
                           f"{champ:.3f} - {rule.max_regression:g} = {floor:.3f} (confidently worse)")
    return RuleResult(**base, n=n, k=k, interval=(lo, hi), passed=passed, reason="; ".join(reasons))


def judge(name: str, version: int, gate: Any, metrics: Mapping[str, float],
          champion_metrics: Mapping[str, float] | None, champion_version: int | None,
          tags: Mapping[str, str] | None = None, **extra: Any) -> Verdict:
    """Every rule and required tag of `gate` (a `motus.config.Gate`) for one version; passed = all passed."""
    results = []
    for rule in gate.rules:
        results.append(judge_rule(rule, metrics, champion_metrics, champion_version))
    tags = tags or {}
    for tag in gate.required_tags:
        present = tag in tags and str(tags[tag]) != ""
        results.append(RuleResult(metric=f"tag:{tag}", comparator=None, threshold=None, max_regression=None,
                                  value=None, champion_value=None, passed=present,
                                  reason=f"tag {tag}={tags[tag]!r}" if present else f"required tag {tag} is missing"))
    evaluation_run = extra.pop("evaluation_run", None)
    training_run = extra.pop("training_run", None)
    return Verdict(name=name, version=int(version), passed=all(r.passed for r in results), rules=tuple(results),
                   champion_version=champion_version, gate_hash=gate_hash(gate),
                   judged_at=datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                   evaluation_run=evaluation_run, training_run=training_run, extra=extra)
