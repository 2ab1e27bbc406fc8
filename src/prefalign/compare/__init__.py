"""``prefalign compare``: a grid of methods and options trained on one dataset, scored on one held-out set.

`grid` expands the YAML into resolved runs, `score` measures a model on the held-out data (raw numbers, cached per
run), `table` turns those into the summary rows, `plots` and `page` draw the report, `run` ties them together.
"""
