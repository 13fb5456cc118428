"""deploy/dagster.yaml against a real PostgreSQL server and the S3 server: a run's record, its events
and its compute logs land where the deployment will look for them."""

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from contextlib import closing
from pathlib import Path

import boto3
import psycopg2
import pytest
from dagster import AssetExecutionContext, DagsterEventType, DagsterInstance, MaterializeResult, asset, materialize

from pipelines.launch import free_port

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
# Characters that must survive the connection URL Dagster builds from the password field.
PASSWORD = "s3cret:with@odd/chars"


def _postgres_bindir() -> Path | None:
    """The newest Debian PostgreSQL server binaries, else whatever initdb is on PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    initdb = found[-1] if found else shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@pytest.fixture(scope="module")
def postgres():
    """A throwaway PostgreSQL server on 127.0.0.1 with a password-protected `dagster` user and database."""
    bindir = _postgres_bindir()
    if bindir is None:
        message = "no PostgreSQL server binaries (initdb); make test installs Debian's postgresql"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    # PostgreSQL refuses to run as root: as root, run the server as the `postgres` system user.
    as_owner = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    # Not under pytest's tmp_path: that lives in a root-only folder the postgres user cannot enter.
    root = Path(tempfile.mkdtemp(prefix="prologue-pg-"))
    data, log, pwfile = root / "data", root / "server.log", root / "superuser.pw"
    pwfile.write_text("superuser-pw\n")
    if as_owner:
        for p in (root, pwfile):
            shutil.chown(p, "postgres", "postgres")
    port = free_port()
    pg_ctl = [*as_owner, str(bindir / "pg_ctl"), "-D", str(data)]

    def run(cmd: list[str]) -> None:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            server_log = log.read_text() if log.exists() else ""
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout}{done.stderr}{server_log}")

    try:
        initdb = [*as_owner, str(bindir / "initdb"), "-D", str(data), "-U", "postgres", f"--pwfile={pwfile}"]
        run([*initdb, "--auth=scram-sha-256", "--encoding=UTF8", "--no-sync"])
        # fsync off: a test database need not survive a power cut, and start-up/DDL get faster
        options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
        run([*pg_ctl, "-l", str(log), "-o", options, "-w", "-t", "30", "start"])
        superuser = {"host": "127.0.0.1", "port": port, "user": "postgres", "password": "superuser-pw"}
        with closing(psycopg2.connect(**superuser, dbname="postgres")) as admin:
            admin.autocommit = True  # CREATE DATABASE cannot run inside a transaction
            with admin.cursor() as cur:
                cur.execute("CREATE ROLE dagster LOGIN PASSWORD %s", (PASSWORD,))
                cur.execute("CREATE DATABASE dagster OWNER dagster")
        yield {"host": "127.0.0.1", "port": port, "user": "dagster", "password": PASSWORD, "dbname": "dagster"}
    finally:
        # fast: disconnect any client still open instead of waiting for it
        subprocess.run([*pg_ctl, "-m", "fast", "-w", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


@asset
def greeting(context: AssetExecutionContext) -> MaterializeResult:
    print("stdout line from the deploy test")
    context.log.info("log line from the deploy test")
    return MaterializeResult(metadata={"words": 2})


@pytest.mark.s3
def test_deploy_instance_stores_runs_in_postgres_and_compute_logs_in_s3(postgres, s3_endpoint, tmp_path, monkeypatch):
    from dagster._core.run_coordinator import QueuedRunCoordinator
    from dagster_aws.s3.compute_log_manager import S3ComputeLogManager
    from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage, PostgresScheduleStorage

    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(DEPLOY / "dagster.yaml", home / "dagster.yaml")
    bucket, prefix = f"dagster-logs-{uuid.uuid4().hex[:8]}", "compute-logs"
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket=bucket)
    env = {
        "DAGSTER_HOME": str(home),
        "DAGSTER_PG_HOST": postgres["host"],
        "DAGSTER_PG_PORT": str(postgres["port"]),
        "DAGSTER_PG_USERNAME": postgres["user"],
        "DAGSTER_PG_PASSWORD": postgres["password"],
        "DAGSTER_PG_DB": postgres["dbname"],
        "DAGSTER_COMPUTE_LOG_BUCKET": bucket,
        "DAGSTER_COMPUTE_LOG_PREFIX": prefix,
        "AWS_ENDPOINT_URL": s3_endpoint,
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)

    with DagsterInstance.get() as instance:
        assert isinstance(instance.run_storage, PostgresRunStorage)
        assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
        assert isinstance(instance.schedule_storage, PostgresScheduleStorage)
        assert isinstance(instance.compute_log_manager, S3ComputeLogManager)
        assert isinstance(instance.run_coordinator, QueuedRunCoordinator)
        concurrency = instance.get_concurrency_config()
        assert concurrency.run_queue_config.max_concurrent_runs == 4
        assert concurrency.pool_config.default_pool_limit == 1  # one accelerator-bound step at a time
        assert instance.run_monitoring_enabled and instance.run_monitoring_start_timeout_seconds == 1200
        assert instance.run_retries_enabled and instance.run_retries_max_retries == 2
        result = materialize([greeting], instance=instance, tags={"prologue/gpu": "true"})
        assert result.success
        run_id = result.run_id

    # Read back through a separate SQL connection: what the webserver and daemon would see.
    with closing(psycopg2.connect(**postgres)) as conn, conn.cursor() as cur:
        cur.execute("SELECT status FROM runs WHERE run_id = %s", (run_id,))
        assert cur.fetchall() == [("SUCCESS",)]
        cur.execute("SELECT value FROM run_tags WHERE run_id = %s AND key = 'prologue/gpu'", (run_id,))
        assert cur.fetchall() == [("true",)]
        cur.execute(
            "SELECT dagster_event_type, asset_key FROM event_logs WHERE run_id = %s AND dagster_event_type IS NOT NULL",
            (run_id,),
        )
        events = cur.fetchall()
    kinds = [kind for kind, _ in events]
    assert (DagsterEventType.ASSET_MATERIALIZATION.value, '["greeting"]') in events
    # the stored names of run events are the legacy ones (RUN_START is stored as PIPELINE_START)
    for kind in (DagsterEventType.RUN_START, DagsterEventType.STEP_SUCCESS, DagsterEventType.RUN_SUCCESS):
        assert kinds.count(kind.value) == 1, f"{kind.value} in {kinds}"

    # The step's stdout and stderr were uploaded when the capture ended (the last upload is synchronous).
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/storage/{run_id}/")
    keys = [o["Key"] for o in listed.get("Contents", [])]
    out = [k for k in keys if k.endswith(".out")]
    err = [k for k in keys if k.endswith(".err")]
    assert len(out) == 1 and len(err) == 1, keys
    assert "stdout line from the deploy test" in s3.get_object(Bucket=bucket, Key=out[0])["Body"].read().decode()
    assert "log line from the deploy test" in s3.get_object(Bucket=bucket, Key=err[0])["Body"].read().decode()


def test_multinode_launcher_trains_across_two_simulated_nodes(tmp_path, tiny_graph):
    """deploy/train_ar_multinode.py as two nodes on this machine (one rank each, gloo): node 0 prints
    node 1's command and waits at the rendezvous; the model trains with both ranks in sync."""
    import json
    import sys

    import torch
    from safetensors.torch import load

    from pipelines.store import Store
    from tests.conftest import UPSTREAM_OF_AR, copy_store

    root = DEPLOY.parent
    store = tmp_path / "store"
    copy_store(tiny_graph.root, Store(str(store)), UPSTREAM_OF_AR)
    cmd = [sys.executable, str(DEPLOY / "train_ar_multinode.py"), "--profile", "tiny", "--variant", "baseline",
           "--store", str(store), "--nodes", "2", "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           "--set", "ar_train.processes=2"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PROLOGUE_RANK_WEIGHTS": "1"}  # each rank saves its weights
    node0 = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    node1 = None
    try:
        lines = []
        for line in node0.stdout:
            lines.append(line)
            if lines[-2:-1] and lines[-2].startswith("==> on node 1"):
                # the printed line is `VAR=value ... python -m torch.distributed.run ...`: run it as printed
                node1 = subprocess.Popen(["bash", "-c", line.strip()], cwd=root, env=env,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        assert node0.wait(timeout=600) == 0, "".join(lines)[-3000:]
        assert node1 is not None, "node 0 printed no command for node 1"
        assert node1.wait(timeout=120) == 0, node1.stderr.read()[-3000:]
    finally:
        for proc in (node0, node1):
            if proc is not None and proc.poll() is None:
                proc.kill()
    [manifest] = (store / "ar_model").glob("*/_manifest.json")
    metrics = json.loads(manifest.read_text())["metrics"]
    assert metrics["ranks"] == 2 and metrics["val_ce_visual"] > 0
    # data parallelism kept the ranks identical: their own final weights, bit for bit
    ranks = [load((manifest.parent / "ranks" / f"rank-{r}.safetensors").read_bytes()) for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys() and len(ranks[0]) > 0
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    final = load((manifest.parent / "model" / "ar.safetensors").read_bytes())
    assert all(torch.equal(final[k], ranks[0][k].float()) for k in final)  # and they are what was committed


def test_compose_images_are_pinned_and_pullable_registries():
    """Every pulled image has an explicit version (MinIO also a digest); none comes from the removed
    Docker Hub minio/* repositories; only the locally built image may be `latest`."""
    import yaml

    root = Path(__file__).resolve().parents[1] / "deploy"
    for name in ("compose.yaml", "compose.gpu.yaml"):
        services = (yaml.safe_load((root / name).read_text()) or {}).get("services", {})
        for service, spec in services.items():
            image = spec.get("image")
            if image is None or spec.get("build") or spec.get("pull_policy") == "never":
                continue  # built here, not pulled
            assert not image.startswith("minio/"), (name, service, image)
            assert ":" in image.split("/")[-1] and not image.endswith(":latest"), (name, service, image)
            if "minio" in image:
                assert image.startswith("quay.io/minio/") and "@sha256:" in image, (name, service, image)


POOL_JOB = """
import json, os, sys, time
from pathlib import Path
from dagster import DagsterInstance, asset, materialize
from dagster._core.instance.ref import InstanceRef
from assets.resources import ACCELERATOR_POOL

home = Path(sys.argv[1])

@asset(pool=ACCELERATOR_POOL)
def holds_the_accelerator():
    start = time.time()
    (home / f"started-{os.getpid()}").write_text(str(start))
    deadline = start + 120
    while not (home / "release").exists() and time.time() < deadline:  # held until the test lets go
        time.sleep(0.05)
    return [start, time.time()]

instance = DagsterInstance.from_ref(InstanceRef.from_dir(str(home)))
result = materialize([holds_the_accelerator], instance=instance)
print(json.dumps(result.output_for_node("holds_the_accelerator")))
"""


def _wait_for(condition, what: str, timeout: float = 120.0):
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_two_runs_that_need_the_accelerator_pool_run_one_after_the_other(tmp_path):
    """deploy/dagster.yaml's pool limit (its `concurrency` block, on a SQLite instance here): a run whose step
    needs the accelerator pool while another run's step holds it queues, and starts only after the pool is let go.
    (The second run starts once the first holds the pool: two claims in the same few milliseconds can both win,
    deploy/README.md.)"""
    import json

    import yaml

    from assets.definitions import defs
    from assets.resources import ACCELERATOR_POOL

    deploy = yaml.safe_load((Path(__file__).resolve().parents[1] / "deploy" / "dagster.yaml").read_text())
    home = tmp_path / "home"
    home.mkdir()
    config = {"concurrency": {"pools": deploy["concurrency"]["pools"]}, "telemetry": {"enabled": False}}
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))
    from dagster._core.instance.ref import InstanceRef

    instance = DagsterInstance.from_ref(InstanceRef.from_dir(str(home)))  # the schema, once: not by two at once
    # The pool's slots, once, as deploy/README.md has the operator do: Dagster otherwise allocates a default-limit
    # pool's slots at its first claim, and two first claims at the same moment each allocated a slot (seen in CI).
    assert instance.event_log_storage.initialize_concurrency_limit_to_default(ACCELERATOR_POOL)
    assert instance.event_log_storage.get_concurrency_info(ACCELERATOR_POOL).slot_count == 1
    instance.dispose()
    script = tmp_path / "pool_job.py"
    script.write_text(POOL_JOB)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}

    def launch():
        return subprocess.Popen([sys.executable, str(script), str(home)], stdout=subprocess.PIPE, text=True, env=env)

    first = launch()
    _wait_for(lambda: any(home.glob(f"started-{first.pid}")), "the first run to hold the pool")
    second = launch()
    instance = DagsterInstance.from_ref(InstanceRef.from_dir(str(home)))
    try:
        _wait_for(lambda: instance.event_log_storage.get_concurrency_info(ACCELERATOR_POOL).pending_step_count == 1,
                  "the second run to queue for the pool")  # fmt: skip
        info = instance.event_log_storage.get_concurrency_info(ACCELERATOR_POOL)
        assert info.active_slot_count == 1 and not any(home.glob(f"started-{second.pid}")), info  # it waits
    finally:
        instance.dispose()
        (home / "release").touch()
    spans = [json.loads(p.communicate(timeout=300)[0].strip().splitlines()[-1]) for p in (first, second)]
    assert first.returncode == 0 and second.returncode == 0
    assert spans[0][1] <= spans[1][0], spans  # the second held the pool only after the first let it go
    pooled = {a.key.to_user_string() for a in defs.assets if getattr(a, "op", None) is not None
              and a.op.pool == ACCELERATOR_POOL}  # fmt: skip
    assert pooled == {"domain_classifier", "tokenizer", "token_dataset", "ar_model", "sampling_tuning", "samples"}


# --- The compose files and the Helm values against vendored schemas (deploy/schemas/README.md) ---------------
# Offline: every validator gets an empty `referencing` registry, so a reference that is not inside the vendored
# file raises instead of being fetched.

SCHEMAS = DEPLOY / "schemas"


def _load_yaml(path: Path):
    import yaml

    return yaml.safe_load(path.read_text())


def _compose_validator():
    import json

    from jsonschema import Draft201909Validator
    from referencing import Registry

    schema = json.loads((SCHEMAS / "compose-spec.json").read_text())
    return Draft201909Validator(schema, registry=Registry()), schema


def _merge_compose(base, override):
    """`docker compose -f base -f override`: mappings merge key by key, the override's scalars win. Compose has
    per-key rules for sequences (ports, volumes, ...); our override adds none that the base also has."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = _merge_compose(base[key], value) if key in base else value
        return merged
    assert not (isinstance(base, list) and isinstance(override, list)), "sequence merge: extend _merge_compose"
    return override


def _chart_overlay_schema(node, in_then=False):
    """The chart's schema as it applies to an override file such as ours. Helm validates the chart's defaults
    merged with ours, so the keys the schema requires come from the chart's own values.yaml: drop `required`,
    except inside the if/then rules (e.g. type K8sRunLauncher needs config.k8sRunLauncher). The schema's
    `$ref`s into the Kubernetes definitions (remote, yannh/kubernetes-json-schema) are dropped too: the Kubernetes
    objects (resources, tolerations, volumes, ...) keep only their sibling checks (object/array types)."""
    if isinstance(node, dict):
        return {
            key: _chart_overlay_schema(value, in_then or key == "then")
            for key, value in node.items()
            if not (key == "required" and not in_then)
            and not (key == "$ref" and isinstance(value, str) and not value.startswith("#"))
        }
    if isinstance(node, list):
        return [_chart_overlay_schema(x, in_then) for x in node]
    return node


def _chart_validator():
    import json

    from jsonschema import Draft202012Validator
    from referencing import Registry

    schema = json.loads((SCHEMAS / "dagster-chart-values.schema.json").read_text())
    return Draft202012Validator(_chart_overlay_schema(schema), registry=Registry()), schema


def _errors(validator, document) -> list[tuple[str, str]]:
    """Every error as (JSON path, message), including those inside anyOf/oneOf branches: a typo under an
    optional block (`anyOf: [<block>, null]`) is named by the branch's error, not by the anyOf's summary."""
    found = []

    def add(errors):
        for e in errors:
            found.append((e.json_path, e.message))
            add(e.context or [])

    add(validator.iter_errors(document))
    return found


def test_vendored_schemas_are_valid_json_schemas_and_resolve_offline():
    from jsonschema import Draft201909Validator, Draft202012Validator
    from referencing import Registry
    from referencing.exceptions import Unresolvable

    _, compose_schema = _compose_validator()
    Draft201909Validator.check_schema(compose_schema)
    _, chart_schema = _chart_validator()
    Draft202012Validator.check_schema(chart_schema)
    # the keys our files use are ones these schema versions know (not a typo-tolerant fallback)
    service = compose_schema["definitions"]["service"]["properties"]
    assert {"pull_policy", "shm_size", "healthcheck", "depends_on", "deploy"} <= service.keys()
    assert {"concurrency", "dagsterDaemon", "runLauncher"} <= chart_schema["properties"].keys()
    # the only references outside the chart's file are the Kubernetes definitions the overlay drops, and the
    # unmodified schema cannot reach them here (no download at test time)
    remote = set()

    def walk(node):
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and not ref.startswith("#"):
                remote.add(ref.split("#")[0])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(chart_schema)
    assert remote == {"https://raw.githubusercontent.com/yannh/kubernetes-json-schema/master/v1.19.0/_definitions.json"}
    unmodified = Draft202012Validator(chart_schema, registry=Registry())
    with pytest.raises(Unresolvable):
        list(unmodified.iter_errors(_load_yaml(DEPLOY / "helm" / "values.yaml")))


def test_compose_files_validate_against_compose_spec_schema():
    """Each file alone (docker compose validates every file it is given) and the two merged as
    `-f compose.yaml -f compose.gpu.yaml`; every merged service has an image or a build (the spec's
    service constraint, which Compose checks on the merged model)."""
    from jsonschema import Draft201909Validator
    from referencing import Registry

    validator, schema = _compose_validator()
    base = _load_yaml(DEPLOY / "compose.yaml")
    gpu = _load_yaml(DEPLOY / "compose.gpu.yaml")
    assert _errors(validator, base) == []
    assert _errors(validator, gpu) == []
    merged = _merge_compose(base, gpu)
    assert _errors(validator, merged) == []
    assert merged["services"]["code-server"]["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    assert merged["services"]["code-server"]["build"]["dockerfile"] == "deploy/Dockerfile"  # base kept
    constraint = Draft201909Validator(schema["definitions"]["constraints"]["service"], registry=Registry())
    for name, service in merged["services"].items():
        assert _errors(constraint, service) == [], name


@pytest.mark.parametrize(
    ("file", "plant", "path", "words"),
    [
        # a misspelled service key
        ("compose.yaml", lambda d: d["services"]["webserver"].update(imagee=d["services"]["webserver"].pop("image")),
         "$.services.webserver", ["imagee"]),
        # a value outside the spec's enum
        ("compose.yaml", lambda d: d["services"]["daemon"].update(pull_policy="nevr"),
         "$.services.daemon.pull_policy", ["nevr"]),
        # a misspelled key in the GPU reservation
        ("compose.gpu.yaml",
         lambda d: d["services"]["code-server"]["deploy"]["resources"]["reservations"]["devices"][0].update(
             capabilites=["gpu"]),
         "$.services['code-server'].deploy.resources.reservations.devices[0]", ["capabilites"]),
    ],
    ids=["misspelled-service-key", "pull-policy-enum", "gpu-device-key"],
)
def test_compose_spec_schema_catches_planted_typo(file, plant, path, words):
    import copy

    validator, _ = _compose_validator()
    document = copy.deepcopy(_load_yaml(DEPLOY / file))
    assert _errors(validator, document) == []
    plant(document)
    errors = _errors(validator, document)
    assert any(p == path and all(w in message for w in words) for p, message in errors), errors


def test_helm_values_validate_against_dagster_chart_schema():
    validator, _ = _chart_validator()
    values = _load_yaml(DEPLOY / "helm" / "values.yaml")
    assert _errors(validator, values) == []
    # the queue and pool limits sit in the chart's `concurrency` block (the schema forbids unknown keys there)
    assert values["concurrency"] == {"enabled": True, "pools": {"defaultLimit": 1}, "runs": {"maxConcurrentRuns": 4}}


@pytest.mark.parametrize(
    ("plant", "path", "words"),
    [
        # a misspelled key under dagsterDaemon (the chart forbids unknown keys there)
        (lambda v: v["dagsterDaemon"].update(runMonitorng=v["dagsterDaemon"].pop("runMonitoring")),
         "$.dagsterDaemon", ["runMonitorng"]),
        # a string where the chart wants an integer
        (lambda v: v["concurrency"]["pools"].update(defaultLimit="1"), "$.concurrency.pools.defaultLimit", ["'1'"]),
        # a misspelled key in the concurrency block
        (lambda v: v["concurrency"]["runs"].update(maxConcurentRuns=v["concurrency"]["runs"].pop("maxConcurrentRuns")),
         "$.concurrency.runs", ["maxConcurentRuns"]),
        # a misspelled key of the run pod spec
        (lambda v: v["runLauncher"]["config"]["k8sRunLauncher"]["runK8sConfig"].update(
            containerConfg=v["runLauncher"]["config"]["k8sRunLauncher"]["runK8sConfig"].pop("containerConfig")),
         "$.runLauncher.config.k8sRunLauncher.runK8sConfig", ["containerConfg"]),
        # a run launcher type the chart does not have
        (lambda v: v["runLauncher"].update(type="K8SRunLauncher"), "$.runLauncher.type", ["K8SRunLauncher"]),
    ],
    ids=["daemon-key", "pool-limit-type", "concurrency-key", "run-pod-key", "launcher-type"],
)
def test_dagster_chart_schema_catches_planted_typo(plant, path, words):
    import copy

    validator, _ = _chart_validator()
    values = copy.deepcopy(_load_yaml(DEPLOY / "helm" / "values.yaml"))
    assert _errors(validator, values) == []
    plant(values)
    errors = _errors(validator, values)
    assert any(p == path and all(w in message for w in words) for p, message in errors), errors
