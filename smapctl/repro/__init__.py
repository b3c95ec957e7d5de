"""Reproductions of the paper's claims at scales this machine can run (`smapctl reproduce ...`).

* `mini.py`: the "mini scale" reproduction (issue 7) of tables 2-3 and figures 1, 4, 5 on the embedded
  `digits` set, plus the tail-dropping schedule study (issue 11); writes recipes/mini/RESULTS.md.
* `runs.py`: trains (or reuses) the tokenizers and generators it needs, one cached run folder each.
* `measure.py`: the measurements (prefix rate-quality curves, class swaps, generation metrics).
* `schedules.py`: the issue-11 schedules, their prefix-length distributions and the comparison rule.
* `report.py`: mean +- spread over seeds, verdicts computed from the numbers, markdown tables.
* `plots.py`: the PNG curves and image panels.
"""
