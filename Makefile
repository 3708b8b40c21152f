# The README's two commands: `make demo` (main job) and `make test`.
# `make test-current` runs the suite on the second supported stack (torch 2.11 + espnet-s3prl).
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-done
CURRENT := .venv-current
CURRENT_STAMP := $(CURRENT)/.setup-done

.PHONY: setup setup-current test test-current test-slow demo clean-venv

setup: $(STAMP)

$(STAMP): requirements.lock setup.cfg setup.py pyproject.toml scripts/setup.sh
	bash scripts/setup.sh default
	touch $@

setup-current: $(CURRENT_STAMP)

$(CURRENT_STAMP): requirements-current.lock setup.cfg setup.py pyproject.toml scripts/setup.sh
	bash scripts/setup.sh current
	touch $@

test: setup
	$(PY) -m pytest -q

test-current: setup-current
	$(CURRENT)/bin/python -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

demo: setup
	$(VENV)/bin/s3prl-ekd demo $(if $(FULL),--full,) $(if $(COMPARE),--compare,) $(if $(CONVERGE),--converge,)

clean-venv:
	rm -rf $(VENV) $(CURRENT)
