"""The EP-group dashboard: γ, skew, the Hockney fits, flagged ranks and their evidence."""

from __future__ import annotations

from epwatch.dashboards.builder import (
    Dashboard,
    Target,
    alerts_annotation,
    dashed,
    datasource_variable,
    heatmap,
    link_column,
    query_variable,
    right_axis,
    stat,
    state_timeline,
    table,
    thresholds,
    timeseries,
)
from epwatch.dashboards.common import NODE_LINK, RATIO_STEPS, RI


def ep_group() -> Dashboard:
    """One EP group: who straggles and why, γ and skew, L and BW_eff, ingest health."""
    g = 'ep_group="$ep_group"'
    gn = 'ep_group="$ep_group", node=~"$node"'
    n = 'node=~"$node"'
    collector = f"on (instance) group by (instance) (epwatch_group_world_size{{{g}}})"
    board = Dashboard(
        uid="epwatch-ep-group",
        title="epwatch / EP group",
        description="One EP group: current stragglers with cause and evidence, per-rank "
        "slowdown, γ, routing skew, the Hockney fit (L, BW_eff, regime) and ingest health.",
        variables=[
            datasource_variable(),
            query_variable(
                "ep_group", "EP group", "label_values(epwatch_group_world_size, ep_group)"
            ),
            query_variable(
                "node",
                "Node",
                'label_values(epwatch_rank_compute_slowdown_ratio{ep_group="$ep_group"}, node)',
                multi=True,
                include_all=True,
            ),
        ],
        annotations=[alerts_annotation('ep_group="$ep_group"')],
    )
    board.row("Summary").add(
        stat("Ranks P", Target(f"max(epwatch_group_world_size{{{g}}})")),
        stat(
            "Forward passes / s",
            Target(f"sum(ep_group:epwatch_group_steps:rate1m{{{g}}})"),
            decimals=1,
        ),
        stat(
            "γ median",
            Target(f'max(epwatch_straggler_factor_ratio{{{g}, quantile="0.5"}})'),
            decimals=2,
            steps=RATIO_STEPS,
        ),
        stat(
            "γ p99",
            Target(f'max(epwatch_straggler_factor_ratio{{{g}, quantile="0.99"}})'),
            decimals=2,
            steps=RATIO_STEPS,
        ),
        stat(
            "Routing skew median",
            Target(f'max(epwatch_routing_skew_ratio{{{g}, quantile="0.5"}})'),
            decimals=2,
            steps=thresholds((None, "green"), (1.3, "orange"), (1.5, "red")),
        ),
        stat(
            "Balancedness",
            Target(f"max(epwatch_routing_balancedness_ratio{{{g}}})"),
            description="1 / median skew (vLLM's mean/max load).",
            decimals=2,
            steps=thresholds((None, "red"), (0.67, "orange"), (0.8, "green")),
        ),
        stat(
            "Lost per forward pass",
            Target(f"max(epwatch_straggler_seconds_per_step{{{g}}})"),
            description="Σ over layers of (max_r x_r - mean_r x_r).",
            unit="s",
        ),
        stat(
            "Stalled for",
            Target(f"max(epwatch_group_stalled_seconds{{{g}}})"),
            description="Seconds since the group last completed a collective (0 while moving).",
            unit="s",
            steps=thresholds((None, "green"), (10, "orange"), (60, "red")),
        ),
    )
    board.row("Stragglers").add(
        table(
            "Current stragglers",
            # Hung ranks have their own metric (seconds stalled, not a slowdown); one
            # table shows both, the hang's value in seconds.
            Target(
                f"epwatch_straggler{{{gn}}} or label_replace("
                f'epwatch_rank_stalled_seconds{{{gn}}}, "cause", "hang", "", "")'
            ),
            Target(f"epwatch_straggler_first_step{{{gn}}}"),
            columns={
                "rank": "rank",
                "node": "node",
                "cause": "cause",
                "Value #A": "slowdown x (hang: s stalled)",
                "Value #B": "first step",
            },
            hide=("Time", "__name__", "job", "instance", "ep_group"),
            description="Ranks flagged now: cause compute, network, routing (slowdown "
            "relative to the group) or hang (seconds the group has been stalled). The node "
            "links to its node dashboard.",
            overrides=[link_column("node", "Node dashboard", NODE_LINK)],
        ),
        table(
            "Evidence",
            Target(f"epwatch_straggler_evidence{{{gn}}}"),
            columns={"rank": "rank", "node": "node", "cause": "cause", "evidence": "evidence"},
            hide=("Time", "__name__", "job", "instance", "ep_group", "Value"),
            description="Up to 4 lines per straggler: what the diagnosis rests on.",
        ),
    )
    board.row("Per-rank slowdown").add(
        heatmap(
            "Per-token compute slowdown by rank",
            Target(f"epwatch_rank_compute_slowdown_ratio{{{gn}}}", "{{rank}}"),
            description="Rank's median per-token expert compute over the group median: "
            "a slow GPU is a hot row here.",
            min=1,
        ),
        heatmap(
            "Routed load by rank",
            Target(f"epwatch_rank_load_ratio{{{gn}}}", "{{rank}}"),
            description="Routed tokens over the mean: a hot expert is a hot row here.",
            scheme="Blues",
            width=12,
        ),
        heatmap(
            "Arrival lag by rank",
            Target(f"epwatch_rank_arrival_lag_seconds{{{gn}}}", "{{rank}}"),
            description="How late each rank arrives at dispatch/combine: network and "
            "compute stragglers both arrive late.",
            unit="s",
            scheme="Reds",
            width=12,
        ),
    )
    board.row("Straggler factor and routing").add(
        timeseries(
            "Straggler factor γ",
            Target(f'max(epwatch_straggler_factor_ratio{{{g}, quantile="0.5"}})', "median"),
            Target(f'max(epwatch_straggler_factor_ratio{{{g}, quantile="0.99"}})', "p99"),
            decimals=2,
            threshold=1.2,
            width=8,
        ),
        timeseries(
            "Routing skew and balancedness",
            Target(f'max(epwatch_routing_skew_ratio{{{g}, quantile="0.5"}})', "skew median"),
            Target(f'max(epwatch_routing_skew_ratio{{{g}, quantile="1"}})', "skew max"),
            Target(f"max(epwatch_routing_balancedness_ratio{{{g}}})", "balancedness"),
            decimals=2,
            width=8,
            overrides=[right_axis("C", "percentunit")],
        ),
        timeseries(
            "Time lost to stragglers",
            Target(f"max(epwatch_straggler_seconds_per_step{{{g}}})", "per forward pass"),
            Target(f"max(ep_group:epwatch_straggler_time:ratio{{{g}}})", "share of time"),
            unit="s",
            width=8,
            overrides=[right_axis("B", "percentunit")],
        ),
        timeseries(
            "Slowest 10 ranks (per-token compute)",
            Target(
                f"topk(10, epwatch_rank_compute_slowdown_ratio{{{gn}}})",
                "rank {{rank}} ({{node}})",
            ),
            decimals=2,
            legend_table=True,
        ),
        timeseries(
            "Hottest 10 ranks (routed load)",
            Target(f"topk(10, epwatch_rank_load_ratio{{{gn}}})", "rank {{rank}} ({{node}})"),
            decimals=2,
            legend_table=True,
        ),
    )
    board.row("Communication: Hockney fit t = L + V / BW_eff per phase").add(
        timeseries(
            "Fixed latency L",
            Target(f"max by (phase) (epwatch_collective_latency_seconds{{{g}}})", "{{phase}}"),
            unit="s",
            width=8,
        ),
        timeseries(
            "Effective bandwidth BW_eff",
            Target(
                f"max by (phase) (epwatch_collective_bandwidth_bytes_per_second{{{g}}})",
                "{{phase}}",
            ),
            Target(
                "max by (phase) (ep_group_phase:epwatch_collective_bandwidth_bytes_per_second"
                f":median1h{{{g}}})",
                "{{phase}} 1h median",
            ),
            description="EPBandwidthDegraded fires below 70% of the 1h median (dashed).",
            unit="Bps",
            width=8,
            overrides=[dashed("B")],
        ),
        timeseries(
            "Transfer time t_xfer (median)",
            Target(f"max by (phase) (epwatch_collective_transfer_seconds{{{g}}})", "{{phase}}"),
            description="min_r d_r: the collective's duration for the last arriver.",
            unit="s",
            width=8,
        ),
        timeseries(
            "Per-peer message vs crossover n½",
            Target(
                f"max by (phase) (epwatch_collective_per_peer_message_bytes{{{g}}})",
                "{{phase}} per-peer message",
            ),
            Target(
                f"max by (phase) (epwatch_collective_crossover_bytes{{{g}}})",
                "{{phase}} crossover n½",
            ),
            description="Below the crossover L·BW_eff the fixed latency dominates: "
            "raise the batch (EPLatencyBound).",
            unit="bytes",
            width=8,
            overrides=[dashed("B")],
        ),
        state_timeline(
            "Regime",
            Target(f"max by (phase) (epwatch_collective_latency_bound{{{g}}})", "{{phase}}"),
            {"0": ("bandwidth-bound", "green"), "1": ("latency-bound", "orange")},
            width=8,
        ),
        timeseries(
            "Fit quality",
            Target(f"max by (phase) (epwatch_collective_fit_r2_ratio{{{g}}})", "{{phase}} R²"),
            Target(f"max by (phase) (epwatch_collective_fit_points{{{g}}})", "{{phase}} points"),
            description="Alerts trust the fit only with R² ≥ 0.8 (latency) / 0.5 (bandwidth).",
            decimals=2,
            width=8,
            overrides=[right_axis("B", "short")],
        ),
    )
    board.row("Ingest health").add(
        timeseries(
            "Hook records ingested",
            Target(f"sum(ep_group:epwatch_ingest_records:rate1m{{{g}}})", "records/s"),
            Target(f"sum(ep_group:epwatch_group_steps:rate1m{{{g}}})", "steps/s"),
            unit="cps",
            width=8,
            overrides=[right_axis("B", "short")],
        ),
        timeseries(
            "Collector messages",
            Target(f"sum(rate(epwatch_ingest_batches_total[{RI}]) and {collector})", "accepted"),
            Target(
                f"sum(rate(epwatch_ingest_duplicates_total[{RI}]) and {collector})",
                "duplicates",
            ),
            Target(
                f"sum by (reason) (rate(epwatch_ingest_rejected_total[{RI}]) and {collector})",
                "rejected {{reason}}",
            ),
            description="Messages of the collector(s) serving this group.",
            unit="cps",
            width=8,
        ),
        timeseries(
            "Agents",
            Target(f"sum(epwatch_agents_connected and {collector})", "connected"),
            Target(f"sum by (node) (epwatch_agent_spool_records{{{n}}})", "{{node}} spool"),
            width=8,
            overrides=[right_axis("B", "short")],
        ),
        timeseries(
            "Records dropped",
            Target(
                f"sum by (node) (rate(epwatch_agent_hook_records_dropped_total{{{n}}}[{RI}]))",
                "{{node}} hooks",
            ),
            Target(
                f"sum by (node) (rate(epwatch_agent_records_dropped_total{{{n}}}[{RI}]))",
                "{{node}} agent spool",
            ),
            unit="cps",
            width=8,
        ),
        timeseries(
            "Estimator pass duration",
            Target(f"max(epwatch_estimator_duration_seconds and {collector})", "estimators"),
            unit="s",
            width=8,
        ),
        timeseries(
            "Newest finalised step",
            Target(f"max(epwatch_group_last_step{{{g}}})", "step"),
            width=8,
        ),
    )
    return board
