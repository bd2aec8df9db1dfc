"""The Helm chart: lints, renders for default and production-like values, and
the rendered manifests hold what the cluster needs. Runs helm (scripts/helm.sh)."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

CHART = Path(__file__).resolve().parents[1] / "leadscore"
REPO = CHART.parents[2]
PROD = CHART / "ci" / "production-values.yaml"
SERVICES = ["scorer", "drift", "retrain", "training-worker", "controller", "lookup", "dashboard"]
SECRET_VARS = {"LEADSCORE__KAFKA__SASL_PASSWORD", "LEADSCORE__REGISTRY__PASSWORD", "LEADSCORE__POSTGRES__URL",
               "LEADSCORE__ALERTING__SLACK_WEBHOOK_URL", "LEADSCORE__ALERTING__PAGERDUTY_ROUTING_KEY",
               "LEADSCORE__ALERTING__SMTP_PASSWORD", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
               "MLFLOW_TRACKING_TOKEN"}


@pytest.fixture(scope="module")
def helm() -> str:
    return os.environ.get("LEADSCORE_HELM") or subprocess.run(
        [str(REPO / "scripts" / "helm.sh")], check=True, capture_output=True, text=True).stdout.strip()


def render(helm: str, *args: str) -> list[dict]:
    out = subprocess.run([helm, "template", "t", str(CHART), *args], check=True, capture_output=True, text=True)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def deployments(docs: list[dict]) -> dict[str, dict]:
    return {d["metadata"]["name"].removeprefix("t-"): d for d in docs if d["kind"] == "Deployment"}


def pods(docs: list[dict]) -> dict[str, dict]:
    """Each service's pod spec: a Deployment's, or the training worker's ScaledJob's Job template."""
    out = {name: d["spec"]["template"]["spec"] for name, d in deployments(docs).items()}
    for d in docs:
        if d["kind"] == "ScaledJob":
            out[d["metadata"]["name"].removeprefix("t-")] = d["spec"]["jobTargetRef"]["template"]["spec"]
    return out


@pytest.mark.parametrize("values", [[], ["-f", str(PROD)]], ids=["default", "production"])
def test_the_chart_lints(helm: str, values: list[str]) -> None:
    out = subprocess.run([helm, "lint", str(CHART), *values], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("values", [[], ["-f", str(PROD)]], ids=["default", "production"])
def test_every_service_runs_non_root_read_only_with_probes_and_a_long_enough_grace(helm: str, values: list[str]) -> None:
    docs = render(helm, *values)
    all_pods = pods(docs)
    # The webhook service runs once endpoints are configured (the production values do).
    assert sorted(all_pods) == sorted(SERVICES + (["webhook"] if values else []))
    grace = yaml.safe_load((CHART / "values.yaml").read_text())["services"]
    for name, pod in all_pods.items():
        [c] = pod["containers"]
        if name in deployments(docs):
            assert c["livenessProbe"]["httpGet"]["path"] == "/healthz", name
            assert c["readinessProbe"]["httpGet"]["path"] == "/readyz", name
        else:  # a Job runs to completion: no probes, no restarts in place
            assert "livenessProbe" not in c and pod["restartPolicy"] == "Never", name
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] and sc["runAsNonRoot"] and not sc["allowPrivilegeEscalation"], name
        assert sc["capabilities"]["drop"] == ["ALL"], name
        assert pod["securityContext"]["runAsNonRoot"], name
        assert pod["automountServiceAccountToken"] is False, name
        key = {"training-worker": "trainingWorker"}.get(name, name)
        assert pod["terminationGracePeriodSeconds"] > grace[key]["shutdownGraceSeconds"], name
        env = {e["name"]: e for e in c["env"]}
        assert env["LEADSCORE_CONFIG"]["value"] == "/etc/leadscore/leadscore.toml"
        listens = [v["value"] for k, v in env.items() if k.endswith("_LISTEN")]
        assert listens and all(v.startswith("0.0.0.0:") for v in listens), name


def test_secrets_are_referenced_never_inlined(helm: str) -> None:
    docs = render(helm, "-f", str(PROD))
    assert not [d for d in docs if d["kind"] == "Secret"]
    referenced = set()
    assert "training-worker" not in deployments(docs), "production values run training as Jobs"
    for pod in pods(docs).values():
        for e in pod["containers"][0]["env"]:
            if e["name"] in SECRET_VARS:
                assert "value" not in e and "secretKeyRef" in e["valueFrom"], e
                referenced.add(e["name"])
    assert {"LEADSCORE__KAFKA__SASL_PASSWORD", "LEADSCORE__POSTGRES__URL", "MLFLOW_TRACKING_USERNAME",
            "MLFLOW_TRACKING_PASSWORD"} <= referenced
    webhook_env = {e["name"]: e for e in pods(docs)["webhook"]["containers"][0]["env"]}
    secret = webhook_env["LEADSCORE_WEBHOOK_CRM_SECRET"]
    assert "value" not in secret and secret["valueFrom"]["secretKeyRef"] == {"name": "crm-webhook", "key": "secret"}
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]["leadscore.toml"]
    assert "password" not in config.lower()


def test_production_values_autoscale_the_scorer_within_the_partitions(helm: str) -> None:
    docs = render(helm, "-f", str(PROD))
    [hpa] = [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
    declared = yaml.safe_load((REPO / "topics" / "topics.yaml").read_text())
    leads = next(t for t in declared["topics"] if t["name"] == "crm.public.leads")
    partitions = leads.get("partitions", declared["defaults"]["partitions"])
    assert hpa["spec"]["maxReplicas"] <= partitions
    assert "replicas" not in deployments(docs)["scorer"]["spec"], "the HPA owns the scorer's replicas"
    scorer_env = {e["name"]: e for e in deployments(docs)["scorer"]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert scorer_env["LEADSCORE__SCORER__INSTANCE_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert "SASL_SSL" in next(d for d in docs if d["kind"] == "ConfigMap")["data"]["leadscore.toml"]


def test_a_wrong_value_is_refused_by_the_schema_naming_it(helm: str) -> None:
    out = subprocess.run([helm, "template", "t", str(CHART), "--set", "services.scorer.replicas=three"],
                         capture_output=True, text=True, check=False)
    assert out.returncode != 0
    assert "/services/scorer/replicas" in out.stderr, out.stderr
    # A key in the wrong place is refused too, not silently ignored.
    out = subprocess.run([helm, "template", "t", str(CHART), "--set", "autoscaling.trainingWorker.mode=job"],
                         capture_output=True, text=True, check=False)
    assert out.returncode != 0
    assert "/autoscaling" in out.stderr and "trainingWorker" in out.stderr, out.stderr
    out = subprocess.run([helm, "template", "t", str(CHART), "--set", "services.trainingWorker.mode=jobs"],
                         capture_output=True, text=True, check=False)
    assert out.returncode != 0 and "/services/trainingWorker/mode" in out.stderr, out.stderr


def test_helm_test_hook_calls_the_lookup_health(helm: str) -> None:
    docs = render(helm)
    [hook] = [d for d in docs if d["kind"] == "Pod"]
    assert hook["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert "/health" in " ".join(hook["spec"]["containers"][0]["command"])
    assert "http://t-lookup:8000/health" in " ".join(hook["spec"]["containers"][0]["command"])
    assert hook["metadata"]["labels"]["leadscore-client"] == "true", "admitted by the NetworkPolicy"
    [tls_hook] = [d for d in render(helm, "-f", str(PROD)) if d["kind"] == "Pod"]
    assert "https://t-lookup:8000/health" in " ".join(tls_hook["spec"]["containers"][0]["command"])
    assert "@sha256:" in tls_hook["spec"]["containers"][0]["image"]


def test_keda_and_prometheus_operator_resources_render_and_alert_on_metrics_the_services_export(helm: str) -> None:
    docs = render(helm, "-f", str(PROD), "--set", "keda.enabled=true", "--set", "monitoring.serviceMonitor.enabled=true",
                  "--set", "monitoring.prometheusRule.enabled=true")
    kinds = [d["kind"] for d in docs]
    [scaled] = [d for d in docs if d["kind"] == "ScaledObject"]
    assert "HorizontalPodAutoscaler" not in kinds, "KEDA replaces the HPA"
    assert scaled["spec"]["maxReplicaCount"] <= 12
    trigger = scaled["spec"]["triggers"][0]["metadata"]
    assert trigger["topic"] == "crm.public.leads" and trigger["bootstrapServers"].count(",") == 2
    assert kinds.count("ServiceMonitor") == 1
    [rule] = [d for d in docs if d["kind"] == "PrometheusRule"]
    exprs = " ".join(r["expr"] for g in rule["spec"]["groups"] for r in g["rules"])
    import re
    names = set(re.findall(r"leadscore_[a-z_]+", exprs))
    assert {"leadscore_scorer_consumer_lag", "leadscore_scorer_dead_letters_total", "leadscore_lookup_calls_total"} <= names
    sources = " ".join(p.read_text() for p in (REPO / "crates").rglob("*.rs"))
    for n in names:
        assert n in sources, f"{n} is alerted on but no service exports it"


def test_the_grafana_dashboard_ships_as_a_configmap_on_exported_metrics(helm: str) -> None:
    import json
    import re
    docs = render(helm)
    [cm] = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "t-dashboard"]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(cm["data"]["leadscore.json"])
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    names = {re.sub(r"_(bucket|count|sum)$", "", n) for n in re.findall(r"leadscore_[a-z_]+", exprs)}
    assert len(dashboard["panels"]) >= 6 and names
    sources = " ".join(p.read_text() for p in (REPO / "crates").rglob("*.rs"))
    for n in names:
        assert n in sources, f"{n} is charted but no service exports it"


@pytest.fixture(scope="module")
def declared_topics() -> list[dict]:
    """The declarations with defaults applied, as `leadscore topics apply` reads them."""
    binary = os.environ.get("LEADSCORE_BIN") or str(REPO / "target" / "debug" / "leadscore")
    out = subprocess.run([binary, "topics", "show"], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def test_strimzi_resources_are_off_by_default(helm: str) -> None:
    kinds = {d["kind"] for d in render(helm)}
    assert not kinds & {"KafkaTopic", "KafkaConnector"}


@pytest.mark.parametrize("values", [[], ["-f", str(PROD)]], ids=["default", "production"])
def test_strimzi_topics_match_topics_yaml_exactly(helm: str, values: list[str], declared_topics: list[dict]) -> None:
    docs = render(helm, *values, "--set", "strimzi.topics.enabled=true", "--set", "strimzi.kafkaCluster=kafka-main")
    topics = [d for d in docs if d["kind"] == "KafkaTopic"]
    rendered = {t["spec"]["topicName"]: t for t in topics}
    assert len(rendered) == len(topics), "a topic is rendered twice"
    assert sorted(rendered) == sorted(t["name"] for t in declared_topics)
    for want in declared_topics:
        got = rendered[want["name"]]
        assert got["apiVersion"] == "kafka.strimzi.io/v1beta2"
        assert got["metadata"]["labels"]["strimzi.io/cluster"] == "kafka-main"
        assert got["spec"]["partitions"] == want["partitions"], want["name"]
        assert got["spec"]["replicas"] == want["replication_factor"], want["name"]
        assert got["spec"]["config"] == want["configs"], want["name"]


def test_strimzi_connectors_match_connectors_dir_exactly(helm: str) -> None:
    docs = render(helm, "--set", "strimzi.connectors.enabled=true", "--set", "strimzi.connectCluster=connect-a")
    rendered = {d["metadata"]["name"]: d for d in docs if d["kind"] == "KafkaConnector"}
    files = [json.loads(p.read_text()) for p in sorted((REPO / "connectors").glob("*.json"))]
    assert sorted(rendered) == sorted(f["name"] for f in files)
    for f in files:
        spec = rendered[f["name"]]["spec"]
        assert rendered[f["name"]]["metadata"]["labels"]["strimzi.io/cluster"] == "connect-a"
        config = dict(f["config"])
        assert spec["class"] == config.pop("connector.class")
        assert spec["tasksMax"] == int(config.pop("tasks.max"))
        assert spec["config"] == config, f["name"]
        assert spec["autoRestart"] == {"enabled": True}
        # Secrets stay references the Connect worker resolves, never literals.
        assert all(v.startswith("${env:") for k, v in spec["config"].items() if "password" in k), f["name"]


def test_the_training_worker_runs_as_one_job_per_pending_request(helm: str) -> None:
    assert not [d for d in render(helm) if d["kind"] == "ScaledJob"], "default: a long-running Deployment"
    docs = render(helm, "-f", str(PROD), "--set", "config.training.timeout_secs=3600")
    [scaled] = [d for d in docs if d["kind"] == "ScaledJob"]
    spec = scaled["spec"]
    assert spec["maxReplicaCount"] == 1, "Jobs share the transactional id: one at a time"
    job = spec["jobTargetRef"]
    assert job["activeDeadlineSeconds"] > 3600, "the run's own timeout reports it failed first"
    [c] = job["template"]["spec"]["containers"]
    assert c["args"][:2] == ["retrain", "worker"] and "--once" in c["args"]
    assert any(a.startswith("--idle-exit-secs=") for a in c["args"])
    [trigger] = spec["triggers"]
    assert trigger["type"] == "kafka"
    assert trigger["metadata"]["topic"] == "leadscore.retrain.requests.v1"
    assert trigger["metadata"]["consumerGroup"] == "leadscore-training"
    assert trigger["metadata"]["lagThreshold"] == "1"
    assert trigger["metadata"]["offsetResetPolicy"] == "earliest"
    assert trigger["authenticationRef"]["name"] == "kafka-sasl"


def test_lookup_and_dashboard_refuse_to_render_without_tokens_unless_told(helm: str) -> None:
    out = subprocess.run([helm, "template", "t", str(CHART), "--set", "secrets.lookupTokens=null"],
                         capture_output=True, text=True, check=False)
    assert out.returncode != 0 and "secrets.lookupTokens" in out.stderr and "allow_unauthenticated" in out.stderr, out.stderr
    docs = render(helm, "--set", "secrets.lookupTokens=null", "--set", "config.lookup.allow_unauthenticated=true")
    assert "lookup" in deployments(docs)
    docs = render(helm)
    for name in ("lookup", "dashboard"):
        env = {e["name"]: e.get("value") for e in deployments(docs)[name]["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["LEADSCORE__LOOKUP__AUTH_TOKENS_FILE"] == "/etc/leadscore/tokens/tokens", name


@pytest.fixture(scope="module")
def chartcheck(tmp_path_factory: pytest.TempPathFactory) -> str:
    """deploy/helm/check built with the machine's Go (modules from the Go module proxy)."""
    out = tmp_path_factory.mktemp("chartcheck") / "chartcheck"
    go = os.environ.get("LEADSCORE_GO") or "go"
    env = {**os.environ, "GOTOOLCHAIN": "local", "GOFLAGS": "-mod=readonly"}
    subprocess.run([go, "build", "-o", str(out), "."], cwd=CHART.parent / "check", env=env, check=True)
    return str(out)


ALL_ON = ["-f", str(PROD), "--set", "keda.enabled=true", "--set", "monitoring.serviceMonitor.enabled=true",
          "--set", "monitoring.prometheusRule.enabled=true", "--set", "strimzi.topics.enabled=true",
          "--set", "strimzi.kafkaCluster=kafka-main", "--set", "strimzi.connectors.enabled=true",
          "--set", "strimzi.connectCluster=connect-a"]


@pytest.mark.parametrize("values", [[], ["-f", str(PROD)], ALL_ON], ids=["default", "production", "everything-on"])
def test_every_manifest_decodes_strictly_into_the_kubernetes_types(helm: str, chartcheck: str, values: list[str]) -> None:
    rendered = subprocess.run([helm, "template", "t", str(CHART), *values], check=True, capture_output=True, text=True)
    out = subprocess.run([chartcheck], input=rendered.stdout, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    decoded = int(out.stdout.rsplit("chartcheck: ", 1)[1].split()[0])
    assert decoded == sum(1 for d in yaml.safe_load_all(rendered.stdout) if d and d["kind"] not in NO_GO_TYPES), out.stdout
    if values is ALL_ON:
        for kind in ("ServiceMonitor", "PrometheusRule", "ScaledObject", "ScaledJob", "TriggerAuthentication"):
            assert f" {kind} " not in out.stdout, f"{kind}: checked against its operator's types"


# Kinds without Go types (Strimzi publishes none): chartcheck lists them, the other tests
# check their fields.
NO_GO_TYPES = {"KafkaTopic", "KafkaConnector", "KafkaUser"}


def test_chartcheck_names_an_unknown_field_and_a_wrong_type(chartcheck: str) -> None:
    bad = """apiVersion: apps/v1
kind: Deployment
metadata: {name: typo}
spec:
  replicas: 1
  selector: {matchLabels: {a: b}}
  template:
    metadata: {labels: {a: b}}
    spec:
      containers: [{name: c, image: i, securityContext: {runAsNonRoot: true, readOnlyRootFS: true}}]
---
apiVersion: v1
kind: Service
metadata: {name: port}
spec:
  ports: [{port: "http"}]
"""
    out = subprocess.run([chartcheck], input=bad, capture_output=True, text=True, check=False)
    assert out.returncode == 1
    assert "Deployment typo" in out.stdout and "readOnlyRootFS" in out.stdout, out.stdout
    assert "Service port" in out.stdout, out.stdout


def test_production_values_pin_the_image_by_digest(helm: str) -> None:
    for name, pod in pods(render(helm, "-f", str(PROD))).items():
        image = pod["containers"][0]["image"]
        assert "@sha256:" in image and ":0.1.0" not in image, (name, image)
    out = subprocess.run([helm, "template", "t", str(CHART), "--set", "image.digest=latest"],
                         capture_output=True, text=True, check=False)
    assert out.returncode != 0 and "digest" in out.stderr, out.stderr


@pytest.mark.parametrize("values", [[], ["-f", str(PROD)]], ids=["default", "production"])
def test_network_policies_name_who_may_call_and_where_pods_may_connect(helm: str, values: list[str]) -> None:
    policies = {d["metadata"]["name"].removeprefix("t-"): d["spec"] for d in render(helm, *values)
                if d["kind"] == "NetworkPolicy"}
    assert sorted(policies) == ["dashboard", "default", "lookup"]
    for name, spec in policies.items():
        for rule in spec["ingress"]:
            assert rule.get("from"), f"{name}: an ingress rule without `from` admits everyone"
    default = policies["default"]
    assert default["policyTypes"] == ["Ingress", "Egress"]
    ports = {p["port"] for rule in default["egress"] for p in rule["ports"]}
    assert {53, 9092, 8081, 5432, 6379, 5000, 4318} <= ports and 22 not in ports
    assert {p["port"] for p in policies["lookup"]["ingress"][0]["ports"]} == {"grpc", "http"}


def test_production_values_serve_the_lookup_over_tls_with_https_probes(helm: str) -> None:
    pod = pods(render(helm, "-f", str(PROD)))["lookup"]
    c = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["LEADSCORE__LOOKUP__TLS_CERT"] == "/etc/leadscore/tls/tls.crt"
    assert env["LEADSCORE__LOOKUP__TLS_KEY"] == "/etc/leadscore/tls/tls.key"
    assert c["readinessProbe"]["httpGet"]["scheme"] == "HTTPS" and c["livenessProbe"]["httpGet"]["scheme"] == "HTTPS"
    assert {"name": "tls", "secret": {"secretName": "lookup-tls"}} in pod["volumes"]
    # Other services' probes stay plain HTTP.
    assert "scheme" not in pods(render(helm, "-f", str(PROD)))["scorer"]["containers"][0]["readinessProbe"]["httpGet"]


def test_production_values_give_each_service_a_kafka_user_with_only_its_writes(helm: str) -> None:
    docs = render(helm, "-f", str(PROD))
    users = {d["metadata"]["name"].removeprefix("t-"): d["spec"] for d in docs if d["kind"] == "KafkaUser"}
    assert sorted(users) == sorted(["controller", "dashboard", "drift", "lookup", "retrain", "scorer",
                                    "training-worker", "webhook", "leadscore-operator"])

    def writers(topic: str) -> set[str]:
        return {name for name, spec in users.items() for acl in spec["authorization"]["acls"]
                if acl["resource"].get("name") == topic and "Write" in acl["operations"]}

    for topic in ("leads.scores.v1", "leads.scores.shadow.v1", "leads.scores.dlq.v1"):
        assert writers(topic) == {"scorer"}, topic
    assert writers("leadscore.model.lifecycle.v1") == {"controller", "training-worker"}
    assert writers("leadscore.retrain.requests.v1") == {"retrain", "leadscore-operator"}
    assert writers("leadscore.model.commands.v1") == {"leadscore-operator"}
    for name, spec in users.items():
        assert spec["authentication"] == {"type": "scram-sha-512"}, name
    # Each pod signs in as its own user, with the password Strimzi made for it.
    for name, pod in pods(docs).items():
        env = {e["name"]: e for e in pod["containers"][0]["env"]}
        assert env["LEADSCORE__KAFKA__SASL_USERNAME"]["value"] == f"t-{name}", name
        assert env["LEADSCORE__KAFKA__SASL_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": f"t-{name}", "key": "password"}
        assert [e["name"] for e in pod["containers"][0]["env"]].count("LEADSCORE__KAFKA__SASL_PASSWORD") == 1, name
