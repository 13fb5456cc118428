"""Dagster resources: which object store and which experiment profile the assets use."""

from __future__ import annotations

import dataclasses
import os
import typing

from dagster import AssetKey, Config, ConfigurableResource, DagsterInstance, StaticPartitionsDefinition
from pydantic import Field, create_model

from modeling.config import ConfigError, field_docs, merge, parse_overrides, to_dict
from pipelines.plan import Listing, Plan
from pipelines.profiles import Profile, load_profile
from pipelines.store import Store

LISTING = "listing"  # image_shards metadata: the source listing its shards were made from


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


def _location_profile_name() -> str:
    return os.environ.get("PROLOGUE_PROFILE", "fashion32")


# The concurrency pool of the assets that hold an accelerator (training, export, sampling): its limit
# (deploy/dagster.yaml, the Helm values' `concurrency` block) holds for every launch path.
ACCELERATOR_POOL = "accelerator"

# The variant partitions of every variant asset: the variants of the code location's profile. A run
# whose profile lists other variants fails before any work (see `run_plan`).
variant_partitions = StaticPartitionsDefinition(default_profile().variants)


# Profile fields that are not settings of a run: what the profile is, and its variants (the partitions)
NOT_RUN_SETTINGS = ("name", "version", "description", "variants")


def settings_model(cls: type, value: object, path: str = "") -> type[Config]:
    """A Dagster config class generated from profile dataclass `cls`: one typed field per dataclass
    field, its docstring as description and its value in `value` (the code location's profile) as
    default. The Launchpad shows this schema and rejects an unknown field or a wrongly typed value
    before the run starts."""
    hints, docs, fields = typing.get_type_hints(cls), field_docs(cls), {}
    for f in dataclasses.fields(cls):
        if not path and f.name in NOT_RUN_SETTINGS:
            continue
        tp, default, doc = hints[f.name], getattr(value, f.name), docs.get(f.name, "")
        if dataclasses.is_dataclass(tp):
            sub = settings_model(tp, default, f"{path}{f.name}.")
            fields[f.name] = (sub, Field(default_factory=sub, description=doc))
        else:
            fields[f.name] = (tp, Field(default=default, description=doc))
    name = "".join(part.title().replace("_", "") for part in path.split(".")) or "Profile"
    return create_model(f"{name}Settings", __base__=Config, __doc__=cls.__doc__, **fields)


def changed(settings: dict, defaults: dict) -> dict:
    """The entries of `settings` that differ from `defaults`, nested as they are."""
    out = {}
    for k, v in settings.items():
        if isinstance(v, dict):
            if sub := changed(v, defaults[k]):
                out[k] = sub
        elif v != defaults[k]:
            out[k] = v
    return out


# The typed run configuration of the profile resource: every setting of the code location's profile
ProfileSettings = settings_model(type(default_profile()), default_profile())


class ProfileResource(ConfigurableResource):
    """The experiment profile (see pipelines/profiles.py): its typed settings, with optional overrides."""

    name: str = Field(default="", description="Profile name or JSON path; empty: $PROLOGUE_PROFILE or fashion32.")
    settings: ProfileSettings = Field(  # type: ignore[valid-type]
        default_factory=ProfileSettings,
        description="Every field of the code location's profile, typed, with its value as default; the fields "
        "set to another value override the profile. Values are validated when the run starts, before any work.",
    )
    overrides: list[str] = Field(default=[], description="Dotted FIELD=VALUE overrides applied after `settings`, "
                                 "e.g. data.workers=4 (for scripts; the Launchpad has `settings`).")

    def profile(self) -> Profile:
        """The run's profile; its variants must be the code location's partitions."""
        typed = changed(self.settings.model_dump(), to_dict(default_profile()))
        profile = load_profile(self.name or _location_profile_name(), merge(typed, parse_overrides(self.overrides)))
        partitions = variant_partitions.get_partition_keys()
        if sorted(profile.variants) != sorted(partitions):
            raise ConfigError(
                f"variants: profile {profile.name!r} has variants {profile.variants}, but this code location's "
                f"partitions are {partitions} (the variants of PROLOGUE_PROFILE={_location_profile_name()}); "
                f"start the code location with PROLOGUE_PROFILE={profile.name} (make ui PROFILE={profile.name})"
            )
        return profile


def recorded_listing(instance: DagsterInstance, profile: Profile) -> Listing | None:
    """The source listing of the latest image_shards materialisation, if it is of this profile's source."""
    event = instance.get_latest_materialization_event(AssetKey("image_shards"))
    if event is None or event.asset_materialization is None:
        return None
    value = event.asset_materialization.metadata.get(LISTING)
    if value is None:
        return None
    listing = Listing.from_dict(value.value)
    return listing if listing.matches(profile.data) else None


def run_plan(
    instance: DagsterInstance, profile: ProfileResource, store: StoreResource, *, relist: bool = False
) -> Plan:
    """The plan of this run: over the listing image_shards recorded (so a run lists the source once,
    in image_shards), or over a fresh listing when there is none or `relist` (image_shards itself)."""
    prof, st = profile.profile(), store.store()
    listing = None if relist else recorded_listing(instance, prof)
    return Plan(prof, st, listing) if listing is not None else Plan.from_listing(prof, st)
