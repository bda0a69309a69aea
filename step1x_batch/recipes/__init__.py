"""Jobs built on the edit job: each turns its own config section into edit rows, runs the edit
job's graph, and makes something of the result (training pairs, a published catalog night).
See docs/architecture.md."""
