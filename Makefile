# The two commands of the README quickstart. Each sets itself up (scripts/setup.sh is idempotent).
.PHONY: demo test setup
VENV ?= .venv

setup:
	@./scripts/setup.sh

demo: setup
	$(VENV)/bin/flywheel demo $(DEMO_DIR)

test: setup
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)
