"""Dagster resources: which object store and which experiment profile the assets use."""

from __future__ import annotations

import os

from dagster import ConfigurableResource
from pydantic import Field

from pipelines.profiles import Profile, load_profile
from pipelines.store import Store


class StoreResource(ConfigurableResource):
    """The object store every asset reads from and writes to."""

    url: str = Field(default="", description="Store URL; empty: $PROLOGUE_STORE, else ./store of the project.")
    endpoint_url: str = Field(default="", description="S3 endpoint (MinIO, Ceph, ...); empty: AWS_ENDPOINT_URL.")
    region: str = Field(default="", description="S3 region; empty: the AWS environment/config.")
    access_key_id: str = Field(default="", description="S3 key; empty: AWS_ACCESS_KEY_ID / AWS config.")
    secret_access_key: str = Field(default="", description="S3 secret (use EnvVar); empty: AWS environment.")

    def store(self) -> Store:
        options: dict = {}
        if self.access_key_id:
            options["key"] = self.access_key_id
        if self.secret_access_key:
            options["secret"] = self.secret_access_key
        client_kwargs = {}
        if self.endpoint_url:
            client_kwargs["endpoint_url"] = self.endpoint_url
        if self.region:
            client_kwargs["region_name"] = self.region
        if client_kwargs:
            options["client_kwargs"] = client_kwargs
        return Store(self.url or None, options)


def default_profile() -> Profile:
    """The profile the code location is built for ($PROLOGUE_PROFILE, else fashion32): its variants
    are the partitions, its operations section sets the schedule and sensor."""
    return load_profile(os.environ.get("PROLOGUE_PROFILE", "fashion32"))


class ProfileResource(ConfigurableResource):
    """The experiment profile (see pipelines/profiles.py) with optional field overrides."""

    name: str = Field(default="", description="Profile name or JSON path; empty: $PROLOGUE_PROFILE or fashion32.")
    overrides: list[str] = Field(default=[], description="Dotted FIELD=VALUE overrides, e.g. data.workers=4.")

    def profile(self) -> Profile:
        return load_profile(self.name or os.environ.get("PROLOGUE_PROFILE", "fashion32"), list(self.overrides))
