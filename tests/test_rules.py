"""The alert and recording rules: promtool accepts them and their unit tests pass.

Every alert must have a promtool test where it fires and one where it stays
silent, say what to check first, and read only metrics the contract defines.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.promstack import (
    INSTALL_HINT,
    REPO_ROOT,
    RULES_DIR,
    alertmanager_binary,
    contract_metric_names,
    find_binary,
    metric_names_in,
    promtool_binary,
    rule_files,
)

RULE_FILES = rule_files()
TEST_FILES = sorted(RULES_DIR.glob("*_test.yml"))
SEVERITIES = {"critical", "warning", "info"}


def _test_file_for(rule_file: Path) -> Path:
    """ep.rules.yml is tested by ep_test.yml beside it."""
    return rule_file.with_name(rule_file.name.replace(".rules.yml", "_test.yml"))


def _promtool() -> str:
    path = promtool_binary()
    if path is None:
        pytest.skip(f"promtool not found; {INSTALL_HINT}")
    return path


def _run(*args: str, cwd: Path = RULES_DIR) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120)


def _load_yaml(path: Path) -> Any:
    """Parsed YAML; the structural checks skip without pyyaml, promtool's do not."""
    yaml = pytest.importorskip("yaml", reason="pyyaml is a test dependency: pip install pyyaml")
    return yaml.safe_load(path.read_text())


def _rules() -> list[tuple[Path, dict[str, Any]]]:
    out = []
    for path in RULE_FILES:
        for group in _load_yaml(path)["groups"]:
            out.extend((path, rule) for rule in group["rules"])
    return out


def test_rule_files_exist_and_each_has_a_test() -> None:
    assert RULE_FILES, f"no *.rules.yml in {RULES_DIR}"
    for path in RULE_FILES:
        assert _test_file_for(path).exists(), f"{path.name} has no {_test_file_for(path).name}"


@pytest.mark.parametrize("path", RULE_FILES, ids=lambda p: p.name)
def test_promtool_check_rules(path: Path) -> None:
    result = _run(_promtool(), "check", "rules", path.name)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", TEST_FILES, ids=lambda p: p.name)
def test_promtool_test_rules(path: Path) -> None:
    result = _run(_promtool(), "test", "rules", path.name)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_fires_and_stays_silent_in_a_test() -> None:
    """Both directions: a rule that never fires is as useless as one that always does."""
    fires: set[str] = set()
    silent: set[str] = set()
    for path in TEST_FILES:
        for case in _load_yaml(path)["tests"]:
            for check in case.get("alert_rule_test", []):
                (fires if check.get("exp_alerts") else silent).add(check["alertname"])
    alerts = {rule["alert"] for _, rule in _rules() if "alert" in rule}
    assert alerts - fires == set(), "alerts without a firing test"
    assert alerts - silent == set(), "alerts without a silent test"
    assert fires | silent <= alerts, "tests for alerts that do not exist"


def test_alerts_have_severity_summary_and_what_to_check() -> None:
    for path, rule in _rules():
        if "alert" not in rule:
            continue
        name = f"{path.name}:{rule['alert']}"
        assert rule.get("labels", {}).get("severity") in SEVERITIES, name
        annotations = rule.get("annotations", {})
        assert annotations.get("summary"), name
        assert "Check first" in annotations.get("description", ""), name
        assert "for" in rule, f"{name}: say how long the condition must hold"


def test_recording_rule_names_follow_level_metric_operations() -> None:
    for path, rule in _rules():
        if "record" in rule:
            assert re.fullmatch(r"[a-z_]+:[a-z0-9_]+:[a-z0-9_]+", rule["record"]), (
                f"{path.name}: {rule['record']}"
            )


def test_rules_read_only_contract_metrics() -> None:
    """The collector and agent are written elsewhere; the names in docs/contracts.md
    are the only ones they promise."""
    contract = contract_metric_names()
    assert "epwatch_straggler" in contract
    for path, rule in _rules():
        unknown = metric_names_in(rule["expr"]) - contract
        assert not unknown, f"{path.name}: {rule.get('alert') or rule.get('record')}: {unknown}"


def test_deploy_prometheus_config_is_valid() -> None:
    """deploy/prometheus.yml, including the rule files it references."""
    result = _run(_promtool(), "check", "config", "deploy/prometheus.yml", cwd=REPO_ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    for path in RULE_FILES:
        assert path.name in result.stdout, f"deploy/prometheus.yml does not load {path.name}"


def test_deploy_alertmanager_config_is_valid() -> None:
    amtool = find_binary("amtool")
    if amtool is None:
        if alertmanager_binary() is None:
            pytest.skip(f"amtool not found; {INSTALL_HINT}")
        pytest.skip("amtool not found (it ships with prometheus-alertmanager)")
    result = _run(amtool, "check-config", "deploy/alertmanager.yml", cwd=REPO_ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_alertmanager_routes_every_alert() -> None:
    """Each alert reaches a receiver, and critical ones reach the pager."""
    amtool = find_binary("amtool")
    if amtool is None:
        pytest.skip(f"amtool not found; {INSTALL_HINT}")
    for _, rule in _rules():
        if "alert" not in rule:
            continue
        severity = rule["labels"]["severity"]
        result = _run(
            amtool,
            "config",
            "routes",
            "test",
            "--config.file=deploy/alertmanager.yml",
            f"alertname={rule['alert']}",
            f"severity={severity}",
            cwd=REPO_ROOT,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        receiver = result.stdout.strip()
        expected = "epwatch-pager" if severity == "critical" else "epwatch-team"
        assert receiver == expected, f"{rule['alert']} ({severity}) -> {receiver}"
