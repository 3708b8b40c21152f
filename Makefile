# The README's two commands: `make demo` (main job) and `make test`.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-done

.PHONY: setup test test-slow demo clean-venv

setup: $(STAMP)

$(STAMP): requirements.lock setup.cfg pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $@

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

demo: setup
	$(VENV)/bin/s3prl-ekd demo $(if $(FULL),--full,)

clean-venv:
	rm -rf $(VENV)
