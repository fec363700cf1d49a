"""Labs: the lecture notes' claims as experiments. `dlrun lab=<name>` runs a lab's sweep, judges its claim
(held / did not hold / inconclusive) and writes a report with figures; `dlrun lab=list` lists the labs.

A lab is one YAML file in conf/lab/ (read by spec.py); verdict.py holds the rule language, runner.py the
command, report.py the report and figures. docs/labs.md describes every lab.
"""
