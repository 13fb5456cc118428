"""The Dagster layer: assets, checks, jobs, schedules and sensors over the steps in `pipelines/`."""

import warnings

from dagster import BetaWarning

# observable source assets and single-run backfill policies are marked beta in Dagster 1.13; we
# pin the version, so the warning on every import says nothing new
warnings.filterwarnings("ignore", category=BetaWarning)
