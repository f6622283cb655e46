"""The recipe's steps as cached, resumable units tracked in MLflow: each trains or merges one checkpoint
(or builds the data a stage needs) through the domain packages, and records its run, inputs and parents
through `keyeflow.lineage`. No Prefect here: `keyeflow.tasks` wraps each step in a task."""
