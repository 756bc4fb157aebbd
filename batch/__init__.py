"""`camface batch`: explain a whole video archive on one machine or a Ray cluster (Ray Data).

inputs.py   INPUT... (files, folders, globs) -> the videos, each with a stable id
cluster.py  join or start Ray; plan the actors from the cluster's resources
stages.py   the Ray Data stages: detect + crop (CPU), graph (GPU-capable), render + encode + rows (CPU)
rows.py     the Parquet rows (one per face per frame) and atomic writes
state.py    one finished-video record per video (resume, summary)
report.py   summary.json, report.md and the per-class mean heatmap PNGs
pipeline.py the driver: builds the dataset, runs it, progress bar, Ctrl-C
cli.py      configure(parser) / main(args)
"""
