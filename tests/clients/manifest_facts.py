"""Reads deploy/kubernetes/*.yaml and prints the facts tests/deploy.rs checks
against the server and the image (ports, probe paths, user, grace period,
the HPA's metric and the adapter rule's), as one JSON object."""

import json
import sys
from pathlib import Path

import yaml

root = Path(sys.argv[1])
docs = {}
for path in sorted(root.glob("*.yaml")):
    for doc in yaml.safe_load_all(path.read_text()):
        docs[doc["kind"]] = doc

deployment = docs["Deployment"]["spec"]["template"]["spec"]
container = deployment["containers"][0]
port_names = {p["name"]: p["containerPort"] for p in container["ports"]}
probes = {
    kind: container[kind]["httpGet"]["path"]
    for kind in ("startupProbe", "readinessProbe", "livenessProbe")
}
rule = yaml.safe_load(docs["ConfigMap"]["data"]["config.yaml"])["rules"][0]
isvc = docs["InferenceService"]["spec"]["predictor"]
isvc_container = isvc["containers"][0]
job = docs["Job"]["spec"]
job_container = job["template"]["spec"]["containers"][0]
print(json.dumps({
    "container_port": port_names["http"],
    "args": container["args"],
    "probes": probes,
    "probe_ports": sorted({container[k]["httpGet"]["port"] for k in probes}),
    "pod_security": deployment["securityContext"],
    "container_security": container["securityContext"],
    "grace_seconds": deployment["terminationGracePeriodSeconds"],
    "env": {e["name"]: e["value"] for e in container["env"]},
    "pre_stop_seconds": container["lifecycle"]["preStop"]["sleep"]["seconds"],
    "gpu_limit": container["resources"]["limits"]["nvidia.com/gpu"],
    "tmp_mount": [m["mountPath"] for m in container["volumeMounts"]],
    "hpa_metric": docs["HorizontalPodAutoscaler"]["spec"]["metrics"][0]["pods"]["metric"]["name"],
    "hpa_target": docs["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"],
    "rule_series": rule["seriesQuery"],
    "rule_name": rule["name"]["as"],
    "pdb_selector": docs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
    "service_selector": docs["Service"]["spec"]["selector"],
    "pod_labels": docs["Deployment"]["spec"]["template"]["metadata"]["labels"],
    "isvc_args": isvc_container["args"],
    "isvc_port": isvc_container["ports"][0]["containerPort"],
    "isvc_probe": isvc_container["readinessProbe"]["httpGet"]["path"],
    "job": {
        "mode": job["completionMode"],
        "completions": job["completions"],
        "parallelism": job["parallelism"],
        "args": job_container["args"],
        "index_env": [e["name"] for e in job_container["env"] if "valueFrom" in e],
        "pod_labels": job["template"]["metadata"]["labels"],
        "mounts": [m["mountPath"] for m in job_container["volumeMounts"]],
        "pod_security": job["template"]["spec"]["securityContext"],
        "container_security": job_container["securityContext"],
    },
}))
