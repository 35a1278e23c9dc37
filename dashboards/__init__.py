"""epwatch alert rules (prometheus/) and Grafana dashboards generated from code (grafana/)."""
