"""`make demo`: materialise every asset of the code location on the default profile.

Runs against the persistent instance in $DAGSTER_HOME, so the runs, metadata and preview images
show up afterwards in the UI (`make ui`). Already-materialised artefacts are reused at once.
"""

from __future__ import annotations

import os
import sys

from dagster import DagsterInstance, materialize
from dagster._core.definitions.observe import observe  # observing source assets has no public API

from assets.data import image_shards, raw_images, split_partitions
from assets.definitions import defs


def main() -> int:
    instance = DagsterInstance.get()
    resources = defs.resources
    profile = resources["profile"].profile()
    print(f"==> profile {profile.name}@{profile.version}: {profile.description}")
    print(f"==> store {resources['store'].store().url}")
    if not observe([raw_images], instance=instance, resources=resources).success:
        print("error: observing raw_images failed", file=sys.stderr)
        return 1
    for split in split_partitions.get_partition_keys():
        result = materialize([image_shards], partition_key=split, instance=instance, resources=resources)
        if not result.success:
            print(f"error: image_shards[{split}] failed", file=sys.stderr)
            return 1
        for mat in result.get_asset_materialization_events():
            md = mat.materialization.metadata
            print(f"image_shards[{split}]: {md['samples'].value} images, {md['shards'].value} shards, "
                  f"{md['corrupt_skipped'].value} corrupt skipped -> {md['uri'].value}")
    print(f"\nDagster instance: {os.environ.get('DAGSTER_HOME')}")
    print("Open the UI with `make ui` and browse http://127.0.0.1:3000 (Assets -> image_shards).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
