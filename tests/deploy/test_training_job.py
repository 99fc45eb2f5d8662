"""deploy/training/lowdiff-train-job.yaml (multi-node training: an Indexed Job running torchrun, a headless
Service for the rendezvous) is consistent with itself and with `lowdiff train`'s command line. Its schema
is checked by kubernetes-validate in scripts/check-deploy.sh."""

from __future__ import annotations

from pathlib import Path

import yaml  # PyYAML: a dev dependency (pyproject.toml)

MANIFEST = Path(__file__).resolve().parents[2] / "deploy" / "training" / "lowdiff-train-job.yaml"


def _objects() -> dict[str, dict]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all(MANIFEST.read_text()) if doc}


def _flag(args: list[str], name: str) -> str:
    (value,) = [a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")]
    return value


def test_the_job_and_its_torchrun_agree() -> None:
    objects = _objects()
    job, service = objects["Job"], objects["Service"]
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = container["args"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == int(_flag(args, "nnodes"))
    assert container["resources"]["limits"]["nvidia.com/gpu"] == int(_flag(args, "nproc_per_node"))
    # Pod 0 is reachable as <job>-0.<service>: the headless Service is the pods' subdomain.
    assert service["spec"]["clusterIP"] == "None" and pod["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["selector"] == {"job-name": job["metadata"]["name"]}
    assert _flag(args, "master_addr") == f"{job['metadata']['name']}-0.{service['metadata']['name']}"
    assert int(_flag(args, "master_port")) == service["spec"]["ports"][0]["port"]
    env = {e["name"]: e for e in container["env"]}
    assert _flag(args, "node_rank") == "$(NODE_RANK)"
    assert "job-completion-index" in env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert Path(_flag(args, "run-dir")).parts[1] == "runs" and "/runs" in mounts and "/dev/shm" in mounts


def test_the_lowdiff_arguments_parse() -> None:
    """What follows `-m lowdiff` is a valid `lowdiff train` command line (parsed, not run)."""
    from lowdiff.cli import build_parser

    (container,) = _objects()["Job"]["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    lowdiff_args = args[args.index("lowdiff") + 1 :]
    parsed = build_parser().parse_args(lowdiff_args)
    assert parsed.command == "train" and parsed.resume and parsed.device == "cuda" and parsed.precision == "bf16"
