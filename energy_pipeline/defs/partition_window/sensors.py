"""The partition window sensor and the webserver client it uses."""

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import dagster as dg
import requests

from energy_pipeline.scheduling import stale_partition_starts

# The name workspace.yaml gives the code location; used when a sensor context carries no origin
# (a sensor evaluated outside the daemon).
LOCATION_NAME = "energy_pipeline"

_FIRST_PARTITION = """
query FirstPartition($assetKey: AssetKeyInput!) {
  assetNodeOrError(assetKey: $assetKey) {
    __typename
    ... on AssetNode { partitionKeyConnection(limit: 1, ascending: true) { results } }
  }
}
"""
_RELOAD = """
mutation Reload($location: String!) {
  reloadRepositoryLocation(repositoryLocationName: $location) {
    __typename
    ... on WorkspaceLocationEntry { loadStatus }
    ... on PythonError { message }
  }
}
"""


class WebserverError(RuntimeError):
    """The webserver answered a GraphQL request with an error."""


class DagsterWebserverResource(dg.ConfigurableResource):
    """The Dagster webserver's GraphQL API, as the partition window sensor needs it."""

    url: str = "http://127.0.0.1:3000"
    timeout_s: float = 10.0
    # A reload answers once the location has loaded again (a new code server imports the code).
    reload_timeout_s: float = 180.0

    def _graphql(
        self, query: str, variables: Mapping[str, Any], timeout_s: float | None = None
    ) -> dict[str, Any]:
        response = requests.post(
            f"{self.url.rstrip('/')}/graphql",
            json={"query": query, "variables": dict(variables)},
            timeout=timeout_s or self.timeout_s,
        )
        response.raise_for_status()
        body = response.json()
        if body.get("errors"):
            raise WebserverError("; ".join(e.get("message", "?") for e in body["errors"]))
        return body["data"]

    def first_partition_key(self, asset_key: dg.AssetKey) -> str | None:
        """The first partition key the webserver shows for the asset (None: not shown there)."""
        node = self._graphql(_FIRST_PARTITION, {"assetKey": {"path": list(asset_key.path)}})[
            "assetNodeOrError"
        ]
        # partitionKeyConnection pages through the keys; partitionKeysByDimension(startIdx: 0)
        # would list all of them (a zero startIdx is taken as no range).
        if node["__typename"] != "AssetNode" or not node["partitionKeyConnection"]:
            return None
        keys = node["partitionKeyConnection"]["results"]
        return keys[0] if keys else None

    def reload_location(self, location: str) -> None:
        """Has the webserver load the code location again (as its "Reload" button does)."""
        result = self._graphql(_RELOAD, {"location": location}, self.reload_timeout_s)[
            "reloadRepositoryLocation"
        ]
        if result["__typename"] != "WorkspaceLocationEntry":
            raise WebserverError(
                f"reloading {location} gave {result['__typename']}: {result.get('message', '')}"
            )


def build_partition_window_sensor(
    watched: Mapping[dg.AssetKey, dg.TimeWindowPartitionsDefinition],
    minimum_interval_seconds: int = 300,
) -> dg.SensorDefinition:
    """The sensor reloading the code location in the webserver when the partitions it shows for
    a `watched` asset start before the ones this code (loaded by the daemon within the last
    minute) builds."""
    current = {key.to_user_string(): p.start.astimezone(UTC) for key, p in watched.items()}

    @dg.sensor(
        name="partition_window_sensor",
        minimum_interval_seconds=minimum_interval_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING,
    )
    def partition_window_sensor(
        context: dg.SensorEvaluationContext, dagster_webserver: DagsterWebserverResource
    ) -> dg.SkipReason:
        """Reloads the code location in the webserver once its partition starts have moved (at
        UTC midnight), so the UI's partition window stays as bounded as the daemon's."""
        origin = context.code_location_origin
        location = origin.location_name if origin is not None else LOCATION_NAME
        try:
            shown = {
                key.to_user_string(): _parse(dagster_webserver.first_partition_key(key), p)
                for key, p in watched.items()
            }
        except requests.RequestException as exc:
            # No webserver (a daemon-only deployment) or one restarting: it loads fresh code when
            # it comes back, so there is nothing to repair.
            return dg.SkipReason(
                f"webserver at {dagster_webserver.url} not reachable ({type(exc).__name__})"
            )
        stale = stale_partition_starts(shown, current)
        if not stale:
            return dg.SkipReason("the webserver shows the current partition window")
        detail = ", ".join(f"{name} from {shown[name]:%Y-%m-%d}" for name in stale)
        dagster_webserver.reload_location(location)
        context.log.info(f"reloaded {location} in the webserver: it showed {detail}")
        return dg.SkipReason(f"reloaded {location} in the webserver ({detail})")

    return partition_window_sensor


def _parse(key: str | None, partitions_def: dg.TimeWindowPartitionsDefinition) -> datetime | None:
    if key is None:
        return None
    return partitions_def.time_window_for_partition_key(key).start.astimezone(UTC)
