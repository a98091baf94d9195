"""Diagnosis: rules over a run's records that name training failures and say what to try.

Pure Python over plain records (no torch), so it runs on a finished run directory
(``cockpit diagnose``) and live on the records a training loop emits (:class:`LiveDiagnosis`).
"""

from cockpit_cli.diagnosis.engine import diagnose, run_rules
from cockpit_cli.diagnosis.finding import SEVERITIES, Diagnosis, Evidence, Finding, NotChecked
from cockpit_cli.diagnosis.live import LiveDiagnosis
from cockpit_cli.diagnosis.rules import RULES

__all__ = ["RULES", "SEVERITIES", "Diagnosis", "Evidence", "Finding", "LiveDiagnosis", "NotChecked", "diagnose", "run_rules"]
