# The two commands of the README. Both do all set-up first (scripts/setup.sh is idempotent).
.PHONY: setup run test bench

setup:
	bash scripts/setup.sh

run: setup
	.venv/bin/keyeflow run

test: setup
	.venv/bin/ruff check keyeflow tests benchmarks scripts
	.venv/bin/ruff format --check keyeflow tests benchmarks scripts
	.venv/bin/python -m pytest -q

bench: setup
	.venv/bin/python benchmarks/bench_slowfast.py
	.venv/bin/python benchmarks/bench_ingest.py
	.venv/bin/python benchmarks/bench_mixture.py
	.venv/bin/python benchmarks/bench_balance.py
	.venv/bin/python benchmarks/bench_trainer.py
