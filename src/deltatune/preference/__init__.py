"""Preference tuning (task: preference): learning from pairs of answers, one chosen and one rejected.

losses.py: the losses (DPO, IPO, SimPO, ORPO) as pure functions of per-answer log-probabilities, their
registry (`LOSSES`) and the metrics a trainer logs. docs/preference.md is the user's page.
"""
