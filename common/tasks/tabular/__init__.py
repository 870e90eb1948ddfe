"""DP synthetic tables for partner sites, with group fairness by sensitive attributes.

Sites hold one-person-per-row tables (patients, loans, hires). The federation trains a DP
generator of mixed-type rows (:mod:`.model`: a TVAE-style conditional VAE, or the simpler
conditional-marginal model) on them, conditioned on the label and the sensitive attributes
so that any mix of label x group can be drawn, and measures every round the utility
(TSTR), fidelity and fairness of what it generates, with a before/after bias correction
(:mod:`common.metrics.tabular`).

Data (:mod:`common.data.tabular`, :mod:`common.data.tabular_schema`): a CSV and a declared
schema (roles and public domains); identifiers dropped at load; a person key HMAC'd with
the federation key; probable identifiers refused until declared. Privacy and evaluation:
:mod:`.task`.
"""
