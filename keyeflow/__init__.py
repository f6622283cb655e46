"""keyeflow: a workflow-DAG data-and-training platform for Keye-VL-1.5-style video LLMs."""

__version__ = "0.1.0"
