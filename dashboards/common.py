"""What the dashboards share: links between them, the rate interval, value maps."""

from __future__ import annotations

from epwatch.dashboards.builder import thresholds

NODE_LINK = (
    "/d/epwatch-node/epwatch-node?var-node=${__value.raw}"
    "&${datasource:queryparam}&${__url_time_range}"
)
EP_GROUP_LINK = (
    "/d/epwatch-ep-group/epwatch-ep-group?var-ep_group=${__value.raw}"
    "&${datasource:queryparam}&${__url_time_range}"
)
RI = "$__rate_interval"

LINK_STATE = {"0": ("down", "red"), "1": ("up", "green")}
ACTIVE = {"0": ("-", "transparent"), "1": ("active", "red")}
RATIO_STEPS = thresholds((None, "green"), (1.2, "orange"), (1.5, "red"))
