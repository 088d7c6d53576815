"""The commands behind `peftlab COMMAND`: what orchestrates runs (sweeps, and the commands a workload's spec
registers, e.g. `distill`) and the thin handlers of the built-in commands. This floor sits above the run service
(`peftlab.train`); nothing below imports it. cli.py imports these modules only when their command runs.
"""
