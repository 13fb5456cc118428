"""Asset checks: one result per check and run, covering every partition the run materialised."""

from dagster import AssetCheckResult, AssetCheckSeverity, AssetCheckSpec, MetadataValue

from pipelines.checks import codebook_problems, finite_problems, shard_problems, token_problems

__all__ = ["check_result", "codebook_problems", "finite_problems", "shard_problems", "spec", "token_problems"]


def spec(name: str, asset: str, description: str) -> AssetCheckSpec:
    """A blocking check: a failed integrity check stops the assets downstream of it in the run."""
    return AssetCheckSpec(name, asset=asset, blocking=True, description=description)


def check_result(name: str, problems: dict[str, list[str]]) -> AssetCheckResult:
    """Pass when no partition (or split) has a problem; the metadata lists them by partition."""
    failing = {k: v for k, v in problems.items() if v}
    return AssetCheckResult(
        check_name=name,
        passed=not failing,
        severity=AssetCheckSeverity.ERROR,
        metadata={"checked": ", ".join(problems), "problems": MetadataValue.json(failing)},
    )
