# The two commands of the README: `make demo` (the main job) and `make test`.
VENV ?= .venv
export HF_HUB_OFFLINE = 1
export PYOPENGL_PLATFORM ?= egl

.PHONY: setup demo test test-all
setup:
	@bash scripts/bootstrap.sh

demo: setup
	$(VENV)/bin/hi3d demo --out outputs/demo

test: setup
	@bash scripts/run_tests.sh $(ARGS)

test-all: setup
	@bash scripts/run_tests.sh -m "" $(ARGS)
