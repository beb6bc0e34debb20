"""The autoscaling side of Baton: CapacityPolicy's engine, its sources and its operator.

Pure engine (no I/O): `pool_policy` (what a policy asks), `metrics_window` (what the
pools did), `demand` (signals), `scaling_history` (HPA behavior), `policy_engine`
(`decide`, `plan`), `autoscaler` (the engine with memory), `simulator`.
Around it: `policy_spec` (the CRD spec, pydantic), `exposition`/`histogram`/
`scrape_source`/`prometheus_source` (metrics), `kube_api`/`scale_target` (actuators),
`reconciler`/`policy_status`/`handlers`/`main` (the kopf operator, `baton operator`).
"""
