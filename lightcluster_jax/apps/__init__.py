"""Applications on top of the runner: the `lightcluster` CLI, the demo, evaluation, pictures."""
