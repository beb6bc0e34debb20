"""`baton operator`: run the CapacityPolicy operator (kopf) against the current cluster.

Credentials: the pod's service account in a cluster, else the kubeconfig. Examples:

    baton operator --all-namespaces --metrics-source http://prometheus.monitoring:9090
    baton operator -n llm -n llm-canary --standalone --interval 10
"""

from __future__ import annotations

import argparse
import logging

import kopf
from pydantic import ValidationError

from operators.handlers import OperatorConfig, build_registry
from operators.policy_spec import PrometheusSpec


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="baton operator",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:]),
    )
    scope = p.add_mutually_exclusive_group(required=True)
    scope.add_argument(
        "-n", "--namespace", action="append", help="watch this namespace (repeatable; globs ok)"
    )
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace")
    p.add_argument(
        "--metrics-source",
        metavar="URL",
        help="Prometheus HTTP API for policies without spec.metrics",
    )
    p.add_argument(
        "--interval", type=float, default=15.0, help="seconds between reconciles of a policy"
    )
    peering = p.add_mutually_exclusive_group()
    peering.add_argument(
        "--standalone", action="store_true", help="no peering: this is the only operator replica"
    )
    peering.add_argument(
        "--peering", metavar="NAME", help="kopf peering object shared with other replicas"
    )
    p.add_argument("--priority", type=int, default=0, help="peering priority of this replica")
    p.add_argument("--liveness", metavar="URL", help="e.g. http://0.0.0.0:8080/healthz")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.interval <= 0:
        parser.error("--interval must be positive")
    default_prometheus = None
    if args.metrics_source is not None:
        try:  # the rule of a policy's own spec.metrics.prometheus.url
            default_prometheus = PrometheusSpec(url=args.metrics_source)
        except ValidationError:
            parser.error(
                "--metrics-source must be an http(s) URL such as "
                f"http://prometheus.monitoring:9090, got {args.metrics_source!r}"
            )
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    registry = build_registry(
        OperatorConfig(interval_s=args.interval, default_prometheus=default_prometheus)
    )
    kopf.run(
        registry=registry,
        clusterwide=args.all_namespaces,
        namespaces=args.namespace or (),
        standalone=True if args.standalone else None,
        peering_name=args.peering,
        priority=args.priority,
        liveness_endpoint=args.liveness,
        memo=kopf.Memo(),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
