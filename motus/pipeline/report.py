"""What a pipeline run and a plan say to people: a summary table, a terraform-plan-like listing, a JSON report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ..contracts import mask_secrets

REPORT = "last-run.json"


def summary_dict(pipe: Any, wall_seconds: float, stopped: str | None, error: str | None) -> dict[str, Any]:
    steps = []
    for r in pipe.results:
        out = r.outputs or {}
        detail = ""
        if "model" in out and "version" in out and r.kind != "evaluate":
            detail = f"{out['model']} v{out['version']}" + held_out_line(out.get("held_out") or {})
        elif r.kind == "gate":
            detail = f"{out.get('verdict', '')} -> champion v{out.get('champion')}" if out else ""
        elif r.kind == "evaluate":
            detail = evaluation_line(out.get("metrics", {}))
        elif "content_hash" in out:
            detail = f"content {out['content_hash'][:12]}"
        steps.append({"step": r.step, "kind": r.kind, "status": r.status, "seconds": round(r.seconds, 2),
                      "compute_seconds": round(r.compute_seconds, 2), "device_hours": out.get("device_hours")
                      if r.status == "ran" else None, "pool": out.get("pool") if r.status == "ran" else None,
                      "goodput": out.get("goodput") if r.status == "ran" else None,
                      "lost_device_hours": out.get("lost_device_hours") if r.status == "ran" else None,
                      "device_hours_by_pool": out.get("device_hours_by_pool") if r.status == "ran" else None,
                      "detail": detail, "error": r.error})
    status = "completed" if stopped is None else ("stopped at a gate" if stopped == "gate" else "failed")
    return {"status": status, "error": error, "wall_seconds": round(wall_seconds, 2),
            "device_hours": sum(s["device_hours"] or 0.0 for s in steps),
            "device_hours_by_pool": _by_pool(steps),
            "lost_device_hours": sum(s["lost_device_hours"] or 0.0 for s in steps),
            "compute_seconds": round(sum(s["compute_seconds"] for s in steps), 2),
            "steps": steps, "champions": pipe.champions(),
            "unverified_champions": getattr(pipe, "unverified_champions", {}),
            "tracking_uri": mask_secrets(pipe.tracking_uri),
            "pipeline_run": pipe.pipeline_run}


def held_out_line(held_out: dict[str, list[float]]) -> str:
    """A training job's held-out numbers, first -> last validation, the action error also as a multiple of the
    zero-action floor of the same windows."""
    floor = (held_out.get("val/floor_zero_action_mse") or [None, None])[-1]
    parts = []
    for k, (a, b) in held_out.items():
        if k.startswith("lam/"):  # a score against the untrained VAE's: no percentage of an R^2
            parts.append(f"; {k.removeprefix('lam/')} {a:.3g} (untrained) -> {b:.3g}")
            continue
        if not a or k == "val/floor_zero_action_mse":
            continue
        part = f"; {k.removeprefix('val/')} {a:.3g} -> {b:.3g} ({(b - a) / a:+.0%})"
        if k.startswith("val/vla_action_mse") and floor:
            part = part[:-1] + f", {b / floor:.2f}x floor)"
        parts.append(part)
    return "".join(parts)


def evaluation_line(m: dict[str, Any]) -> str:
    """The model's own held-out numbers beside their floor (action error as a multiple of predicting zeros) and
    its closed-loop success beside the scripted ceiling."""
    parts = []
    floor = m.get("eval/floor_zero_action_mse")
    for mode in ("vla", "idm", "joint"):
        v = m.get(f"eval/{mode}_action_mse")
        if isinstance(v, (int, float)):
            parts.append(f"{mode} mse {v:.3g}" + (f" = {v / floor:.2f}x floor" if floor else ""))
    if floor:
        parts.append(f"floor {floor:.3g}")
    for key, label in (("eval/success_rate", "success"), ("eval/ceiling_success_rate", "ceiling")):
        v, n = m.get(key), m.get(f"{key}_n")
        if isinstance(v, (int, float)):
            parts.append(f"{label} {round(v * n)}/{int(n)}" if n else f"{label} {v:.0%}")
    return ", ".join(parts)


def model_numbers(m: dict[str, Any]) -> str:
    """One version's own numbers for a registry listing: its evaluation's beside floors and ceiling, and its last
    held-out validation's (action error as a multiple of the zero-action floor) where the evaluation has no
    action error of its own (not evaluated, or closed loop only)."""
    evaluated = evaluation_line(m)
    parts = [evaluated] if evaluated else []
    if not isinstance(m.get("eval/vla_action_mse"), float):
        parts += [f"{k} {m[f'val/{k}']:.3g}" for k in ("video_loss", "action_loss")
                  if isinstance(m.get(f"val/{k}"), float)]
        v, floor = m.get("val/vla_action_mse"), m.get("val/floor_zero_action_mse")
        if isinstance(v, float):
            parts.append(f"vla mse {v:.3g}" + (f" = {v / floor:.2f}x floor {floor:.3g}" if floor else ""))
    if isinstance(m.get("lam/probe_r2"), float):  # the latent-action model: how well latents predict actions
        parts.append(f"probe R2 {m['lam/probe_r2']:.2f}")
    return ", ".join(parts)


def _by_pool(steps: list[dict[str, Any]]) -> dict[str, float]:
    """Device-hours of this run's cluster jobs per pool (local jobs have no pool)."""
    pools: dict[str, float] = {}
    for s in steps:
        split = s.get("device_hours_by_pool") or ({s["pool"]: s["device_hours"]} if s.get("pool") else {})
        for pool, hours in split.items():  # a job resubmitted to its fallback pool ran on two
            if hours:
                pools[pool] = pools.get(pool, 0.0) + hours
    return pools


def write_report(pipe: Any, report: dict[str, Any]) -> Path:
    pipe.out_dir.mkdir(parents=True, exist_ok=True)
    path = pipe.out_dir / REPORT
    path.write_text(mask_secrets(json.dumps(report, indent=2, default=str)))  # errors may quote a URI
    return path


def _console() -> Console:
    # a pipeline's output usually lands in a log file or CI: do not squeeze the table into 80 columns there
    c = Console()
    return c if c.is_terminal else Console(width=140)


def print_summary(report: dict[str, Any], console: Console | None = None) -> None:
    console = console or _console()
    t = Table(title=f"motus pipeline: {report['status']} in {report['wall_seconds']:.0f}s", show_lines=False)
    for col in ("step", "status", "seconds", "device h", "result"):
        t.add_column(col, justify="right" if col in ("seconds", "device h") else "left")
    for s in report["steps"]:
        style = {"cached": "dim", "failed": "red"}.get(s["status"])
        dh = f"{s['device_hours']:.4f}" if s.get("device_hours") else ""
        msg = (s["error"] or s["detail"] or "").strip().splitlines()
        t.add_row(s["step"], s["status"], f"{s['seconds']:.1f}", dh, msg[0][:200] if msg else "", style=style)
    console.print(t)
    champs = ", ".join(f"{m}: {'v' + str(v) if v else 'none'}" for m, v in report["champions"].items())
    console.print(f"champions: {champs}")
    for model, state in (report.get("unverified_champions") or {}).items():
        console.print(f"[red]{model}: {state}[/red]; `motus registry verify {model} --repair` restores the audited state")
    pools = report.get("device_hours_by_pool") or {}
    per_pool = f" ({', '.join(f'{p}: {h:.4f}' for p, h in sorted(pools.items()))})" if pools else ""
    console.print(f"device hours this run: {report['device_hours']:.4f}{per_pool}")
    if pools:
        total = report["device_hours"]
        lost = report.get("lost_device_hours") or 0.0
        console.print(f"goodput: {(total - lost) / total if total else 1.0:.0%} ({lost:.4f} device h lost to "
                      "restarts, redone steps, start-up and checkpoints)")
    if report.get("error"):
        console.print(f"[red]{report['error']}[/red]")
    uri = report.get("tracking_uri", "")
    console.print("next: " + (f"`mlflow ui --backend-store-uri {uri}`" if uri.startswith("sqlite") else f"MLflow at {uri}")
                  + ", `motus registry history MODEL`, `motus lineage show models:/MODEL@champion`, "
                    "`motus serve MODEL@champion` to serve a policy (it follows promotions), "
                    "`prefect server start` for the flow runs")


def plan_totals(rows: list[Any], params: Any = None) -> dict[str, dict[str, float | None]]:
    """Estimated device-hours per pool of the steps a plan would run ("this machine" for local jobs) and their
    cost at params.yaml's price of the pool's device (None where there is no price, never 0)."""
    import warnings

    from ..track.accounting import cost

    totals: dict[str, dict[str, float | None]] = {}
    for r in rows:
        if r.action != "run" or not r.est_device_hours:
            continue
        where = r.est_pool or "this machine"
        t = totals.setdefault(where, {"device_hours": 0.0, "cost": 0.0})
        t["device_hours"] = (t["device_hours"] or 0.0) + r.est_device_hours
        pool = (params.pools.get(r.est_pool) if params is not None and r.est_pool else None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an unknown price reads as "cost unknown" below
            money = cost(r.est_device_hours, pool.gpu, params.costs.device_hour) if pool is not None else None
        t["cost"] = None if money is None or t["cost"] is None else t["cost"] + money
    return totals


def print_plan(rows: list[Any], console: Console | None = None, params: Any = None) -> None:
    console = console or _console()
    sym = {"cached": "[dim]=[/dim]", "run": "[yellow]+[/yellow]", "check": "[cyan]?[/cyan]"}
    total = 0.0
    for r in rows:
        est = f"  ~{r.est_device_hours:.4f} device h" if r.est_device_hours else ""
        est += f" on {r.est_pool}" if est and r.est_pool else ""
        total += r.est_device_hours or 0.0
        console.print(f"{sym.get(r.action, r.action)} {r.step:<34} {r.action:<7}{est}")
        for w in r.why:
            console.print(f"      {w}", style="dim" if r.action == "cached" else None, markup=False)
    runs = sum(r.action == "run" for r in rows)
    cached = sum(r.action == "cached" for r in rows)
    checks = sum(r.action == "check" for r in rows)
    console.print(f"\nPlan: {runs} to run, {cached} cached, {checks} gate(s) to decide; "
                  f"estimated {total:.4f} device hours (measured throughput x planned steps).")
    currency = params.costs.currency if params is not None else ""
    for where, t in sorted(plan_totals(rows, params).items()):
        money = "cost unknown" if t["cost"] is None else f"{t['cost']:.2f} {currency}"
        console.print(f"  {where}: ~{t['device_hours']:.4f} device h, {money}", markup=False)
