"""Orchestration cores for `replicatord`: settings, the per-machine state machine, health and metrics,
the cycle scheduler, quiesce providers, recovery plans and jobs. Each is plain and testable on its own;
the daemon wires them to trackers, replicators and targets.
"""
from .health import Health, HealthReport, MachineStats, render_prometheus
from .jobs import Job, JobRegistry, JobState, format_progress
from .plans import ManualAction, PlanGroup, PlanResult, PlanRun, RecoveryPlan, ScriptAction
from .quiesce import QemuGuestAgentQuiesce, QuiesceFailed, QuiesceProvider, ScriptQuiesce, provider_from_settings
from .scheduler import FakeClock, Scheduler, SystemClock, Tick, next_time_of_day, window_opens, within_window
from .settings import Config, ConfigError, Machine, Protection, load_config, parse_config
from .states import Event, MachineState, ReplicationState, StateError

__all__ = [
    "Config", "ConfigError", "Event", "FakeClock", "Health", "HealthReport", "Job", "JobRegistry", "JobState",
    "Machine", "MachineState", "MachineStats", "ManualAction", "PlanGroup", "PlanResult", "PlanRun",
    "Protection", "QemuGuestAgentQuiesce", "QuiesceFailed", "QuiesceProvider", "RecoveryPlan",
    "ReplicationState", "Scheduler", "ScriptAction", "ScriptQuiesce", "StateError", "SystemClock", "Tick",
    "format_progress", "load_config", "parse_config", "provider_from_settings", "render_prometheus",
    "next_time_of_day", "window_opens", "within_window",
]
