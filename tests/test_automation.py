"""Automation through Dagster's evaluation APIs: the new-data sensor (one run per arrival, and that
run re-shards and retrains), the retrain schedule, and the run-failure summary."""

from __future__ import annotations

from pathlib import Path

import pytest
from dagster import (
    DagsterEventType,
    DagsterInstance,
    DefaultScheduleStatus,
    PipesSubprocessClient,
    build_run_status_sensor_context,
    build_schedule_context,
    build_sensor_context,
    materialize,
)

from assets.automation import ALL_VARIANTS, new_images_sensor, retrain_schedule, run_failure_summary
from assets.data import image_shards
from assets.definitions import defs
from assets.resources import ProfileResource, StoreResource
from pipelines.sources import open_source


def _write_pngs(root: Path, fashion_mnist: Path, split: str, per_class: int, skip: int = 0) -> int:
    """`per_class` Fashion-MNIST images of every class as `<root>/<split>/<class>/<key>.png`."""
    source = open_source("idx", str(fashion_mnist), split)
    taken: dict[int, int] = {}
    written = 0
    for item in source.items():
        seen = taken.get(item.label, 0)
        taken[item.label] = seen + 1
        if skip <= seen < skip + per_class:
            folder = root / split / f"class{item.label}"
            folder.mkdir(parents=True, exist_ok=True)
            source.read(item).save(folder / f"{item.key}.png")
            written += 1
        if all(taken.get(c, 0) >= skip + per_class for c in range(len(source.classes))):
            break
    return written


# short schedules: the retrain run must train everything anew, not train well (shards of 32: the
# domain classifier holds one train shard out and trains on the others; its accuracy is not the point)
SHORT = ["tokenizer_train.steps=10", "tokenizer_train.gan_start=5", "tokenizer_train.checkpoint_every=10",
         "ar_train.steps=10", "ar_train.checkpoint_every=10", "evaluation.samples_per_class=4",
         "evaluation.sample_shard_size=4", "data.shard_size=32", "evaluation.domain_min_top1=0"]  # fmt: skip


@pytest.fixture
def watched(tmp_path, fashion_mnist):
    """A class-folder source (12 train / 4 val images per class) and tiny-profile resources on it."""
    root = tmp_path / "incoming"
    n_train = _write_pngs(root, fashion_mnist, "train", 12)
    _write_pngs(root, fashion_mnist, "val", 4)
    overrides = [f"data.{s}.{k}" for s in ("train", "val") for k in ("kind=folder", f"url={root}")]
    resources = {
        "store": StoreResource(url=str(tmp_path / "store")),
        "profile": ProfileResource(name="tiny", overrides=[*overrides, *SHORT, "evaluation.reference_images=0"]),
        "pipes_subprocess_client": PipesSubprocessClient(),
    }
    return root, n_train, resources


def test_new_images_make_exactly_one_run_request_and_that_run_reshards_and_retrains(watched, fashion_mnist):
    root, n_train, resources = watched
    instance = DagsterInstance.ephemeral()
    assert materialize([image_shards], resources=resources, instance=instance).success

    # first tick: the listing is already sharded, so nothing to do; the listing becomes the cursor
    tick = new_images_sensor.evaluate_tick(build_sensor_context(resources=resources))
    assert tick.run_requests == [] and "already in the store" in tick.skip_message
    cursor = tick.cursor
    again = new_images_sensor.evaluate_tick(build_sensor_context(resources=resources, cursor=cursor))
    assert again.run_requests == [] and "unchanged" in again.skip_message

    # new images arrive: exactly one run request, keyed by the new listing
    added = _write_pngs(root, fashion_mnist, "train", 2, skip=12)
    tick = new_images_sensor.evaluate_tick(build_sensor_context(resources=resources, cursor=cursor))
    [request] = tick.run_requests
    assert new_images_sensor.job_name == "retrain" and tick.cursor != cursor
    assert request.run_key == f"listing-{tick.cursor}" and request.tags["prologue/listing"] == tick.cursor
    assert request.tags.items() >= {**ALL_VARIANTS, "prologue/gpu": "true"}.items()
    later = new_images_sensor.evaluate_tick(build_sensor_context(resources=resources, cursor=tick.cursor))
    assert later.run_requests == []  # the next tick does not ask again

    # that run re-shards and retrains both variants on the new data
    result = defs.resolve_job_def("retrain").execute_in_process(
        instance=instance, resources=resources, tags=request.tags
    )
    assert result.success
    mats = {
        (e.asset_key.to_user_string(), e.materialization.partition): {
            k: v.value for k, v in e.materialization.metadata.items()
        }
        for e in result.get_asset_materialization_events()
    }
    shards = mats[("image_shards", None)]
    assert shards["train_samples"] == n_train + added and shards["train_reused_existing"] is False
    assert shards["val_reused_existing"] is True  # val did not change
    for variant in ("baseline", "prologue"):
        for name in ("tokenizer", "token_dataset", "ar_model"):
            assert mats[(name, variant)]["reused_existing"] is False, (name, variant)
        assert mats[("tokenizer", variant)]["steps"] == 10
    assert ("results_table", None) in mats
    done = new_images_sensor.evaluate_tick(build_sensor_context(resources=resources))
    assert done.run_requests == []  # a restarted sensor (no cursor) sees the listing is sharded


def test_retrain_schedule_is_off_by_default_and_runs_every_variant():
    assert retrain_schedule.default_status == DefaultScheduleStatus.STOPPED
    assert retrain_schedule.cron_schedule == "0 3 * * 0"  # the profile's operations.retrain_cron
    data = retrain_schedule.evaluate_tick(build_schedule_context())
    [request] = data.run_requests
    assert defs.resolve_job_def(retrain_schedule.job_name).tags.items() >= ALL_VARIANTS.items()
    assert request.run_key is None


def test_run_failure_summary_names_the_step_and_the_error(tmp_path, capfd):
    resources = {
        "store": StoreResource(url=str(tmp_path / "store")),
        "profile": ProfileResource(name="tiny", overrides=["data.val.kind=folder", f"data.val.url={tmp_path}/nope"]),
    }
    instance = DagsterInstance.ephemeral()
    result = materialize([image_shards], resources=resources, instance=instance, raise_on_error=False)
    assert not result.success
    run = instance.get_run_by_id(result.run_id)
    [failure] = [e.dagster_event for e in instance.all_logs(result.run_id, of_type=DagsterEventType.RUN_FAILURE)]
    context = build_run_status_sensor_context(
        sensor_name="run_failure_summary", dagster_event=failure, dagster_instance=instance, dagster_run=run
    ).for_run_failure()
    capfd.readouterr()
    run_failure_summary(context)
    text = capfd.readouterr().err
    assert f"run {result.run_id} of job __ephemeral_asset_job__ failed" in text
    assert "step image_shards: FileNotFoundError: folder source: no 'val' folder under" in text
    assert "resumes from its last store checkpoint" in text


@pytest.mark.s3
def test_sensor_watches_an_s3_prefix(tmp_path, fashion_mnist, s3_endpoint):
    """The same sensor on a class-folder tree under an S3 prefix: one request per new listing."""
    import s3fs

    local = tmp_path / "incoming"
    _write_pngs(local, fashion_mnist, "train", 3)
    _write_pngs(local, fashion_mnist, "val", 1)
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}, use_listings_cache=False)
    prefix = f"prologue-test/incoming-{tmp_path.name}"
    fs.put(str(local) + "/", prefix, recursive=True)
    url = f"s3://{prefix}"
    overrides = [f"data.{s}.{k}" for s in ("train", "val") for k in ("kind=folder", f"url={url}")]
    resources = {"store": StoreResource(url=str(tmp_path / "store")),
                 "profile": ProfileResource(name="tiny", overrides=overrides)}

    first = new_images_sensor.evaluate_tick(build_sensor_context(resources=resources))
    [request] = first.run_requests  # nothing sharded yet: the data present is new to the store
    assert request.run_key == f"listing-{first.cursor}"
    same = new_images_sensor.evaluate_tick(build_sensor_context(resources=resources, cursor=first.cursor))
    assert same.run_requests == [] and "unchanged" in same.skip_message
    png = next(local.rglob("*.png"))
    fs.put(str(png), f"{prefix}/train/class0/arrived-later.png")
    later = new_images_sensor.evaluate_tick(build_sensor_context(resources=resources, cursor=first.cursor))
    [request] = later.run_requests
    assert later.cursor != first.cursor and request.run_key == f"listing-{later.cursor}"
