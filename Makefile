# The two commands a newcomer needs:  make serve  (the main job)  and  make test.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup serve test
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

serve: setup
	$(PY) -m serving.up $(ARGS)

test: setup
	$(PY) -m pytest -q

# Proves `bentoml containerize` without Docker (root; buildah + podman, installed with apt if missing):
# tiny model -> Bento -> image -> podman run on 127.0.0.1 -> /readyz, /classify, non-root user -> cleanup.
# Not part of `make test`: it downloads torch + CUDA wheels (~7 GB image). Args: --keep-images, --purge.
.PHONY: container-check
container-check: setup
	container/check.sh $(CONTAINER_CHECK_ARGS)
