"""The files under examples/: they parse, reference each other consistently (Grafana uids, chart DNS
names), avoid the origin article's mistakes (trace_id label, boltdb-shipper, invalid Loki keys), and the
demo's records arrive at a real server with their trace ids normalized.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO
from tests.procs import ServerProcess, spool_records

yaml = pytest.importorskip("yaml", reason="PyYAML is a test dependency (it comes with kubernetes-validate)")

EXAMPLES = REPO / "examples"
GRAFANA = EXAMPLES / "grafana"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "datasources.yaml"
DASHBOARD = GRAFANA / "dashboards" / "trace-logs.json"
SERVICE_HOST = "fluentforward.logging.svc.cluster.local"

# Top-level blocks of a Loki 3 configuration file (docs/sources/shared/configuration.md). The article's
# `tempo:` block is not one of them, and Loki refuses to start on an unknown key.
LOKI_BLOCKS = {
    "target", "auth_enabled", "ballast_bytes", "server", "distributor", "querier", "query_scheduler",
    "frontend", "query_range", "ruler", "ruler_storage", "ingester_client", "ingester", "pattern_ingester",
    "index_gateway", "bloom_build", "bloom_gateway", "storage_config", "chunk_store_config", "schema_config",
    "compactor", "limits_config", "frontend_worker", "table_manager", "runtime_config", "operational_config",
    "tracing", "analytics", "common", "memberlist", "kafka_config", "ui", "shutdown_delay", "metrics_namespace",
}  # fmt: skip
TEMPO_BLOCKS = {
    "target", "http_api_prefix", "server", "distributor", "ingester", "metrics_generator", "querier",
    "query_frontend", "compactor", "storage", "overrides", "memberlist", "usage_report", "cache",
    "stream_over_http_enabled", "multitenancy_enabled",
}  # fmt: skip


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def walk(node: Any, path: str = "") -> Any:
    """Yield (path, key, value) for every mapping entry and list item, depth first."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield path, key, value
            yield from walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield path, index, value
            yield from walk(value, f"{path}[{index}]")


def classic_sections(text: str) -> list[tuple[str, dict[str, str]]]:
    """Parse Fluent Bit's classic format: [SECTION] headers and `key value` lines (keys lowercased)."""
    sections: list[tuple[str, dict[str, str]]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", "@")):
            continue
        if line.startswith("[") and line.endswith("]"):
            sections.append((line[1:-1].upper(), {}))
            continue
        key, _, value = line.partition(" ")
        assert sections, f"entry outside a section: {raw!r}"
        sections[-1][1][key.lower()] = value.strip()
    return sections


def forward_outputs(sections: list[tuple[str, dict[str, str]]]) -> list[dict[str, str]]:
    return [entries for name, entries in sections if name == "OUTPUT" and entries.get("name") == "forward"]


# -- every file parses -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(EXAMPLES.rglob("*.yaml")), ids=lambda p: str(p.relative_to(EXAMPLES)))
def test_yaml_files_parse(path):
    """Each YAML example is one well-formed mapping."""
    assert isinstance(load_yaml(path), dict)


def test_dashboard_is_json_with_a_stable_uid():
    """The dashboard is JSON with a uid, a title and panels."""
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "fluentforward-trace-logs"
    assert dashboard["title"]
    assert dashboard["panels"]


def test_readme_explains_every_file():
    """examples/README.md names every file of the directory."""
    readme = (EXAMPLES / "README.md").read_text()
    for path in sorted(EXAMPLES.rglob("*")):
        if path.is_file() and path.name != "README.md" and "__pycache__" not in path.parts:
            relative = path.relative_to(EXAMPLES)
            assert str(relative) in readme or f"{relative.parent}/" in readme, relative


# -- Loki and Tempo ----------------------------------------------------------------------------------


def test_loki_config_enables_structured_metadata_on_tsdb_v13():
    """Loki stores structured metadata: tsdb index, schema v13, allow_structured_metadata true."""
    config = load_yaml(EXAMPLES / "loki-config.yaml")
    schemas = config["schema_config"]["configs"]
    assert schemas
    assert all(period["store"] == "tsdb" and period["schema"] == "v13" for period in schemas)
    assert config["limits_config"]["allow_structured_metadata"] is True
    assert config["storage_config"]["tsdb_shipper"]


def test_loki_config_avoids_the_articles_invalid_keys():
    """No boltdb-shipper, no `tempo:` block, no enforce_metric_name, no raised label limit."""
    config = load_yaml(EXAMPLES / "loki-config.yaml")
    assert set(config) <= LOKI_BLOCKS, set(config) - LOKI_BLOCKS
    for _, key, value in walk(config):
        assert "boltdb" not in str(key).lower()
        assert not (isinstance(value, str) and "boltdb" in value.lower())
        assert key != "enforce_metric_name"
    assert config["limits_config"].get("max_label_names_per_series", 15) <= 15


def test_tempo_config_receives_otlp():
    """Tempo uses known top-level blocks and listens for OTLP on all interfaces."""
    config = load_yaml(EXAMPLES / "tempo.yaml")
    assert set(config) <= TEMPO_BLOCKS, set(config) - TEMPO_BLOCKS
    protocols = config["distributor"]["receivers"]["otlp"]["protocols"]
    assert protocols["grpc"]["endpoint"].startswith("0.0.0.0:")
    assert config["storage"]["trace"]["backend"] == "local"


# -- Grafana -----------------------------------------------------------------------------------------


def datasources() -> dict[str, dict[str, Any]]:
    return {ds["type"]: ds for ds in load_yaml(DATASOURCES)["datasources"]}


def test_derived_fields_link_to_the_tempo_data_source():
    """Loki's derived fields point at Tempo's uid; one matches the trace_id structured metadata."""
    sources = datasources()
    fields = sources["loki"]["jsonData"]["derivedFields"]
    assert {field["datasourceUid"] for field in fields} == {sources["tempo"]["uid"]}
    assert {field["url"] for field in fields} == {"$${__value.raw}"}
    assert [f["matcherRegex"] for f in fields if f["matcherType"] == "label"] == ["trace_id"]


@pytest.mark.parametrize(
    "line",
    [
        'level=info msg="paid" trace_id=4bf92f3577b34da6a3ce929d0e0e4736 span_id=00f067aa0ba902b7',
        '{"level":"info","trace_id":"4bf92f3577b34da6a3ce929d0e0e4736","msg":"paid"}',
        '{"traceId": "4BF92F3577B34DA6A3CE929D0E0E4736"}',
        '{"trace.id":"4bf92f3577b34da6a3ce929d0e0e4736"}',
    ],
)
def test_line_regex_captures_the_trace_id(line):
    """The regex derived field has one capture group and captures the id from common line shapes."""
    (regex,) = [
        f["matcherRegex"]
        for f in datasources()["loki"]["jsonData"]["derivedFields"]
        if f["matcherType"] == "regex"
    ]
    pattern = re.compile(regex)
    assert pattern.groups == 1
    match = pattern.search(line)
    assert match is not None
    assert match.group(1).lower() == "4bf92f3577b34da6a3ce929d0e0e4736"


def test_traces_to_logs_query_matches_64_bit_origin_ids():
    """Tempo links to Loki; its query matches the stored W3C id whether Grafana shows 16 or 32 chars."""
    sources = datasources()
    options = sources["tempo"]["jsonData"]["tracesToLogsV2"]
    assert options["datasourceUid"] == sources["loki"]["uid"]
    assert options["customQuery"] is True
    query = options["query"]
    assert query.startswith("{$${__tags}}")
    value = re.search(r'\| trace_id=~"([^"]+)"', query)
    assert value is not None
    for shown, stored in [
        ("a3ce929d0e0e4736", "0000000000000000a3ce929d0e0e4736"),  # upper 64 bits zero: Grafana trims
        ("4bf92f3577b34da6a3ce929d0e0e4736", "4bf92f3577b34da6a3ce929d0e0e4736"),
    ]:
        # LogQL regex matchers are anchored, like fullmatch.
        regex = value.group(1).replace("$${__trace.traceId}", shown)
        assert re.fullmatch(regex, stored)
        assert not re.fullmatch(regex, "1" + stored[1:])


def test_provisioning_escapes_grafana_variables():
    """Grafana expands ${...} in provisioning files, so every Grafana variable is written $${...}."""
    values = [value for _, _, value in walk(load_yaml(DATASOURCES)) if isinstance(value, str)]
    assert any("$${" in value for value in values)
    assert not [value for value in values if re.search(r"(?<!\$)\$\{", value)]


def test_dashboard_queries_use_provisioned_data_sources():
    """Every data source the dashboard names is provisioned, and every query uses defined variables."""
    uids = {ds["uid"] for ds in datasources().values()}
    dashboard = json.loads(DASHBOARD.read_text())
    referenced = {value["uid"] for _, key, value in walk(dashboard) if key == "datasource"}
    assert referenced
    assert referenced <= uids
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    builtins = {"__interval", "__range", "__auto", "__all"}
    for _, key, value in walk(dashboard):
        if key == "expr":
            used = set(re.findall(r"\$\{?(\w+)", value))
            assert used <= variables | builtins, used - variables - builtins


def test_dashboard_filters_by_structured_metadata_not_by_label():
    """The trace id is matched after the stream selector (structured metadata), never inside it."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [value for _, key, value in walk(dashboard) if key == "expr"]
    assert any("| trace_id" in expr and "$trace_id" in expr for expr in exprs)
    for expr in exprs:
        for selector in re.findall(r"\{[^}]*\}", expr):
            assert "trace_id" not in selector, expr


def test_dashboard_provider_loads_files():
    """The dashboard provider reads dashboards from a directory."""
    providers = load_yaml(GRAFANA / "provisioning" / "dashboards" / "dashboards.yaml")["providers"]
    assert [p["type"] for p in providers] == ["file"]
    assert providers[0]["options"]["path"]


# -- shippers ----------------------------------------------------------------------------------------


def test_fluent_bit_classic_config_waits_for_acks():
    """fluent-bit.conf: kubernetes filter merges JSON logs; forward output requires acks and gzips."""
    sections = classic_sections((EXAMPLES / "fluent-bit.conf").read_text())
    (kube,) = [entries for name, entries in sections if name == "FILTER" and entries["name"] == "kubernetes"]
    assert (kube["merge_log"], kube["keep_log"]) == ("On", "Off")
    (output,) = forward_outputs(sections)
    assert output["require_ack_response"] == "true"
    assert output["compress"] == "gzip"
    assert output["host"] == SERVICE_HOST
    assert {"shared_key", "self_hostname", "tls"} <= set(output)


def test_fluent_bit_yaml_config_waits_for_acks_over_tls():
    """fluent-bit.yaml: the same pipeline, with TLS verification on."""
    pipeline = load_yaml(EXAMPLES / "fluent-bit.yaml")["pipeline"]
    (kube,) = [f for f in pipeline["filters"] if f["name"] == "kubernetes"]
    assert (kube["merge_log"], kube["keep_log"]) == (True, False)
    (output,) = [o for o in pipeline["outputs"] if o["name"] == "forward"]
    assert output["require_ack_response"] is True
    assert output["compress"] == "gzip"
    assert output["tls"] is True
    assert output["tls.verify"] is True
    assert {"shared_key", "self_hostname", "tls.ca_file"} <= set(output)


def test_upstream_nodes_each_require_acks():
    """In Upstream mode the forward settings come from each [NODE], so each one sets them."""
    sections = classic_sections((EXAMPLES / "upstream.conf").read_text())
    assert [name for name, _ in sections][0] == "UPSTREAM"
    nodes = [entries for name, entries in sections if name == "NODE"]
    assert len(nodes) >= 2
    for node in nodes:
        assert node["require_ack_response"] == "true"
        assert node["compress"] == "gzip"
        assert {"name", "host", "port", "shared_key", "self_hostname"} <= set(node)
    assert len({node["host"] for node in nodes}) == len(nodes)


def test_fluent_bit_helm_values_forward_with_acks():
    """The official chart's values carry a forward output with acks and the shared key from a Secret."""
    values = load_yaml(EXAMPLES / "fluent-bit-values.yaml")
    (output,) = forward_outputs(classic_sections(values["config"]["outputs"]))
    assert output["require_ack_response"] == "true"
    assert output["shared_key"] == "${FLUENTFORWARD_SHARED_KEY}"
    (variable,) = [e for e in values["env"] if e["name"] == "FLUENTFORWARD_SHARED_KEY"]
    assert variable["valueFrom"]["secretKeyRef"] == {"name": "fluentforward", "key": "shared-key"}
    filters = classic_sections(values["config"]["filters"])
    (kube,) = [entries for name, entries in filters if entries["name"] == "kubernetes"]
    assert (kube["merge_log"], kube["keep_log"]) == ("On", "Off")


def test_fluentd_output_requires_acks_with_a_shared_key():
    """fluentd.conf forwards with require_ack_response and a <security> shared key."""
    text = (EXAMPLES / "fluentd.conf").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    assert "@type forward" in lines
    assert "require_ack_response true" in lines
    security = text[text.index("<security>") : text.index("</security>")]
    assert "shared_key" in security
    assert "self_hostname" in security
    assert f"host {SERVICE_HOST}" in lines


def test_shipper_configs_use_the_chart_names():
    """The Service host and the Upstream's per-pod hosts are the names the chart creates."""
    helm = pytest.importorskip("helm_python", reason="helm-python-sdk is a test dependency")
    chart = helm.Chart.load(REPO / "charts" / "fluentforward")
    notes = chart.render({"replicaCount": 3}, name="fluentforward", namespace="logging")[
        "fluentforward/templates/NOTES.txt"
    ]
    assert f"Host                  {SERVICE_HOST}" in notes
    upstream = classic_sections((EXAMPLES / "upstream.conf").read_text())
    for name, node in upstream:
        if name == "NODE":
            assert f"{node['host']}:{node['port']}" in notes


# -- sample applications -----------------------------------------------------------------------------


def test_log4j2_layout_writes_mdc_trace_fields_at_top_level():
    """log4j2.xml adds trace_id and span_id from the MDC as top-level JSON fields."""
    root = ET.parse(EXAMPLES / "apps" / "java-log4j2" / "log4j2.xml").getroot()
    fields = {
        field.get("key"): json.loads(field.get("value", ""))
        for field in root.iter("EventTemplateAdditionalField")
        if field.get("format") == "JSON"
    }
    for key in ("trace_id", "span_id"):
        assert fields[key] == {"$resolver": "mdc", "key": key}
    assert "ThreadContext" in (EXAMPLES / "apps" / "java-log4j2" / "OrderService.java").read_text()


def test_python_app_is_valid_python():
    """The structlog example compiles and formats ids as 32/16 lowercase hex."""
    source = (EXAMPLES / "apps" / "python-structlog" / "app.py").read_text()
    ast.parse(source)
    assert '"032x"' in source
    assert '"016x"' in source


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed")
def test_node_app_is_valid_javascript():
    """The pino example passes `node --check`."""
    result = subprocess.run(
        ["node", "--check", str(EXAMPLES / "apps" / "node-pino" / "app.js")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_go_app_logs_trace_fields_only_for_valid_spans():
    """The zap example writes trace_id and span_id and checks the span context first."""
    source = (EXAMPLES / "apps" / "go-zap" / "main.go").read_text()
    assert source.startswith("// Command go-zap")
    assert 'zap.String("trace_id"' in source
    assert 'zap.String("span_id"' in source
    assert "IsValid()" in source


# -- the demo, end to end ----------------------------------------------------------------------------


@pytest.mark.slow
def test_demo_records_arrive_with_normalized_trace_ids(tmp_path):
    """Every demo record is spooled, and its trace and span ids are the W3C ones the demo expects."""
    with ServerProcess(tmp_path / "spool") as server:
        result = subprocess.run(
            [
                sys.executable,
                str(EXAMPLES / "demo.py"),
                "--to",
                f"127.0.0.1:{server.port}",
                "--json",
                "--count",
                "42",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        expected = {row["demo_seq"]: row for row in map(json.loads, result.stdout.splitlines())}
        stored = {row["record"]["demo_seq"]: row for row in spool_records(tmp_path / "spool")}
    assert len(expected) == 42
    assert stored.keys() == expected.keys()
    for seq, row in stored.items():
        want = expected[seq]
        assert (row["trace_id"], row["span_id"]) == (want["trace_id"], want["span_id"]), want["spelling"]
    spellings = {row["spelling"] for row in expected.values()}
    assert len(spellings) == 14
    assert any(row["trace_id"] is None for row in expected.values())
    assert any(row["trace_id"] and row["trace_id"].startswith("0" * 16) for row in expected.values())


def test_demo_is_deterministic_for_a_seed():
    """The same seed builds the same records; another seed builds other ids."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        import demo  # noqa: PLC0415 - examples/ is not a package
    finally:
        sys.path.remove(str(EXAMPLES))
    first = [(r.record, r.trace_id) for r in demo.build_records(30, seed=7)]
    assert first == [(r.record, r.trace_id) for r in demo.build_records(30, seed=7)]
    assert first != [(r.record, r.trace_id) for r in demo.build_records(30, seed=8)]
    assert all(r.trace_id is None or re.fullmatch("[0-9a-f]{32}", r.trace_id) for r in demo.build_records(30))
