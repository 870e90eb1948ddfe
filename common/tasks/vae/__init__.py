"""The VAE task plug-in: ``config`` (its ``[vae]`` table and SPEC, no torch) and ``task``
(the model and the task; its docstring has the objective and the fairness metrics)."""
