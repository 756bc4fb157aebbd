"""`camface bench`, one module per job: config (flags and BenchConfig), rows (the pipelines
timed), heads (the gradient outputs' cost), machine (what it ran on), report (the table), and
cli (the command)."""
